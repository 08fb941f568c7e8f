"""``lbp-cds simulate`` (alert burden over a folder of records) and ``fixtures export``.

What the HTML reports look like in a real browser is ``tests/test_reports_browser.py``; the
agreement of ``simulate`` with the HTTP service over Synthea records is there too.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from lbp_cds import simulate
from lbp_cds.cli import main
from lbp_cds.fixtures import load_scenarios, rebase, transaction_bundle

NOW = "2026-03-02T10:00:00+00:00"


def _scenario(sid: str) -> dict:
    (s,) = load_scenarios([sid])
    return transaction_bundle(rebase(s, datetime.fromisoformat(NOW)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fixtures-export")
    assert main(["fixtures", "export", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three scenarios: a cauda equina syndrome, an ask prompt, and one with a CC-1 card."""
    folder = tmp_path_factory.mktemp("small")
    for sid in ("fx-ask-osteoporosis-coded-only", "cc-startback-incomplete",
                "ces-bilateral-sciatica-saddle-finding"):
        (folder / f"{sid}.json").write_text(json.dumps(_scenario(sid)))
    return folder


def test_fixtures_export_writes_one_transaction_bundle_per_patient_view_scenario(exported):
    pv = [s for s in load_scenarios() if s.hook == "patient-view" and s.expected_status == 200]
    files = sorted(exported.glob("*.json"))
    assert [f.stem for f in files] == sorted(s.id for s in pv)
    doc = json.loads(files[0].read_text())
    assert doc["resourceType"] == "Bundle" and doc["type"] == "transaction"


