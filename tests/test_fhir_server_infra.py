"""The sekmet FHIR server the suite runs against: it starts, guards, loads, searches and pages.

These tests pin down what sekmet-fhir does (see ``tests/fhir_server.py``), so a new sekmet release
that behaves differently shows up here before it shows up as a puzzling failure elsewhere.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.fhir_server import (
    SEKMET_VERSION,
    FhirServer,
    FhirServerError,
    ServerFactory,
    bundle_patient_id,
    prepare_transaction,
)

SYNTHEA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "synthea-r4"
#: 101 Observations and 8 Conditions: six pages of Observations at sekmet's 20 a page.
PAGING_PATIENT_FILE = "Florentino_Mertz_3bf8969a-593a-4d5a-8a78-839ca6edf044.json"

pytestmark = pytest.mark.fhir_server


def _synthea_bundle(name: str) -> dict[str, Any]:
    path = SYNTHEA_DIR / name
    assert path.is_file(), f"missing shared data file {path}"
    bundle: dict[str, Any] = json.loads(path.read_text())
    return bundle


def _ids_of_type(bundle: dict[str, Any], resource_type: str, patient_id: str) -> set[str]:
    """Ids of the bundle's resources of a type whose subject is the patient (as a urn:uuid)."""
    wanted = {f"urn:uuid:{patient_id}", f"Patient/{patient_id}"}
    return {
        e["resource"]["id"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == resource_type
        and (e["resource"].get("subject") or {}).get("reference") in wanted
    }


@pytest.fixture(scope="module")
def synthea_patient(fhir_server: FhirServer) -> tuple[str, dict[str, Any]]:
    """Load one Synthea patient (ids kept) into the session server.

    Returns:
        The patient id and the bundle as it is in the file.
    """
    bundle = _synthea_bundle(PAGING_PATIENT_FILE)
    fhir_server.transaction(prepare_transaction(bundle))
    return bundle_patient_id(bundle), bundle


@pytest.fixture(scope="module")
def absolute_server(fhir_server_factory: ServerFactory) -> FhirServer:
    """A second server answering with absolute references (as Firely and others do)."""
    return fhir_server_factory(
        {"server_behaviour": {"absolute_references": True}}, name="sekmet-absolute"
    )


# ------------------------------------------------------------------------------ start and auth


def test_server_starts_and_answers_metadata(fhir_server: FhirServer) -> None:
    response = fhir_server.get("metadata")
    assert response.status_code == 200
    capability = response.json()
    assert capability["resourceType"] == "CapabilityStatement"
    assert capability["fhirVersion"] == "4.0.1"
    assert fhir_server.process.poll() is None
    assert fhir_server.base_url.startswith("http://127.0.0.1:")
    assert SEKMET_VERSION


def test_metadata_needs_no_token(fhir_server: FhirServer) -> None:
    response = requests.get(f"{fhir_server.base_url}/metadata", timeout=30)
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("authorization", "diagnostics"),
    [
        (None, "Authentication required"),
        ("Bearer not-the-token", "Unsupported or invalid Authorization scheme 'bearer'"),
        ("Basic dXNlcjpwYXNz", "Unsupported or invalid Authorization scheme 'basic'"),
    ],
)
def test_request_without_valid_token_is_401(
    fhir_server: FhirServer, authorization: str | None, diagnostics: str
) -> None:
    headers = {"Accept": "application/fhir+json"}
    if authorization:
        headers["Authorization"] = authorization
    response = requests.get(f"{fhir_server.base_url}/Patient", headers=headers, timeout=30)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="sekmet"'
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "login"
    assert outcome["issue"][0]["diagnostics"] == diagnostics


def test_expired_smart_token_is_401_expired(fhir_server_factory: ServerFactory) -> None:
    server = fhir_server_factory(
        {
            "server_auth": {
                "types": ["smart"],
                "tokens": [],
                "token_lifetime": 1,
                "smart_clients": [
                    {"client_id": "lbp-cds", "client_secret": "s3cret", "scopes": "system/*.read"}
                ],
            }
        },
        name="sekmet-smart",
    )
    assert server.token is None
    grant = requests.post(
        f"{server.root_url}/auth/token",
        data={"grant_type": "client_credentials", "scope": "system/*.read"},
        auth=("lbp-cds", "s3cret"),
        timeout=30,
    )
    assert grant.status_code == 200, grant.text
    access_token = grant.json()["access_token"]
    assert (
        server.get("Patient", headers={"Authorization": f"Bearer {access_token}"}).status_code
        == 200
    )
    write = requests.post(
        f"{server.base_url}/Patient",
        json={"resourceType": "Patient"},
        headers={
            "Authorization": f"Bearer {access_token}",
            "Content-Type": "application/fhir+json",
        },
        timeout=30,
    )
    assert write.status_code == 403  # system/*.read does not cover create
    time.sleep(2.1)  # lifetime 1 s, PyJWT has no leeway
    expired = server.get("Patient", headers={"Authorization": f"Bearer {access_token}"})
    assert expired.status_code == 401
    assert expired.json()["issue"][0]["code"] == "expired"


