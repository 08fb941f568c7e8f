"""Property tests (hypothesis): hostile input never becomes a server error or an exception.

* Request parsing, through the Flask test client over the mini pack: arbitrary JSON-like
  documents, arbitrary bytes, and mutated valid requests and feedback, posted to every service
  and feedback endpoint, get only 200/400/404/412/413/415 (and 422 for feedback), every non-200
  an OperationOutcome.
* The FHIR record: ``record_from_resources`` / ``load_record`` with arbitrary resource dicts,
  then the mini engine's ``evaluate`` and card rendering, never raise; a resource that does not
  parse is skipped and counted.

The app fetches nothing: its HTTP session refuses every connection and its resolver every host
name (no network in CI; the egress check resolves a fhirServer's name before any connection).
"""

from __future__ import annotations

import copy
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbp_cds import api, create_app, hooks
from lbp_cds.config import Settings
from lbp_cds.egress import EgressRule
from lbp_cds.errors import PreconditionFailed
from lbp_cds.fhir_data import load_record, record_from_resources
from tests.builders import (
    bundle,
    condition,
    hook_request,
    imaging_order,
    medication,
    observation,
    patient,
    questionnaire_response,
)
from tests.conftest import MINI, NOW

EXAMPLES = int(os.environ.get("LBP_CDS_FUZZ_EXAMPLES", "200"))  # CI: 200 per property
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SERVICE_STATUSES = {200, 400, 404, 412, 413, 415}
FEEDBACK_STATUSES = SERVICE_STATUSES | {422}
SERVICES = ["mini-triage", "mini-order-select", "mini-order-sign"]


class RefusingAdapter(requests.adapters.BaseAdapter):
    """A transport that refuses every connection (the app must never reach the network)."""

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        raise requests.ConnectionError("no network in the fuzz tests")

    def close(self) -> None:
        pass


def no_resolution(host: str, *args: Any, **kwargs: Any) -> list[Any]:
    """A resolver that knows no name (the system's would send a DNS query)."""
    raise socket.gaierror(socket.EAI_NONAME, "no name resolution in the fuzz tests")


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    folder: Path = tmp_path_factory.mktemp("fuzz")
    session = requests.Session()
    session.mount("http://", RefusingAdapter())
    session.mount("https://", RefusingAdapter())
    app = create_app(Settings(dev=True, database_url=f"sqlite:///{folder}/store.sqlite3",
                              knowledge_dir=str(MINI), max_body_bytes=200_000,
                              max_json_depth=32, fhir_deadline_seconds=1.0),
                     clock=lambda: NOW, session=session, resolver=no_resolution)
    app.config["TESTING"] = True
    yield app
    app.extensions["lbp_cds"].store.engine.dispose()


@pytest.fixture(scope="module")
def fuzz_client(fuzz_app: Flask) -> FlaskClient:
    return fuzz_app.test_client()


# --------------------------------------------------------------------------- strategies

KEYS = ["hook", "hookInstance", "context", "prefetch", "fhirServer", "fhirAuthorization",
        "extension", "userId", "patientId", "encounterId", "draftOrders", "selections",
        "resourceType", "id", "entry", "resource", "subject", "reference", "code", "coding",
        "system", "feedback", "card", "outcome", "outcomeTimestamp", "acceptedSuggestions",
        "overrideReason", "reason", "userComment", "access_token", "token_type", "expires_in",
        "scope", "patient", "conditions", "observations", "link", "relation", "url"]
STRINGS = ["patient-view", "order-select", "order-sign", "encounter-start", "Bundle", "Patient",
           "Condition", "Observation", "ServiceRequest", "MedicationRequest", "OperationOutcome",
           "QuestionnaireResponse", "p1", "Patient/p1", "Practitioner/example",
           "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea", "accepted", "overridden", "Bearer",
           "2026-03-02T10:05:31Z", "2026-13-45", "http://127.0.0.1:9/fhir", "https://x.invalid",
           "ServiceRequest/sr1", "M54.41", "8310-5", "http://loinc.org", "", "\u0000",
           "\u202e", "a" * 300]

scalars = (st.none() | st.booleans()
           | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from(STRINGS) | st.text(max_size=20))
keys = st.sampled_from(KEYS) | st.text(max_size=12)
json_values = st.recursive(
    scalars,
    lambda children: (st.lists(children, max_size=5)
                      | st.dictionaries(keys, children, max_size=6)),
    max_leaves=40)


