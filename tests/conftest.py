"""Shared pytest wiring for the lbp-cds test suite."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from lbp_cds import create_app
from lbp_cds.config import Settings

pytest_plugins = ["tests.fhir_server"]

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "tests" / "knowledge_mini"
SHARED = ROOT.parent / "shared"
NOW = datetime(2026, 3, 2, 10, 0, tzinfo=timezone.utc)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests of ../shared data need that folder; outside CI they may be deselected, never in CI."""
    if SHARED.is_dir():
        return
    if os.environ.get("CI"):
        raise pytest.UsageError(f"CI must have {SHARED}: the tests of shared data must run")
    skip = pytest.mark.skip(reason=f"{SHARED} is absent (checkout without ../shared)")
    for item in items:
        if "shared" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Dev settings over the mini knowledge pack and a fresh SQLite file."""
    return Settings(dev=True, database_url=f"sqlite:///{tmp_path}/store.sqlite3",
                    knowledge_dir=str(MINI))


@pytest.fixture
def make_app(tmp_path: Path) -> Callable[..., Flask]:
    """Build an app with settings overrides (fresh store per test)."""

    def build(clock: Callable[[], datetime] = lambda: NOW, **overrides: Any) -> Flask:
        values: dict[str, Any] = {"dev": True,
                                  "database_url": f"sqlite:///{tmp_path}/store.sqlite3",
                                  "knowledge_dir": str(MINI)}
        values.update(overrides)
        app = create_app(Settings(**values), clock=clock)
        app.config["TESTING"] = True
        return app

    return build


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Iterator[Flask]:
    """The app over the mini pack."""
    application = make_app()
    yield application
    application.extensions["lbp_cds"].store.engine.dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client of the mini-pack app."""
    return app.test_client()
