"""``/admin/burden`` (issue 17): the governance report, served by the real service.

gunicorn with the bundled pack, one rule silent; cards issued and judged through the HTTP API;
the page refused without the admin token (and absent without one configured), then rendered in
real headless Chromium with its charts, loading nothing from anywhere.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from tests.test_reports_browser import REPORTS
from tests.service_server import ROOT, ServerFactory, ServiceServer
from tests.test_silent import call

TOKEN = "admin-" + "7f3c9a1e" * 4


@pytest.fixture(scope="module")
def served(module_service_server: ServerFactory) -> ServiceServer:
    """The service with an admin token, CES-1 silent, and cards issued and judged."""
    server = module_service_server(env={"LBP_CDS_KNOWLEDGE_DIR": str(ROOT / "cds_services"),
                                        "LBP_CDS_SILENT_RULES": "CES-1",
                                        "LBP_CDS_ADMIN_TOKEN": TOKEN},
                                   args=["--dev", "--workers", "1", "--threads", "2"])
    call(server, "ces-saddle-numbness-urinary-retention")  # CES-1: silent
    for scenario in ("inf-ivdu-fever", "fx-fall-from-ladder-critical"):
        cards = call(server, scenario)
        card = cards[0]
        outcome: dict[str, Any] = {"card": card["uuid"], "outcome": "overridden",
                                   "overrideReason": {"reason": card["overrideReasons"][0]},
                                   "outcomeTimestamp": datetime.now(timezone.utc).isoformat()}
        services = server.get("/cds-services").json()["services"]
        service = next(s for s in services if s["hook"] == "patient-view")
        resp = server.post(f"/cds-services/{service['id']}/feedback",
                           json={"feedback": [outcome]})
        assert resp.status_code == 200, resp.text
    return server


@pytest.fixture(scope="module")
def plain(module_service_server: ServerFactory) -> ServiceServer:
    """The service without an admin token."""
    return module_service_server(env={"LBP_CDS_KNOWLEDGE_DIR": str(ROOT / "cds_services")},
                                 args=["--dev", "--workers", "1"])


def test_without_an_admin_token_configured_the_page_does_not_exist(plain):
    assert plain.get("/admin/burden").status_code == 404
    assert plain.get("/admin/burden", headers={"Authorization": "Bearer x"}).status_code == 404


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {TOKEN}", "Bearer",
                                    f"Bearer {TOKEN}x"])
def test_the_page_is_refused_without_the_token(served, header):
    headers = {"Authorization": header} if header else {}
    resp = served.get("/admin/burden", headers=headers)
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert "<" not in resp.text and TOKEN not in resp.text


def test_a_bad_since_is_400(served):
    resp = served.get("/admin/burden?since=last-week",
                      headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 400
    assert "since must be a date" in resp.text


def test_the_report_with_the_token(served):
    resp = served.get("/admin/burden", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["Cache-Control"] == "no-store"
    page = resp.text
    for rule in ("CES-1", "INF-1", "FX-1"):
        assert rule in page
    assert TOKEN not in page
    assert "<script" not in page.lower()


def test_the_report_in_chromium(served, browser_page):
    page = browser_page
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.set_extra_http_headers({"Authorization": f"Bearer {TOKEN}"})
    resp = page.goto(served.url("/admin/burden"))
    assert resp is not None and resp.status == 200
    charts = page.locator("svg[role=img]")
    assert charts.count() >= 2
    for i in range(charts.count()):
        assert charts.nth(i).get_attribute("aria-label")
    body = page.locator("body").inner_text()
    assert "CES-1" in body and "INF-1" in body
    assert requested == [served.url("/admin/burden")]  # self-contained: nothing else loaded
    shot = REPORTS / "admin-burden.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    print(f"\n/admin/burden screenshot: {shot}")
    assert shot.stat().st_size > 10_000