# ------------------------------------------------------------------------------ loading data


@pytest.mark.shared
def test_synthea_patient_loads_with_its_ids(
    fhir_server: FhirServer, synthea_patient: tuple[str, dict[str, Any]]
) -> None:
    patient_id, bundle = synthea_patient
    patient = fhir_server.read_json(f"Patient/{patient_id}")
    assert patient["id"] == patient_id
    assert patient["name"] == bundle["entry"][0]["resource"]["name"]


@pytest.mark.shared
def test_prepared_synthea_bundle_loads_idempotently(
    fhir_server: FhirServer, synthea_patient: tuple[str, dict[str, Any]]
) -> None:
    patient_id, bundle = synthea_patient
    version = int(fhir_server.read_json(f"Patient/{patient_id}")["meta"]["versionId"])
    response = fhir_server.transaction(prepare_transaction(bundle))  # loaded once already
    assert response["type"] == "transaction-response"
    statuses = {e["response"]["status"] for e in response["entry"]}
    assert statuses == {"200 OK"}  # updates, not creates
    family = bundle["entry"][0]["resource"]["name"][0]["family"]
    assert fhir_server.read_json("Patient", family=family)["total"] == 1
    patient = fhir_server.read_json(f"Patient/{patient_id}")
    assert int(patient["meta"]["versionId"]) == version + 1


def test_prepare_transaction_keeps_conditional_creates_and_input() -> None:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:a",
                "resource": {"resourceType": "Patient", "id": "a"},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": "urn:uuid:b",
                "resource": {"resourceType": "Practitioner", "id": "b"},
                "request": {
                    "method": "POST",
                    "url": "Practitioner",
                    "ifNoneExist": "identifier=x|1",
                },
            },
            {
                "fullUrl": "urn:uuid:c",
                "resource": {"resourceType": "Observation"},
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    prepared = prepare_transaction(bundle)
    assert [e["request"] for e in prepared["entry"]] == [
        {"method": "PUT", "url": "Patient/a"},
        {"method": "POST", "url": "Practitioner", "ifNoneExist": "identifier=x|1"},
        {"method": "POST", "url": "Observation"},
    ]
    assert bundle["entry"][0]["request"] == {"method": "POST", "url": "Patient"}


def test_invalid_transaction_raises_with_operation_outcome(fhir_server: FhirServer) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:1",
                "resource": {"resourceType": "Patient", "birthDate": "not-a-date"},
                "request": {"method": "POST", "url": "Patient"},
            },
        ],
    }
    with pytest.raises(
        FhirServerError, match=r"HTTP 400: error/structure: .*Transaction rolled back"
    ) as info:
        fhir_server.transaction(bundle)
    assert info.value.status == 400
    assert info.value.outcome["resourceType"] == "OperationOutcome"


def test_put_creates_then_updates(fhir_server: FhirServer) -> None:
    resource = {"resourceType": "Patient", "id": "infra-put", "gender": "female"}
    assert fhir_server.put(resource)["meta"]["versionId"] == "1"
    assert fhir_server.put({**resource, "gender": "male"})["meta"]["versionId"] == "2"
    assert fhir_server.read_json("Patient/infra-put")["gender"] == "male"


# ------------------------------------------------------------------------------ search and paging


@pytest.mark.shared
def test_condition_search_by_patient(
    fhir_server: FhirServer, synthea_patient: tuple[str, dict[str, Any]]
) -> None:
    patient_id, bundle = synthea_patient
    expected = _ids_of_type(bundle, "Condition", patient_id)
    assert len(expected) == 8
    searchset = fhir_server.read_json("Condition", patient=patient_id)
    assert searchset["type"] == "searchset"
    assert searchset["total"] == len(expected)
    assert {e["resource"]["id"] for e in searchset["entry"]} == expected
    assert all(
        e["resource"]["subject"]["reference"] == f"Patient/{patient_id}" for e in searchset["entry"]
    )
    assert all(
        e["fullUrl"].startswith(f"{fhir_server.base_url}/Condition/") for e in searchset["entry"]
    )


