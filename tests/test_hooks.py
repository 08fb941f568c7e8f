"""Tests of lbp_cds.hooks: CDS Hooks 2.0.1 wire types and JSON Schema validation.

Vectors come from ``shared/data/cds-hooks/``: the HL7 validator's CDS Hooks test cases
(``fhir-test-cases/``, expected outcomes in ``fhir-test-cases/outcomes/``) and the examples of the
specification and the Hook Library (``spec-examples/``). Tests reading them are marked ``shared``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbp_cds import hooks
from lbp_cds.errors import Issue, JsonTooDeep, RequestError
from lbp_cds.hooks import (
    Feedback,
    FhirAuthorization,
    HookRequest,
    parse_feedback,
    parse_json,
    parse_request,
    response_issues,
    services_issues,
)

CDS_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cds-hooks"
VECTORS = CDS_DIR / "fhir-test-cases"
OUTCOMES = VECTORS / "outcomes"
SPEC = CDS_DIR / "spec-examples"

HOOK_INSTANCE = "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea"


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def load(path: Path) -> Any:
    """Load a JSON vector; a ``-fragment`` file (``"context": {...}``) is wrapped in braces."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith('"'):
        text = "{" + text + "}"
    return json.loads(text)


def request_for(hook: str, context: Any, **extra: Any) -> dict[str, Any]:
    """A request body for ``hook`` with ``context`` and any extra top-level fields."""
    return {"hook": hook, "hookInstance": HOOK_INSTANCE, "context": context, **extra}


def pv_context(**fields: Any) -> dict[str, Any]:
    """A valid patient-view context, updated with ``fields``."""
    return {"userId": "Practitioner/example", "patientId": "1288992", **fields}


def draft_orders(*resources: dict[str, Any]) -> dict[str, Any]:
    """A draftOrders Bundle (no fullUrl, like the specification's examples)."""
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in resources],
    }


SERVICE_REQUEST = {
    "resourceType": "ServiceRequest",
    "id": "mri-1",
    "status": "draft",
    "intent": "order",
}


def os_context(**fields: Any) -> dict[str, Any]:
    """A valid order-select context, updated with ``fields``."""
    return {
        "userId": "PractitionerRole/123",
        "patientId": "1288992",
        "selections": ["ServiceRequest/mri-1"],
        "draftOrders": draft_orders(SERVICE_REQUEST),
        **fields,
    }


def rejection(doc: Any) -> list[Issue]:
    """The issues with which parse_request rejects ``doc`` (fails if it is accepted)."""
    with pytest.raises(RequestError) as info:
        parse_request(doc)
    assert info.value.status == 400
    return info.value.issues


def locations(issues: list[Issue]) -> set[str]:
    return {issue.location for issue in issues}


def card(**fields: Any) -> dict[str, Any]:
    """A valid minimal card, updated with ``fields``."""
    return {
        "summary": "Consider MRI",
        "indicator": "warning",
        "source": {"label": "LBP CDS"},
        **fields,
    }


def response(*cards: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"cards": list(cards), **extra}


# ------------------------------------------------------------------------------------------
# request vectors from the HL7 validator test cases
# ------------------------------------------------------------------------------------------

GOOD_REQUESTS = [
    # (vector, validator outcome, hook, patientId)
    (
        "cdshooks-request-pv-good.json",
        "R4.cdshooks-request-pv-good-logical.json",
        "patient-view",
        "1288992",
    ),
    (
        "cdshooks-request-patient-view-good.json",
        "R4.cdshooks-request-patient-view-good-logical.json",
        "patient-view",
        "example-rec-04-not-long-acting-opioid",
    ),
    (
        "cdshooks-request-order-select-good.json",
        "R4.cdshooks-request-order-select-good-logical.json",
        "order-select",
        "example-rec-11-benzo-trigger-without-opioid",
    ),
    (
        "cdshooks-request-order-sign-good.json",
        "R4.cdshooks-request-order-sign-good-logical.json",
        "order-sign",
        "example-rec-02-careplan-revisited",
    ),
]


@pytest.mark.shared
@pytest.mark.req("1", "28")
@pytest.mark.parametrize(("vector", "outcome", "hook", "patient_id"), GOOD_REQUESTS)
def test_good_request_vectors_parse(vector: str, outcome: str, hook: str, patient_id: str) -> None:
    doc = load(VECTORS / vector)
    assert load(OUTCOMES / outcome).get("issue", []) == []  # the validator accepts it too
    request = parse_request(doc)
    assert request.hook == hook
    assert request.hook_instance == doc["hookInstance"]
    assert request.patient_id == patient_id
    assert request.user_id == "Practitioner/example"
    assert request.fhir_server == doc["fhirServer"]
    assert request.prefetch == doc["prefetch"]
    assert request.context is doc["context"]
    if hook in ("order-select", "order-sign"):
        assert [r["resourceType"] for r in request.draft_orders] == ["MedicationRequest"]
    if hook == "order-select":
        assert request.selections == [
            "MedicationRequest/example-rec-11-benzo-trigger-without-opioid-context"
        ]
    else:
        assert request.selections == []


# Validator issues that are about the embedded FHIR resources, not the CDS Hooks structure. Our
# request schema does not reproduce them, on purpose (test_fhir_level_only_errors_are_accepted).
FHIR_LEVEL = re.compile(
    r"fullUrl|Relative Reference appears inside Bundle|could not be found so is not allowed"
    r"|not found in the value set|System URI could not be determined|Not a valid date format"
)


def _validator_location(expression: str, doc: dict[str, Any]) -> str:
    """Map a validator expression (``CDSHooksRequest.prefetch[0].value``) to our location prefix."""
    location = expression.removeprefix("CDSHooksRequest").removeprefix(".")
    match = re.fullmatch(r"prefetch\[(\d+)\]\.value", location)
    if match:  # the validator numbers prefetch entries in document order
        return "prefetch." + list(doc["prefetch"])[int(match.group(1))]
    return location


BAD_REQUESTS = [
    # (vector, validator outcome, the issues with which we reject it)
    (
        "cdshooks-request-patient-view-bad.json",
        "R4.cdshooks-request-patient-view-bad-logical.json",
        {
            "context.encounterId",  # "Encounter/..." is a reference, not an id
            "context.patientId",  # "Patient/..." is a reference, not an id
            "prefetch.item1.resourceType",  # a {response, resource} Bundle-entry wrapper
            "prefetch.item2.resourceType",
        },
    ),
    (
        "cdshooks-request-order-select-bad.json",
        "R4.cdshooks-request-order-select-bad-logical.json",
        {
            "context.encounterId",
            "context.patientId",
            "context.selections[0]",  # a bare id, not Type/id (ord-1)
            "prefetch.item1.resourceType",
        },
    ),
    (
        "cdshooks-request-order-sign-bad-1.json",
        "R4.cdshooks-request-bad-1-logical.json",
        {"context.patientId"},
    ),
    (
        "cdshooks-request-order-sign-bad-2.json",
        "R4.cdshooks-request-order-sign-bad-2-logical.json",
        {"context.patientId", "prefetch.item1.resourceType"},
    ),
    (
        # The validator also flags the unknown extension key 'davinci-crd.configuration-test':
        # its model knows only the extensions the Tools IG defines. The specification leaves
        # extension content to the parties (keys SHOULD be reverse-DNS), so we accept it.
        "cdshooks-request-order-select-extensions.json",
        "R4.cdshooks-request-order-select-extensions-logical.json",
        {"context.draftOrders"},  # order-select requires draftOrders
    ),
]
EXTENSION_KEY = re.compile(r"Unrecognized property '[^']+'")