def valid_documents() -> list[dict[str, Any]]:
    """Valid requests for each service, and a valid feedback body."""
    triage = hook_request(prefetch={
        "patient": patient(), "conditions": bundle(condition("M54.41")),
        "observations": bundle(observation("8310-5", 38.6)), "medications": bundle(
            medication("8640", supply_days=120)),
        "questionnaireResponses": bundle(questionnaire_response({"ces-saddle": True}))})
    select = hook_request("order-select", drafts=[imaging_order()],
                          prefetch={"patient": patient(), "conditions": bundle(
                              condition("M54.41")), "observations": bundle()})
    sign = hook_request("order-sign", drafts=[imaging_order()],
                        prefetch={"patient": patient(), "conditions": bundle()})
    feedback = {"feedback": [{"card": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
                              "outcome": "overridden", "outcomeTimestamp": "2026-03-02T10:05:31Z",
                              "overrideReason": {"userComment": "x"}}]}
    return [triage, select, sign, feedback]


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a value inside ``node`` (the root included)."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, (*prefix, i))


def mutate(draw: st.DrawFn, doc: Any, times: int) -> Any:
    """``doc`` after ``times`` random mutations anywhere in it (replace, delete, insert,
    duplicate, wrap in a list or an object)."""
    for _ in range(times):
        path = draw(st.sampled_from(list(paths(doc))))
        action = draw(st.sampled_from(["replace", "delete", "insert", "duplicate", "wrap"]))
        if not path:
            if action == "replace":
                doc = draw(json_values)
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        if action == "replace":
            parent[last] = draw(json_values)
        elif action == "delete":
            del parent[last]
        elif action == "insert" and isinstance(parent[last], dict):
            parent[last][draw(keys)] = draw(json_values)
        elif action == "insert" and isinstance(parent[last], list):
            parent[last].insert(draw(st.integers(0, len(parent[last]))), draw(json_values))
        elif action == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[last]))
        elif action == "wrap":
            parent[last] = draw(st.sampled_from([[parent[last]], {"value": parent[last]}]))
    return doc


@st.composite
def mutated(draw: st.DrawFn) -> tuple[int, Any]:
    """(index of the valid document, that document with 1-4 random mutations)."""
    index = draw(st.integers(0, len(valid_documents()) - 1))
    doc = copy.deepcopy(valid_documents()[index])
    return index, mutate(draw, doc, draw(st.integers(1, 4)))


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


def check(response: Any, allowed: set[int]) -> None:
    assert response.status_code in allowed, (response.status_code, response.get_data()[:500])
    if response.status_code != 200:
        body = response.get_json()
        assert body["resourceType"] == "OperationOutcome" and body["issue"], body


service_ids = st.sampled_from(SERVICES) | st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~", min_size=1,
    max_size=20)


# --------------------------------------------------------------------------- request parsing


@FUZZ
@given(service=service_ids, doc=json_values)
def test_arbitrary_json_to_a_service(fuzz_client: FlaskClient, service: str, doc: Any) -> None:
    check(fuzz_client.post(f"/cds-services/{service}", data=dumps(doc),
                           content_type="application/json"), SERVICE_STATUSES)


@FUZZ
@given(service=service_ids, doc=json_values)
def test_arbitrary_json_as_feedback(fuzz_client: FlaskClient, service: str, doc: Any) -> None:
    check(fuzz_client.post(f"/cds-services/{service}/feedback", data=dumps(doc),
                           content_type="application/json"), FEEDBACK_STATUSES)


@FUZZ
@given(case=mutated(), service=st.sampled_from(SERVICES))
def test_mutated_valid_requests(fuzz_client: FlaskClient, case: tuple[int, Any],
                                service: str) -> None:
    index, doc = case
    if index == 3:  # the feedback document
        check(fuzz_client.post(f"/cds-services/{service}/feedback", data=dumps(doc),
                               content_type="application/json"), FEEDBACK_STATUSES)
    else:
        check(fuzz_client.post(f"/cds-services/{SERVICES[index]}", data=dumps(doc),
                               content_type="application/json"), SERVICE_STATUSES)


@FUZZ
@given(body=st.binary(max_size=300) | st.text(max_size=200).map(str.encode),
       content_type=st.sampled_from(["application/json", "application/fhir+json",
                                     "application/json; charset=latin-1", "text/plain", "",
                                     "application/x-www-form-urlencoded", "*/*"]),
       feedback=st.booleans())
