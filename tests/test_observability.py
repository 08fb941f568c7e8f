"""Structured logs: JSON lines with request ids, never tokens, patient identifiers or names."""

from __future__ import annotations

import io
import json
import logging

from lbp_cds.observability import JsonFormatter, configure_logging, request_id_var
from tests.builders import bundle, condition, hook_request, patient


def capture() -> tuple[io.StringIO, logging.Logger]:
    stream = io.StringIO()
    configure_logging("DEBUG", stream)
    for name in ("lbp_cds", "lbp_cds.api", "lbp_cds.fhir_data"):
        logging.getLogger(name).setLevel(logging.NOTSET)  # whatever earlier tests set
    return stream, logging.getLogger("lbp_cds.test")


def test_lines_are_json_with_the_request_id():
    stream, log = capture()
    token = request_id_var.set("rid-1")
    try:
        log.info("hello", extra={"rules": ["CES-1"]})
    finally:
        request_id_var.reset(token)
    line = json.loads(stream.getvalue().splitlines()[-1])
    assert line["msg"] == "hello" and line["request_id"] == "rid-1"
    assert line["rules"] == ["CES-1"] and line["level"] == "info"


def test_forbidden_keys_are_redacted_whatever_a_caller_passes():
    stream, log = capture()
    log.info("oops", extra={"patient_id": "PAT-123", "token": "abc", "patientId": "Jane Doe"})
    text = stream.getvalue()
    assert "PAT-123" not in text and "abc" not in text and "Jane Doe" not in text


def test_exceptions_are_logged_without_their_message():
    stream, log = capture()
    who = "-".join(["Jane", "Doe"])  # built at run time: the trace shows code lines, not data
    try:
        raise ValueError(f"birthDate of {who} is invalid")
    except ValueError:
        log.exception("failed")
    line = json.loads(stream.getvalue().splitlines()[-1])
    assert line["exception"] == "ValueError" and "Jane-Doe" not in stream.getvalue()
    assert "test_observability.py" in line["trace"]


def test_a_whole_hook_call_logs_no_patient_data(client):
    stream, _log = capture()
    pid = "PATIENT-SECRET-ID-42"
    p = patient(pid=pid) | {"name": [{"family": "Zebedee", "given": ["Quentin"]}]}
    c = condition("M54.41") | {"subject": {"reference": f"Patient/{pid}"}}
    body = hook_request(prefetch={"patient": p, "conditions": bundle(c)})
    body["context"]["patientId"] = pid
    body["fhirServer"] = "http://127.0.0.1:9/fhir"
    body["fhirAuthorization"] = {"access_token": "FHIR-TOKEN-XYZ", "token_type": "Bearer",
                                 "expires_in": 300, "scope": "patient/*.read",
                                 "subject": "lbp-cds", "patient": pid}
    resp = client.post("/cds-services/mini-triage", json=body)
    assert resp.status_code == 200
    text = stream.getvalue()
    assert text, "the call must have logged something"
    for secret in (pid, "Zebedee", "Quentin", "FHIR-TOKEN-XYZ", "1970-01-01"):
        assert secret not in text, secret
    assert '"hook_instance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea"' in text


def test_formatter_handles_records_without_context():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "plain", (), None)
    assert json.loads(JsonFormatter().format(record))["msg"] == "plain"
