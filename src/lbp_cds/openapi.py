"""The OpenAPI 3.1 document of lbp-cds, served at ``/openapi.json``.

Built from the JSON Schemas in ``schemas/`` (the ones the service validates with), so the
document cannot drift from what the service accepts and answers. Each schema's ``$defs`` become
``components.schemas`` entries named ``<Prefix>_<def>`` and its ``#/$defs/...`` references are
rewritten to them; the ``x-messages`` annotations (our error wording) are left out.

``tests/test_openapi.py`` validates the document and runs schemathesis against a real server to
keep it honest: every status code and media type the server answers is listed here.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from lbp_cds.knowledge import Knowledge, Service

SCHEMA_DIR = Path(__file__).parent / "schemas"
FHIR_JSON = "application/fhir+json"
JSON = "application/json"

# (file in schemas/, component name of its root, prefix of its $defs)
_SCHEMAS = (
    ("services.schema.json", "DiscoveryResponse", "Discovery"),
    ("request.schema.json", "CdsServiceRequest", "Request"),
    ("response.schema.json", "CdsServiceResponse", "Response"),
    ("feedback.schema.json", "FeedbackRequest", "Feedback"),
)

_ERRORS = {
    "400": "The body is not valid JSON, nests too deep, or is not a valid CDS Hooks request for "
           "this service (wrong hook, missing or malformed fields), or its `fhirServer` is not "
           "one this client may send the service to; the issues name each field.",
    "401": "Missing or invalid client JWT (expired, wrong `aud`/`iss`, replayed `jti`, "
           "untrusted `jku`, `none`/symmetric algorithm ...). The OperationOutcome names only "
           "the category; the reason is in the service's log under the `X-Request-Id`.",
    "404": "No CDS service with this id (answered after authentication).",
    "412": "Data the service needs were neither prefetched nor obtainable from `fhirServer`.",
    "413": "The body is larger than the service accepts (`LBP_CDS_MAX_BODY_BYTES`).",
    "415": "The body is not `application/json` (or `application/fhir+json`).",
    "422": "Well-formed feedback about a card or suggestion this service did not issue.",
    "503": "The store did not answer: nothing was kept; retrying is safe (feedback is idempotent).",
    "500": "Internal error (an OperationOutcome quoting the request id; nothing else).",
}

_OPERATION_OUTCOME: dict[str, Any] = {
    "title": "FHIR OperationOutcome",
    "description": "Every error answer. `expression` names the offending request field.",
    "type": "object",
    "required": ["resourceType", "issue"],
    "properties": {
        "resourceType": {"const": "OperationOutcome"},
        "issue": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["severity", "code"],
                "properties": {
                    "severity": {"enum": ["fatal", "error", "warning", "information"]},
                    "code": {"type": "string", "minLength": 1},
                    "diagnostics": {"type": "string"},
                    "expression": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}

_EXTRA_SCHEMAS: dict[str, Any] = {
    "OperationOutcome": _OPERATION_OUTCOME,
    "FeedbackReceipt": {
        "title": "Feedback receipt",
        "description": "What became of the feedback items: `stored` new rows, `duplicates` "
                       "already known (feedback is stored idempotently).",
        "type": "object",
        "required": ["received", "stored", "duplicates"],
        "additionalProperties": False,
        "properties": {name: {"type": "integer", "minimum": 0}
                       for name in ("received", "stored", "duplicates")},
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"const": "ok"}},
    },
    "Readiness": {
        "type": "object",
        "required": ["status", "checks", "knowledgeDigest"],
        "properties": {
            "status": {"enum": ["ready", "not ready"]},
            "checks": {"type": "object", "additionalProperties": {"type": "boolean"}},
            "knowledgeDigest": {
                "type": "string", "pattern": "^[0-9a-f]{64}$",
                "description": "SHA-256 of the knowledge pack this replica serves (cards carry "
                               "its first 12 digits in extension `org.lbp-cds.rule`)."},
        },
    },
    "Questionnaire": {
        "description": "The FHIR R4 Questionnaire of the red-flag intake.",
        "type": "object",
        "required": ["resourceType"],
        "properties": {"resourceType": {"const": "Questionnaire"}},
    },
}


def _rewrite(node: Any, prefix: str) -> Any:
    """Copy a schema with ``#/$defs/x`` refs pointing at ``components.schemas``, without the
    ``x-messages`` annotations."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "x-messages":
                continue
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
                out[key] = f"#/components/schemas/{prefix}_{value[len('#/$defs/'):]}"
            else:
                out[key] = _rewrite(value, prefix)
        return out
    if isinstance(node, list):
        return [_rewrite(v, prefix) for v in node]
    return node