@pytest.mark.shared
@pytest.mark.req("3", "76")
@pytest.mark.parametrize(("vector", "outcome", "expected"), BAD_REQUESTS)
def test_bad_request_vectors_are_rejected(vector: str, outcome: str, expected: set[str]) -> None:
    doc = load(VECTORS / vector)
    issues = rejection(doc)
    assert locations(issues) == expected
    assert [i.location for i in issues] == sorted(i.location for i in issues)
    for issue in issues:
        assert issue.message and "{field}" not in issue.message and "{parent}" not in issue.message
        if issue.location in ("context.patientId", "context.encounterId"):
            assert "FHIR resource id" in issue.message and issue.code == "value"
        if issue.location.startswith("prefetch."):
            assert "no resourceType" in issue.message and issue.code == "required"

    # Compare with the HL7 validator: each of its errors is either one of ours (same field or a
    # field inside it) or a FHIR-resource-level / extension-naming error we leave alone on purpose.
    validator_errors = [
        i for i in load(OUTCOMES / outcome)["issue"] if i["severity"] in ("error", "fatal")
    ]
    assert validator_errors
    matched: set[str] = set()
    for error in validator_errors:
        text = error["details"]["text"]
        prefix = _validator_location(error["expression"][0], doc)
        ours = {loc for loc in expected if loc == prefix or loc.startswith(prefix + ".")}
        if ours:
            matched |= ours
        else:
            assert FHIR_LEVEL.search(text) or EXTENSION_KEY.search(text), (prefix, text)
    assert matched == expected  # nothing we reject is accepted by the validator


@pytest.mark.shared
@pytest.mark.req("28")
def test_fhir_level_only_errors_are_accepted() -> None:
    """Decision: errors inside embedded FHIR resources do not make the CDS Hooks request invalid.

    Once the CDS Hooks errors of the bad vectors are corrected, what the HL7 validator still
    reports is about the FHIR resources: draftOrders entries without fullUrl (and the relative
    references that then cannot be resolved), an extension whose definition it cannot load, the
    status code 'Xactive' and the birthDate 'X2002-09-26'. We accept such requests:

    * fullUrl: the specification's own order-select/order-sign examples have none; a collection
      Bundle of draft orders needs no identity to be evaluated.
    * unknown (non-modifier) extensions may be ignored by any FHIR consumer.
    * invalid codes and dates are data quality problems of one resource. Rejecting the whole
      request would deny all decision support; the resource layer parses the resources it uses
      with fhir.resources.R4B and treats what it cannot parse or understand as unknown data
      (never as "no red flag"). R4B does reject the bad birthDate (shown below); it does not
      check MedicationRequest.status against its value set.
    """
    bad_1 = load(VECTORS / "cdshooks-request-order-sign-bad-1.json")
    bad_1["context"]["patientId"] = "example-rec-01-true-make-recommendations"
    request = parse_request(bad_1)
    assert request.draft_orders[0]["status"] == "Xactive"
    assert "fullUrl" not in bad_1["context"]["draftOrders"]["entry"][0]

    bad_2 = load(VECTORS / "cdshooks-request-order-sign-bad-2.json")
    bad_2["context"]["patientId"] = "example-rec-01-false-due-to-inpatient-opioid"
    bad_2["prefetch"]["item1"] = bad_2["prefetch"]["item1"]["resource"]
    assert parse_request(bad_2).prefetch["item1"]["resourceType"] == "Patient"

    select_bad = load(VECTORS / "cdshooks-request-order-select-bad.json")
    select_bad["context"].update(
        patientId="example-rec-11-benzo-trigger-without-opioid",
        encounterId="example-rec-11-benzo-trigger-without-opioid-context",
        selections=["MedicationRequest/example-rec-11-benzo-trigger-without-opioid-context"],
    )
    select_bad["prefetch"]["item1"] = select_bad["prefetch"]["item1"]["resource"]
    assert parse_request(select_bad).selections == select_bad["context"]["selections"]

    from fhir.resources.R4B.patient import Patient
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="birthDate"):
        Patient.model_validate(bad_1["prefetch"]["item1"])


# ------------------------------------------------------------------------------------------
# request examples of the specification and the Hook Library
# ------------------------------------------------------------------------------------------

HOOK_EXAMPLES = [
    "hook-appointment-book-example-00-fragment.json",
    "hook-appointment-book-example-01-fragment.json",
    "hook-encounter-discharge-example-00-fragment.json",
    "hook-encounter-start-example-00-fragment.json",
    "hook-order-select-example-00.json",
    "hook-order-select-example-01.json",
    "hook-order-select-example-02.json",
    "hook-order-sign-example-00.json",
    "hook-order-sign-example-01.json",
    "hook-order-sign-example-02-fragment.json",
    "hook-patient-view-example-00-fragment.json",
    "hook-patient-view-example-01-fragment.json",
]


@pytest.mark.shared
@pytest.mark.req("28")
@pytest.mark.parametrize("name", HOOK_EXAMPLES)
def test_hook_library_context_examples_parse(name: str) -> None:
    """Each Hook Library context example, sent under its hook, is a valid request.

    The appointment-book examples send ``appointments`` as an array of Appointments although the
    hook's table (and the FHIR Tools logical model) say Bundle; we accept both forms.
    """
    match = re.fullmatch(r"hook-(.+)-example-\d+(?:-fragment)?\.json", name)
    assert match is not None
    hook = match.group(1)
    context = load(SPEC / name)["context"]
    request = parse_request(request_for(hook, context))
    assert request.hook == hook
    assert request.patient_id == "1288992"
    assert request.user_id == context["userId"]
    if hook in ("order-select", "order-sign"):
        assert request.draft_orders == [e["resource"] for e in context["draftOrders"]["entry"]]
    if hook == "order-select":
        assert request.selections == context["selections"]


@pytest.mark.shared
@pytest.mark.req("28")
def test_every_hook_example_is_tested() -> None:
    assert sorted(p.name for p in SPEC.glob("hook-*.json")) == HOOK_EXAMPLES


@pytest.mark.shared
@pytest.mark.req("1", "28", "60")
def test_spec_request_example_parses() -> None:
    doc = load(SPEC / "spec-2.0.1-example-01.json")
    request = parse_request(doc)
    assert request.hook == "patient-view"
    assert request.hook_instance == "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea"
    assert request.fhir_server == "http://hooks.smarthealthit.org:9080"
    assert request.encounter_id == "89284"
    assert request.prefetch["patientToGreet"]["id"] == "1288992"
    assert request.fhir_authorization == FhirAuthorization(
        access_token="some-opaque-fhir-access-token",
        token_type="Bearer",
        expires_in=300,
        scope="user/Patient.read user/Observation.read",
        subject="cds-service4",
    )
    assert request.extension is None


@pytest.mark.shared
@pytest.mark.req("60")
def test_spec_fhir_authorization_example_parses() -> None:
    auth = load(SPEC / "spec-2.0.1-example-08.json")["fhirAuthorization"]
    request = parse_request(
        request_for(
            "patient-view",
            pv_context(),
            fhirServer="https://ehr.example.org/fhir",
            fhirAuthorization=auth,
        )
    )
    assert request.fhir_authorization is not None
    assert request.fhir_authorization.access_token == "some-opaque-fhir-access-token"
    assert request.fhir_authorization.patient is None


@pytest.mark.shared
@pytest.mark.req("214")
def test_spec_extension_request_example() -> None:
    """The extension example of the specification sends patient-view without patientId.

    It illustrates ``extension`` only; patient-view requires patientId (Hook Library 1.0.1), so
    we reject it for exactly that, and accept it once patientId is added.
    """
    doc = load(SPEC / "spec-2.0.1-example-25.json")
    issues = rejection(copy.deepcopy(doc))
    assert [(i.location, i.code) for i in issues] == [("context.patientId", "required")]
    assert "patient-view" in issues[0].message
    doc["context"]["patientId"] = "1288992"
    request = parse_request(doc)
    assert request.extension == {
        "com.example.timestamp": "2017-11-27T22:13:25Z",
        "com.cds-hooks.sandbox.myextension-practitionerspecialty": "gastroenterology",
    }


@pytest.mark.shared
@pytest.mark.req("28")
def test_spec_prefetch_data_example() -> None:
    """The 'Example prefetch data' of the specification has ``"user": "123"``.

    A prefetch value is a FHIR resource or null; a bare string is not (the HL7 validator says the
    same: 'Unable to find resourceType property'). We reject that key only.
    """
    prefetch = load(SPEC / "spec-2.0.1-example-07.json")["prefetch"]
    issues = rejection(request_for("patient-view", pv_context(), prefetch=prefetch))
    assert [(i.location, i.code) for i in issues] == [("prefetch.user", "structure")]
    del prefetch["user"]
    request = parse_request(request_for("patient-view", pv_context(), prefetch=prefetch))
    assert request.prefetch["hemoglobin-a1c"]["type"] == "searchset"


