"""Every scenario against a second, independent FHIR implementation: Medplum's FHIR router.

The sekmet suite (``tests/test_integration_fhir.py``) checks the service against one FHIR
server; a second implementation catches what the service (or the tests) assume of that one.
Here the EHR's FHIR store is ``@medplum/fhir-router`` 5.2.13 over its in-memory repository
(``tests/medplum_server/server.mjs``, started by ``tests/medplum_server.py``). Every scenario of
``fixtures/scenarios`` is dated to today, loaded with the same PUT transaction, and called through
the same gunicorn process in the same two ways:

(a) **prefetch**: the EHR resolves the service's discovery templates against Medplum and sends
    the results, no ``fhirServer``;
(b) **fetch**: no prefetch; ``fhirServer`` and the bearer token, the service fetches everything.

Both must give the scenario's expected status and cards, and the same answer.

How this server differs from sekmet 0.1.1 (checked against the running server; none of it changes
a scenario's cards, and none needed a change to the server or the service):

* **No paging.** A search with no ``_count`` returns every match in one Bundle; ``_count=N``
  returns the first N with ``total`` counting all matches and *no* ``next`` link (sekmet: 20 a
  page by default, ``next`` links). A client relying on ``next`` links would silently lose the
  rest; the service asks ``_count=500`` (``fhir_page_size``), far above any scenario's record.
  Sekmet's paging test has no counterpart here for that reason.
* **No ``link`` and no ``fullUrl``** in searchset Bundles (sekmet: ``self``/``next`` links and
  an absolute ``fullUrl`` on every entry). The service and the prefetch resolver need neither.
* **An unknown search parameter matches nothing** (200, empty Bundle); sekmet ignores it with a
  warning entry. ``_count=abc`` gives an empty Bundle, not 400. An unknown resource type is a
  200 empty searchset, not 404. The templates use only ``patient`` (and the service adds
  ``_count``), which Medplum understands.
* **No validation**: a transaction stores resources with unknown elements or invalid codes as
  given (sekmet validates against the R4B models and refuses). So a scenario file with a
  malformed resource would pass here and fail on sekmet, never the other way.
* **Transactions** run as transactions only with the router's ``config.transactions`` (the
  server sets it: a failing entry then fails the request instead of a 200 batch-response with an
  error entry), but the in-memory repository does not roll back earlier entries.
* **No ``/metadata``** route in the router (it would search a resource type "metadata"); the
  server script answers it with a minimal CapabilityStatement as a readiness probe.
* **No scopes**: one static bearer token reads everything (sekmet also issues SMART tokens whose
  scopes deny resource types). See the unavailable keys below.
* ``meta.versionId`` is a UUID (sekmet: 1, 2, ...); ``patient=id``, ``patient=Patient/id`` and
  ``subject=Patient/id`` all match relative references, as on sekmet.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import pytest
import requests

from lbp_cds.fixtures import Scenario, load_scenarios, post_transaction, rebase, transaction_bundle
from lbp_cds.hooks import response_issues
from tests.medplum_server import MedplumServer
from tests.test_integration_fhir import (  # noqa: F401 - cds_service: the session's service process
    Outcome,
    cds_service,
    discover,
    fetch_request,
    post_hook,
    prefetch_request,
)

pytestmark = [pytest.mark.fhir_server, pytest.mark.slow]

SCENARIOS = load_scenarios()
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def services(cds_service) -> dict[str, dict[str, Any]]:  # noqa: F811
    """Discovery entries by hook."""
    return discover(cds_service)


def test_there_are_scenarios() -> None:
    """The scenario folder exists and every file reads (load_scenarios raised otherwise)."""
    assert SCENARIOS, "no scenario files in fixtures/scenarios"


def test_server_is_medplum_and_refuses_without_token(medplum_server: MedplumServer) -> None:
    """It is the pinned router answering, and it wants the bearer token as an EHR's would."""
    meta = requests.get(f"{medplum_server.base_url}/metadata", timeout=30).json()
    assert meta["software"]["version"] == "5.2.13", meta
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        refused = requests.get(f"{medplum_server.base_url}/Patient", headers=headers, timeout=30)
        assert refused.status_code == 401, refused.text
        assert refused.json()["resourceType"] == "OperationOutcome"


def load_dated(server: MedplumServer, sc: Scenario) -> Scenario:
    """Load a scenario's record dated to today; return the dated scenario (drafts too)."""
    dated = rebase(sc, datetime.now(timezone.utc))
    post_transaction(server.base_url, server.token, transaction_bundle(dated))
    return dated


def stored_as_sent(server: MedplumServer, sc: Scenario) -> None:
    """Each resource reads back as loaded (Medplum adds only ``meta``)."""
    for res in sc.record():
        got = server.read_json(f"{res['resourceType']}/{res['id']}")
        got.pop("meta", None)
        assert got == {k: v for k, v in res.items() if k != "meta"}, (
            f"{sc.id}: {res['resourceType']}/{res['id']} changed on the way in")


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_scenario_on_medplum(scenario: Scenario, medplum_server: MedplumServer,
                             cds_service, services: Mapping[str, dict[str, Any]],  # noqa: F811
                             ) -> None:
    """Prefetched from Medplum or fetched from it by the service: the scenario's cards."""
    started = time.perf_counter()
    entry = services[scenario.hook]
    sc = load_dated(medplum_server, scenario)
    stored_as_sent(medplum_server, sc)
    with requests.Session() as http:
        a = post_hook(cds_service, entry["id"],
                      prefetch_request(sc, entry, medplum_server, leave_out=sc.unavailable), http)
        b: Outcome | None = None
        if not sc.unavailable:
            b = post_hook(cds_service, entry["id"],
                          fetch_request(sc, medplum_server, medplum_server.token), http)
        # else: prefetch only. An unavailable key is one the service can neither be sent nor
        # fetch. The sekmet suite reproduces that in mode (b) with a SMART token whose scopes deny
        # the key's resource type; this server has one token that reads everything, so a fetch
        # would find the data the scenario says cannot be had. Mode (a) leaves the keys out of
        # the prefetch and sends no fhirServer, which is the scenario exactly (412 included).
    TIMINGS[sc.id] = round(time.perf_counter() - started, 3)
    expected = (sc.expected_status, sorted(sc.expected_cards))
    notes = f"\n  notes: {sc.expect.get('notes')}" if sc.expect.get("notes") else ""
    assert (a.status, sorted(a.cards)) == expected, (
        f"{sc.id} ({sc.title}) prefetched from Medplum: expected {expected}, got "
        f"{a.describe()}{notes}")
    if a.status == 200:
        assert response_issues(a.body) == [], f"{sc.id}: invalid response {a.body}"
    if b is not None:
        assert (b.status, sorted(b.cards)) == expected, (
            f"{sc.id} ({sc.title}) fetched from Medplum by the service: expected {expected}, "
            f"got {b.describe()}{notes}")
        assert (a.status, a.cards, a.locations) == (b.status, b.cards, b.locations), (
            f"{sc.id}: prefetch and fetch disagree\n  prefetch: {a.describe()}\n"
            f"  fetch:    {b.describe()}")
