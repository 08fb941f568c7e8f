"""Prefetch semantics and the FHIR fetcher against a local HTTP server that misbehaves.

The real FHIR server (sekmet) covers the well-behaved paths in the integration suite; the
failures a hospital's server can produce (hangs, garbage, 5xx, huge bodies, hostile links) are
served here by a small programmable server on loopback.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from lbp_cds import knowledge
from lbp_cds.errors import PreconditionFailed
from lbp_cds.fhir_data import FetchPolicy, FhirFetcher, load_record, resolve_template
from lbp_cds.hooks import parse_request
from tests.builders import bundle, condition, hook_request, observation, patient
from tests.conftest import MINI

Handler = Callable[[BaseHTTPRequestHandler], tuple[int, bytes]]


class FakeFhir:
    """Routes by path prefix; records requests (path, Authorization header)."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.seen: list[tuple[str, str]] = []
        server = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server.seen.append((self.path, self.headers.get("Authorization", "")))
                for prefix, handler in sorted(server.routes.items(), key=lambda r: -len(r[0])):
                    if self.path.startswith(prefix):
                        status, body = handler(self)
                        break
                else:
                    status, body = 404, b'{"resourceType":"OperationOutcome","issue":[]}'
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/fhir+json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def json(self, prefix: str, doc: Any, status: int = 200) -> None:
        self.routes[prefix] = lambda h: (status, json.dumps(doc).encode())


@pytest.fixture
def fhir() -> Iterator[FakeFhir]:
    server = FakeFhir()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture(scope="module")
def service():
    return next(s for s in knowledge.load(MINI).services if s.id == "mini-triage")


POLICY = FetchPolicy(connect_timeout=1, read_timeout=1, deadline=2, max_pages=5,
                     max_resources=1000, max_response_bytes=200_000)


def load(service, fhir: FakeFhir | None, prefetch: dict[str, Any] | None, policy=POLICY,
         token: str | None = "s3cret-token"):
    extra: dict[str, Any] = {}
    if fhir is not None:
        extra["fhirServer"] = fhir.base
        if token:
            extra["fhirAuthorization"] = {"access_token": token, "token_type": "Bearer",
                                          "expires_in": 300, "scope": "patient/*.read",
                                          "subject": "lbp-cds", "patient": "p1"}
    req = parse_request(hook_request(prefetch=prefetch, **extra))
    return load_record(req, service, FhirFetcher(requests.Session(), policy), policy)


def serve_patient(fhir: FakeFhir) -> None:
    fhir.json("/fhir/Patient/p1", patient())
    fhir.json("/fhir/Condition", bundle(condition("M54.41")))
    fhir.json("/fhir/Observation", bundle(observation("8310-5", 38.5)))
    fhir.json("/fhir/MedicationRequest", bundle())
    fhir.json("/fhir/QuestionnaireResponse", bundle())


def test_templates_resolve_only_spec_tokens():
    req = parse_request(hook_request())
    assert resolve_template("Condition?patient={{context.patientId}}", req) == \
        "Condition?patient=p1"
    assert resolve_template("Practitioner/{{userPractitionerId}}", req) == \
        "Practitioner/example"
    assert resolve_template("Encounter/{{context.encounterId}}", req) is None


def test_full_prefetch_needs_no_server(service):
    prefetch = {"patient": patient(), "conditions": bundle(condition("M54.41")),
                "observations": bundle(), "medications": None, "questionnaireResponses": None}
    record = load(service, None, prefetch)
    assert [s.state for s in record.statuses] == ["prefetched", "prefetched", "prefetched",
                                                 "null", "null"]
    assert record.unavailable == {}


@pytest.mark.req("34", "60", "61")
def test_missing_keys_are_fetched_in_parallel_with_the_token(service, fhir):
    serve_patient(fhir)
    record = load(service, fhir, {"patient": patient()})
    states = {s.key: s.state for s in record.statuses}
    assert states == {"patient": "prefetched", "conditions": "fetched",
                      "observations": "fetched", "medications": "fetched",
                      "questionnaireResponses": "fetched"}
    assert all(auth == "Bearer s3cret-token" for _p, auth in fhir.seen)
    # Our own searches ask for large pages.
    assert ("/fhir/Condition?patient=p1&_count=500", "Bearer s3cret-token") in fhir.seen
    assert record.count("Observation") == 1


def test_next_links_are_followed_within_the_page_budget(service, fhir):
    serve_patient(fhir)
    page2 = bundle(observation("8310-5", 39.0, rid="o2"))
    page1 = bundle(observation("8310-5", 37.0, rid="o1"))
    page1["link"] = [{"relation": "next", "url": f"{fhir.base}/Observation-page2"}]
    fhir.json("/fhir/Observation-page2", page2)
    fhir.json("/fhir/Observation", page1)
    record = load(service, fhir, {"patient": patient()})
    assert record.count("Observation") == 2


