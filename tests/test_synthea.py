"""Real-shaped records no one here wrote: the 11 Synthea patients of ``shared/data/synthea-r4``.

None of them has back pain, so the service must stay quiet: no card at patient-view, and no card
at order-select for a lumbar MRI drafted without a reason (no back-pain context anywhere). Each
call goes through the real WSGI server with the full prefetch resolved from the FHIR server, and
again with the service fetching the record itself; the latencies are printed as a table
(``pytest -s``) and kept in ``.cache/synthea-latency.json``.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import requests

from lbp_cds.hooks import HookRequest, response_issues
from lbp_cds.probe import build_request, hook_context, resolve_prefetch
from tests import test_integration_fhir as integration
from tests.fhir_server import FhirServer, bundle_patient_id, prepare_transaction
from tests.test_integration_fhir import CACHE, Outcome, ServiceProcess, discover, post_hook

#: The session's service process, shared with the integration suite.
cds_service = integration.cds_service

pytestmark = [pytest.mark.shared, pytest.mark.fhir_server, pytest.mark.slow]

SYNTHEA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthea-r4"
BUNDLES = sorted(SYNTHEA_DIR.glob("*.json")) if SYNTHEA_DIR.is_dir() else []
RESULTS: dict[str, dict[str, Any]] = {}


def lumbar_mri_draft(patient_id: str) -> dict[str, Any]:
    """A draft MRI of the lumbar spine without contrast, with no reason given."""
    return {
        "resourceType": "ServiceRequest",
        "id": f"synthea-mri-{uuid.uuid4().hex[:8]}",
        "status": "draft",
        "intent": "order",
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "363679005",
                                  "display": "Imaging"}]}],
        "code": {"coding": [
            {"system": "http://loinc.org", "code": "30679-5",
             "display": "MR Lumbar spine WO contrast"},
            {"system": "http://www.ama-assn.org/go/cpt", "code": "72148",
             "display": "MRI lumbar spine without contrast"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "authoredOn": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "requester": {"reference": "Practitioner/probe"},
    }


@pytest.fixture(scope="module")
def synthea_patients(fhir_server: FhirServer) -> dict[str, tuple[str, int]]:
    """Load every Synthea bundle (ids kept, idempotent) into the session FHIR server.

    Returns:
        For each file name: the patient id and the number of resources.
    """
    assert len(BUNDLES) == 11, f"expected 11 Synthea bundles in {SYNTHEA_DIR}, found {len(BUNDLES)}"
    out = {}
    for path in BUNDLES:
        bundle = json.loads(path.read_text())
        fhir_server.transaction(prepare_transaction(bundle))
        out[path.name] = (bundle_patient_id(bundle), len(bundle["entry"]))
    return out


@pytest.fixture(scope="module", autouse=True)
def latency_table() -> Iterator[None]:
    """Print and keep the latencies once every patient has been called."""
    yield
    if not RESULTS:
        return
    columns = ["pv_prefetch_ms", "pv_fetch_ms", "os_prefetch_ms", "os_fetch_ms"]
    lines = ["", f"{'patient':<34}{'res':>5}{'resolve':>9}"
             + "".join(f"{c[:-3]:>13}" for c in columns) + "  cards"]
    for name, row in sorted(RESULTS.items()):
        lines.append(f"{name[:33]:<34}{row['resources']:>5}{row['resolve_ms']:>9.0f}"
                     + "".join(f"{row[c]:>13.0f}" for c in columns)
                     + f"  {row['pv_cards'] or '-'} / {row['os_cards'] or '-'}")
    calls = [row[c] for row in RESULTS.values() for c in columns]
    summary = {"calls": len(calls), "median_ms": round(statistics.median(calls), 1),
               "max_ms": round(max(calls), 1),
               "by_kind": {c: {"median_ms": round(statistics.median(
                   [r[c] for r in RESULTS.values()]), 1),
                   "max_ms": round(max(r[c] for r in RESULTS.values()), 1)} for c in columns}}
    lines.append(f"hook calls: {summary['calls']}, median {summary['median_ms']} ms, "
                 f"max {summary['max_ms']} ms (client side, gunicorn 1 worker x 4 threads)")
    print("\n".join(lines))
    CACHE.mkdir(exist_ok=True)
    (CACHE / "synthea-latency.json").write_text(json.dumps(
        {"summary": summary, "patients": RESULTS}, indent=2))


@pytest.mark.parametrize("file_name", [p.name for p in BUNDLES])
def test_synthea_patient_gets_no_card(file_name: str, synthea_patients: dict[str, tuple[str, int]],
                                      fhir_server: FhirServer, cds_service: ServiceProcess
                                      ) -> None:
    """patient-view and order-select (lumbar MRI, no reason) answer 200 with no card."""
    patient_id, count = synthea_patients[file_name]
    services = discover(cds_service)
    row: dict[str, Any] = {"patient": patient_id, "resources": count}
    answers: dict[str, Outcome] = {}
    with requests.Session() as http:
        for hook, short in (("patient-view", "pv"), ("order-select", "os")):
            entry = services[hook]
            drafts = [lumbar_mri_draft(patient_id)] if hook == "order-select" else []
            context = hook_context(hook, patient_id, drafts)
            started = time.perf_counter()
            prefetch = resolve_prefetch(
                entry.get("prefetch") or {},
                HookRequest(hook=hook, hook_instance=str(uuid.uuid4()), context=context,
                            prefetch={}),
                fhir_server.base_url, fhir_server.token, http)
            if hook == "patient-view":
                row["resolve_ms"] = (time.perf_counter() - started) * 1000
            assert not prefetch.omitted, f"{file_name}: prefetch failed: {prefetch.omitted}"
            answers[f"{short}_prefetch"] = post_hook(
                cds_service, entry["id"], build_request(hook, context, prefetch=prefetch.values),
                http)
            answers[f"{short}_fetch"] = post_hook(
                cds_service, entry["id"],
                build_request(hook, context, fhir_server=fhir_server.base_url,
                              token=fhir_server.token), http)
    for kind, got in answers.items():
        row[f"{kind}_ms"] = got.seconds * 1000
    row["pv_cards"] = [r for r, _ in answers["pv_prefetch"].cards]
    row["os_cards"] = [r for r, _ in answers["os_prefetch"].cards]
    RESULTS[file_name] = row
    for kind, got in answers.items():
        assert got.status == 200, f"{file_name} {kind}: {got.describe()}"
        assert response_issues(got.body) == [], f"{file_name} {kind}: {response_issues(got.body)}"
    assert answers["pv_prefetch"].cards == answers["pv_fetch"].cards
    assert answers["os_prefetch"].cards == answers["os_fetch"].cards
    assert answers["pv_prefetch"].cards == (), (
        f"{file_name}: patient-view fired for a patient without back pain: "
        f"{answers['pv_prefetch'].describe()}")
    assert answers["os_prefetch"].cards == (), (
        f"{file_name}: a lumbar MRI without back-pain context drew cards: "
        f"{answers['os_prefetch'].describe()}")
