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

from lbp_cds import knowledge
from lbp_cds.egress import EgressRule
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
    return load_record(req, service, FhirFetcher(None, policy), policy,
                       egress=EgressRule.dev())


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
        load_record(req, service, FhirFetcher(None, policy), policy,
                       egress=EgressRule.dev())


def test_resources_of_another_patient_are_dropped(service):
    stranger = condition("G83.4", rid="c9")
    stranger["subject"] = {"reference": "Patient/someone-else"}
    record = load(service, None, {"patient": patient(), "conditions": bundle(
        condition("M54.41"), stranger), "observations": None, "medications": None,
        "questionnaireResponses": None})
    assert record.count("Condition") == 1


def test_an_element_that_cannot_be_read_is_left_out_by_its_location(service):
    """One bad element no longer costs the resource: it is left out (pydantic's error location
    names it), counted, and the facts handed the resource are told what they lost."""
    from lbp_cds.knowledge import load as load_pack

    bad = condition("M54.42", rid="c2")
    bad["onsetDateTime"] = "not a date"
    record = load(service, None, {"patient": patient(), "conditions": bundle(
        condition("M54.41"), bad), "observations": None, "medications": None,
        "questionnaireResponses": None})
    vs = load_pack(MINI).valueset("lbp")
    read = record.coded("Condition", vs)
    assert [c.id for c in read] == ["c1", "c2"] and read[1].onsetDateTime is None
    assert read[1].code.coding[0].code == "M54.42"
    assert record.parse_failures["Condition"] == 0
    assert record.dropped == {"Condition": {"onsetDateTime": 1}}
    assert [(f.noun, f.lost) for f in record.misses] == [("Condition", ("onsetDateTime",))]


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
    # What is read is still validated: a birth date that is not a date leaves age unknown, and
    # is left out (sex is still read), and the answer says why.
    bad = record_from_resources("p1", [{**person, "birthDate": "1970-13-45"}])
    from lbp_cds.facts import FACTS, evaluate_fact

    unknown_age = evaluate_fact(FACTS["age"].fn, context(bad),
                                {"op": "ge", "value": 56, "label": "age"})
    assert unknown_age.status == "unknown"
    assert "age: birthDate of 1 Patient could not be read" in [u.reason for u in unknown_age.unknown]
    assert bad.dropped["Patient"]["birthDate"] == 1 and bad.parse_failures["Patient"] == 0
    assert sex(context(bad), {"is": "female"}).status == "present"


# -- reading leniently ---------------------------------------------------------------------------
def _dstu2_condition(code: str, rid: str, system: str = "http://hl7.org/fhir/sid/icd-10-cm",
                     pid: str = "p1") -> dict[str, Any]:
    """A Condition as a DSTU2 server writes it: ``patient``, string statuses, ``dateRecorded``,
    one category object."""
    return {"resourceType": "Condition", "id": rid, "patient": {"reference": f"Patient/{pid}"},
            "code": {"coding": [{"system": system, "code": code}]},
            "category": {"coding": [{"system": "http://hl7.org/fhir/condition-category",
                                     "code": "diagnosis"}]},
            "clinicalStatus": "active", "verificationStatus": "confirmed",
            "onsetDateTime": "2026-02-20", "dateRecorded": "2026-02-21"}


def test_a_category_sent_as_an_object_is_wrapped_in_a_list():
    """The HL7 CDS Hooks Sandbox sends MedicationRequest.category as one object: the order is
    read, not discarded, and the raw resource is left as it came (suggestions copy it)."""
    from lbp_cds.fhir_data import record_from_resources
    from tests.builders import medication

    sandbox = medication("1049621", rid="m1", status="draft")
    sandbox["category"] = {"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/medicationrequest-category",
        "code": "outpatient"}]}
    record = record_from_resources("p1", [patient()], draft_orders=[sandbox])
    [order] = record.draft_orders()
    assert order.category[0].coding[0].code == "outpatient"
    assert order.medicationCodeableConcept.coding[0].code == "1049621"
    assert record.repaired["MedicationRequest"] == 1 and not record.parse_failures
    assert record.misses == []  # nothing a fact reads was lost
    assert isinstance(sandbox["category"], dict)


def test_a_dstu2_condition_is_read_as_r4():
    from lbp_cds.fhir_data import (
        CONDITION_CLINICAL,
        CONDITION_VER_STATUS,
        record_from_resources,
    )

    old = _dstu2_condition("I71.40", "aaa")
    record = record_from_resources("p1", [patient(), old])
    [c] = record.all("Condition")
    assert c.subject.reference == "Patient/p1"
    assert (c.clinicalStatus.coding[0].system, c.clinicalStatus.coding[0].code) == (
        CONDITION_CLINICAL, "active")
    assert (c.verificationStatus.coding[0].system, c.verificationStatus.coding[0].code) == (
        CONDITION_VER_STATUS, "confirmed")
    assert str(c.recordedDate) == "2026-02-21" and c.category[0].coding[0].code == "diagnosis"
    assert record.repaired["Condition"] == 1 and not record.dropped and not record.misses
    # A status DSTU2 did not have is left out, and the facts handed the Condition are told.
    odd = {**_dstu2_condition("I71.40", "aaa2"), "clinicalStatus": "hmm"}
    record = record_from_resources("p1", [patient(), odd])
    assert record.all("Condition")[0].clinicalStatus is None
    assert [(f.noun, f.lost) for f in record.misses] == [("Condition", ("clinicalStatus",))]