def test_paged_prefetch_is_completed_from_the_next_link(service, fhir):
    serve_patient(fhir)
    fhir.json("/fhir/Observation-page2", bundle(observation("8310-5", 39.0, rid="o2")))
    first = bundle(observation("8310-5", 37.0, rid="o1"))
    first["link"] = [{"relation": "next", "url": f"{fhir.base}/Observation-page2"}]
    record = load(service, fhir, {"patient": patient(), "conditions": bundle(),
                                  "observations": first, "medications": None,
                                  "questionnaireResponses": None})
    assert record.count("Observation") == 2


def test_endless_paging_stops_at_the_budget(service, fhir):
    serve_patient(fhir)
    looping = bundle(observation("8310-5", 37.0))
    looping["link"] = [{"relation": "next", "url": f"{fhir.base}/Observation?page=again"}]
    fhir.json("/fhir/Observation", looping)
    record = load(service, fhir, {"patient": patient()})
    assert "more than 5 pages" in record.missing_reason("Observation")


def test_next_link_to_another_host_is_not_followed_with_the_token(service, fhir):
    serve_patient(fhir)
    leaking = bundle(observation("8310-5", 37.0))
    leaking["link"] = [{"relation": "next", "url": "http://127.0.0.2:9/steal"}]
    fhir.json("/fhir/Observation", leaking)
    record = load(service, fhir, {"patient": patient()})
    assert "away from the FHIR server" in record.missing_reason("Observation")


@pytest.mark.parametrize("status", [401, 403, 404, 500, 503])
def test_http_errors_on_required_data_are_412(service, fhir, status):
    serve_patient(fhir)
    fhir.json("/fhir/Condition", {"resourceType": "OperationOutcome", "issue": []}, status)
    with pytest.raises(PreconditionFailed) as err:
        load(service, fhir, {"patient": patient()})
    assert err.value.issues[0].location == "prefetch.conditions"
    assert f"HTTP {status}" in err.value.issues[0].message


def test_error_on_optional_data_degrades_to_unknown(service, fhir):
    serve_patient(fhir)
    fhir.json("/fhir/Observation", {"resourceType": "OperationOutcome", "issue": []}, 500)
    record = load(service, fhir, {"patient": patient()})
    assert not record.available("Observation")
    assert "HTTP 500" in record.missing_reason("Observation")


@pytest.mark.parametrize("body", [b"<html>oops</html>", b"[1, 2]", b'{"resourceType": "Bundl'])
def test_garbage_is_unavailable_not_a_crash(service, fhir, body):
    serve_patient(fhir)
    fhir.routes["/fhir/Observation"] = lambda h: (200, body)
    record = load(service, fhir, {"patient": patient()})
    assert not record.available("Observation")


def test_operation_outcome_with_200_is_unavailable(service, fhir):
    serve_patient(fhir)
    fhir.json("/fhir/Observation", {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "too-costly"}]})
    record = load(service, fhir, {"patient": patient()})
    assert "OperationOutcome" in record.missing_reason("Observation")


def test_huge_response_is_cut_off(service, fhir):
    serve_patient(fhir)
    big = bundle(*[observation("8310-5", 37.0, rid=f"o{i}") for i in range(2000)])
    fhir.json("/fhir/Observation", big)
    record = load(service, fhir, {"patient": patient()})
    assert "larger than allowed" in record.missing_reason("Observation")


def test_a_server_that_never_answers_costs_no_more_than_the_deadline(service, fhir):
    serve_patient(fhir)

    def hang(h: BaseHTTPRequestHandler) -> tuple[int, bytes]:
        time.sleep(5)
        return 200, b"{}"

    fhir.routes["/fhir/Observation"] = hang
    fhir.routes["/fhir/MedicationRequest"] = hang
    started = time.monotonic()
    record = load(service, fhir, {"patient": patient()})
    assert time.monotonic() - started < POLICY.deadline + 0.5
    assert not record.available("Observation") and not record.available("MedicationRequest")
    assert record.available("Condition")


def test_unreachable_server_on_required_data_is_412(service):
    policy = FetchPolicy(connect_timeout=0.5, read_timeout=0.5, deadline=1)
    req = parse_request(hook_request(prefetch={"patient": patient()},
                                     fhirServer="http://127.0.0.1:9/fhir"))
    with pytest.raises(PreconditionFailed):
        load_record(req, service, FhirFetcher(requests.Session(), policy), policy)


def test_resources_of_another_patient_are_dropped(service):
    stranger = condition("G83.4", rid="c9")
    stranger["subject"] = {"reference": "Patient/someone-else"}
    record = load(service, None, {"patient": patient(), "conditions": bundle(
        condition("M54.41"), stranger), "observations": None, "medications": None,
        "questionnaireResponses": None})
    assert record.count("Condition") == 1