@cache
def _components() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for filename, name, prefix in _SCHEMAS:
        document = json.loads((SCHEMA_DIR / filename).read_text(encoding="utf-8"))
        document.pop("$schema", None)
        document.pop("$comment", None)  # about our x-messages annotations, left out here
        for def_name, definition in document.pop("$defs", {}).items():
            schemas[f"{prefix}_{def_name}"] = _rewrite(definition, prefix)
        schemas[name] = _rewrite(document, prefix)
    schemas.update(_EXTRA_SCHEMAS)
    return schemas


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _errors(*codes: str) -> dict[str, Any]:
    return {code: {"description": _ERRORS[code],
                   "content": {FHIR_JSON: {"schema": _ref("OperationOutcome")}}}
            for code in codes}


def example_request(service: Service) -> dict[str, Any]:
    """A valid request for ``service``: its hook, a minimal context, every prefetch key ``null``
    ("the EHR has no such data"), a draft imaging order for the order hooks."""
    context: dict[str, Any] = {"userId": "Practitioner/example", "patientId": "example"}
    if service.hook in ("order-select", "order-sign"):
        order = {"resourceType": "ServiceRequest", "id": "example-order", "status": "draft",
                 "intent": "order", "subject": {"reference": "Patient/example"},
                 "code": {"text": "MRI lumbar spine without contrast"}}
        context["draftOrders"] = {"resourceType": "Bundle", "type": "collection",
                                  "entry": [{"resource": order}]}
        if service.hook == "order-select":
            context["selections"] = ["ServiceRequest/example-order"]
    request: dict[str, Any] = {"hook": service.hook,
                               "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
                               "context": context}
    if service.prefetch:
        request["prefetch"] = {key: None for key in service.prefetch}
    return request


def _version() -> str:
    try:
        return metadata.version("lbp-cds")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0"