@pytest.mark.shared
@pytest.mark.req("1")
@pytest.mark.parametrize(
    "name",
    [
        "spec-2.0.1-example-03.json",
        "spec-2.0.1-example-04.json",
        "spec-2.0.1-example-05.json",
        "spec-2.0.1-example-27-fragment.json",
        "spec-2.0.1-example-29-fragment.json",
    ],
)
def test_spec_context_fragments_parse_under_a_custom_hook(name: str) -> None:
    """Context fragments of the specification text: a hook we do not know only needs an object."""
    context = load(SPEC / name)["context"]
    request = parse_request(request_for("org.example.custom-hook", context))
    assert request.context == context
    if "draftOrders" in context:
        assert request.draft_orders[0]["resourceType"] == "MedicationRequest"
    # example 27 is the spec's patient-view context: valid under patient-view too
    if name.startswith("spec-2.0.1-example-27"):
        assert parse_request(request_for("patient-view", context)).user_id == "PractitionerRole/123"


# ------------------------------------------------------------------------------------------
# request unit tests
# ------------------------------------------------------------------------------------------


@pytest.mark.req("3")
def test_all_problems_are_reported_at_once_sorted_by_location() -> None:
    issues = rejection({"prefetch": {"b": "x", "a": 1}, "extension": []})
    assert [i.location for i in issues] == [
        "context",
        "extension",
        "hook",
        "hookInstance",
        "prefetch.a",
        "prefetch.b",
    ]
    assert {i.code for i in issues if i.location in ("context", "hook", "hookInstance")} == {
        "required"
    }
    assert issues[0].message == "Required field 'context' is missing"


def test_body_must_be_an_object() -> None:
    docs: list[Any] = [[], "x", 1, None, True]
    for doc in docs:
        issues = rejection(doc)
        assert issues == [Issue("", "The request body must be a JSON object", "structure")]


def test_request_error_message_summarises() -> None:
    with pytest.raises(RequestError) as info:
        parse_request(request_for("patient-view", pv_context(patientId="Patient/1")))
    assert info.value.message.startswith(
        "Invalid CDS Hooks request: context.patientId: patientId must be"
    )
    outcome = info.value.operation_outcome()
    assert outcome["issue"][0]["expression"] == ["context.patientId"]


@pytest.mark.parametrize(
    "value",
    [
        "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "D1577C69-DFBE-44AD-BA6D-3E05E953B2EA",
        "00000000-0000-0000-0000-000000000000",
    ],
)
def test_hook_instance_uuid_accepted(value: str) -> None:
    assert (
        parse_request(
            {**request_for("patient-view", pv_context()), "hookInstance": value}
        ).hook_instance
        == value
    )


@pytest.mark.parametrize(
    "value",
    [
        "d1577c69dfbe44adba6d3e05e953b2ea",
        "{d1577c69-dfbe-44ad-ba6d-3e05e953b2ea}",
        "urn:uuid:d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea\n",
        "d1577c69-dfbe-44ad-ba6d-3e05e953b2eg",
        "not-a-uuid",
        "",
    ],
)
def test_hook_instance_must_be_a_uuid(value: str) -> None:
    issues = rejection({**request_for("patient-view", pv_context()), "hookInstance": value})
    assert [(i.location, i.code) for i in issues] == [("hookInstance", "value")]
    assert "UUID" in issues[0].message


def test_hook_instance_must_be_a_string() -> None:
    issues = rejection({**request_for("patient-view", pv_context()), "hookInstance": 12})
    assert issues == [Issue("hookInstance", "hookInstance must be a string", "structure")]


@pytest.mark.parametrize(
    "value",
    ["http://localhost:8080/fhir", "https://ehr.example.org/fhir/R4", "https://[::1]:8443/fhir"],
)
def test_fhir_server_url_accepted(value: str) -> None:
    assert (
        parse_request(request_for("patient-view", pv_context(), fhirServer=value)).fhir_server
        == value
    )


@pytest.mark.parametrize(
    "value",
    [
        "",
        "ehr.example.org/fhir",
        "/fhir",
        "https://",
        "https:///fhir",
        "https://ehr example.org",
        "https://ehr.example.org:99999/fhir",
        "https://[::1/fhir",
        "https://ehr.example.org/fhir\n",
        "ftp://ehr.example.org/fhir",
        "urn:oid:1.2.3",
    ],
)
def test_fhir_server_must_be_an_absolute_http_url(value: str) -> None:
    issues = rejection(request_for("patient-view", pv_context(), fhirServer=value))
    assert {(i.location, i.code) for i in issues} == {("fhirServer", "value")}


AUTH = {
    "access_token": "secret-token-value",
    "token_type": "Bearer",
    "expires_in": 300,
    "scope": "patient/Patient.read patient/Condition.read",
    "subject": "lbp-cds",
    "patient": "1288992",
}


@pytest.mark.req("60")
def test_fhir_authorization_parsed() -> None:
    request = parse_request(
        request_for(
            "patient-view",
            pv_context(),
            fhirServer="https://ehr.example.org/fhir",
            fhirAuthorization=AUTH,
        )
    )
    assert request.fhir_authorization == FhirAuthorization(**AUTH)
    assert isinstance(request.fhir_authorization.expires_in, int)


def test_cds_r_1_fhir_authorization_requires_fhir_server() -> None:
    issues = rejection(request_for("patient-view", pv_context(), fhirAuthorization=AUTH))
    assert [(i.location, i.code) for i in issues] == [("fhirServer", "required")]
    assert "cds-r-1" in issues[0].message


@pytest.mark.parametrize(
    "missing", ["access_token", "token_type", "expires_in", "scope", "subject"]
)
def test_fhir_authorization_required_fields(missing: str) -> None:
    auth = {k: v for k, v in AUTH.items() if k != missing}
    issues = rejection(
        request_for(
            "patient-view", pv_context(), fhirServer="https://x.org/fhir", fhirAuthorization=auth
        )
    )
    assert [(i.location, i.code) for i in issues] == [(f"fhirAuthorization.{missing}", "required")]


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("token_type", "MAC", "value"),
        ("token_type", "", "value"),
        ("expires_in", "300", "structure"),
        ("expires_in", 1.5, "structure"),
        ("expires_in", True, "structure"),
        ("expires_in", -1, "value"),
        ("access_token", "", "value"),
        ("scope", None, "structure"),
        ("patient", "Patient/1288992", "value"),
    ],
)
def test_fhir_authorization_field_values(field: str, value: Any, code: str) -> None:
    auth = {**AUTH, field: value}
    issues = rejection(
        request_for(
            "patient-view", pv_context(), fhirServer="https://x.org/fhir", fhirAuthorization=auth
        )
    )
    assert [(i.location, i.code) for i in issues] == [(f"fhirAuthorization.{field}", code)]


def test_token_type_is_case_insensitive() -> None:
    """RFC 6749 section 5.1: the token type value is case insensitive."""
    auth = {**AUTH, "token_type": "bearer"}
    request = parse_request(
        request_for(
            "patient-view", pv_context(), fhirServer="https://x.org/fhir", fhirAuthorization=auth
        )
    )
    assert (
        request.fhir_authorization is not None and request.fhir_authorization.token_type == "bearer"
    )


def test_access_token_never_in_repr() -> None:
    request = parse_request(
        request_for(
            "patient-view", pv_context(), fhirServer="https://x.org/fhir", fhirAuthorization=AUTH
        )
    )
    assert "secret-token-value" not in repr(request.fhir_authorization)
    assert "secret-token-value" not in repr(request)
    assert "secret-token-value" not in str(request)
    assert "1288992" not in repr(request)  # no context values (PHI) either
    assert "context_keys=['patientId', 'userId']" in repr(request)


@pytest.mark.parametrize("value", ["1288992", "example-rec-04", "a.b-C", "x" * 64])
def test_patient_id_is_a_fhir_id(value: str) -> None:
    assert (
        parse_request(request_for("patient-view", pv_context(patientId=value))).patient_id == value
    )


@pytest.mark.parametrize("value", ["Patient/123", "x" * 65, "", "12 34", "123\n", "123_4", "äbc"])
def test_patient_id_rejects_non_ids(value: str) -> None:
    issues = rejection(request_for("patient-view", pv_context(patientId=value)))
    assert [(i.location, i.code) for i in issues] == [("context.patientId", "value")]
    assert "not a reference such as 'Patient/123'" in issues[0].message