def test_arbitrary_bytes(fuzz_client: FlaskClient, body: bytes, content_type: str,
                         feedback: bool) -> None:
    path = "/cds-services/mini-triage" + ("/feedback" if feedback else "")
    check(fuzz_client.post(path, data=body, content_type=content_type),
          FEEDBACK_STATUSES if feedback else SERVICE_STATUSES)


def test_valid_documents_are_served(fuzz_client: FlaskClient) -> None:
    """The seeds of the mutations are valid (so mutations start from requests that work)."""
    for service, doc in zip(SERVICES, valid_documents(), strict=False):
        response = fuzz_client.post(f"/cds-services/{service}", json=doc)
        assert response.status_code == 200, response.get_json()
        assert hooks.response_issues(response.get_json()) == []


# --------------------------------------------------------------------------- the FHIR record

TYPES = ["Patient", "Condition", "Observation", "MedicationRequest", "QuestionnaireResponse",
         "ServiceRequest", "Procedure", "ImagingStudy", "DiagnosticReport", "Bundle",
         "OperationOutcome", "NotAResource"]
CODINGS = [("http://hl7.org/fhir/sid/icd-10-cm", "M54.41"), ("http://hl7.org/fhir/sid/icd-10-cm",
                                                            "G83.4"),
           ("http://snomed.info/sct", "23056005"), ("http://snomed.info/sct", "449813001"),
           ("http://loinc.org", "8310-5"), ("http://loinc.org", "1988-5"),
           ("http://loinc.org", "30679-5"), ("http://www.nlm.nih.gov/research/umls/rxnorm", "8640")]
codeable = st.sampled_from(CODINGS).map(
    lambda c: {"coding": [{"system": c[0], "code": c[1]}]}) | json_values


# Near-valid FHIR shapes, each element possibly the wrong JSON type: what the raw screening of
# the facts reads before anything is parsed.
weird = st.sampled_from([None, True, 0, 5, -1.5, "x", "", [], {}, [5], ["x"], [None], [[]],
                         {"a": 1}, {"coding": 5}, [{"coding": True}]])
dates = st.sampled_from(["2026-03-01", "2026-03-01T10:00:00Z", "2026-02-25T08:00:00+01:00",
                         "2026", "2026-02", "yesterday", "2026-02-30", "2025-01-01"])
coding = st.fixed_dictionaries({}, optional={
    "system": st.sampled_from(sorted({c[0] for c in CODINGS})) | weird,
    "code": st.sampled_from(sorted({c[1] for c in CODINGS}) + ["H", "HH", "POS"]) | weird,
    "display": st.sampled_from(["prednisone 5 mg", "Fever", ""]) | weird})
concept = st.fixed_dictionaries({}, optional={
    "coding": st.lists(coding | weird, max_size=3) | weird,
    "text": st.sampled_from(["prednisone", "MRI lumbar spine"]) | weird}) | weird
number = st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True) | weird
quantity = st.fixed_dictionaries({}, optional={
    "value": number, "unit": st.sampled_from(["Cel", "[degF]", "degF", "kg", "[lb_av]", "mg/L",
                                              "d", "wk"]) | weird,
    "code": st.sampled_from(["Cel", "[degF]", "kg", "mg/L", "d"]) | weird,
    "system": st.just("http://unitsofmeasure.org") | weird}) | weird
answer = st.fixed_dictionaries({}, optional={
    "valueBoolean": st.booleans() | weird, "valueInteger": number, "valueDate": dates | weird,
    "valueCoding": coding | weird, "valueString": weird}) | weird
item = st.fixed_dictionaries({}, optional={
    "linkId": st.sampled_from(["ces-saddle", "sb-1", "sb-2", "sb-3", "lbp-onset-date"]) | weird,
    "answer": st.lists(answer, max_size=2) | weird,
    "item": st.lists(st.fixed_dictionaries({"linkId": st.just("sb-1"),
                                            "answer": st.lists(answer, max_size=1)}),
                     max_size=1) | weird}) | weird
