"""Shared pytest wiring for the lbp-cds test suite."""

from __future__ import annotations

import contextlib
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

pytest_plugins = ["tests.fhir_server", "tests.service_server", "tests.medplum_server",
                  "tests.browser", "tests.smart_ehr"]

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "tests" / "knowledge_mini"
SHARED = ROOT.parent / "shared"
NOW = datetime(2026, 3, 2, 10, 0, tzinfo=timezone.utc)
# The sandbox suite talks to a FHIR server on the internet: collected only when one is named.
collect_ignore = [] if os.environ.get("LBP_CDS_SANDBOX_FHIR_URL") else ["test_sandbox.py"]


def postgres_url() -> str:
    """The PostgreSQL database the store tests use (``LBP_CDS_TEST_POSTGRES_URL``; ``make test``
    and ``.ci/run`` set it). Its absence fails the test: it is never a reason to skip."""
    url = os.environ.get("LBP_CDS_TEST_POSTGRES_URL", "")
    if not url:
        if os.environ.get("CI"):
            raise AssertionError("CI must set LBP_CDS_TEST_POSTGRES_URL")
        pytest.fail("set LBP_CDS_TEST_POSTGRES_URL (make test sets it) to run the tests against "
                    "PostgreSQL")
    return url


@contextlib.contextmanager
def postgres_schema(name: str) -> Iterator[str]:
    """A URL of the test database whose ``search_path`` is the schema ``name``, created empty
    and dropped afterwards: a suite there cannot meet the tables of another."""
    from sqlalchemy import create_engine, make_url, text

    base = make_url(postgres_url())
    admin = create_engine(base)
    try:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))
            conn.execute(text(f"CREATE SCHEMA {name}"))
        url = base.update_query_dict({"options": f"-csearch_path={name}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))
        admin.dispose()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests of ../shared data need that folder: in a checkout without it they are deselected
    and reported as not run; in CI its absence is an error."""
    if SHARED.is_dir():
        return
    if os.environ.get("CI"):
        raise pytest.UsageError(f"CI must have {SHARED}: the tests of shared data must run")
    dropped = [item for item in items if "shared" in item.keywords]
    if dropped:
        items[:] = [item for item in items if "shared" not in item.keywords]
        config.hook.pytest_deselected(items=dropped)
        config.stash[_NOT_RUN] = len(dropped)


_NOT_RUN = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Say plainly that the tests of ../shared did not run."""
    count = config.stash.get(_NOT_RUN, 0)
    if count:
        terminalreporter.write_line(
            f"NOT RUN: {count} tests of {SHARED} (folder absent in this checkout)", red=True)


def validate_responses(app: Flask) -> None:
    """Every hook answer a test sees is checked against our CDS Hooks response schema."""
    from flask import request

    from lbp_cds.hooks import response_issues

    @app.after_request
    def _check(response: Any) -> Any:
        if (request.method == "POST" and request.path.startswith("/cds-services/")
                and not request.path.endswith("/feedback") and response.status_code == 200):
            issues = response_issues(response.get_json())
            assert issues == [], f"invalid CDS Hooks response: {issues}"
        return response


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
        validate_responses(app)
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


@pytest.fixture(scope="module")
def real_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    """An app with the bundled knowledge pack and a settable clock (``app.config["clock"]
    ["now"]``), whose every hook answer is checked against the response schema."""
    tmp = tmp_path_factory.mktemp("real-app")
    clock: dict[str, datetime] = {}
    app = create_app(Settings(dev=True, database_url=f"sqlite:///{tmp}/s.sqlite3"),
                     clock=lambda: clock["now"])
    app.config["clock"] = clock
    validate_responses(app)
    yield app
    app.extensions["lbp_cds"].store.engine.dispose()