def openapi_document(knowledge: Knowledge) -> dict[str, Any]:
    """Describe every endpoint, with the request and response schemas of ``schemas/``.

    Args:
        knowledge: the loaded pack; its service ids are the values of ``{id}``.

    Returns:
        An OpenAPI 3.1.0 document (a fresh dict each call).
    """
    ids = sorted({s.id for s in knowledge.services})
    id_parameter = {
        "name": "id", "in": "path", "required": True,
        "description": "The CDS service id, as listed by discovery.",
        "schema": {"type": "string", "enum": ids} if ids else {"type": "string"},
    }
    body_types = (JSON, FHIR_JSON)
    served = sorted({s.hook for s in knowledge.services})
    # The service answers 400 to any other hook: say so, so that generated requests can succeed.
    request_schema = {"allOf": [_ref("CdsServiceRequest"),
                                {"properties": {"hook": {"enum": served}}}]} if served \
        else _ref("CdsServiceRequest")
    request_examples = {s.id: {"summary": f"{s.hook} call of {s.id}",
                               "value": example_request(s)} for s in knowledge.services}
    bearer: list[dict[str, list[str]]] = [{"cdsClientJwt": []}]
    open_: dict[str, list[dict[str, list[str]]]] = {"security": []}
    hooks = ", ".join(f"`{s.id}` ({s.hook})" for s in knowledge.services)
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": "lbp-cds",
            "version": _version(),
            "summary": "CDS Hooks 2.0 service for low back pain radiating to the leg.",
            "description": (
                "CDS Hooks 2.0.1 endpoints (discovery, service calls, feedback), authenticated "
                "with the CDS client's JWT (`Authorization: Bearer`, ES384/RS384, `aud` = the "
                "URL of the endpoint called) unless the service runs in development mode.\n\n"
                "The operational endpoints (`/healthz`, `/readyz`, `/metrics`, `/openapi.json`, "
                "`/questionnaires/lbp-intake`) need no token and hold no patient data; they are "
                "for the cluster and integrators and should not be exposed publicly (`/metrics` "
                "is internal).\n\nServices: " + (hooks or "none") + "."),
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [
            {"name": "CDS Hooks", "description": "The CDS Hooks 2.0 API."},
            {"name": "Operations", "description": "Health, readiness, metrics, documents."},
        ],
        "security": bearer,
        "paths": {
            "/cds-services": {"get": {
                "tags": ["CDS Hooks"],
                "operationId": "discovery",
                "summary": "CDS Hooks discovery: the services offered",
                "responses": {
                    "200": {"description": "The services.",
                            "content": {JSON: {"schema": _ref("DiscoveryResponse")}}},
                    **_errors("401"),
                },
            }},
            "/cds-services/{id}": {"post": {
                "tags": ["CDS Hooks"],
                "operationId": "callService",
                "summary": "Call a CDS service (a hook fired)",
                "description": "The body's `hook` must be the hook the service serves. Prefetch "
                               "keys missing or holding an OperationOutcome are fetched from "
                               "`fhirServer` with `fhirAuthorization`.",
                "parameters": [id_parameter],
                "requestBody": {"required": True, "content": {
                    t: {"schema": request_schema, "examples": request_examples}
                    for t in body_types}},
                "responses": {
                    "200": {"description": "Cards (`{\"cards\": []}` when there is no advice).",
                            "content": {JSON: {"schema": _ref("CdsServiceResponse")}}},
                    **_errors("400", "401", "404", "412", "413", "415", "500"),
                },
            }},
            "/cds-services/{id}/feedback": {"post": {
                "tags": ["CDS Hooks"],
                "operationId": "feedback",
                "summary": "Feedback on cards this service issued",
                "parameters": [id_parameter],
                "requestBody": {"required": True, "content": {
                    t: {"schema": _ref("FeedbackRequest")} for t in body_types}},
                "responses": {
                    "200": {"description": "Stored (idempotently).",
                            "content": {JSON: {"schema": _ref("FeedbackReceipt")}}},
                    **_errors("400", "401", "404", "413", "415", "422", "500", "503"),
                },
            }},
            "/healthz": {"get": {
                "tags": ["Operations"], "operationId": "healthz", **open_,
                "summary": "Liveness",
                "responses": {"200": {"description": "The process answers.",
                                      "content": {JSON: {"schema": _ref("Health")}}}},
            }},
            "/readyz": {"get": {
                "tags": ["Operations"], "operationId": "readyz", **open_,
                "summary": "Readiness: knowledge loaded and the store reachable",
                "responses": {
                    "200": {"description": "Ready.",
                            "content": {JSON: {"schema": _ref("Readiness")}}},
                    "503": {"description": "Not ready (the failing check is false).",
                            "content": {JSON: {"schema": _ref("Readiness")}}},
                },
            }},
            "/metrics": {"get": {
                "tags": ["Operations"], "operationId": "metrics", **open_,
                "summary": "Prometheus metrics (internal: do not expose publicly)",
                "responses": {"200": {"description": "Prometheus text exposition format.",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}}},
            }},
            "/openapi.json": {"get": {
                "tags": ["Operations"], "operationId": "openapi", **open_,
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.1.",
                                      "content": {JSON: {"schema": {"type": "object"}}}}},
            }},
            "/questionnaires/lbp-intake": {"get": {
                "tags": ["Operations"], "operationId": "intakeQuestionnaire", **open_,
                "summary": "The red-flag intake Questionnaire",
                "description": "FHIR JSON; HTML when the client prefers `text/html`.",
                "responses": {"200": {"description": "The Questionnaire.", "content": {
                    FHIR_JSON: {"schema": _ref("Questionnaire")},
                    "text/html": {"schema": {"type": "string"}}}}},
            }},
        },
        "components": {
            "schemas": json.loads(json.dumps(_components())),
            "securitySchemes": {"cdsClientJwt": {
                "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                "description": "A JWT signed by the CDS client (CDS Hooks 2.0 'Trusting CDS "
                               "Clients'): `iss` trusted, `aud` the endpoint URL, short `exp`, "
                               "unique `jti`, asymmetric `alg`.",
            }},
        },
    }
    return document
