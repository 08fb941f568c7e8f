"""Silent mode (issue 17): a silent rule is evaluated and recorded, never shown.

Through the real service (gunicorn, the bundled pack, a fixture scenario) and in-process over
the mini pack, where one rule is made to stay silent beside a critical card so that the
"as if the silent card were absent" rule of that suppression can be seen.
"""

from __future__ import annotations

import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import text

from lbp_cds import create_app, knowledge
from lbp_cds.config import Settings
from lbp_cds.errors import ConfigError, KnowledgeError
from lbp_cds.fhir_data import record_from_resources
from lbp_cds.fixtures import hook_request as scenario_request
from lbp_cds.fixtures import load_scenarios, rebase
from lbp_cds.rules import RuleEngine, RuleMatch
from lbp_cds.store import Store
from tests.builders import condition, medication, patient, questionnaire_response
from tests.conftest import MINI, NOW, validate_responses
from tests.service_server import ROOT, ServerFactory, ServiceServer
from tests.test_api import full_prefetch, post

CES = "ces-saddle-numbness-urinary-retention"  # CES-1 critical, nothing else shown
APP = "app-pregnant-rlq-pain-fever-ultrasound"  # APP-1 critical beside PREG-1 info


# -- the mini pack with STER silent beside a critical card -----------------------------------------
@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mini pack where STER (info) stays silent beside a critical card: RF (critical) does
    not name STER in its tree, so only the display suppression keeps STER off beside it."""
    root = tmp_path_factory.mktemp("pack") / "knowledge"
    shutil.copytree(MINI, root)
    path = root / "triage" / "rules.yaml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    ster = next(r for r in doc["rules"] if r["id"] == "STER")
    ster["silent_beside"] = ["critical"]
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return root


RED_FLAG_AND_STEROIDS = [condition("M54.41"), questionnaire_response({"ces-saddle": True}),
                         medication("312617", authored="2025-10-01")]


def run(engine: RuleEngine, silent: frozenset[str] = frozenset()) -> list[RuleMatch]:
    record = record_from_resources("p1", [patient(), *RED_FLAG_AND_STEROIDS])
    service = next(s for s in engine.knowledge.services if s.hook == "patient-view")
    return engine.evaluate(service, record, NOW, silent=silent)


def states(matches: list[RuleMatch]) -> list[tuple[str, str, bool]]:
    return [(m.rule.id, m.indicator, m.silent) for m in matches]


def test_a_silent_critical_card_does_not_silence_the_cards_beside_it(pack_dir):
    engine = RuleEngine(knowledge.load(pack_dir))
    assert states(run(engine)) == [("RF", "critical", False)]  # STER silent beside RF
    # RF silent: STER is shown as if RF's card were absent; CC still sees the red flag in the
    # record (its own condition, not a display rule) and stays off.
    assert states(run(engine, frozenset({"RF"}))) == [("RF", "critical", True),
                                                      ("STER", "info", False)]


def test_a_silent_card_is_recorded_only_where_it_would_have_been_shown(pack_dir):
    engine = RuleEngine(knowledge.load(pack_dir))
    # STER silent beside a shown RF: had STER been live it would not have shown; not recorded.
    assert states(run(engine, frozenset({"STER"}))) == [("RF", "critical", False)]
    # Everything silent: what a live pack would have shown, all marked.
    assert states(run(engine, frozenset({"RF", "STER", "CC", "FEV", "SB-HIGH"}))) == [
        ("RF", "critical", True)]


def test_the_api_answers_without_the_silent_card_and_records_it(pack_dir, tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("silent_rules: [RF]\n", encoding="utf-8")
    app = create_app(Settings(dev=True, database_url=f"sqlite:///{tmp_path}/s.sqlite3",
                              knowledge_dir=str(pack_dir), parameters_file=str(site)),
                     clock=lambda: NOW)
    validate_responses(app)
    try:
        resp = post(app.test_client(), "mini-triage",
                    {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
                     "context": {"userId": "Practitioner/example", "patientId": "p1"},
                     "prefetch": full_prefetch(*RED_FLAG_AND_STEROIDS)})
        assert resp.status_code == 200, resp.json
        assert [c["extension"]["org.lbp-cds.rule"]["ruleId"] for c in resp.json["cards"]] == [
            "STER"]
        rows = _issued(app.extensions["lbp_cds"].store)
        assert sorted((r["rule_id"], bool(r["silent"])) for r in rows) == [("RF", True),
                                                                           ("STER", False)]
        report = app.extensions["lbp_cds"].store.feedback_report()
        assert [(e["rule"], e["issued"]) for e in report] == [("STER", 1)]  # shown cards only
    finally:
        app.extensions["lbp_cds"].store.engine.dispose()


# -- settings and the site file -------------------------------------------------------------------
def test_an_unknown_silent_rule_stops_the_service_at_start(tmp_path):
    base = {"dev": True, "database_url": f"sqlite:///{tmp_path}/s.sqlite3",
            "knowledge_dir": str(MINI)}
    with pytest.raises(ConfigError, match=r"LBP_CDS_SILENT_RULES .*: CES-1 \(its rules: CC"):
        create_app(Settings(silent_rules="RF, CES-1", **base))
    with pytest.raises(ConfigError, match="not both"):
        Settings.from_env({"LBP_CDS_SILENT_RULES": "*,RF"})
    assert not (tmp_path / "s.sqlite3").exists()  # refused before the store was opened


def test_silent_rules_from_the_environment_and_the_site_file_add_up(tmp_path):
    settings = Settings.from_env({"LBP_CDS_SILENT_RULES": " RF ,FEV,,RF"})
    assert settings.silent == ("RF", "FEV")
    assert settings.silent_rule_ids(["RF", "FEV", "CC"]) == {"RF", "FEV"}
    assert Settings(silent_rules="*").silent_rule_ids(["RF", "CC"]) == {"RF", "CC"}
    assert Settings().silent_rule_ids(["RF"]) == frozenset()
    site = tmp_path / "site.yaml"
    site.write_text("parameters: {acupuncture_offered: true}\nsilent_rules: [CC]\n",
                    encoding="utf-8")
    app = create_app(Settings(dev=True, database_url=f"sqlite:///{tmp_path}/s.sqlite3",
                              knowledge_dir=str(MINI), parameters_file=str(site),
                              silent_rules="FEV"))
    try:
        assert app.extensions["lbp_cds"].silent == {"CC", "FEV"}
    finally:
        app.extensions["lbp_cds"].store.engine.dispose()


@pytest.mark.parametrize(("entry", "loaded"), [
    ("silent_rules: '*'", {"RF", "FEV", "STER", "SB-HIGH", "CC", "LV"}),
    ("silent_rules: []", set()),
    ("parameters: {acupuncture_offered: true}", set()),
])
def test_the_site_file_names_silent_rules(tmp_path, entry, loaded):
    site = tmp_path / "site.yaml"
    site.write_text(entry + "\n", encoding="utf-8")
    assert knowledge.load(MINI, site).silent_rules == loaded


@pytest.mark.parametrize(("entry", "message"), [
    ("silent_rules: [RF, NOPE]", "silent_rules names rules the knowledge pack does not have: "
                                 "NOPE"),
    ("silent_rules: RF", "a list of rule ids"),
    ("silent_rules: {RF: true}", "a list of rule ids"),
])
def test_the_site_file_refuses_unknown_or_misshapen_silent_rules(tmp_path, entry, message):
    site = tmp_path / "site.yaml"
    site.write_text(entry + "\n", encoding="utf-8")
    with pytest.raises(KnowledgeError, match=message):
        knowledge.load(MINI, site)


# -- the real service -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(module_service_server: ServerFactory) -> ServiceServer:
    """gunicorn with the bundled pack, CES-1 and APP-1 silent, two workers (metrics across)."""
    return module_service_server(env={"LBP_CDS_KNOWLEDGE_DIR": str(ROOT / "cds_services"),
                                      "LBP_CDS_SILENT_RULES": "CES-1,APP-1"},
                                 args=["--dev", "--workers", "2", "--threads", "2"])


def call(server: ServiceServer, scenario_id: str) -> list[dict[str, Any]]:
    (scenario,) = load_scenarios([scenario_id])
    scenario = rebase(scenario, datetime.now(timezone.utc))
    services = server.get("/cds-services").json()["services"]
    service = next(s for s in services if s["hook"] == scenario.hook)
    resp = server.post(f"/cds-services/{service['id']}",
                       json=scenario_request(scenario, service.get("prefetch", {})))
    assert resp.status_code == 200, resp.text
    cards: list[dict[str, Any]] = resp.json()["cards"]
    return cards


def _issued(store: Store) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(
            "SELECT card_uuid, rule_id, indicator, silent FROM issued_cards")).mappings()]


def _silent_count(metrics: str, rule: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("lbp_cds_cards_silent_total{") and f'rule="{rule}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_the_real_service_keeps_a_silent_critical_card_out_of_the_answer(served):
    # Scenario expects CES-1 critical alone. CC-1 stays off: its own condition ("no red flag")
    # still sees the saddle numbness and retention CES-1 found; silence hides a card, not a fact.
    assert call(served, CES) == []
    # APP-1 critical silent: PREG-1 (info) beside it is answered as usual.
    cards = call(served, APP)
    assert [c["extension"]["org.lbp-cds.rule"]["ruleId"] for c in cards] == ["PREG-1"]

    store = Store(served.env["LBP_CDS_DATABASE_URL"])
    try:
        rows = _issued(store)
    finally:
        store.engine.dispose()
    by_rule = {(r["rule_id"], r["indicator"]): bool(r["silent"]) for r in rows}
    assert by_rule == {("CES-1", "critical"): True, ("APP-1", "critical"): True,
                       ("PREG-1", "info"): False}

    metrics = served.get("/metrics").text
    assert _silent_count(metrics, "CES-1") == 1 and _silent_count(metrics, "APP-1") == 1
    shown = [line for line in metrics.splitlines() if line.startswith("lbp_cds_cards_total{")]
    assert shown and not [line for line in shown if 'indicator="critical"' in line]
    assert 'rule="PREG-1"' in metrics and _silent_count(metrics, "PREG-1") == 0

    # Feedback on a silent card is refused like a card never issued: nobody saw it.
    silent_uuid = next(r["card_uuid"] for r in rows if r["rule_id"] == "CES-1")
    resp = served.post("/cds-services/lbp-triage/feedback", json={"feedback": [{
        "card": silent_uuid, "outcome": "overridden",
        "outcomeTimestamp": datetime.now(timezone.utc).isoformat()}]})
    assert resp.status_code == 422, resp.text
    assert "was not issued by this service" in resp.text
    shown_uuid = cards[0]["uuid"]
    resp = served.post("/cds-services/lbp-triage/feedback", json={"feedback": [{
        "card": shown_uuid, "outcome": "overridden",
        "outcomeTimestamp": datetime.now(timezone.utc).isoformat()}]})
    assert resp.status_code == 200, resp.text