def test_unparsable_resources_are_skipped_and_counted(service):
    from lbp_cds.knowledge import load as load_pack

    bad = condition("M54.42", rid="c2")
    bad["onsetDateTime"] = "not a date"
    record = load(service, None, {"patient": patient(), "conditions": bundle(
        condition("M54.41"), bad), "observations": None, "medications": None,
        "questionnaireResponses": None})
    vs = load_pack(MINI).valueset("lbp")
    assert len(record.coded("Condition", vs)) == 1
    assert record.parse_failures["Condition"] == 1


def test_the_token_never_reaches_the_logs(service, fhir, caplog):
    serve_patient(fhir)
    fhir.json("/fhir/Observation", {}, 500)
    caplog.set_level("DEBUG")
    load(service, fhir, {"patient": patient()}, token="TOPSECRET-abc123")
    assert "TOPSECRET" not in caplog.text


def _cut_short(fhir: FakeFhir, n: int, total: int, honour_count: bool) -> None:
    """A server that answers searches with at most n entries, total = the real count, no link."""
    all_obs = [observation("8310-5", 37.0 + i / 100, rid=f"o{i}") for i in range(total)]

    def handler(h: BaseHTTPRequestHandler) -> tuple[int, bytes]:
        from urllib.parse import parse_qs, urlsplit

        count = int(parse_qs(urlsplit(h.path).query).get("_count", [n])[0])
        shown = all_obs[:count] if honour_count else all_obs[:n]
        doc = bundle(*shown) | {"total": total}
        return 200, json.dumps(doc).encode()

    fhir.routes["/fhir/Observation"] = handler


def test_a_search_cut_short_without_a_link_is_asked_for_in_full(service, fhir):
    serve_patient(fhir)
    _cut_short(fhir, n=3, total=12, honour_count=True)
    from dataclasses import replace

    record = load(service, fhir, {"patient": patient()}, policy=replace(POLICY, page_size=5))
    assert record.available("Observation") and record.count("Observation") == 12
    assert any("_count=12" in path for path, _auth in fhir.seen)


def test_a_search_that_stays_short_is_partial_evidence_and_unknown_absence(service, fhir):
    serve_patient(fhir)
    _cut_short(fhir, n=3, total=12, honour_count=False)
    record = load(service, fhir, {"patient": patient()})
    assert record.count("Observation") == 3  # what came is kept as evidence of presence
    assert "returned 3 of 12" in record.missing_reason("Observation")


def test_a_prefetch_cut_short_is_fetched_again_or_marked_incomplete(service, fhir):
    short = bundle(observation("8310-5", 37.0)) | {"total": 5}
    prefetch = {"patient": patient(), "conditions": bundle(condition("M54.41")),
                "observations": short, "medications": None, "questionnaireResponses": None}
    offline = load(service, None, prefetch)
    assert offline.count("Observation") == 1
    assert "held 1 of 5" in offline.missing_reason("Observation")
    serve_patient(fhir)
    online = load(service, fhir, prefetch)
    assert online.available("Observation") and online.count("Observation") == 1
    assert any(path.startswith("/fhir/Observation?") for path, _auth in fhir.seen)


def test_the_patient_is_parsed_as_the_elements_rules_read():
    from datetime import datetime, timezone

    from lbp_cds.facts import Context, age, sex
    from lbp_cds.fhir_data import SEX_EXTENSION, record_from_resources

    now = datetime(2026, 3, 2, tzinfo=timezone.utc)
    person = {**patient(gender="male", birth="1970-01-01"),
              # Elements no rule reads, one of them invalid: they must not hide age and sex.
              "telecom": "not an array", "name": [{"family": "X"}],
              "extension": [
                  {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
                   "extension": [{"url": "text", "valueString": "x"}]},
                  {"url": SEX_EXTENSION, "extension": [{"url": "value", "valueCodeableConcept": {
                      "coding": [{"system": "http://loinc.org", "code": "female-typical"}]}}]}]}

    def context(record: Any) -> Context:
        return Context(record=record, now=now, knowledge=None,  # type: ignore[arg-type]
                       hook="patient-view")

    record = record_from_resources("p1", [person])
    assert age(context(record), {"op": "ge", "value": 56}).status == "present"
    # The sex parameter for clinical use is kept and wins over gender.
    assert sex(context(record), {"is": "female"}).status == "present"
    assert record.patient.telecom is None and record.patient.name is None
    # What is read is still validated: a birth date that is not a date leaves age unknown.
    bad = record_from_resources("p1", [{**person, "birthDate": "1970-13-45"}])
    assert age(context(bad), {"op": "ge", "value": 56}).status == "unknown"
    assert bad.parse_failures["Patient"] == 1
