"""The specification's own examples and the HL7 validator's CDS Hooks vectors, served by the API.

Good requests are never refused as invalid: they get 200 with valid cards, or the 412 the spec
requires when the data a service needs cannot be had (the examples name FHIR servers that do not
exist here). Bad requests get 400 with an OperationOutcome naming the fields.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from lbp_cds import create_app
from lbp_cds.config import Settings
from lbp_cds.hooks import parse_feedback, response_issues, services_issues
from tests.conftest import NOW, SHARED, validate_responses

pytestmark = pytest.mark.shared
req = pytest.mark.req
CASES = SHARED / "data" / "cds-hooks" / "fhir-test-cases"
EXAMPLES = SHARED / "data" / "cds-hooks" / "spec-examples"
SERVICE_FOR = {"patient-view": "lbp-triage", "order-select": "lbp-imaging-order-select",
               "order-sign": "lbp-imaging-order-sign"}
GOOD = ["cdshooks-request-pv-good.json", "cdshooks-request-patient-view-good.json",
        "cdshooks-request-order-select-good.json", "cdshooks-request-order-sign-good.json"]
BAD = ["cdshooks-request-patient-view-bad.json", "cdshooks-request-order-select-bad.json",
       "cdshooks-request-order-sign-bad-1.json", "cdshooks-request-order-sign-bad-2.json",
       "cdshooks-request-order-select-extensions.json"]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("spec")
    app = create_app(Settings(dev=True, database_url=f"sqlite:///{tmp}/s.sqlite3",
                              fhir_deadline_seconds=2, fhir_connect_timeout_seconds=1),
                     clock=lambda: NOW)
    validate_responses(app)
    yield app.test_client()
    app.extensions["lbp_cds"].store.engine.dispose()


def read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def spec_hook_request(name: str, hook: str) -> dict[str, Any]:
    """The Hook Library example (a context) wrapped as a full request."""
    doc = read(EXAMPLES / name)
    return {"hook": hook, "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
            "context": doc["context"]}


def check_answer(resp: Any) -> None:
    assert resp.status_code in (200, 412), resp.json
    if resp.status_code == 200:
        assert response_issues(resp.json) == []
    else:
        assert resp.json["resourceType"] == "OperationOutcome"
        assert all(loc.startswith("prefetch.") for i in resp.json["issue"]
                   for loc in i.get("expression", []))


@req("1", "28", "34", "52", "54", "60", "74")
@pytest.mark.parametrize("name", GOOD)
def test_good_validator_requests_are_served(client, name):
    doc = read(CASES / name)
    resp = client.post(f"/cds-services/{SERVICE_FOR[doc['hook']]}", json=doc)
    check_answer(resp)


@req("14", "76")
@pytest.mark.parametrize("name", BAD)
def test_bad_validator_requests_are_400_naming_fields(client, name):
    doc = read(CASES / name)
    resp = client.post(f"/cds-services/{SERVICE_FOR[doc['hook']]}", json=doc)
    assert resp.status_code == 400, resp.json
    assert all(i.get("expression") for i in resp.json["issue"])


@req("16", "74", "77")
@pytest.mark.parametrize("name, hook", [
    ("hook-order-select-example-00.json", "order-select"),
    ("hook-order-select-example-01.json", "order-select"),
    ("hook-order-select-example-02.json", "order-select"),
    ("hook-order-sign-example-00.json", "order-sign"),
    ("hook-order-sign-example-01.json", "order-sign"),
])
def test_the_specs_order_examples_get_no_imaging_card(client, name, hook):
    # A pureed diet and amoxicillin are not lumbar imaging: the service stays silent.
    resp = client.post(f"/cds-services/{SERVICE_FOR[hook]}", json=spec_hook_request(name, hook))
    assert resp.status_code == 200, resp.json
    assert resp.json == {"cards": []}


LUMBAR_MRI = {
    "resourceType": "ServiceRequest", "id": "lumbar-mri-1", "status": "draft", "intent": "order",
    "subject": {"reference": "Patient/1288992"}, "authoredOn": "2026-03-01",
    "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "72148",
                         "display": "MRI lumbar spine without contrast"}]},
    "reasonCode": [{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M54.41",
                                "display": "Lumbago with sciatica, right side"}]}],
}


@pytest.mark.parametrize("name, hook", [("hook-order-select-example-00.json", "order-select"),
                                        ("hook-order-sign-example-00.json", "order-sign")])
def test_the_specs_order_examples_with_a_lumbar_mri_added(client, name, hook):
    body = spec_hook_request(name, hook)
    body["context"]["draftOrders"]["entry"].append({"resource": copy.deepcopy(LUMBAR_MRI)})
    if hook == "order-select":
        body["context"]["selections"].append("ServiceRequest/lumbar-mri-1")
    resp = client.post(f"/cds-services/{SERVICE_FOR[hook]}", json=body)
    assert resp.status_code == 200, resp.json
    assert response_issues(resp.json) == []
    rules = [c["extension"]["org.lbp-cds.rule"]["ruleId"] for c in resp.json["cards"]]
    assert rules == ["LV-1"]
    card = resp.json["cards"][0]
    # No record could be had (no prefetch, no FHIR server): the card says so plainly.
    assert "could not be obtained" in card["detail"]
    deletes = [a for s in card["suggestions"] for a in s.get("actions", [])
               if a["type"] == "delete"]
    assert deletes and deletes[0]["resourceId"] == "ServiceRequest/lumbar-mri-1"


def test_order_select_judges_only_the_selection(client):
    body = spec_hook_request("hook-order-select-example-00.json", "order-select")
    body["context"]["draftOrders"]["entry"].append({"resource": copy.deepcopy(LUMBAR_MRI)})
    resp = client.post("/cds-services/lbp-imaging-order-select", json=body)
    assert resp.status_code == 200 and resp.json == {"cards": []}


@req("74", "77")
def test_spec_patient_view_example_is_answered(client):
    doc = read(EXAMPLES / "spec-2.0.1-example-01.json")
    check_answer(client.post("/cds-services/lbp-triage", json=doc))


@req("83", "87", "88", "90", "93")
@pytest.mark.parametrize("name, errors", [
    ("cdshooks-response-good.json", 0), ("cdshooks-response-empty.json", 0),
    ("cdshooks-response-link.json", 0), ("cdshooks-response-no-link.json", 0),
    ("cdshooks-response-two-cards.json", 0), ("cdshooks-response-empty2.json", 1),
    ("cdshooks-response-empty-source.json", 2), ("cdshooks-response-suggestion.json", 2),
])
def test_our_response_schema_agrees_with_the_validator(name, errors):
    assert len(response_issues(read(CASES / name))) == errors


@req("6", "7", "9", "10")
def test_discovery_vectors_and_our_own_discovery(client):
    assert services_issues(read(CASES / "cdshooks-services-good.json")) == []
    assert services_issues(read(EXAMPLES / "spec-2.0.1-example-00.json")) == []
    ours = client.get("/cds-services")
    assert ours.status_code == 200 and services_issues(ours.json) == []


@req("148")
@pytest.mark.parametrize("name", ["spec-2.0.1-example-18.json", "spec-2.0.1-example-19.json",
                                  "spec-2.0.1-example-20.json"])
def test_spec_feedback_examples_parse_and_unknown_cards_are_422(client, name):
    doc = read(EXAMPLES / name)
    assert parse_feedback(doc)
    resp = client.post("/cds-services/lbp-triage/feedback", json=doc)
    assert resp.status_code == 422
    assert "was not issued" in json.dumps(resp.json)
