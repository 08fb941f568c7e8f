"""The scenario suite against a FHIR sandbox of your choice (HAPI's public R4 server, the SMART
sandbox, a hospital's test EHR). Collected only when ``LBP_CDS_SANDBOX_FHIR_URL`` names its base
URL (CI has no internet, so it never runs there):

    LBP_CDS_SANDBOX_FHIR_URL=https://hapi.fhir.org/baseR4 \\
    [LBP_CDS_SANDBOX_TOKEN=...] [LBP_CDS_SANDBOX_SCENARIOS=ces-saddle-numbness-urinary-retention,...] \\
    make test PYTEST_ARGS="tests/test_sandbox.py"

Each scenario is dated to today and written to the sandbox (PUT by id: idempotent, but it does
write to the sandbox), then called twice through the service under gunicorn, exactly as the
sekmet suite does: with prefetch resolved from the discovery templates against the sandbox, and
with no prefetch so the service fetches with the token. Both must give the expected cards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone

import pytest
import requests

from lbp_cds.fixtures import load_scenarios, post_transaction, rebase, transaction_bundle
from tests.test_integration_fhir import (  # noqa: F401 - the session's service process
    cds_service,
    discover,
    fetch_request,
    post_hook,
    prefetch_request,
)

BASE = os.environ.get("LBP_CDS_SANDBOX_FHIR_URL", "").rstrip("/")
if not BASE:
    # Named on the command line without its URL (the suite's conftest leaves the file out of a
    # plain run): one error that says what is missing, not one per scenario.
    pytest.fail("tests/test_sandbox.py runs against a FHIR sandbox of your choice: set "
                "LBP_CDS_SANDBOX_FHIR_URL to its base URL (and LBP_CDS_SANDBOX_TOKEN if it "
                "needs one), e.g. LBP_CDS_SANDBOX_FHIR_URL=https://hapi.fhir.org/baseR4 "
                'make test PYTEST_ARGS="tests/test_sandbox.py"', pytrace=False)
TOKEN = os.environ.get("LBP_CDS_SANDBOX_TOKEN") or None
ONLY = [s for s in os.environ.get("LBP_CDS_SANDBOX_SCENARIOS", "").split(",") if s]
SCENARIOS = [s for s in load_scenarios(ONLY or None) if not s.unavailable
             and s.expected_status == 200]


@dataclass(frozen=True)
class Sandbox:
    """What the integration helpers need of a FHIR server: its base and a token."""

    base_url: str
    token: str | None


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    meta = requests.get(f"{BASE}/metadata", headers={"Accept": "application/fhir+json"},
                        timeout=30)
    assert meta.status_code == 200, f"{BASE}/metadata answered {meta.status_code}"
    return Sandbox(BASE, TOKEN)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_scenario_on_the_sandbox(sandbox, cds_service, scenario):  # noqa: F811
    dated = rebase(scenario, datetime.now(timezone.utc))
    post_transaction(sandbox.base_url, sandbox.token, transaction_bundle(dated))
    entry = discover(cds_service)[dated.hook]
    with_prefetch = post_hook(cds_service, entry["id"], prefetch_request(dated, entry, sandbox))
    fetched = post_hook(cds_service, entry["id"], fetch_request(dated, sandbox, sandbox.token))
    assert with_prefetch.status == fetched.status == 200
    assert sorted(with_prefetch.cards) == sorted(fetched.cards) == sorted(dated.expected_cards)
