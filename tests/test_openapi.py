"""The OpenAPI 3.1 document (``/openapi.json``): valid, complete, and honest about the server.

* Valid: against ``openapi-spec-validator`` when installed, else against the official OpenAPI 3.1
  meta-schema (the copy schemathesis ships), plus structural checks: every ``$ref`` resolves,
  every component is a valid JSON Schema 2020-12, every endpoint and status code is there.
* Honest: schemathesis (v4 CLI, a bounded number of examples per operation) runs against a real
  ``lbp-cds serve --dev`` over the mini pack, checking ``not_a_server_error``,
  ``status_code_conformance``, ``content_type_conformance`` and
  ``response_schema_conformance``; then once more with authentication on (every CDS call 401).
  Loopback only: the server's proxy settings point at a closed local port, so a generated
  ``fhirServer`` URL is never fetched from the network.

``LBP_CDS_SCHEMATHESIS_EXAMPLES`` (default 50) and ``LBP_CDS_SCHEMATHESIS_SEED`` tune the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from flask.testing import FlaskClient

from lbp_cds import hooks, knowledge
from lbp_cds.openapi import SCHEMA_DIR, example_request, openapi_document
from tests.conftest import MINI
from tests.service_server import (
    CdsClientKeys,
    ServerFactory,
    ServiceServer,
    free_port,
    server_environment,
)

EXAMPLES = int(os.environ.get("LBP_CDS_SCHEMATHESIS_EXAMPLES", "50"))
SEED = int(os.environ.get("LBP_CDS_SCHEMATHESIS_SEED", "20261122"))
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance")
FHIR_JSON = "application/fhir+json"
EXPECTED = {
    ("/cds-services", "get"): {"200", "401"},
    ("/cds-services/{id}", "post"): {"200", "400", "401", "404", "412", "413", "415", "500"},
    ("/cds-services/{id}/feedback", "post"): {"200", "400", "401", "404", "413", "415", "422",
                                               "500", "503"},
    ("/healthz", "get"): {"200"},
    ("/readyz", "get"): {"200", "503"},
    ("/metrics", "get"): {"200"},
    ("/openapi.json", "get"): {"200"},
    ("/questionnaires/lbp-intake", "get"): {"200"},
}


@pytest.fixture(scope="module")
def pack() -> knowledge.Knowledge:
    return knowledge.load(MINI)


@pytest.fixture(scope="module")
def document(pack: knowledge.Knowledge) -> dict[str, Any]:
    return openapi_document(pack)


# --------------------------------------------------------------------------- validity


def test_document_is_valid_openapi_31(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    try:
        from openapi_spec_validator import validate  # type: ignore[import-not-found]
    except ImportError:
        from schemathesis.specs.openapi.definitions import OPENAPI_31

        assert OPENAPI_31["$id"].startswith("https://spec.openapis.org/oas/3.1/schema/")
        errors = sorted(jsonschema.Draft202012Validator(OPENAPI_31).iter_errors(document),
                        key=lambda e: list(e.absolute_path))
        assert [f"{list(e.absolute_path)}: {e.message[:200]}" for e in errors] == []
    else:  # pragma: no cover - not installed in our venv
        validate(document)


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def object_keys(node: Any) -> set[str]:
    """Every object key in ``node``, recursively."""
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in object_keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in object_keys(v)}
    return set()


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_every_reference_resolves_and_every_schema_is_valid(document: dict[str, Any]) -> None:
    all_refs = refs(document)
    assert all_refs and not [r for r in all_refs if "$defs" in r]
    for ref in set(all_refs):
        resolve(document, ref)
    for name, schema in document["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert "x-messages" not in object_keys(schema), name


def test_every_endpoint_and_status_is_described(document: dict[str, Any],
                                                pack: knowledge.Knowledge) -> None:
    found = {(path, method): set(op["responses"])
             for path, item in document["paths"].items() for method, op in item.items()}
    assert found == EXPECTED
    operation_ids = [op["operationId"] for item in document["paths"].values()
                     for op in item.values()]
    assert len(operation_ids) == len(set(operation_ids))
    ids = sorted({s.id for s in pack.services})
    for path in ("/cds-services/{id}", "/cds-services/{id}/feedback"):
        (param,) = document["paths"][path]["post"]["parameters"]
        assert param["in"] == "path" and param["schema"]["enum"] == ids
    # Bearer JWT on the CDS endpoints; none on the operational ones.
    assert document["components"]["securitySchemes"]["cdsClientJwt"]["scheme"] == "bearer"
    assert document["security"] == [{"cdsClientJwt": []}]
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json",
                 "/questionnaires/lbp-intake"):
        assert document["paths"][path]["get"]["security"] == []
    for path in ("/cds-services", "/cds-services/{id}", "/cds-services/{id}/feedback"):
        for op in document["paths"][path].values():
            assert "security" not in op  # the document-wide bearer requirement applies
            for code, response in op["responses"].items():
                if code.startswith(("4", "5")):
                    assert response["content"] == {FHIR_JSON: {
                        "schema": {"$ref": "#/components/schemas/OperationOutcome"}}}


def test_schemas_are_the_ones_the_service_validates_with(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for filename, name, prefix in (("request.schema.json", "CdsServiceRequest", "Request"),
                                   ("response.schema.json", "CdsServiceResponse", "Response"),
                                   ("feedback.schema.json", "FeedbackRequest", "Feedback"),
                                   ("services.schema.json", "DiscoveryResponse", "Discovery")):
        source = json.loads((SCHEMA_DIR / filename).read_text())
        assert schemas[name]["required"] == source["required"]
        assert set(schemas[name]["properties"]) == set(source["properties"])
        assert {f"{prefix}_{d}" for d in source["$defs"]} <= set(schemas)
    body = document["paths"]["/cds-services/{id}"]["post"]["requestBody"]
    assert set(body["content"]) == {"application/json", FHIR_JSON}
    response = document["paths"]["/cds-services/{id}"]["post"]["responses"]["200"]
    assert response["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CdsServiceResponse"}


def test_document_validates_what_the_service_validates(document: dict[str, Any]) -> None:
    """The request schema of the document accepts a valid request and refuses the invalid ones
    the service refuses, with the same verdicts as ``hooks.request_issues``."""
    components = document["components"]
    wrapper = {"$ref": "#/components/schemas/CdsServiceRequest", "components": components}
    validator = jsonschema.Draft202012Validator(
        wrapper, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    good = example_request(knowledge.load(MINI).services[0])
    bad = [good | {"hookInstance": 12}, {k: v for k, v in good.items() if k != "context"},
           good | {"context": good["context"] | {"patientId": "Patient/1"}},
           good | {"fhirAuthorization": {"access_token": "t", "token_type": "Bearer",
                                         "expires_in": 30, "scope": "s", "subject": "c"}}]
    assert validator.is_valid(good) and hooks.request_issues(good) == []
    for doc in bad:
        assert not validator.is_valid(doc) and hooks.request_issues(doc), doc


def test_served_document_and_examples(client: FlaskClient, pack: knowledge.Knowledge) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    served = response.get_json()
    assert served == json.loads(json.dumps(openapi_document(pack)))
    examples = served["paths"]["/cds-services/{id}"]["post"]["requestBody"]["content"][
        "application/json"]["examples"]
    assert set(examples) == {s.id for s in pack.services}
    for service_id, example in examples.items():
        answer = client.post(f"/cds-services/{service_id}", json=example["value"])
        assert answer.status_code == 200, answer.get_json()
        assert hooks.response_issues(answer.get_json()) == []


# --------------------------------------------------------------------------- schemathesis


def schemathesis_command() -> list[str]:
    st = Path(sys.executable).with_name("st")
    return [str(st)] if st.exists() else [sys.executable, "-m", "schemathesis.cli"]


def run_schemathesis(server: ServiceServer, workdir: Path, *extra: str,
                     timeout: float = 300) -> tuple[subprocess.CompletedProcess[str],
                                                    Counter[tuple[str, str, int]]]:
    """``st run`` against ``server``; returns the run and (operation, phase, status) counts
    from its NDJSON report."""
    workdir.mkdir(parents=True, exist_ok=True)
    report = workdir / "report.ndjson"
    cmd = [*schemathesis_command(), "run", server.url("/openapi.json"),
           "--checks", CHECKS, "--seed", str(SEED), "--workers", "4",
           "--request-timeout", "20", "--report", "ndjson", "--report-ndjson-path", str(report),
           "--no-color", *extra]
    env = server_environment({"NO_PROXY": "*", "SCHEMATHESIS_HOOKS": ""})
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir,
                            timeout=timeout, start_new_session=True)
    return result, statuses(report)


def statuses(report: Path) -> Counter[tuple[str, str, int]]:
    """(operation label, phase, status) of every documented-method call in the report."""
    seen: Counter[tuple[str, str, int]] = Counter()
    if not report.exists():
        return seen
    for line in report.read_text().splitlines():
        scenario = json.loads(line).get("ScenarioFinished")
        if not scenario:
            continue
        recorder = scenario["recorder"]
        interactions = recorder.get("interactions", {})
        for case_id, case in recorder.get("cases", {}).items():
            response = (interactions.get(case_id) or {}).get("response") or {}
            method = case["value"]["method"]
            if response and recorder["label"].startswith(method + " "):
                seen[(recorder["label"], scenario["phase"], response["status_code"])] += 1
    return seen


def failure_report(result: subprocess.CompletedProcess[str], server: ServiceServer) -> str:
    return (f"st exited {result.returncode}\n{result.stdout[-12000:]}\n{result.stderr[-3000:]}"
            f"\n--- server log ---\n{server.log_text()[-4000:]}")


def server_errors(server: ServiceServer) -> list[str]:
    return [line for line in server.log_text().splitlines()
            if '"level": "error"' in line or '"status": 5' in line or "Traceback" in line]


@pytest.mark.slow
def test_schemathesis_against_the_dev_server(service_server: ServerFactory,
                                             tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: no fetch leaves loopback
    server = service_server(env={"HTTP_PROXY": closed, "HTTPS_PROXY": closed,
                                 "LBP_CDS_FHIR_DEADLINE_SECONDS": "1"},
                            args=["--dev", "--workers", "2"])
    result, seen = run_schemathesis(server, tmp_path / "dev", "--max-examples", str(EXAMPLES),
                                    "--phases", "examples,coverage,fuzzing", "--mode", "all")
    assert result.returncode == 0, failure_report(result, server)
    assert server_errors(server) == []
    by_operation: dict[str, set[int]] = {}
    for (label, _phase, status), _n in seen.items():
        by_operation.setdefault(label, set()).add(status)
    # The run reached every operation, and the service calls both succeeded and failed.
    # (schemathesis leaves out the operation serving the schema itself)
    assert set(by_operation) == {f"{m.upper()} {p}" for p, m in EXPECTED
                                 if p != "/openapi.json"}, by_operation
    assert {200, 400, 404, 415} <= by_operation["POST /cds-services/{id}"], by_operation
    assert {400, 404, 415, 422} <= by_operation["POST /cds-services/{id}/feedback"]
    assert not [s for statuses_ in by_operation.values() for s in statuses_ if s >= 500]


@pytest.mark.slow
def test_schemathesis_against_an_authenticating_server(service_server: ServerFactory,
                                                       tmp_path: Path) -> None:
    """Without a token every CDS call is a documented 401; the operational ones stay 200."""
    keys = CdsClientKeys(tmp_path / "keys")
    server = service_server(env={"LBP_CDS_PUBLIC_BASE_URL": "{base_url}"},
                            args=["--clients", str(keys.clients_file)])
    result, seen = run_schemathesis(server, tmp_path / "auth", "--max-examples", "5",
                                    "--phases", "examples,fuzzing", "--mode", "positive")
    assert result.returncode == 0, failure_report(result, server)
    for (label, _phase, status), _n in seen.items():
        if label.startswith(("GET /cds-services", "POST /cds-services")):
            assert status in (401, 404), (label, status)  # 404: unknown id, checked first
        else:
            assert status == 200, (label, status)
    assert server_errors(server) == []