shaped_resource = st.fixed_dictionaries(
    {"resourceType": st.sampled_from(TYPES[:9])},
    optional={
        "id": st.sampled_from(["a", "b", "p1", "sr1"]) | weird,
        "status": st.sampled_from(["final", "preliminary", "active", "draft", "completed",
                                   "entered-in-error"]) | weird,
        "intent": st.sampled_from(["order", "plan"]) | weird,
        "subject": st.sampled_from([{"reference": "Patient/p1"}, {"reference": "Patient/x"},
                                    {"reference": 5}]) | weird,
        "code": concept, "valueCodeableConcept": concept, "medicationCodeableConcept": concept,
        "clinicalStatus": concept, "verificationStatus": concept, "category": weird,
        "interpretation": st.lists(concept, max_size=2) | weird,
        "valueQuantity": quantity,
        "component": st.lists(st.fixed_dictionaries({}, optional={
            "code": concept, "valueQuantity": quantity}) | weird, max_size=2) | weird,
        "referenceRange": st.lists(st.fixed_dictionaries({}, optional={
            "low": quantity, "high": quantity}) | weird, max_size=2) | weird,
        "effectiveDateTime": dates | weird, "onsetDateTime": dates | weird,
        "recordedDate": dates | weird, "authoredOn": dates | weird, "authored": dates | weird,
        "issued": dates | weird, "birthDate": dates | weird,
        "effectivePeriod": st.fixed_dictionaries({}, optional={"start": dates | weird}) | weird,
        "dispenseRequest": st.fixed_dictionaries({}, optional={
            "expectedSupplyDuration": quantity, "numberOfRepeatsAllowed": number,
            "validityPeriod": weird}) | weird,
        "dosageInstruction": weird,
        "item": st.lists(item, max_size=3) | weird,
        "gender": st.sampled_from(["male", "female"]) | weird,
    })


@st.composite
def resources(draw: st.DrawFn) -> dict[str, Any]:
    """A resource-like dict: a near-valid shape with wrong types anywhere, a valid resource
    with random damage, or random fields around a code the mini rules look for (so that the
    engine tries to parse it)."""
    choice = draw(st.integers(0, 2))
    if choice == 0:
        return draw(shaped_resource)
    if choice == 1:
        base = draw(st.sampled_from([
            patient(), condition("M54.41"), condition("G83.4"), observation("8310-5", 38.6),
            observation("1988-5", 50, unit="mg/L"), medication("8640", supply_days=120),
            questionnaire_response({"ces-saddle": True, "sb-1": 1}), imaging_order()]))
        doc = mutate(draw, copy.deepcopy(base), draw(st.integers(0, 3)))
        return doc if isinstance(doc, dict) else {"resourceType": "Observation", "value": doc}
    doc = draw(st.dictionaries(keys, json_values, max_size=6))
    doc["resourceType"] = draw(st.sampled_from(TYPES) | st.text(max_size=8) | json_values)
    for field in draw(st.lists(st.sampled_from(["code", "valueCodeableConcept",
                                                "medicationCodeableConcept", "component"]),
                               max_size=2)):
        doc[field] = draw(codeable)
    if draw(st.booleans()):
        doc["subject"] = draw(st.sampled_from([{"reference": "Patient/p1"},
                                               {"reference": "Patient/other"}]) | json_values)
    for field in ("effectiveDateTime", "onsetDateTime", "authoredOn", "authored"):
        if draw(st.integers(0, 4)) == 0:
            doc[field] = draw(st.sampled_from(["2026-03-01", "2026-03-01T10:00:00Z", "2026",
                                               "yesterday", "2026-02-30"]) | json_values)
    return doc


def evaluate_everything(fuzz_app: Flask, record: Any, doc: dict[str, Any]) -> None:
    rt: api.Runtime = fuzz_app.extensions["lbp_cds"]
    req = hooks.parse_request(doc)
    for service in rt.knowledge.services:
        if service.hook != req.hook:
            continue
        with fuzz_app.app_context():
            issued = api.evaluate(rt, service, req, record, NOW)
        assert hooks.response_issues({"cards": [c.card for c in issued]}) == []


def assert_skipped_and_counted(record: Any, items: list[dict[str, Any]]) -> None:
    """Every resource of a type is either parsed or counted as a parse failure."""
    for rtype in {r.get("resourceType") for r in items if isinstance(r.get("resourceType"), str)}:
        before = record.parse_failures[rtype]
        parsed = record.all(rtype)
        assert len(parsed) + record.parse_failures[rtype] - before <= record.count(rtype)
        failures_now = record.parse_failures[rtype]
        # a second pass parses nothing again and counts nothing twice
        assert len(record.all(rtype)) == len(parsed)
        assert record.parse_failures[rtype] == failures_now
        assert len(parsed) + failures_now >= record.count(rtype)


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(items=st.lists(resources(), max_size=8),
       orders=st.lists(resources(), max_size=3),
       hook=st.sampled_from(["patient-view", "order-select", "order-sign"]))