@pytest.mark.shared
@pytest.mark.parametrize(("count", "pages"), [(None, 6), (7, 15), (1000, 1)])
def test_observation_search_pages_through_next_links(
    fhir_server: FhirServer,
    synthea_patient: tuple[str, dict[str, Any]],
    count: int | None,
    pages: int,
) -> None:
    patient_id, bundle = synthea_patient
    expected = _ids_of_type(bundle, "Observation", patient_id)
    assert len(expected) == 101
    params: dict[str, Any] = {"patient": patient_id}
    if count is not None:
        params["_count"] = count
    first = fhir_server.read_json("Observation", **params)
    assert first["total"] == len(expected)
    assert len(first["entry"]) == min(count or 20, len(expected))  # sekmet: 20 a page by default
    found, read_pages = fhir_server.search_all("Observation", **params)
    assert read_pages == pages
    assert len(found) == len(expected)
    assert {r["id"] for r in found} == expected


def test_count_above_1000_is_clamped(fhir_server: FhirServer) -> None:
    page = fhir_server.read_json("Patient", _count=5000)
    self_link = next(link["url"] for link in page["link"] if link["relation"] == "self")
    assert "_count=1000" in self_link


def test_read_of_missing_patient_is_404(fhir_server: FhirServer) -> None:
    response = fhir_server.get("Patient/does-not-exist")
    assert response.status_code == 404
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "not-found"


def test_unknown_resource_type_is_404(fhir_server: FhirServer) -> None:
    response = fhir_server.get("Foo", x="1")
    assert response.status_code == 404
    assert response.json()["issue"][0]["code"] == "not-supported"


def test_unknown_search_parameter_is_ignored_with_a_warning(fhir_server: FhirServer) -> None:
    fhir_server.put({"resourceType": "Patient", "id": "infra-lenient"})
    response = fhir_server.get("Patient", bogus="1", _id="infra-lenient")
    assert response.status_code == 200
    searchset = response.json()
    assert searchset["total"] == 1
    matches = [e for e in searchset["entry"] if e["search"]["mode"] == "match"]
    outcomes = [e["resource"] for e in searchset["entry"] if e["search"]["mode"] == "outcome"]
    assert [m["resource"]["id"] for m in matches] == ["infra-lenient"]
    assert len(outcomes) == 1
    assert outcomes[0]["resourceType"] == "OperationOutcome"
    assert outcomes[0]["issue"][0]["severity"] == "warning"
    assert outcomes[0]["issue"][0]["code"] == "not-supported"
    assert "bogus" in outcomes[0]["issue"][0]["diagnostics"]
    self_link = next(link["url"] for link in searchset["link"] if link["relation"] == "self")
    assert "bogus" not in self_link  # links repeat only the parameters it used


def test_unknown_search_parameter_with_strict_handling_is_400(fhir_server: FhirServer) -> None:
    response = fhir_server.get("Patient", headers={"Prefer": "handling=strict"}, bogus="1")
    assert response.status_code == 400
    issue = response.json()["issue"][0]
    assert (issue["severity"], issue["code"]) == ("error", "not-supported")


@pytest.mark.parametrize(
    ("params", "code"),
    [({"birthdate": "not-a-date"}, "value"), ({"_count": "abc"}, "value")],
)
def test_malformed_search_values_are_400(
    fhir_server: FhirServer, params: dict[str, Any], code: str
) -> None:
    response = fhir_server.get("Patient", **params)
    assert response.status_code == 400
    assert response.json()["issue"][0]["code"] == code


# ------------------------------------------------------------------------------ a second server


@pytest.mark.shared
@pytest.mark.slow
def test_every_synthea_bundle_loads_as_is(absolute_server: FhirServer) -> None:
    files = sorted(SYNTHEA_DIR.glob("*.json"))
    assert len(files) == 11
    for path in files:
        bundle = json.loads(path.read_text())
        response = absolute_server.transaction(bundle)
        statuses = {e["response"]["status"] for e in response["entry"]}
        assert statuses == {"201 Created"}, path.name
        assert len(response["entry"]) == len(bundle["entry"])
        # POST entries get new ids: the file's patient id is unknown to the server
        assert absolute_server.get(f"Patient/{bundle_patient_id(bundle)}").status_code == 404


@pytest.mark.shared
def test_absolute_references_setting(absolute_server: FhirServer) -> None:
    bundle = prepare_transaction(_synthea_bundle(PAGING_PATIENT_FILE))
    absolute_server.transaction(bundle)
    patient_id = bundle_patient_id(bundle)
    searchset = absolute_server.read_json("Condition", patient=patient_id)
    assert searchset["total"] == 8
    for entry in searchset["entry"]:
        assert (
            entry["resource"]["subject"]["reference"]
            == f"{absolute_server.base_url}/Patient/{patient_id}"
        )
    # searching by the absolute reference works too
    assert (
        absolute_server.read_json(
            "Condition", patient=f"{absolute_server.base_url}/Patient/{patient_id}"
        )["total"]
        == 8
    )
