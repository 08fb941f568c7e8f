"""Real headless Chromium for the tests: Debian's ``chromium`` driven by Playwright for Python.

Playwright's own browser download cannot work on these machines, so the browser is the
distribution's: ``/usr/bin/chromium``, installed here with apt-get when absent (the tests run as
root, as CI does). If it cannot be installed the test FAILS with the reason: it is never skipped.

``browser_page`` (registered in ``tests/conftest.py``) yields a fresh Playwright page of one
browser shared by the session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CANDIDATES = ("chromium", "chromium-browser")
INSTALL_TIMEOUT_S = 900


def chromium_path() -> str:
    """The Chromium executable, installed with apt-get if missing.

    Raises:
        pytest.fail.Exception: it is absent and could not be installed.
    """
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log: list[str] = []
    for command in (["apt-get", "install", "-y", "-qq", "chromium"],
                    ["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "chromium"]):
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env,
                                  timeout=INSTALL_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.append(f"{' '.join(command)}: {exc}")
            break
        log.append(f"{' '.join(command)}: exit {done.returncode} {done.stderr[-400:]}")
        if command[1] == "install" and done.returncode == 0:
            break
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("headless Chromium is needed for the browser tests and could not be installed "
                "(`apt-get install chromium`, as root):\n" + "\n".join(log), pytrace=False)


@pytest.fixture(scope="session")
def chromium_browser() -> Iterator[Any]:
    """One headless Chromium for the session."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is needed for the browser tests: pip install -e '.[test]'",
                    pytrace=False)
    executable = chromium_path()
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=args)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def browser_page(chromium_browser: Any) -> Iterator[Any]:
    """A fresh page (its own context) in the session's headless Chromium."""
    context = chromium_browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()


def open_html(page: Any, html: str, path: Path) -> None:
    """Write ``html`` to ``path`` and open it from disk, with every network request refused
    (the report must be self-contained)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    requested: list[str] = []

    def refuse(route: Any) -> None:
        requested.append(route.request.url)
        route.abort()

    page.route("http://**/*", refuse)
    page.route("https://**/*", refuse)
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    assert requested == [], f"the report asked the network for {requested}"
