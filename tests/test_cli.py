"""The command line: evaluate offline, check the knowledge, report feedback, install from a wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from lbp_cds.cli import EXIT_BROKEN_PIPE, main
from lbp_cds.display import format_cards
from tests.builders import bundle, condition, hook_request, patient, questionnaire_response
from tests.conftest import MINI, ROOT


def write(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / "in.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(autouse=True)
def mini_pack(monkeypatch):
    monkeypatch.setenv("LBP_CDS_KNOWLEDGE_DIR", str(MINI))


def test_evaluate_a_hook_request(tmp_path, capsys):
    body = hook_request(prefetch={"patient": patient(), "conditions": bundle(condition("M54.41")),
                                  "observations": bundle(), "medications": None,
                                  "questionnaireResponses": bundle(questionnaire_response(
                                      {"ces-saddle": True}))})
    assert main(["evaluate", str(write(tmp_path, body)), "--now", "2026-03-02T10:00:00Z"]) == 0
    out = capsys.readouterr().out
    assert "!!! CRITICAL  Possible cauda equina syndrome - emergency MRI" in out
    assert "suggestion: Emergency MRI (recommended)" in out


def test_evaluate_a_bundle_as_json(tmp_path, capsys):
    doc = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": patient()}, {"resource": condition("M54.41")}]}
    assert main(["evaluate", str(write(tmp_path, doc)), "--hook", "patient-view",
                 "--now", "2026-03-02T10:00:00Z", "--json"]) == 0
    cards = json.loads(capsys.readouterr().out)["cards"]
    assert [c["extension"]["org.lbp-cds.rule"]["ruleId"] for c in cards] == ["CC"]


def test_evaluate_a_synthea_style_transaction_resolves_urn_uuid_references(tmp_path, capsys):
    # Synthea refers to the patient by its entry's fullUrl; left as is, the service would drop
    # the Condition as naming another patient, and the back pain would go unseen.
    person, back_pain = patient(), condition("M54.41")
    back_pain["subject"] = {"reference": f"urn:uuid:{person['id']}"}
    doc = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:{person['id']}", "resource": person,
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:0b5c1a52-7d0e-4f7c-9a51-3a4c3f1f2d11", "resource": back_pain,
         "request": {"method": "POST", "url": "Condition"}}]}
    assert main(["evaluate", str(write(tmp_path, doc)), "--hook", "patient-view",
                 "--now", "2026-03-02T10:00:00Z", "--json"]) == 0
    cards = json.loads(capsys.readouterr().out)["cards"]
    assert [c["extension"]["org.lbp-cds.rule"]["ruleId"] for c in cards] == ["CC"]


def test_evaluate_reports_a_bad_request_without_a_trace(tmp_path, capsys):
    assert main(["evaluate", str(write(tmp_path, {"hook": "patient-view"}))]) == 1
    err = capsys.readouterr().err
    assert "400" in err and "hookInstance" in err and "Traceback" not in err


def test_evaluate_says_what_a_412_lacks(tmp_path, capsys):
    body = hook_request(prefetch={"patient": patient()})
    assert main(["evaluate", str(write(tmp_path, body))]) == 1
    assert "prefetch.conditions" in capsys.readouterr().err


def test_check_knowledge(capsys):
    assert main(["check-knowledge", "--knowledge-dir", str(MINI)]) == 0
    assert "6 rules" in capsys.readouterr().out


def test_check_knowledge_refuses_a_broken_pack(tmp_path, capsys):
    import shutil

    shutil.copytree(MINI, tmp_path / "p")
    (tmp_path / "p" / "parameters.yaml").write_text("parameters: [oops\n")
    assert main(["check-knowledge", "--knowledge-dir", str(tmp_path / "p")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_feedback_report_reads_the_store(tmp_path, monkeypatch, capsys, make_app):
    db = f"sqlite:///{tmp_path}/store.sqlite3"
    app = make_app(database_url=db)
    client = app.test_client()
    body = hook_request(hook="order-sign", drafts=[{
        "resourceType": "ServiceRequest", "id": "sr1", "status": "draft", "intent": "order",
        "subject": {"reference": "Patient/p1"}, "authoredOn": "2026-03-01",
        "code": {"coding": [{"system": "http://loinc.org", "code": "30679-5"}]}}],
        prefetch={"patient": patient(), "conditions": bundle(condition("M54.41"))})
    card = client.post("/cds-services/mini-order-sign", json=body).json["cards"][0]
    client.post("/cds-services/mini-order-sign/feedback", json={"feedback": [{
        "card": card["uuid"], "outcome": "overridden",
        "overrideReason": {"reason": card["overrideReasons"][0]},
        "outcomeTimestamp": "2026-03-02T10:05:00Z"}]})
    monkeypatch.setenv("LBP_CDS_DATABASE_URL", db)
    assert main(["feedback-report"]) == 0
    out, err = capsys.readouterr()
    assert "LV" in out and "100.0%" in out and "Red flag present" in out
    assert err == f"store: {tmp_path}/store.sqlite3 (1 issued cards, 1 feedback entries)\n"
    digest = card["extension"]["org.lbp-cds.rule"]["knowledgeDigest"]
    assert main(["feedback-report", "--json", "--knowledge", digest]) == 0
    assert [e["rule"] for e in json.loads(capsys.readouterr().out)] == ["LV"]
    other = "0" * 12 if not digest.startswith("0") else "1" * 12
    assert main(["feedback-report", "--json", "--knowledge", other]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["feedback-report", "--versions"]) == 0
    (header, row) = capsys.readouterr().out.splitlines()
    assert header.split()[:2] == ["knowledge", "cards"]
    assert row.split()[:2] == [digest, "1"] and "UTC" in row


def test_migrate_and_purge(tmp_path, monkeypatch, capsys):
    from datetime import datetime, timedelta, timezone

    from lbp_cds.cards import IssuedCard
    from lbp_cds.hooks import Feedback
    from lbp_cds.store import SCHEMA_REVISION, Store

    db = f"sqlite:///{tmp_path}/store.sqlite3"
    monkeypatch.setenv("LBP_CDS_DATABASE_URL", db)
    assert main(["migrate"]) == 0
    assert capsys.readouterr().out == f"store at schema revision {SCHEMA_REVISION}\n"
    store = Store(db)
    now = datetime.now(timezone.utc)
    for age_days, uuid in ((400, "old"), (10, "recent")):
        when = now - timedelta(days=age_days)
        store.record_issued("svc", "h", [IssuedCard({"uuid": uuid}, "LV-1", "info", ())], when)
        store.record_feedback([Feedback(uuid, "accepted", (), None, None, when)], when)
    store.claim("iss|gone", 1.0)
    store.claim("iss|live", 4e9)
    # An intake app session that has ended (expired) and one still open.
    store.session_put("ended-session-01", "h1", b"sealed", 1.0)
    store.session_put("open-session-001", "h2", b"sealed", 4e9)

    assert main(["purge", "--older-than-days", "365", "--dry-run"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["would delete"] == {"issued_cards": 1, "feedback": 1, "jwt_replay": 1,
                                   "smart_sessions": 1}
    assert store.count("issued_cards") == 2  # a dry run deletes nothing

    assert main(["purge", "--older-than-days", "365"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == {
        "issued_cards": 1, "feedback": 1, "jwt_replay": 1, "smart_sessions": 1}
    assert store.card("old") is None and store.card("recent") is not None
    assert store.count("feedback") == 1 and store.count("jwt_replay") == 1
    assert store.session_get("open-session-001") == ("h2", b"sealed")
    assert store.count("smart_sessions") == 1
    store.engine.dispose()

    with pytest.raises(SystemExit) as exit_:
        main(["purge", "--older-than-days", "0"])
    assert exit_.value.code == 2
    assert "at least 1 day" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["feedback-report", "--knowledge", "not-hex%"])
    assert exit_.value.code == 2
    assert "hex digits" in capsys.readouterr().err


def test_serve_refuses_to_start_without_clients(tmp_path):
    env = dict(os.environ, LBP_CDS_DATABASE_URL=f"sqlite:///{tmp_path}/s.sqlite3",
               LBP_CDS_KNOWLEDGE_DIR=str(MINI), LBP_CDS_PUBLIC_BASE_URL="https://cds.example.org")
    proc = subprocess.run([sys.executable, "-m", "lbp_cds.cli", "serve", "--port", "18099"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "no trusted CDS clients" in proc.stderr and "--dev" in proc.stderr


def test_format_cards_without_cards():
    assert format_cards([], "lbp-triage", "patient-view") == "lbp-triage (patient-view): no cards."


@pytest.mark.slow
def test_the_wheel_installs_and_finds_its_knowledge_without_the_checkout(tmp_path):
    from lbp_cds.knowledge import pack_digest
    from lbp_cds.store import SCHEMA_REVISION

    """pip install of the built wheel, run from elsewhere: the bundled knowledge is found."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(wheels), str(ROOT)], check=True, timeout=300)
    (wheel,) = wheels.glob("lbp_cds-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    # The dependencies come from the test venv's site-packages (no download); its .pth files,
    # the editable install of this checkout among them, are not processed from there.
    import sysconfig

    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, timeout=300)
    # The console script as pip would write it for this venv's interpreter.
    (env_dir / "bin" / "lbp-cds").write_text(
        f"#!{py}\nimport sys\nfrom lbp_cds.cli import main\nsys.exit(main())\n")
    (env_dir / "bin" / "lbp-cds").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LBP_CDS_")}
    proc = subprocess.run([str(env_dir / "bin" / "lbp-cds"), "check-knowledge"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert str(env_dir) in proc.stdout  # the pack inside site-packages, not the checkout
    # ... and it is, byte for byte, the reviewed pack of the checkout.
    assert f"sha256 {pack_digest(ROOT / 'cds_services')})" in proc.stdout
    # The schema migrations travel in the wheel too.
    migrated = subprocess.run(
        [str(env_dir / "bin" / "lbp-cds"), "migrate"], cwd=tmp_path, capture_output=True,
        env=dict(env, LBP_CDS_DATABASE_URL=f"sqlite:///{tmp_path}/wheel.sqlite3"), text=True,
        timeout=120)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert f"schema revision {SCHEMA_REVISION}" in migrated.stdout
    fixtures = subprocess.run(
        [str(py), "-c", "from lbp_cds.fixtures import load_scenarios; "
         "print(len(load_scenarios()))"], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=120)
    assert fixtures.returncode == 0 and int(fixtures.stdout) >= 40, fixtures.stderr


def test_feedback_report_from_another_folder_creates_no_empty_store(tmp_path, monkeypatch, capsys):
    """The default store is relative to the current folder: elsewhere there is none, and the
    report says which file it looked for instead of reading a new empty one."""
    monkeypatch.delenv("LBP_CDS_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["feedback-report"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"no store at {tmp_path}/lbp-cds.sqlite3" in err and "LBP_CDS_DATABASE_URL" in err
    assert main(["purge", "--older-than-days", "30"]) == 1
    assert list(tmp_path.iterdir()) == []


def test_help_shows_no_internal_notes_and_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "Prometheus" not in top and "token" in top
    for command, flags in (("evaluate", ["--json"]), ("feedback-report", ["--json"]),
                           ("probe", ["--show-request", "--show-response"])):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for flag in flags:
            (line,) = [ln for ln in text.splitlines() if ln.strip().startswith(flag)]
            assert line.strip() != flag, f"{command} {flag} has no help"


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"lbp-cds {version('lbp-cds')}\n"


def _cli_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]))


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """``lbp-cds ... | head``: no BrokenPipeError traceback, exit 141 (as SIGPIPE would)."""
    proc = subprocess.Popen([sys.executable, "-m", "lbp_cds.cli", "fixtures", "list"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_cli_env())
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first write
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == EXIT_BROKEN_PIPE
    assert err == ""


def test_piped_into_head():
    """The shell pipeline itself: whether head leaves before the last write or not, the
    command ends without a traceback."""
    pipeline = (f"set -o pipefail; {sys.executable} -m lbp_cds.cli fixtures request "
                "ces-saddle-numbness-urinary-retention | head -1")
    proc = subprocess.run(["bash", "-c", pipeline], env=_cli_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout == "{\n"
    assert proc.stderr == ""
    assert proc.returncode in (0, EXIT_BROKEN_PIPE)


def test_fixtures_list_shows_the_patient_ids(capsys):
    from lbp_cds.fixtures import load_scenarios

    assert main(["fixtures", "list"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["scenario", "patient", "hook"]
    scenario = next(s for s in load_scenarios() if s.id == "inf-ivdu-fever")
    (row,) = [r for r in rows if r.split()[0] == scenario.id]
    assert row.split()[1:3] == [scenario.patient_id, "patient-view"]


def test_a_new_store_logs_one_migration_line_not_alembics(tmp_path):
    code = ("from lbp_cds.observability import configure_logging; configure_logging('INFO'); "
            "from lbp_cds.store import Store; "
            f"Store('sqlite:///{tmp_path}/new.sqlite3').migrate()")
    err = subprocess.run([sys.executable, "-c", code], env=_cli_env(), capture_output=True,
                         text=True, check=True, timeout=120).stderr
    lines = [json.loads(line) for line in err.splitlines()]
    assert [(r["logger"], r["msg"]) for r in lines] == [("lbp_cds.store",
                                                          "store schema migrated")]
    assert lines[0]["from_revision"] == "none"
