"""The HTML reports in real headless Chromium, and ``simulate`` against the HTTP service.

The reports (``lbp_cds.report``) are opened from disk with every network request refused: their
charts must be there (inline SVG), titled and labelled, and caller-supplied text must stay text.
A screenshot of each is kept in ``.cache/reports/`` (paths printed; ``pytest -s`` shows them).

``simulate`` over Synthea records (``../shared/data``) must give each patient exactly the cards
the HTTP service (gunicorn, the bundled pack) gives for the same prepared records.
"""

from __future__ import annotations

import difflib
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import requests

from lbp_cds import report, simulate
from lbp_cds.fixtures import load_scenarios, rebase, transaction_bundle
from tests import population
from tests.browser import open_html
from tests.conftest import ROOT
from tests.test_population import call, served  # noqa: F401 - the module-scoped service

REPORTS = ROOT / ".cache" / "reports"
SYNTHEA_RECORDS = 40
XSS_RULE = "<script>alert('rule')</script>"
XSS_REASON = "<img src=x onerror=alert('reason')>"


def _check_charts(page: Any, count: int) -> None:
    """``count`` inline SVG charts, each with role=img, an aria-label and a <title>, drawn with
    visible text (axis labels and ticks as SVG text, not paths)."""
    svgs = page.locator("svg[role=img]")
    assert svgs.count() == count, f"{svgs.count()} charts, expected {count}"
    for i in range(count):
        svg = svgs.nth(i)
        label = svg.get_attribute("aria-label")
        assert label, f"chart {i} has no aria-label"
        assert svg.locator("title").first.text_content() == label
        box = svg.bounding_box()
        assert box and box["width"] > 200 and box["height"] > 80, f"chart {i} not drawn: {box}"
        assert svg.locator("text").count() >= 4, f"chart {i} has no text labels"


def _visible(page: Any, text: str) -> bool:
    """Some element showing ``text`` is visible (an SVG <title> of the same words is not)."""
    found = page.get_by_text(text, exact=False)
    return any(found.nth(i).is_visible() for i in range(found.count()))


def _no_script_ran(page: Any, dialogs: list[str]) -> None:
    assert dialogs == [], f"a script ran: {dialogs}"
    assert page.locator("script").count() == 0
    assert page.locator("img").count() == 0


# -- simulate report of the fixture scenarios ---------------------------------------------------
@pytest.fixture(scope="module")
def fixture_summary(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("fixture-bundles")
    today = datetime.now(timezone.utc)
    for s in load_scenarios():
        if s.hook == "patient-view" and s.expected_status == 200:
            (folder / f"{s.id}.json").write_text(json.dumps(transaction_bundle(rebase(s, today))))
    return simulate.simulate(folder).summary()


def test_simulate_report_of_the_fixtures_in_chromium(browser_page, fixture_summary):
    page, dialogs = browser_page, []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    open_html(page, report.simulate_html(fixture_summary), REPORTS / "simulate.html")
    _check_charts(page, 3)  # cards by rule, ask prompts, cards per patient
    for text in ("Alert-burden simulation", "share of patients with the card (%)",
                 "rule · indicator", "cards per patient", "CC-1 · info",
                 fixture_summary["knowledgeDigest"]):
        assert _visible(page, text), text
    # Indicators are told apart by more than colour: a hatch pattern and a legend word each.
    assert page.locator("svg pattern").count() >= 2
    legend = page.locator("svg[role=img]").first.text_content() or ""
    assert "critical" in legend and "warning" in legend and "info" in legend
    # The table holds the same figures as the charts.
    cc1 = next(r for r in fixture_summary["rules"] if r["ruleId"] == "CC-1")
    row = page.locator("tr", has_text="CC-1").filter(has_text="card").first
    assert f"{cc1['share']:.1%}" in row.inner_text()
    _no_script_ran(page, dialogs)
    shot = REPORTS / "simulate.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nsimulate report screenshot: {shot}")
    assert shot.stat().st_size > 10_000


# -- burden report --------------------------------------------------------------------------------
def burden_rows() -> list[dict[str, Any]]:
    old, new = "a" * 64, "b" * 64
    rows = []
    weeks = ["2026-W05", "2026-W06", "2026-W07", "2026-W08"]
    for w, week in enumerate(weeks):
        digest = old if w < 2 else new
        for rule, base in (("FX-1", 40), ("CES-1", 12), (XSS_RULE, 5)):
            shown = base + 3 * w
            accepted, overridden = shown // 2, shown // 3
            rows.append({"ruleId": rule, "knowledgeDigest": digest, "week": week,
                         "indicator": "critical" if rule == "CES-1" else "warning",
                         "shown": shown, "silent": 7 if rule == "FX-1" else 0,
                         "accepted": accepted, "overridden": overridden,
                         "overrideReasons": {"already-imaged": overridden - 1, XSS_REASON: 1},
                         "acceptRate": accepted / shown, "overrideRate": overridden / shown})
    rows.append({"ruleId": "SURG-1", "knowledgeDigest": new, "week": weeks[-1],
                 "indicator": "warning", "shown": 0, "silent": 4, "accepted": 0,
                 "overridden": 0, "overrideReasons": {}, "acceptRate": None,
                 "overrideRate": None})
    return rows