def test_simulate_counts_what_each_scenario_expects(exported, capsys):
    """Over the exported fixtures, each rule and indicator is counted on as many patients as
    the scenarios expect it (the scenarios' own expectations, made at their own clock)."""
    assert main(["simulate", str(exported), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    pv = [s for s in load_scenarios() if s.hook == "patient-view" and s.expected_status == 200]
    assert doc["patients"] == len(pv)
    assert set(doc) >= {"patients", "rules", "cardsPerPatient", "knowledgeDigest", "hook", "now"}
    assert doc["hook"] == "patient-view" and len(doc["knowledgeDigest"]) == 64
    assert sum(doc["cardsPerPatient"].values()) == len(pv)
    assert list(doc["cardsPerPatient"]) == ["0", "1", "2", "3", "4+"]
    for row in doc["rules"]:
        assert set(row) == {"ruleId", "indicator", "state", "patients", "share"}
        assert row["share"] == round(row["patients"] / len(pv), 4)
    fired = {(r["ruleId"], r["indicator"]) for r in doc["rules"] if r["state"] == "fire"}
    expected = {pair for s in pv for pair in s.expected_cards}
    # Cards the scenarios expect show up in the burden (asks are counted apart by state).
    missing = {pair for pair in expected if pair not in fired
               and pair not in {(r["ruleId"], r["indicator"]) for r in doc["rules"]}}
    assert not missing, missing


def test_simulate_text_report_and_ask_prompts_apart(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps(_scenario("fx-ask-osteoporosis-coded-only")))
    assert main(["simulate", str(tmp_path), "--now", NOW]) == 0
    out = capsys.readouterr().out
    assert "patients: 1" in out
    head, _, asks = out.partition("ask-state prompts")
    assert "FX-1" in asks, out
    assert "cards per patient:" in out


def test_collection_bundle_with_several_patients_and_ndjson(tmp_path, capsys):
    """A collection Bundle holding two patients (urn:uuid references) and the same records as a
    Bulk Data NDJSON export give the same burden as one transaction Bundle per patient."""
    ids = ["fx-ask-osteoporosis-coded-only", load_scenarios()[0].id]
    per_file = tmp_path / "per-file"
    per_file.mkdir()
    for sid in ids:
        (per_file / f"{sid}.json").write_text(json.dumps(_scenario(sid)))
    assert main(["simulate", str(per_file), "--now", NOW, "--json"]) == 0
    reference = json.loads(capsys.readouterr().out)

    collection, ndjson = tmp_path / "collection", tmp_path / "ndjson"
    collection.mkdir()
    ndjson.mkdir()
    entries, by_type = [], {}
    for sid in ids:
        bundle = _scenario(sid)
        resources = [e["resource"] for e in bundle["entry"]]
        pid = next(r["id"] for r in resources if r["resourceType"] == "Patient")
        for r in resources:
            by_type.setdefault(r["resourceType"], []).append(r)
            r2 = json.loads(json.dumps(r).replace(f'"Patient/{pid}"', f'"urn:uuid:p-{pid}"'))
            full = f"urn:uuid:p-{pid}" if r["resourceType"] == "Patient" else \
                f"urn:uuid:{r['resourceType']}-{r['id']}"
            entries.append({"fullUrl": full, "resource": r2})
    (collection / "all.json").write_text(json.dumps(
        {"resourceType": "Bundle", "type": "collection", "entry": entries}))
    for rtype, rs in by_type.items():
        (ndjson / f"{rtype}.ndjson").write_text("".join(json.dumps(r) + "\n" for r in rs))
    for folder in (collection, ndjson):
        assert main(["simulate", str(folder), "--now", NOW, "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["patients"] == 2
        assert doc["rules"] == reference["rules"], folder.name
        assert doc["cardsPerPatient"] == reference["cardsPerPatient"]


def test_max_share_gates_with_exit_3(small, capsys):
    assert main(["simulate", str(small), "--now", NOW, "--max-share", "CES-1=0.34",
                 "--max-share", "CES-1:warning=0"]) == 0
    capsys.readouterr()
    assert main(["simulate", str(small), "--now", NOW, "--max-share", "CES-1=0.1"]) == 3
    err = capsys.readouterr().err
    assert "limit exceeded: CES-1 on 33.3% of patients (1 of 3), above --max-share " \
           "CES-1=0.1" in err, err
    assert main(["simulate", str(small), "--now", NOW, "--max-share", "CC-1:info=0"]) == 3
    assert "CC-1:info" in capsys.readouterr().err


@pytest.mark.parametrize("limit, message", [
    ("NOPE-1=0.1", "rules the knowledge pack does not have: NOPE-1"),
    ("CC-1", "expected RULE=SHARE"),
    ("CC-1=2", "between 0 and 1"),
    ("CC-1=lots", "not a share"),
])
def test_max_share_refuses_bad_limits(tmp_path, capsys, limit, message):
    assert main(["simulate", str(tmp_path), "--max-share", limit]) == 2
    assert message in capsys.readouterr().err


def test_errors_name_the_file_and_never_trace(tmp_path, capsys):
    assert main(["simulate", str(tmp_path / "absent")]) == 1
    assert "absent: no such folder" in capsys.readouterr().err
    assert main(["simulate", str(tmp_path)]) == 1
    assert "no *.json Bundles or *.ndjson files" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text('{"resourceType": "Bundle", ')
    assert main(["simulate", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "broken.json: not valid JSON" in err and "Traceback" not in err
    (tmp_path / "broken.json").write_text('{"resourceType": "Patient", "id": "x"}')
    assert main(["simulate", str(tmp_path)]) == 1
    assert "broken.json: not a FHIR Bundle" in capsys.readouterr().err
    (tmp_path / "broken.json").unlink()
    (tmp_path / "Patient.ndjson").write_text('{"resourceType": "Patient", "id": "a"}\nnope\n')
    assert main(["simulate", str(tmp_path)]) == 1
    assert "Patient.ndjson line 2: not valid JSON" in capsys.readouterr().err
    (tmp_path / "Patient.ndjson").unlink()
    (tmp_path / "org.json").write_text('{"resourceType": "Bundle", "type": "collection"}')
    assert main(["simulate", str(tmp_path)]) == 1
    assert "no patient records" in capsys.readouterr().err


def test_progress_bar_only_on_a_terminal():
    import io

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    plain, tty = io.StringIO(), Tty()
    for stream in (plain, tty):
        bar = simulate.ProgressBar(stream, width=10)
        for i in range(1, 4):
            bar(i, 3)
    assert plain.getvalue() == ""
    assert tty.getvalue().endswith("[##########] 3/3\n")


def test_html_report_is_written(small, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["simulate", str(small), "--now", NOW, "--html", str(out)]) == 0
    page = out.read_text()
    assert page.startswith("<!doctype html>") and page.count("<svg") == 3
    assert "<script" not in page and "http://" not in page.replace(
        "http://www.w3.org/", "")
    assert str(out.absolute()) in capsys.readouterr().err


def test_summary_shares_and_buckets():
    sim = simulate.Simulation("patient-view", datetime(2026, 1, 1, tzinfo=timezone.utc), "d" * 64)
    card = {"indicator": "info", "extension": {"org.lbp-cds.rule": {"ruleId": "R"}}}
    ask = {"indicator": "info", "extension": {"org.lbp-cds.rule": {"ruleId": "R",
                                                                   "state": "ask"}}}
    sim.patients = [simulate.PatientResult("a", "a", []),
                    simulate.PatientResult("b", "b", [card, card]),
                    simulate.PatientResult("c", "c", [card, ask, card, card, card])]
    doc = sim.summary()
    assert doc["cardsPerPatient"] == {"0": 1, "1": 0, "2": 1, "3": 0, "4+": 1}
    assert doc["rules"] == [
        {"ruleId": "R", "indicator": "info", "state": "fire", "patients": 2, "share": 0.6667},
        {"ruleId": "R", "indicator": "info", "state": "ask", "patients": 1, "share": 0.3333}]


def test_silent_rules_count_as_live_in_a_simulation(small, capsys, monkeypatch):
    """A simulation measures what every rule would show: a rule the site runs silently is
    counted as if it were live (the silent period exists to measure it)."""
    assert main(["simulate", str(small), "--now", NOW, "--json"]) == 0
    live = json.loads(capsys.readouterr().out)["rules"]
    monkeypatch.setenv("LBP_CDS_SILENT_RULES", "CES-1,CC-1")
    assert main(["simulate", str(small), "--now", NOW, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rules"] == live
    assert {"CES-1", "CC-1"} <= {r["ruleId"] for r in live}


def test_html_report_goes_into_a_folder_that_does_not_exist_yet(small, tmp_path, capsys):
    """The README writes `--html .cache/reports/fixtures.html` from a clean clone."""
    target = tmp_path / "not" / "yet" / "report.html"
    assert main(["simulate", str(small), "--now", NOW, "--html", str(target)]) == 0
    assert target.read_text(encoding="utf-8").lower().startswith("<!doctype html>")