def test_encounter_id_is_a_fhir_id() -> None:
    issues = rejection(request_for("patient-view", pv_context(encounterId="Encounter/1")))
    assert locations(issues) == {"context.encounterId"}
    assert (
        parse_request(request_for("patient-view", pv_context(encounterId="89284"))).encounter_id
        == "89284"
    )
    assert parse_request(request_for("patient-view", pv_context())).encounter_id is None


@pytest.mark.parametrize(
    ("hook", "user_id", "ok"),
    [
        ("patient-view", "Practitioner/abc", True),
        ("patient-view", "PractitionerRole/123", True),
        ("patient-view", "Patient/123", True),
        ("patient-view", "RelatedPerson/r1", True),
        ("patient-view", "Device/d1", False),
        ("patient-view", "Practitioner/", False),
        ("patient-view", "Practitioner/a/b", False),
        ("patient-view", "abc", False),
        ("order-sign", "Practitioner/abc", True),
        ("order-sign", "PractitionerRole/abc", True),
        ("order-sign", "Patient/123", False),
        ("order-select", "RelatedPerson/123", False),
        ("encounter-start", "Patient/123", False),
        ("encounter-discharge", "PractitionerRole/1", True),
        ("appointment-book", "Patient/123", True),
    ],
)
def test_user_id_types_per_hook(hook: str, user_id: str, ok: bool) -> None:
    context: dict[str, Any] = {
        "patient-view": pv_context(),
        "order-sign": {"patientId": "1", "draftOrders": draft_orders(SERVICE_REQUEST)},
        "order-select": os_context(),
        "encounter-start": {"patientId": "1", "encounterId": "e1"},
        "encounter-discharge": {"patientId": "1", "encounterId": "e1"},
        "appointment-book": {"patientId": "1", "appointments": {"resourceType": "Bundle"}},
    }[hook]
    doc = request_for(hook, {**context, "userId": user_id})
    if ok:
        assert parse_request(doc).user_id == user_id
    else:
        issues = rejection(doc)
        assert [(i.location, i.code) for i in issues] == [("context.userId", "value")]


@pytest.mark.parametrize(
    ("hook", "required"),
    [
        ("patient-view", {"userId", "patientId"}),
        ("order-select", {"userId", "patientId", "selections", "draftOrders"}),
        ("order-sign", {"userId", "patientId", "draftOrders"}),
        ("encounter-start", {"userId", "patientId", "encounterId"}),
        ("encounter-discharge", {"userId", "patientId", "encounterId"}),
        ("appointment-book", {"userId", "patientId", "appointments"}),
    ],
)
def test_required_context_fields_per_hook(hook: str, required: set[str]) -> None:
    issues = rejection(request_for(hook, {}))
    assert locations(issues) == {f"context.{name}" for name in required}
    assert all(i.code == "required" and hook in i.message for i in issues)


def test_unknown_hook_context_just_an_object() -> None:
    request = parse_request(
        request_for("com.example.custom", {"patientId": "Patient/1", "x": [], "y": None})
    )
    assert request.patient_id == "Patient/1"  # not ours to check
    assert request.selections == [] and request.draft_orders == []
    issues = rejection(request_for("com.example.custom", ["not", "an", "object"]))
    assert issues == [Issue("context", "context must be a JSON object", "structure")]


def test_context_of_known_hook_must_be_an_object() -> None:
    issues = rejection(request_for("patient-view", None))
    assert issues == [Issue("context", "context must be a JSON object", "structure")]


@pytest.mark.parametrize(
    ("selections", "location"),
    [
        ([], "context.selections"),
        (["mri-1"], "context.selections[0]"),
        (["ServiceRequest/mri-1", "serviceRequest/x"], "context.selections[1]"),
        ("ServiceRequest/mri-1", "context.selections"),
        ([7], "context.selections[0]"),
    ],
)
def test_selections_are_type_slash_id(selections: Any, location: str) -> None:
    issues = rejection(request_for("order-select", os_context(selections=selections)))
    assert locations(issues) == {location}


@pytest.mark.parametrize(
    ("bundle", "location"),
    [
        ({"resourceType": "Patient", "id": "p"}, "context.draftOrders.resourceType"),
        ({"entry": []}, "context.draftOrders.resourceType"),
        ([SERVICE_REQUEST], "context.draftOrders"),
        ({"resourceType": "Bundle", "entry": {}}, "context.draftOrders.entry"),
        ({"resourceType": "Bundle", "entry": [{}]}, "context.draftOrders.entry[0].resource"),
        (
            {"resourceType": "Bundle", "entry": [{"resource": {"id": "x"}}]},
            "context.draftOrders.entry[0].resource.resourceType",
        ),
        (
            {"resourceType": "Bundle", "entry": [{"resource": "ServiceRequest/1"}]},
            "context.draftOrders.entry[0].resource",
        ),
    ],
)
def test_draft_orders_is_a_bundle_of_resources(bundle: Any, location: str) -> None:
    issues = rejection(
        request_for(
            "order-sign", {"userId": "Practitioner/1", "patientId": "1", "draftOrders": bundle}
        )
    )
    assert locations(issues) == {location}


def test_draft_orders_lenient_on_fhir_details() -> None:
    """No fullUrl, no Bundle.type, unknown fields: accepted (the spec's own examples do this)."""
    bundle = {
        "resourceType": "Bundle",
        "entry": [{"resource": SERVICE_REQUEST, "search": {"mode": "match"}}],
        "x": 1,
    }
    request = parse_request(
        request_for(
            "order-sign", {"userId": "Practitioner/1", "patientId": "1", "draftOrders": bundle}
        )
    )
    assert request.draft_orders == [SERVICE_REQUEST]
    empty = parse_request(
        request_for(
            "order-sign",
            {
                "userId": "Practitioner/1",
                "patientId": "1",
                "draftOrders": {"resourceType": "Bundle"},
            },
        )
    )
    assert empty.draft_orders == []


@pytest.mark.parametrize(
    ("appointments", "ok"),
    [
        (
            {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Appointment"}}]},
            True,
        ),
        ([{"resourceType": "Appointment", "status": "proposed"}], True),
        ([], False),
        ([{"status": "proposed"}], False),
        ("Appointment/1", False),
        ({"resourceType": "Appointment"}, False),
    ],
)
def test_appointments_bundle_or_array(appointments: Any, ok: bool) -> None:
    doc = request_for(
        "appointment-book", {"userId": "Patient/1", "patientId": "1", "appointments": appointments}
    )
    if ok:
        parse_request(doc)
    else:
        assert all(i.location.startswith("context.appointments") for i in rejection(doc))


@pytest.mark.req("28")
def test_prefetch_values() -> None:
    prefetch = {
        "patient": {"resourceType": "Patient", "id": "1288992"},
        "conditions": {"resourceType": "Bundle", "type": "searchset", "total": 0},
        "nothing": None,
        "failed": {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "timeout"}],
        },
    }
    request = parse_request(request_for("patient-view", pv_context(), prefetch=prefetch))
    assert request.prefetch == prefetch
    assert parse_request(request_for("patient-view", pv_context())).prefetch == {}
    assert parse_request(request_for("patient-view", pv_context(), prefetch={})).prefetch == {}


@pytest.mark.parametrize(
    ("value", "location", "code"),
    [
        ("123", "prefetch.p", "structure"),
        ([{"resourceType": "Patient"}], "prefetch.p", "structure"),
        ({"id": "1"}, "prefetch.p.resourceType", "required"),
        ({"resourceType": ""}, "prefetch.p.resourceType", "value"),
        ({"resourceType": 5}, "prefetch.p.resourceType", "structure"),
        (
            {"resource": {"resourceType": "Patient"}, "response": {"status": "200 OK"}},
            "prefetch.p.resourceType",
            "required",
        ),
    ],
)
def test_prefetch_value_must_be_resource_or_null(value: Any, location: str, code: str) -> None:
    issues = rejection(request_for("patient-view", pv_context(), prefetch={"p": value}))
    assert [(i.location, i.code) for i in issues] == [(location, code)]


def test_odd_keys_are_quoted_in_locations() -> None:
    issues = rejection(
        request_for("patient-view", pv_context(), prefetch={"a.b": "x", "": 1, "ok-key_1": 2})
    )
    assert [i.location for i in issues] == ["prefetch.ok-key_1", 'prefetch[""]', 'prefetch["a.b"]']


def test_prefetch_must_be_an_object() -> None:
    issues = rejection(request_for("patient-view", pv_context(), prefetch=[None]))
    assert issues == [Issue("prefetch", "prefetch must be a JSON object", "structure")]