def test_burden_report_in_chromium(browser_page):
    page, dialogs = browser_page, []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    rows = burden_rows()
    meta = {"database": "postgresql+psycopg://cds:s3cret-pw@127.0.0.1:5432/cds",
            "rows": len(rows), "since": "2026-02-01", "generated": "2026-03-02T10:00:00+00:00"}
    page_html = report.burden_html(rows, meta)
    assert "s3cret-pw" not in page_html
    open_html(page, page_html, REPORTS / "burden.html")
    # shown vs silent, acceptance by week, override by week, before/after of two digests
    _check_charts(page, 4)
    for text in ("Cards shown and silent, by rule", "Acceptance rate of shown cards by week",
                 "Override rate of shown cards by week", "before aaaaaaaaaaaa",
                 "after bbbbbbbbbbbb", "acceptance rate (% of shown)", "week",
                 "cds:***@127.0.0.1:5432/cds", "2026-W08"):
        assert _visible(page, text), text
    # Caller text is text: the rule id and the reason are shown, and nothing ran.
    body = page.locator("body").inner_text()
    assert XSS_RULE in body and XSS_REASON in body
    charts = " ".join(page.locator("svg").all_text_contents())
    assert XSS_RULE in charts  # escaped by the SVG writer, shown as the tick label
    _no_script_ran(page, dialogs)
    shot = REPORTS / "burden.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nburden report screenshot: {shot}")
    assert shot.stat().st_size > 10_000


def test_burden_report_with_one_digest_and_no_rows():
    rows = [r for r in burden_rows() if r["knowledgeDigest"].startswith("a")]
    page = report.burden_html(rows, {"database": "sqlite:////x/y.sqlite3", "rows": len(rows),
                                     "since": None, "generated": "2026-03-02T10:00:00Z"})
    assert page.count("<svg") == 3 and "Before and after" not in page
    empty = report.burden_html([], {"database": "sqlite://", "rows": 0, "since": None,
                                    "generated": "x"})
    assert "No card recorded" in empty and "<svg" not in empty


def test_simulate_report_escapes_rule_ids():
    doc = {"patients": 2, "rules": [
        {"ruleId": XSS_RULE, "indicator": "warning", "state": "fire", "patients": 1,
         "share": 0.5},
        {"ruleId": "R$x$", "indicator": "<b>", "state": "ask", "patients": 1, "share": 0.5}],
        "cardsPerPatient": {"0": 1, "1": 1, "2": 0, "3": 0, "4+": 0},
        "knowledgeDigest": "<i>d</i>", "hook": "patient-view", "now": "2026-03-02"}
    page = report.simulate_html(doc)
    assert "<script>" not in page and "<i>d</i>" not in page and "<b>" not in page
    assert "&lt;script&gt;" in page and "R$x$" in page  # no mathtext either


# -- Synthea: report, and agreement with the HTTP service -----------------------------------------
@pytest.fixture(scope="module")
def synthea_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, datetime]:
    files = population.files()[:SYNTHEA_RECORDS]
    assert len(files) == SYNTHEA_RECORDS, f"expected the Synthea population, found {len(files)}"
    now = datetime.now(timezone.utc).replace(microsecond=0)
    folder = tmp_path_factory.mktemp("synthea")
    for path in files:
        (folder / path.name).write_text(json.dumps(population.prepare(path, now).bundle))
    return folder, now


def _comparable(card: dict[str, Any]) -> Any:
    """A card without what differs by design between two calls: uuids, the new id and
    ``authoredOn`` (the call's clock) of a suggested order, and link URLs' host (the serving
    host's)."""
    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            drop = {"uuid"} | ({"id", "authoredOn"} if "authoredOn" in node else set())
            return {k: strip(v) for k, v in node.items() if k not in drop}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    out = strip(card)
    for link in out.get("links", []):
        link["url"] = re.sub(r"^https?://[^/]+", "", str(link.get("url", "")))
    return out


@pytest.mark.shared
@pytest.mark.slow
def test_simulate_agrees_with_the_http_service(synthea_folder, served):  # noqa: F811
    folder, now = synthea_folder
    sim = simulate.simulate(folder, now=now)
    assert sim.failed == [] and len(sim.patients) == SYNTHEA_RECORDS
    http_cards = {}
    with requests.Session() as http:
        http.trust_env = False
        for p in sim.patients:
            status, cards = call(served, http, json.loads((folder / p.source).read_text()))
            assert status == 200, p.source
            http_cards[p.source] = cards
    disagree = [p.source for p in sim.patients
                if [_comparable(c) for c in p.cards]
                != [_comparable(c) for c in http_cards[p.source]]]
    if disagree:
        first = next(p for p in sim.patients if p.source == disagree[0])
        mine = json.dumps([_comparable(c) for c in first.cards], indent=1, sort_keys=True)
        theirs = json.dumps([_comparable(c) for c in http_cards[first.source]], indent=1,
                            sort_keys=True)
        diff = "\n".join(difflib.unified_diff(theirs.splitlines(), mine.splitlines(),
                                               "service", "simulate", lineterm="", n=1))
        pytest.fail(f"simulate and the service differ for {len(disagree)} records: "
                    f"{disagree[:5]}; first:\n{diff[:3000]}")
    assert sum(len(c) for c in http_cards.values()) > SYNTHEA_RECORDS  # it did compare cards


@pytest.mark.shared
@pytest.mark.slow
def test_simulate_report_of_synthea_records_in_chromium(browser_page, synthea_folder):
    folder, now = synthea_folder
    summary = simulate.simulate(folder, now=now).summary()
    assert summary["patients"] == SYNTHEA_RECORDS
    page = browser_page
    open_html(page, report.simulate_html(summary), REPORTS / "simulate-synthea.html")
    _check_charts(page, 3 if any(r["state"] == "ask" for r in summary["rules"]) else 2)
    assert _visible(page, f"{SYNTHEA_RECORDS} patients")
    shot = REPORTS / "simulate-synthea.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nsimulate report (Synthea) screenshot: {shot}")