def test_record_from_arbitrary_resources_never_raises(fuzz_app: Flask,
                                                      items: list[dict[str, Any]],
                                                      orders: list[dict[str, Any]],
                                                      hook: str) -> None:
    record = record_from_resources("p1", items, draft_orders=orders)
    drafts = [o for o in orders if isinstance(o.get("id"), str)]
    doc = hook_request(hook, drafts=[imaging_order()], prefetch={})
    if hook != "patient-view":
        doc["context"]["draftOrders"]["entry"] += [{"resource": o} for o in drafts
                                                   if isinstance(o.get("resourceType"), str)]
        if hook == "order-select":
            doc["context"]["selections"] = ["ServiceRequest/sr1"]
    try:
        hooks.parse_request(doc)
    except hooks.RequestError:
        doc = hook_request(hook, drafts=[imaging_order()], prefetch={})
    evaluate_everything(fuzz_app, record, doc)
    assert_skipped_and_counted(record, items)
    record.draft_orders()  # unparsable drafts are counted, not raised


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(prefetch=st.dictionaries(
    st.sampled_from(["patient", "conditions", "observations", "medications",
                     "questionnaireResponses", "unknown"]),
    json_values | resources() | st.lists(resources(), max_size=5).map(
        lambda rs: {"resourceType": "Bundle", "type": "searchset",
                    "entry": [{"resource": r} for r in rs]}),
    max_size=6),
    fhir_server=st.none() | st.sampled_from(["https://fhir.invalid/r4", "http://127.0.0.1:9"]))
def test_load_record_from_arbitrary_prefetch_never_raises(
        fuzz_app: Flask, prefetch: dict[str, Any], fhir_server: str | None) -> None:
    rt: api.Runtime = fuzz_app.extensions["lbp_cds"]
    doc = hook_request(prefetch={})
    doc["prefetch"] = prefetch
    if fhir_server:
        doc["fhirServer"] = fhir_server
    try:
        req = hooks.parse_request(json.loads(json.dumps(doc)))
    except hooks.RequestError:
        return  # the schema refuses it: the HTTP tests cover that path
    service = rt.knowledge.services_with_id("mini-triage")[0]
    try:
        record = load_record(req, service, rt.fetcher, rt.policy, egress=EgressRule.dev())
    except PreconditionFailed:
        return
    evaluate_everything(fuzz_app, record, doc)
    items = [r for v in prefetch.values() if isinstance(v, dict)
             for r in ([e.get("resource") for e in v.get("entry") or []
                        if isinstance(e, dict) and isinstance(e.get("resource"), dict)]
                       if v.get("resourceType") == "Bundle" and isinstance(v.get("entry"), list)
                       else [v])]
    assert_skipped_and_counted(record, [r for r in items if isinstance(r, dict)])


def test_malformed_resources_are_skipped_and_counted(fuzz_app: Flask) -> None:
    """The deterministic case behind the properties: a fever observation that cannot be read even
    leniently (a modifier extension that is not one: leaving it out would change the meaning) is
    skipped, counted and named on the card; a valid one beside it still fires the rule."""
    bad = observation("8310-5", 39.0, rid="bad")
    bad["modifierExtension"] = "not an extension"
    items = [patient(), condition("M54.41"), bad, observation("8310-5", 38.6, rid="good")]
    record = record_from_resources("p1", items)
    rt: api.Runtime = fuzz_app.extensions["lbp_cds"]
    service = rt.knowledge.services_with_id("mini-triage")[0]
    matches = rt.engine.evaluate(service, record, NOW)
    fever = next(m for m in matches if m.rule.id == "FEV")
    assert any("1 Observation could not be read" in u for u in fever.not_checked)
    assert record.parse_failures["Observation"] == 1
    assert [o.id for o in record.all("Observation")] == ["good"]


def test_a_subject_sent_as_a_string_is_read_as_a_reference() -> None:
    bad = observation("8310-5", 39.0, rid="bad")
    bad["subject"] = "Patient/p1"
    record = record_from_resources("p1", [patient(), bad])
    assert [o.subject.reference for o in record.all("Observation")] == ["Patient/p1"]
    assert record.repaired["Observation"] == 1 and record.parse_failures["Observation"] == 0

