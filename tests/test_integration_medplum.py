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

Both must give the scenario's expected status and cards, and the same answer. Each scenario
runs on a store holding only its record and one other patient's (see ``load_dated``). Then the
FHIR server behaviours of the sekmet suite this server can show (a refused token, an unknown
patient), and one it shows and sekmet does not (a truncated search, below).

How this server differs from sekmet 0.1.1 (checked against the running server). None of it
changes a scenario's answer: every scenario's whole response, both modes, was compared once with
sekmet's and was identical but for generated ids and timestamps. One difference exposes a gap in
the service (the first):

* **No paging.** A search with no ``_count`` returns every match in one Bundle; ``_count=N``
  returns the first N, ``total`` counting all matches, and *no* ``next`` link (sekmet: 20 a page
  by default, ``next`` links). The service asks ``_count=500`` (``fhir_page_size``) when it
  fetches; past 500 resources of a type it sees ``total`` above what came and no link, and asks
  once more with ``_count`` = total (else the rest would be unknown, never absent):
  ``test_truncated_search_is_not_taken_as_the_whole_record`` (this found the gap).
  Sekmet's next-link test has no counterpart here.
* **No ``link`` and no ``fullUrl``** in searchset Bundles (sekmet: ``self``/``next`` links and an
  absolute ``fullUrl`` on every entry). The service and the prefetch resolver need neither.