def test_an_unreadable_resource_makes_a_fact_unknown_not_absent():
    """The code index sees the codes of a resource that then cannot be read: the fact that asks
    for them answers unknown and says how many could not be read."""
    from lbp_cds.facts import FACTS, Context, evaluate_fact
    from lbp_cds.fhir_data import record_from_resources
    from tests.conftest import NOW

    pack = knowledge.load(MINI)
    ces = condition("G83.4", rid="ces")
    ces["modifierExtension"] = [{"url": 7}]  # a modifier cannot be left out: unreadable
    record = record_from_resources("p1", [patient(), condition("M54.41"), ces])
    ctx = Context(record=record, knowledge=pack, now=NOW, hook="patient-view")
    args = {"valueset": pack.valueset("ces"), "label": "cauda equina"}
    result = evaluate_fact(FACTS["condition"].fn, ctx, args)
    assert result.status == "unknown"
    assert [(u.reason, u.kind) for u in result.unknown] == [
        ("cauda equina: 1 Condition could not be read", "unreadable")]
    assert record.parse_failures["Condition"] == 1
    # Without the unreadable one, the same question is answered absent.
    clean = record_from_resources("p1", [patient(), condition("M54.41")])
    ctx = Context(record=clean, knowledge=pack, now=NOW, hook="patient-view")
    assert evaluate_fact(FACTS["condition"].fn, ctx, args).status == "absent"


def test_another_fhir_version_that_cannot_be_mapped_is_unreadable():
    from lbp_cds.fhir_data import read_leniently
    from pydantic import ValidationError

    from fhir.resources.R4B import get_fhir_model_class

    no_status = observation("8310-5", 38.0)
    del no_status["status"]  # required in R4: nothing to leave out that would make it readable
    try:
        get_fhir_model_class("Observation").model_validate(no_status)
    except ValidationError as exc:
        assert read_leniently(no_status, exc).model is None
    from lbp_cds.fhir_data import record_from_resources

    order = {"resourceType": "MedicationOrder", "id": "m", "patient": {"reference": "Patient/p1"}}
    record = record_from_resources("p1", [patient()], draft_orders=[order])
    assert record.draft_orders() == [] and record.parse_failures["MedicationOrder"] == 1


def _prefetch(*conditions: dict[str, Any], person: dict[str, Any] | None = None,
              observations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"patient": person or patient(), "conditions": bundle(*conditions),
            "observations": bundle(*(observations or [])), "medications": None,
            "questionnaireResponses": None}


def test_required_data_all_unreadable_is_412_naming_the_key(service):
    bad = condition("M54.41")
    bad["modifierExtension"] = "x"
    with pytest.raises(PreconditionFailed) as err:
        load(service, None, _prefetch(bad))
    [issue] = err.value.issues
    assert issue.location == "prefetch.conditions" and "could be read" in issue.message
    # One readable Condition beside it is enough: the other is named on the cards instead.
    record = load(service, None, _prefetch(bad, condition("M54.42", rid="c2")))
    assert record.parse_failures["Condition"] == 1


def test_a_patient_resource_of_another_patient_is_412(service):
    with pytest.raises(PreconditionFailed) as err:
        load(service, None, _prefetch(condition("M54.41"), person=patient(pid="someone-else")))
    assert [i.location for i in err.value.issues] == ["prefetch.patient"]
    assert "another patient" in err.value.issues[0].message


def test_required_resources_all_of_another_patient_is_412(service, caplog):
    stranger = condition("M54.41")
    stranger["subject"] = {"reference": "Patient/someone-else"}
    caplog.set_level("WARNING")
    with pytest.raises(PreconditionFailed) as err:
        load(service, None, _prefetch(stranger))
    assert [i.location for i in err.value.issues] == ["prefetch.conditions"]
    assert "someone-else" not in caplog.text and "M54.41" not in caplog.text
    assert any(getattr(r, "dropped", None) == {"Condition": 1} for r in caplog.records)


def test_other_patients_resources_are_left_out_and_their_type_is_unavailable(service):
    stranger = observation("8310-5", 39.5, rid="o9")
    stranger["subject"] = {"reference": "Patient/someone-else"}
    record = load(service, None, _prefetch(condition("M54.41"), observations=[
        stranger, observation("8310-5", 36.8)]))
    assert record.count("Observation") == 1 and record.other_patient == {"Observation": 1}
    assert not record.available("Observation")
    assert record.missing_reason("Observation") == (
        "1 Observation named another patient and was left out")