@pytest.mark.req("214")
def test_request_extension_must_be_an_object() -> None:
    assert parse_request(
        request_for("patient-view", pv_context(), extension={"a.b": {"c": 1}})
    ).extension == {"a.b": {"c": 1}}
    issues = rejection(request_for("patient-view", pv_context(), extension="x"))
    assert issues == [Issue("extension", "extension must be a JSON object", "structure")]


def test_unknown_top_level_fields_are_allowed() -> None:
    doc = request_for(
        "patient-view", pv_context(encounterId="1"), version="3.0", futureField={"x": None}
    )
    assert parse_request(doc).hook == "patient-view"


@pytest.mark.parametrize("hook", ["", None, 3])
def test_hook_must_be_a_non_empty_string(hook: Any) -> None:
    issues = rejection(request_for("x", {}) | {"hook": hook})
    assert locations(issues) == {"hook"}


# ------------------------------------------------------------------------------------------
# parse_json
# ------------------------------------------------------------------------------------------


@pytest.mark.req("1")
def test_parse_json_returns_value() -> None:
    body = json.dumps(request_for("patient-view", pv_context())).encode()
    assert parse_request(parse_json(body)).patient_id == "1288992"
    assert parse_json(b'"x"') == "x"
    assert parse_json(b"[]", max_depth=1) == []


@pytest.mark.req("1")
@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "empty"),
        (b"{", "line 1"),
        (b'{"hook": tru}', "line 1, column"),
        (b'{"a": 1,}', "line 1"),
        (b"\xff\xfe", "UTF-8"),
        (b"{\n  'a': 1\n}", "line 2"),
        (b"NaN", "line 1"),
    ],
)
def test_parse_json_invalid(body: bytes, fragment: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_json(body)
    assert type(info.value) is RequestError
    assert info.value.message.startswith("Body is not valid JSON: ")
    assert fragment in info.value.message
    assert info.value.status == 400


def _nested(depth: int, kind: str = "list") -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)


@pytest.mark.parametrize("kind", ["list", "object"])
def test_depth_limit(kind: str) -> None:
    parse_json(_nested(64, kind))
    with pytest.raises(JsonTooDeep) as info:
        parse_json(_nested(65, kind))
    assert info.value.status == 400
    assert info.value.issues[0].code == "too-costly"
    parse_json(_nested(10, kind), max_depth=10)
    with pytest.raises(JsonTooDeep):
        parse_json(_nested(11, kind), max_depth=10)


def test_depth_limit_counts_the_deepest_branch() -> None:
    body = b'{"a": [1, 2, {"b": [[[]]]}], "c": {}}'  # depth 6
    parse_json(body, max_depth=6)
    with pytest.raises(JsonTooDeep):
        parse_json(body, max_depth=5)


def test_depth_beyond_orjson_limit_is_too_deep() -> None:
    with pytest.raises(JsonTooDeep):
        parse_json(_nested(5000), max_depth=10_000)


def test_depth_check_is_not_recursive() -> None:
    """A wide and deep (within limits) document is checked without recursion."""
    body = json.dumps([[[[i] for i in range(200)]] * 50] * 20).encode()
    assert len(parse_json(body, max_depth=5)) == 20


def test_parse_json_rejects_bad_max_depth() -> None:
    with pytest.raises(ValueError):
        parse_json(b"{}", max_depth=0)


# ------------------------------------------------------------------------------------------
# feedback
# ------------------------------------------------------------------------------------------


@pytest.mark.shared
@pytest.mark.req("148")
def test_spec_feedback_examples_parse() -> None:
    accepted = parse_feedback(load(SPEC / "spec-2.0.1-example-18.json"))
    assert accepted == [
        Feedback(
            card="4e0a3a1e-3283-4575-ab82-028d55fe2719",
            outcome="accepted",
            accepted_suggestions=("e56e1945-20b3-4393-8503-a1a20fd73152",),
            override_reason=None,
            override_comment=None,
            outcome_timestamp=datetime(2021, 12, 11, 10, 5, 31, tzinfo=UTC),
        )
    ]
    (overridden,) = parse_feedback(load(SPEC / "spec-2.0.1-example-19.json"))
    assert overridden.outcome == "overridden" and overridden.accepted_suggestions == ()
    assert overridden.override_reason is None and overridden.override_comment is None
    (with_reason,) = parse_feedback(load(SPEC / "spec-2.0.1-example-20.json"))
    # the spec's example reason has no display: display is only required in cards
    assert with_reason.override_reason == {
        "code": "d7ecf885",
        "system": "https://example.com/cds-hooks/override-reason-system",
    }
    assert with_reason.override_comment == "A comment entered by the clinician."
    assert with_reason.outcome_timestamp == datetime(2020, 12, 11, tzinfo=UTC)


def _feedback(**fields: Any) -> dict[str, Any]:
    return {
        "feedback": [
            {
                "card": "c1",
                "outcome": "overridden",
                "outcomeTimestamp": "2021-12-11T10:05:31Z",
                **fields,
            }
        ]
    }


def feedback_rejection(doc: Any) -> list[Issue]:
    with pytest.raises(RequestError) as info:
        parse_feedback(doc)
    return info.value.issues


@pytest.mark.req("148")
def test_feedback_cds_fb_1_outcome_enum() -> None:
    issues = feedback_rejection(_feedback(outcome="ignored"))
    assert [(i.location, i.code) for i in issues] == [("feedback[0].outcome", "invariant")]
    assert "cds-fb-1" in issues[0].message


@pytest.mark.req("148")
def test_feedback_cds_fb_2_accepted_needs_suggestions() -> None:
    issues = feedback_rejection(_feedback(outcome="accepted"))
    assert [(i.location, i.code) for i in issues] == [
        ("feedback[0].acceptedSuggestions", "required")
    ]
    assert "cds-fb-2" in issues[0].message
    issues = feedback_rejection(_feedback(outcome="accepted", acceptedSuggestions=[]))
    assert locations(issues) == {"feedback[0].acceptedSuggestions"}
    issues = feedback_rejection(_feedback(outcome="accepted", acceptedSuggestions=[{"uuid": "s"}]))
    assert locations(issues) == {"feedback[0].acceptedSuggestions[0].id"}
    (item,) = parse_feedback(
        _feedback(outcome="accepted", acceptedSuggestions=[{"id": "s1"}, {"id": "s2"}])
    )
    assert item.accepted_suggestions == ("s1", "s2")