* **Slow searches.** Each search scans every stored resource of the type and evaluates the search
  parameter's FHIRPath on it; ``patient`` is a union over ~50 resource types, about 1 ms a
  resource. With all 91 scenarios loaded (~1000 Observations) one ``Observation?patient=`` took
  1.2 s and the module 115 s, close to the service's 4 s fetch deadline. Hence the store is
  emptied (``POST /admin/reset``, the script's own route) before each scenario.
  ``subject=Patient/x`` is fast (10 ms) but the templates say ``patient``.
* **At most 50 updates per transaction** (400 "Transaction contains more update operations than
  allowed"); the largest scenario stores 28 resources. Sekmet has no such limit.
* **An unknown search parameter matches nothing** (200, empty Bundle); sekmet ignores it with a
  warning entry. ``_count=abc`` gives an empty Bundle, not 400. An unknown resource type is a 200
  empty searchset, not 404. The templates use only ``patient`` (and the service adds
  ``_count``), which Medplum understands. ``subject=<bare id>`` matches nothing.
* **No validation**: a transaction stores resources with unknown elements or invalid codes as
  given (sekmet validates against the R4B models and refuses). A malformed scenario resource
  would pass here and fail on sekmet, never the other way. Resources read back as sent, plus
  ``meta`` (checked for every scenario).
* **Transactions** run as transactions only with the router's ``config.transactions`` (the script
  sets it: a failing entry then fails the request instead of a 200 batch-response with an error
  entry); the in-memory repository does not roll back the entries before it.
* **No ``/metadata``** route in the router (it would search a resource type "metadata"); the
  script answers it with a minimal CapabilityStatement.
* **No scopes**: one static bearer token reads everything (sekmet also issues SMART tokens whose
  scopes deny resource types). See the unavailable keys in ``test_scenario_on_medplum``.
* ``meta.versionId`` is a UUID (sekmet: 1, 2, ...). ``patient=id`` and ``patient=Patient/id``
  both match relative references, as on sekmet.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import pytest
import requests

from lbp_cds import knowledge
from lbp_cds.fhir_data import template_type
from lbp_cds.fixtures import Scenario, load_scenarios, post_transaction, rebase, transaction_bundle
from lbp_cds.hooks import response_issues
from tests.medplum_server import MedplumServer
from tests.test_integration_fhir import (  # noqa: F401 - cds_service: the session's service process
    Outcome,
    cds_service,
    clone,
    discover,
    empty_bundle,
    fetch_request,
    height_fillers,
    key_types,
    plain_scenarios,
    post_hook,
    prefetch_request,
    required_keys,
)

pytestmark = [pytest.mark.fhir_server, pytest.mark.slow]

SCENARIOS = load_scenarios()


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


def neighbour(sc: Scenario) -> Scenario:
    """Another patient's scenario to share the store with ``sc`` (the next one in id order)."""
    at = SCENARIOS.index(sc)
    others = SCENARIOS[at + 1:] + SCENARIOS[:at]
    return next(o for o in others if o.patient_id != sc.patient_id)


def load_dated(server: MedplumServer, sc: Scenario) -> Scenario:
    """Empty the store, load another patient's record and this one's, dated to today.

    The store is emptied first because the in-memory repository scans every stored resource and
    evaluates ``patient``'s FHIRPath on each (about 1 ms each): with all scenarios loaded, one
    search takes more than a second. The other patient's record stays so that a search that does
    not filter by patient would show (see :func:`prefetch_holds_the_record`).

    Returns:
        The dated scenario (drafts too).
    """
    now = datetime.now(timezone.utc)
    server.reset()
    dated = rebase(sc, now)
    post_transaction(server.base_url, server.token, transaction_bundle(rebase(neighbour(sc), now)))
    post_transaction(server.base_url, server.token, transaction_bundle(dated))
    return dated


def stored_as_sent(server: MedplumServer, sc: Scenario) -> None:
    """Each resource reads back as loaded (Medplum adds only ``meta``)."""
    for res in sc.record():
        got = server.read_json(f"{res['resourceType']}/{res['id']}")
        got.pop("meta", None)
        assert got == {k: v for k, v in res.items() if k != "meta"}, (
            f"{sc.id}: {res['resourceType']}/{res['id']} changed on the way in")


def prefetch_holds_the_record(sc: Scenario, entry: Mapping[str, Any],
                              request: Mapping[str, Any]) -> None:
    """Each search key of the prefetch resolved against Medplum holds exactly this patient's
    resources of its type: none of the other patient's, none missing (a server that ignored
    ``patient`` or truncated would show here, before the service's own filtering hides it)."""
    for key, template in (entry.get("prefetch") or {}).items():
        rtype = template_type(template)
        if key not in request["prefetch"] or rtype == "Patient":
            continue
        got = sorted(e["resource"]["id"] for e in request["prefetch"][key].get("entry") or [])
        want = sorted(r["id"] for r in sc.resources if r["resourceType"] == rtype)
        assert got == want, f"{sc.id}: {key} ({template}) from Medplum: {got}, record: {want}"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_scenario_on_medplum(scenario: Scenario, medplum_server: MedplumServer,
                             cds_service, services: Mapping[str, dict[str, Any]],  # noqa: F811
                             ) -> None:
    """Prefetched from Medplum or fetched from it by the service: the scenario's cards."""
    entry = services[scenario.hook]
    sc = load_dated(medplum_server, scenario)
    stored_as_sent(medplum_server, sc)
    prefetched = prefetch_request(sc, entry, medplum_server, leave_out=sc.unavailable)
    prefetch_holds_the_record(sc, entry, prefetched)
    with requests.Session() as http:
        a = post_hook(cds_service, entry["id"], prefetched, http)
        b: Outcome | None = None
        if not sc.unavailable:
            b = post_hook(cds_service, entry["id"],
                          fetch_request(sc, medplum_server, medplum_server.token), http)
        # else: prefetch only. An unavailable key is one the service can neither be sent nor
        # fetch. The sekmet suite reproduces that in mode (b) with a SMART token whose scopes deny
        # the key's resource type. This server has one token that reads everything: the service's
        # search would succeed (with whatever is stored, here nothing), which is "the patient has
        # none", not "could not be obtained", so it would answer another case (200, not 412).
        # Mode (a) leaves the keys out of the prefetch and sends no fhirServer: the case exactly.
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


# ==================================================================================================
# Server behaviours of the sekmet suite that this server can show too
# ==================================================================================================
def test_token_refused_at_patient_view_is_412(medplum_server: MedplumServer,
                                              cds_service,  # noqa: F811
                                              services: Mapping[str, dict[str, Any]]) -> None:
    """Medplum answers 401 to the token: the required keys cannot be had, 412 names them."""
    entry = services["patient-view"]
    sc = load_dated(medplum_server, plain_scenarios("patient-view")[0])
    got = post_hook(cds_service, entry["id"], fetch_request(sc, medplum_server, "not-the-token"))
    assert got.status == 412, got.describe()
    assert got.body["resourceType"] == "OperationOutcome"
    assert {f"prefetch.{k}" for k in required_keys(knowledge.load(), entry)} <= set(got.locations)
    assert "401" in json.dumps(got.body)


def test_unknown_patient_is_412_naming_the_patient(medplum_server: MedplumServer,
                                                   cds_service,  # noqa: F811
                                                   services: Mapping[str, dict[str, Any]]) -> None:
    """Medplum answers 404 for the patient: 412 on prefetch.patient, fetched or left out."""
    entry = services["patient-view"]
    ghost = Scenario(id="ghost", title="no such patient", now=datetime.now(timezone.utc),
                     hook="patient-view",
                     patient={"resourceType": "Patient", "id": f"no-such-{uuid.uuid4().hex}"})
    missing = requests.get(medplum_server.url(f"Patient/{ghost.patient_id}"), timeout=30,
                           headers={"Authorization": f"Bearer {medplum_server.token}"})
    assert missing.status_code == 404, missing.text
    patient_keys = [k for k, t in key_types(entry).items() if t == "Patient"]
    fetched = post_hook(cds_service, entry["id"],
                        fetch_request(ghost, medplum_server, medplum_server.token))
    prefetched = post_hook(cds_service, entry["id"],
                           prefetch_request(ghost, entry, medplum_server, leave_out=patient_keys))
    for got in (fetched, prefetched):
        assert got.status == 412, got.describe()
        assert got.body["resourceType"] == "OperationOutcome"
        assert "prefetch.patient" in got.locations, got.describe()
    assert "404" in json.dumps(fetched.body)


def put_in_chunks(server: MedplumServer, resources: Sequence[Mapping[str, Any]]) -> None:
    """PUT resources in transactions of at most 50 (Medplum refuses more updates in one)."""
    for start in range(0, len(resources), 50):
        post_transaction(server.base_url, server.token, {
            "resourceType": "Bundle", "type": "transaction",
            "entry": [{"resource": dict(r),
                       "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                      for r in resources[start:start + 50]]})


def test_truncated_search_is_not_taken_as_the_whole_record(
        medplum_server: MedplumServer, cds_service,  # noqa: F811
        services: Mapping[str, dict[str, Any]]) -> None:
    """More Observations than the service's ``_count`` (500): Medplum answers the first 500,
    ``total`` = all of them, and no ``next`` link. The scenario's own Observations (stored last)
    are not among the 500. The service should not answer as if it had the whole record: either
    the expected cards, or a card saying what could not be checked.

    Prefetch mode (no ``_count``, Medplum answers everything) gives the expected cards.
    """
    now = datetime.now(timezone.utc)
    chosen = None
    for sc in plain_scenarios():  # one whose cards need its Observations
        if not any(r["resourceType"] == "Observation" for r in sc.resources):
            continue
        entry = services[sc.hook]
        obs_keys = [k for k, t in key_types(entry).items() if t == "Observation"]
        dated = load_dated(medplum_server, sc)
        without = post_hook(cds_service, entry["id"], prefetch_request(
            dated, entry, medplum_server, replace={k: empty_bundle() for k in obs_keys}))
        if obs_keys and sorted(without.cards) != sorted(dated.expected_cards):
            chosen = (sc, entry)
            break
    assert chosen, "no scenario's cards depend on its Observations"
    sc, entry = chosen
    medplum_server.reset()
    big = rebase(clone(sc, "big-"), now)
    put_in_chunks(medplum_server, [big.patient, *height_fillers(big.patient_id, 520, now, "bh")])
    post_transaction(medplum_server.base_url, medplum_server.token, transaction_bundle(big))
    page = medplum_server.read_json(f"Observation?patient={big.patient_id}&_count=500")
    own = sum(r["resourceType"] == "Observation" for r in big.resources)
    assert (page["total"], len(page["entry"]), page.get("link")) == (520 + own, 500, None)

    prefetched = post_hook(cds_service, entry["id"], prefetch_request(big, entry, medplum_server))
    assert sorted(prefetched.cards) == sorted(big.expected_cards), prefetched.describe()
    fetched = post_hook(cds_service, entry["id"],
                        fetch_request(big, medplum_server, medplum_server.token))
    assert fetched.status == 200, fetched.describe()
    assert (sorted(fetched.cards) == sorted(big.expected_cards)
            or any("Could not be checked" in d for d in fetched.details)), (
        f"{sc.id} with 520 more Observations, fetched by the service: {fetched.describe()}")