@pytest.mark.req("148")
def test_feedback_cds_fb_3_override_reason_content() -> None:
    issues = feedback_rejection(_feedback(overrideReason={}))
    assert [(i.location, i.code) for i in issues] == [("feedback[0].overrideReason", "invariant")]
    assert "cds-fb-3" in issues[0].message
    (comment_only,) = parse_feedback(_feedback(overrideReason={"userComment": "patient declined"}))
    assert (
        comment_only.override_reason is None and comment_only.override_comment == "patient declined"
    )
    issues = feedback_rejection(_feedback(overrideReason={"reason": {"code": "x"}}))
    assert locations(issues) == {"feedback[0].overrideReason.reason.system"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2021-12-11T10:05:31Z", datetime(2021, 12, 11, 10, 5, 31, tzinfo=UTC)),
        ("1985-04-12T23:20:50.52Z", datetime(1985, 4, 12, 23, 20, 50, 520000, tzinfo=UTC)),
        ("2021-12-11T11:05:31+01:00", datetime(2021, 12, 11, 10, 5, 31, tzinfo=UTC)),
        (
            "2021-12-10T23:05:31.123456789-11:00",
            datetime(2021, 12, 11, 10, 5, 31, 123456, tzinfo=UTC),
        ),
        ("2021-12-11t10:05:31z", datetime(2021, 12, 11, 10, 5, 31, tzinfo=UTC)),
        ("2016-12-31T23:59:60Z", datetime(2016, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
    ],
)
def test_feedback_timestamp_is_utc(text: str, expected: datetime) -> None:
    (item,) = parse_feedback(_feedback(outcomeTimestamp=text))
    assert item.outcome_timestamp == expected
    assert item.outcome_timestamp.utcoffset() is not None and item.outcome_timestamp.tzinfo == UTC


@pytest.mark.parametrize(
    "text",
    [
        "2021-12-11T10:05:31",  # no time zone
        "2021-12-11 10:05:31Z",
        "2021-12-11",
        "2021-13-11T10:05:31Z",
        "2021-02-30T10:05:31Z",
        "2021-12-11T24:05:31Z",
        "2021-12-11T10:05:31+24:00",
        "2021-12-11T10:05:31Z\n",
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
        "",
    ],
)
def test_feedback_timestamp_must_be_rfc3339(text: str) -> None:
    issues = feedback_rejection(_feedback(outcomeTimestamp=text))
    assert [(i.location, i.code) for i in issues] == [("feedback[0].outcomeTimestamp", "value")]


@pytest.mark.req("148")
def test_feedback_wrapper() -> None:
    assert locations(feedback_rejection({"feedback": []})) == {"feedback"}
    assert locations(feedback_rejection({"card": "c1", "outcome": "overridden"})) == {"feedback"}
    assert feedback_rejection([]) == [
        Issue("", "The feedback body must be a JSON object", "structure")
    ]
    issues = feedback_rejection({"feedback": [{}]})
    assert [i.location for i in issues] == [
        "feedback[0].card",
        "feedback[0].outcome",
        "feedback[0].outcomeTimestamp",
    ]


# ------------------------------------------------------------------------------------------
# responses
# ------------------------------------------------------------------------------------------

GOOD_RESPONSES = [
    ("cdshooks-response-good.json", "R4.cdshooks-response-good-logical.json"),
    ("cdshooks-response-empty.json", "R4.cdshooks-response-empty-logical.json"),
    ("cdshooks-response-link.json", "R4.cdshooks-response-link-logical.json"),
    ("cdshooks-response-no-link.json", "R4.cdshooks-response-no-link-logical.json"),
    ("cdshooks-response-two-cards.json", "R4.cdshooks-response-two-cards-logical.json"),
    ("cdshooks-response-empty-good.json", None),  # not in the manifest
]


@pytest.mark.shared
@pytest.mark.req(
    "74",
    "77",
    "80",
    "83",
    "87",
    "88",
    "90",
    "100",
    "103",
    "105",
    "107",
    "111",
    "136",
    "138",
    "139",
    "141",
    "142",
    "144",
    "219",
)
@pytest.mark.parametrize(("vector", "outcome"), GOOD_RESPONSES)
def test_good_response_vectors_validate(vector: str, outcome: str | None) -> None:
    if outcome is not None:
        assert load(OUTCOMES / outcome).get("issue", []) == []
    assert response_issues(load(VECTORS / vector)) == []


BAD_RESPONSES = [
    # (vector, validator outcome, the issues we find)
    (
        "cdshooks-response-empty2.json",  # {}
        "R4.cdshooks-response-empty2-logical.json",
        {("cards", "required")},
    ),
    (
        "cdshooks-response-empty-bad.json",
        None,
        {("cards", "required")},
    ),  # {} too; not in the manifest
    (
        # source {} (validator: "Object must have some content" and "label: minimum required = 1").
        # We also flag links[0].type: the link has no type, which CDS Hooks 2.0.1 REQUIRES; the
        # validator's model does not enforce it.
        "cdshooks-response-empty-source.json",
        "R4.cdshooks-response-empty-source-logical.json",
        {("cards[0].source.label", "required"), ("cards[0].links[0].type", "required")},
    ),
    (
        # cds-resp-6 as the validator says. It also wants an id on the resource of the 'create'
        # action; a resource to be created needs none, so we do not. We also flag the summary:
        # 157 characters, where the specification says "<140-character".
        "cdshooks-response-suggestion.json",
        "R4.cdshooks-response-suggestion-logical.json",
        {("cards[0].selectionBehavior", "required"), ("cards[0].summary", "value")},
    ),
    (
        # The validator accepts this vector; we do not: its summary has 169 characters (the
        # specification: "<140-character") and its link has no type (REQUIRED).
        "cdshooks-response-source-link.json",
        "R4.cdshooks-response-source-link-logical.json",
        {("cards[0].summary", "value"), ("cards[0].links[0].type", "required")},
    ),
]


@pytest.mark.shared
@pytest.mark.req("3", "83", "90", "93", "96", "105", "141")
@pytest.mark.parametrize(("vector", "outcome", "expected"), BAD_RESPONSES)
def test_bad_response_vectors(
    vector: str, outcome: str | None, expected: set[tuple[str, str]]
) -> None:
    issues = response_issues(load(VECTORS / vector))
    assert {(i.location, i.code) for i in issues} == expected
    if outcome is None:
        return
    # Every field the validator flags for a CDS Hooks reason is one we flag too (or inside it).
    ours = {location for location, _ in expected}
    for issue in load(OUTCOMES / outcome).get("issue", []):
        field = issue["expression"][0].removeprefix("CDSHooksResponse").removeprefix(".")
        if "Resource requires an id" in issue["details"]["text"]:
            continue  # FHIR-level: a resource to be created needs no id (see above)
        if field == "":  # "Object must have some content": the whole response is {}
            assert ours == {"cards"}
            continue
        assert any(loc == field or loc.startswith(field + ".") for loc in ours), field


def test_empty2_and_summary_messages() -> None:
    assert response_issues({}) == [Issue("cards", "Required field 'cards' is missing", "required")]
    long = response(card(summary="x" * 140))
    assert response_issues(long) == [
        Issue("cards[0].summary", "summary must have at most 139 characters (it has 140)", "value")
    ]
    assert response_issues(response(card(summary="x" * 139))) == []


@pytest.mark.shared
@pytest.mark.req("74", "75", "77", "80", "84", "85", "87", "88", "103", "136", "146")
@pytest.mark.parametrize("name", ["spec-2.0.1-example-09.json", "spec-2.0.1-example-16.json"])
def test_spec_response_examples_validate(name: str) -> None:
    assert response_issues(load(SPEC / name)) == []


@pytest.mark.shared
@pytest.mark.req("87", "88")
def test_spec_autolaunchable_example_lacks_indicator() -> None:
    """The 'autolaunchable' response example of 2.0.1 has no card indicator, which is REQUIRED."""
    doc = load(SPEC / "spec-2.0.1-example-17.json")
    assert [(i.location, i.code) for i in response_issues(doc)] == [
        ("cards[0].indicator", "required")
    ]
    doc["cards"][0]["indicator"] = "info"
    assert response_issues(doc) == []


@pytest.mark.shared
@pytest.mark.req("75", "128")
def test_spec_system_action_example_lacks_description() -> None:
    """The systemActions example of 2.0.1 has no action description, which 2.0.1 REQUIRES.

    (3.0 makes it optional for system actions.) For our own responses we keep it required.
    """
    issues = response_issues(load(SPEC / "spec-2.0.1-example-15.json"))
    assert [(i.location, i.code) for i in issues] == [("systemActions[0].description", "required")]


@pytest.mark.shared
@pytest.mark.req(
    "105",
    "107",
    "111",
    "115",
    "127",
    "128",
    "130",
    "131",
    "132",
    "133",
    "134",
    "135",
    "136",
    "216",
    "217",
    "219",
    "220",
)
def test_spec_card_fragments_validate() -> None:
    source = load(SPEC / "spec-2.0.1-example-10.json")["source"]
    reasons = load(SPEC / "spec-2.0.1-example-14.json")["overrideReasons"]
    actions = [load(SPEC / f"spec-2.0.1-example-{n}.json") for n in (11, 12, 13)]
    doc = response(
        card(
            source=source,
            overrideReasons=reasons,
            suggestions=[{"label": "Apply", "actions": actions}],
            selectionBehavior="at-most-one",
        ),
        systemActions=[actions[1]],
    )
    assert response_issues(doc) == []


@pytest.mark.req("92", "93", "96")
def test_cds_resp_6_suggestions_need_selection_behavior() -> None:
    issues = response_issues(response(card(suggestions=[{"label": "Order MRI"}])))
    assert issues == [
        Issue(
            "cards[0].selectionBehavior",
            "selectionBehavior is required when the card has suggestions (cds-resp-6)",
            "required",
        )
    ]
    assert (
        response_issues(
            response(card(suggestions=[{"label": "Order MRI"}], selectionBehavior="any"))
        )
        == []
    )
    assert locations(response_issues(response(card(selectionBehavior="all")))) == {
        "cards[0].selectionBehavior"
    }


@pytest.mark.req("95", "120", "121", "122")
def test_cds_resp_1_at_most_one_recommended() -> None:
    def suggestions(*flags: bool | None) -> list[dict[str, Any]]:
        return [
            {"label": f"s{i}"} | ({} if f is None else {"isRecommended": f})
            for i, f in enumerate(flags)
        ]

    two = response(card(suggestions=suggestions(True, True), selectionBehavior="at-most-one"))
    issues = response_issues(two)
    assert [(i.location, i.code) for i in issues] == [("cards[0].suggestions", "invariant")]
    assert "cds-resp-1" in issues[0].message
    for flags in [(True, False, None), (None, None), (False, False)]:
        assert (
            response_issues(
                response(card(suggestions=suggestions(*flags), selectionBehavior="at-most-one"))
            )
            == []
        )
    assert (
        response_issues(
            response(card(suggestions=suggestions(True, True, True), selectionBehavior="any"))
        )
        == []
    )
    assert locations(
        response_issues(
            response(
                card(suggestions=[{"label": "s", "isRecommended": "yes"}], selectionBehavior="any")
            )
        )
    ) == {"cards[0].suggestions[0].isRecommended"}


@pytest.mark.req("133", "134", "135")
def test_cds_resp_2_delete_uses_resource_id_only() -> None:
    def action(**fields: Any) -> dict[str, Any]:
        return response(
            card(
                suggestions=[
                    {
                        "label": "s",
                        "actions": [{"type": "delete", "description": "Cancel", **fields}],
                    }
                ],
                selectionBehavior="any",
            )
        )

    assert response_issues(action(resourceId="ServiceRequest/mri-1")) == []
    issues = response_issues(
        action(resourceId="ServiceRequest/mri-1", resource={"resourceType": "ServiceRequest"})
    )
    assert [(i.location, i.code) for i in issues] == [
        ("cards[0].suggestions[0].actions[0].resource", "invariant")
    ]
    assert "cds-resp-2" in issues[0].message
    # the deprecated form: the id as a string in 'resource'
    issues = response_issues(action(resource="ServiceRequest/mri-1"))
    assert locations(issues) == {
        "cards[0].suggestions[0].actions[0].resource",
        "cards[0].suggestions[0].actions[0].resourceId",
    }
    issues = response_issues(action(resourceId="mri-1"))
    assert locations(issues) == {"cards[0].suggestions[0].actions[0].resourceId"}


@pytest.mark.req("127", "128", "130", "131", "132")
@pytest.mark.parametrize(
    ("act", "location"),
    [
        ({"type": "create", "description": "Order MRI"}, "resource"),
        ({"type": "update", "description": "Update"}, "resource"),
        ({"type": "create", "resource": SERVICE_REQUEST}, "description"),
        ({"type": "create", "description": "", "resource": SERVICE_REQUEST}, "description"),
        ({"type": "remove", "description": "x", "resourceId": "ServiceRequest/1"}, "type"),
        ({"description": "x", "resource": SERVICE_REQUEST}, "type"),
        ({"type": "create", "description": "x", "resource": {"id": "1"}}, "resource.resourceType"),
        ({"type": "create", "description": "x", "resource": SERVICE_REQUEST, "note": "x"}, "note"),
    ],
)
def test_action_rules(act: dict[str, Any], location: str) -> None:
    doc = response(card(suggestions=[{"label": "s", "actions": [act]}], selectionBehavior="any"))
    assert locations(response_issues(doc)) == {f"cards[0].suggestions[0].actions[0].{location}"}
    assert locations(response_issues(response(systemActions=[act]))) == {
        f"systemActions[0].{location}"
    }


@pytest.mark.req("144", "145", "146", "147")
def test_cds_resp_3_app_context_only_for_smart() -> None:
    def link(**fields: Any) -> dict[str, Any]:
        return response(
            card(links=[{"label": "App", "url": "https://app.example.org/launch", **fields}])
        )

    assert response_issues(link(type="smart", appContext='{"a":1}')) == []
    issues = response_issues(link(type="absolute", appContext='{"a":1}'))
    assert [(i.location, i.code) for i in issues] == [("cards[0].links[0].appContext", "invariant")]
    assert "cds-resp-3" in issues[0].message
    # no type at all: the missing type is the problem reported
    assert locations(response_issues(link(appContext="x"))) == {"cards[0].links[0].type"}
    assert locations(response_issues(link(type="relative"))) == {"cards[0].links[0].type"}
    assert locations(response_issues(link(type="smart", autolaunchable="true"))) == {
        "cards[0].links[0].autolaunchable"
    }


@pytest.mark.req("98", "100", "136", "219")
def test_cds_resp_4_override_reasons_need_display() -> None:
    reason = {
        "code": "patient-refuses",
        "system": "http://terminology.hl7.org/CodeSystem/non-adherence-reason-codes",
    }
    issues = response_issues(response(card(overrideReasons=[reason])))
    assert [(i.location, i.code) for i in issues] == [
        ("cards[0].overrideReasons[0].display", "required")
    ]
    assert "cds-resp-4" in issues[0].message
    assert (
        response_issues(response(card(overrideReasons=[{**reason, "display": "Patient refuses"}])))
        == []
    )


@pytest.mark.req("115", "216", "217", "220")
def test_source_topic_coding() -> None:
    topic = {"system": "http://example.org/topics", "code": "lbp"}
    assert response_issues(response(card(source={"label": "x", "topic": topic}))) == []
    issues = response_issues(
        response(card(source={"label": "x", "topic": {"display": "Low back pain"}}))
    )
    assert locations(issues) == {"cards[0].source.topic.code", "cards[0].source.topic.system"}


@pytest.mark.req("105", "107", "111", "139")
@pytest.mark.parametrize(
    "url",
    [
        "/relative",
        "example.org/x",
        "",
        "https://",
        "https://exa mple.org",
        "javascript:alert(1)",
        "data:image/png;base64,iVBORw0KGgo=",
    ],
)
def test_urls_must_be_absolute_http(url: str) -> None:
    doc = response(
        card(
            source={"label": "x", "url": url, "icon": url},
            links=[{"label": "l", "url": url, "type": "absolute"}],
        )
    )
    assert locations(response_issues(doc)) == {
        "cards[0].source.url",
        "cards[0].source.icon",
        "cards[0].links[0].url",
    }


@pytest.mark.req("3")
@pytest.mark.parametrize(
    ("fields", "location"),
    [
        ({"detail": ""}, "cards[0].detail"),
        ({"detail": None}, "cards[0].detail"),
        ({"uuid": ""}, "cards[0].uuid"),
        ({"summary": ""}, "cards[0].summary"),
        ({"links": []}, "cards[0].links"),
        ({"suggestions": [], "selectionBehavior": "any"}, "cards[0].suggestions"),
        ({"overrideReasons": []}, "cards[0].overrideReasons"),
        ({"source": {"label": ""}}, "cards[0].source.label"),
        ({"source": {"label": "x", "url": None}}, "cards[0].source.url"),
        ({"extension": {}}, "cards[0].extension"),
        ({"indicator": "hard-stop"}, "cards[0].indicator"),
        ({"indicator": None}, "cards[0].indicator"),
        ({"sumary": "typo"}, "cards[0].sumary"),
        (
            {"suggestions": [{"label": "s", "actions": []}], "selectionBehavior": "any"},
            "cards[0].suggestions[0].actions",
        ),
        (
            {"suggestions": [{"label": "s", "uuid": None}], "selectionBehavior": "any"},
            "cards[0].suggestions[0].uuid",
        ),
    ],
)
def test_no_null_or_empty_values_in_responses(fields: dict[str, Any], location: str) -> None:
    issues = response_issues(response(card(**fields)))
    assert locations(issues) == {location}


@pytest.mark.req("3", "74", "75", "77")
def test_response_top_level() -> None:
    assert response_issues({"cards": []}) == []
    assert locations(response_issues({"cards": [], "systemActions": []})) == {"systemActions"}
    assert locations(response_issues({"cards": None})) == {"cards"}
    assert locations(response_issues({"cards": [], "extra": 1})) == {"extra"}
    assert response_issues({"cards": [], "extension": {"org.example.x": 1}}) == []
    assert response_issues([]) == [Issue("", "The response must be a JSON object", "structure")]


def test_response_issues_sorted_with_numeric_indexes() -> None:
    doc = response(*[card(indicator="bad") if i in (2, 10) else card() for i in range(12)])
    assert [i.location for i in response_issues(doc)] == [
        "cards[2].indicator",
        "cards[10].indicator",
    ]


# ------------------------------------------------------------------------------------------
# discovery
# ------------------------------------------------------------------------------------------


@pytest.mark.shared
@pytest.mark.req("6", "7", "9", "10", "11", "12", "36", "55", "56", "57", "59", "214")
@pytest.mark.parametrize(
    ("directory", "name"),
    [
        ("vectors", "cdshooks-services-good.json"),
        # The validator flags the two extension keys (its model only knows the Tools IG's
        # extensions); extension content is free, so we accept it.
        ("vectors", "cdshooks-services-order-select-extensions.json"),
        ("spec", "spec-2.0.1-example-00.json"),
        ("spec", "spec-2.0.1-example-26.json"),
    ],
)
def test_services_vectors_validate(directory: str, name: str) -> None:
    path = (VECTORS if directory == "vectors" else SPEC) / name
    assert services_issues(load(path)) == []


@pytest.mark.shared
@pytest.mark.req("55", "56", "57", "59")
def test_spec_prefetch_templates_validate() -> None:
    prefetch = load(SPEC / "spec-2.0.1-example-06.json")["prefetch"]
    prefetch |= load(SPEC / "spec-2.0.1-example-02.json")["prefetch"]
    prefetch |= load(SPEC / "spec-2.0.1-example-28-fragment.json")["prefetch"]
    prefetch["user"] = "{{context.userId}}"
    doc = {
        "services": [{"hook": "patient-view", "id": "x", "description": "d", "prefetch": prefetch}]
    }
    assert services_issues(doc) == []


SERVICE = {
    "hook": "patient-view",
    "id": "lbp-red-flags",
    "description": "Red flags in low back pain",
    "title": "LBP red flags",
}


@pytest.mark.req("55", "56", "57", "59")
@pytest.mark.parametrize(
    "template",
    [
        "Condition?patient={{context.medication.id}}",  # not a root-level field
        "Observation?patient={{context.patientId}}&date=ge{{today() - 90 days}}",  # 3.0 only
        "Patient/{context.patientId}",  # single braces
        "Patient/{{patientId}}",  # not context.<field>
        "Patient/{{ context.patientId }}",
        "Condition?patient={{context.patientId}}&code:text=back pain",
        "",
    ],
)
def test_prefetch_template_tokens(template: str) -> None:
    doc = {"services": [{**SERVICE, "prefetch": {"k": template}}]}
    issues = services_issues(doc)
    assert [(i.location, i.code) for i in issues] == [("services[0].prefetch.k", "value")]


@pytest.mark.req("6", "7", "9", "10", "211")
def test_services_rules() -> None:
    assert services_issues({"services": []}) == []
    same_id_other_hook = {"services": [SERVICE, {**SERVICE, "hook": "order-sign"}]}
    assert services_issues(same_id_other_hook) == []
    duplicate = services_issues({"services": [SERVICE, dict(SERVICE)]})
    assert [(i.location, i.code) for i in duplicate] == [("services[1].id", "duplicate")]
    issues = services_issues({"services": [{"title": "x", "prefetch": {}, "id": "a/b"}]})
    assert locations(issues) == {
        "services[0].hook",
        "services[0].description",
        "services[0].id",
        "services[0].prefetch",
    }
    assert locations(services_issues({"services": [{**SERVICE, "usageRequirements": None}]})) == {
        "services[0].usageRequirements"
    }
    assert (
        services_issues(
            {"services": [{**SERVICE, "version": "3.0.0", "extension": {"org.x": True}}]}
        )
        == []
    )
    assert locations(services_issues({})) == {"services"}


# ------------------------------------------------------------------------------------------
# robustness (hypothesis)
# ------------------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
)
resources = st.fixed_dictionaries(
    {
        "resourceType": st.sampled_from(
            ["Patient", "ServiceRequest", "Bundle", "OperationOutcome", "", "x"]
        )
    },
    optional={
        "id": json_values,
        "entry": st.lists(
            st.fixed_dictionaries({}, optional={"resource": json_values}), max_size=2
        ),
    },
)
field_values = st.one_of(
    json_values,
    resources,
    st.sampled_from(
        [
            "1288992",
            "Patient/1",
            "Practitioner/x",
            "PractitionerRole/1",
            "RelatedPerson/r",
            "",
            "a" * 65,
            "MedicationRequest/1",
            "1\n",
        ]
    ),
    st.lists(st.sampled_from(["MedicationRequest/1", "x", "ServiceRequest/a.b"]), max_size=3),
)
contexts = (
    st.dictionaries(
        st.sampled_from(
            [
                "userId",
                "patientId",
                "encounterId",
                "selections",
                "draftOrders",
                "appointments",
                "other",
            ]
        ),
        field_values,
        max_size=6,
    )
    | json_values
)
auths = (
    st.fixed_dictionaries(
        {},
        optional={
            "access_token": json_values,
            "token_type": st.sampled_from(["Bearer", "bearer", "MAC"]) | json_values,
            "expires_in": json_values,
            "scope": json_values,
            "subject": json_values,
            "patient": field_values,
        },
    )
    | json_values
)
requests = st.fixed_dictionaries(
    {},
    optional={
        "hook": st.sampled_from(
            [
                "patient-view",
                "order-select",
                "order-sign",
                "encounter-start",
                "encounter-discharge",
                "appointment-book",
                "x-hook",
            ]
        )
        | json_values,
        "hookInstance": st.uuids().map(str) | json_values,
        "fhirServer": st.sampled_from(["https://ehr.example.org/fhir", "http://[::1", "x"])
        | json_values,
        "fhirAuthorization": auths,
        "context": contexts,
        "prefetch": st.dictionaries(
            st.text(max_size=5), st.none() | resources | json_values, max_size=3
        )
        | json_values,
        "extension": json_values,
    },
)


def _check_parsed(request: HookRequest) -> None:
    assert isinstance(request.hook, str) and isinstance(request.context, dict)
    assert request.patient_id is None or isinstance(request.patient_id, str)
    assert all(isinstance(s, str) for s in request.selections)
    assert all(isinstance(r, dict) for r in request.draft_orders)
    repr(request)


def _check_issues(issues: list[Issue]) -> None:
    assert issues
    for issue in issues:
        assert isinstance(issue.location, str) and issue.message and issue.code


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests | json_values)
def test_parse_request_only_raises_request_error(doc: Any) -> None:
    try:
        request = parse_request(doc)
    except RequestError as exc:
        _check_issues(exc.issues)
    else:
        _check_parsed(request)


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "hook": st.sampled_from(["patient-view", "order-sign"]),
            "hookInstance": st.uuids().map(str),
        },
        optional={
            "prefetch": st.dictionaries(st.text(max_size=5), st.none() | resources, max_size=3)
        },
    ),
    st.sampled_from(["1288992", "a-b.c"]),
)
def test_generated_requests_parse_unless_prefetch_is_bad(
    doc: dict[str, Any], patient_id: str
) -> None:
    doc["context"] = {"userId": "Practitioner/1", "patientId": patient_id}
    if doc["hook"] == "order-sign":
        doc["context"]["draftOrders"] = draft_orders(SERVICE_REQUEST)
    bad = {
        k
        for k, v in doc.get("prefetch", {}).items()
        if v is not None and v["resourceType"] in ("", "x")
    }
    if not bad:
        assert parse_request(doc).patient_id == patient_id
    else:
        issues = rejection(doc)
        assert len(issues) == len(bad)
        assert all(
            i.location.startswith("prefetch") and i.location.endswith(".resourceType")
            for i in issues
        )


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_other_checks_never_crash(doc: Any) -> None:
    for check in (response_issues, services_issues, hooks.request_issues):
        for issue in check(doc):
            assert isinstance(issue, Issue)
    try:
        parse_feedback(doc)
    except RequestError as exc:
        _check_issues(exc.issues)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
def test_parse_json_only_raises_request_errors(body: bytes) -> None:
    with contextlib.suppress(RequestError):  # JsonTooDeep is a RequestError
        parse_json(body, max_depth=3)


def test_uuid_format_agrees_with_python_uuid() -> None:
    for _ in range(50):
        value = str(uuid.uuid4())
        assert hooks._is_uuid(value) and hooks._is_uuid(value.upper())
    assert not hooks._is_uuid(uuid.uuid4().hex)
