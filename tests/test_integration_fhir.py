"""The service under a real WSGI server, against a real FHIR server, for every scenario.

One ``lbp-cds serve --dev`` process (gunicorn, one worker, four threads) serves the whole session;
a sekmet FHIR server plays the EHR's FHIR store. Every scenario of ``fixtures/scenarios`` is dated
to today, loaded, and called twice over HTTP, as two kinds of EHR would:

(a) **prefetch**: the EHR resolves the service's own discovery templates against its FHIR server
    (following ``next`` links) and sends the results; it sends no ``fhirServer``, so the service
    works from the prefetch alone;
(b) **fetch**: the EHR sends no prefetch, only ``fhirServer`` and a ``fhirAuthorization``; the
    service fetches everything with the token.

Both must give the same cards, equal to the scenario's ``expect``. A scenario's ``unavailable``
keys are left out of the prefetch in (a); in (b) the service is given a SMART access token whose
scopes do not cover those keys' resource types, so the FHIR server answers 403 for them, which
reproduces "the EHR could not supply it and the service cannot fetch it".

Then the FHIR server behaviours an EHR can show: paging (more Observations than one page),
absolute references, an OperationOutcome or an HTTP error for one key, a token the server
refuses, and a patient it does not know.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests

from lbp_cds import knowledge
from lbp_cds.fhir_data import template_type
from lbp_cds.fixtures import (
    FixtureError,
    Scenario,
    load_scenarios,
    post_transaction,
    rebase,
    transaction_bundle,
)
from lbp_cds.hooks import HookRequest, response_issues
from lbp_cds.probe import build_request, hook_context, resolve_prefetch
from tests.fhir_server import FhirServer, ServerFactory, free_port, log_tail

pytestmark = [pytest.mark.fhir_server, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
#: The knowledge pack the service process serves: ``None`` is the real pack (``cds_services/``).
KNOWLEDGE_DIR: Path | None = None
#: Where the scenarios come from: ``None`` is the real ``fixtures/`` folder.
SCENARIO_ROOT: Path | None = None
CACHE = ROOT / ".cache"
SERVICE_START_TIMEOUT_S = 60.0
HTTP_TIMEOUT_S = 60.0
#: sekmet's default page size (``sekmet.fhir.search.DEFAULT_COUNT``).
SEKMET_PAGE_SIZE = 20
NOT_CHECKED = "Could not be checked"
RECORD_NOT_OBTAINED = "record could not be obtained"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


# ==================================================================================================
# The service process (shared with test_probe.py and test_synthea.py)
# ==================================================================================================
@dataclass
class ServiceProcess:
    """A running ``lbp-cds serve --dev`` process.

    Attributes:
        base_url: e.g. ``http://127.0.0.1:PORT`` (no trailing slash).
        process: the gunicorn master.
        log_path: its stdout and stderr.
    """

    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> None:
        """SIGTERM the master (it stops its workers), SIGKILL after a timeout."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)


def start_service(workdir: Path, knowledge_dir: Path | None = KNOWLEDGE_DIR) -> ServiceProcess:
    """Start ``lbp-cds serve --dev --workers 1 --threads 4`` on a free port and wait for /readyz.

    Args:
        workdir: a fresh folder (SQLite store, log, working directory).
        knowledge_dir: the pack to serve (``None``: the real, bundled pack).

    Returns:
        The ready process.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LBP_CDS_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env["LBP_CDS_DATABASE_URL"] = f"sqlite:///{workdir}/x.sqlite3"
    env["LBP_CDS_GRACEFUL_TIMEOUT_SECONDS"] = "3"
    if knowledge_dir is not None:
        env["LBP_CDS_KNOWLEDGE_DIR"] = str(knowledge_dir)
    script = Path(sys.executable).with_name("lbp-cds")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lbp_cds.cli"]
    last = ""
    for _attempt in range(3):
        port = free_port()
        log_path = workdir / f"serve-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [*command, "serve", "--dev", "--port", str(port), "--workers", "1",
                 "--threads", "4"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=workdir, env=env)
        service = ServiceProcess(f"http://127.0.0.1:{port}", process, log_path)
        deadline = time.monotonic() + SERVICE_START_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if requests.get(service.base_url + "/readyz", timeout=2).status_code == 200:
                    return service
            except requests.RequestException:
                pass
            time.sleep(0.1)
        service.stop()
        last = log_tail(log_path)
        if "address already in use" not in last.lower():
            break
    pytest.fail(f"lbp-cds serve did not become ready:\n{last}", pytrace=False)


_SHARED: dict[str, Any] = {"service": None, "users": 0}


@pytest.fixture(scope="session")
def cds_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The one service process of the session (real pack), shared by every module importing it.

    Modules that import this fixture each get their own fixture definition from pytest; the
    process itself is started once and stopped when the last of them is finished.

    Yields:
        The running service.
    """
    if _SHARED["service"] is None:
        _SHARED["service"] = start_service(tmp_path_factory.mktemp("lbp-cds-serve"))
    _SHARED["users"] += 1
    try:
        yield _SHARED["service"]
    finally:
        _SHARED["users"] -= 1
        if _SHARED["users"] == 0:
            _SHARED["service"].stop()
            _SHARED["service"] = None


# ==================================================================================================
# Talking to the service as an EHR
# ==================================================================================================
@dataclass(frozen=True)
class Outcome:
    """What a hook call answered, reduced to what scenarios compare.

    Attributes:
        status: the HTTP status.
        cards: ``(ruleId, indicator)`` of each card, in the service's order.
        locations: the OperationOutcome's issue expressions (non-200 answers).
        body: the whole decoded body.
        seconds: the call's duration seen by the client.
    """

    status: int
    cards: tuple[tuple[str, str], ...]
    locations: tuple[str, ...]
    body: Any
    seconds: float

    @property
    def details(self) -> list[str]:
        """Each card's detail text."""
        return [str(c.get("detail", "")) for c in self.cards_json]

    @property
    def cards_json(self) -> list[dict[str, Any]]:
        """The cards as sent."""
        return list(self.body.get("cards") or []) if isinstance(self.body, dict) else []

    def describe(self) -> str:
        """One line for assertion messages."""
        if self.status == 200:
            return f"200 {list(self.cards)}"
        return f"{self.status} {json.dumps(self.body)[:600]}"


def post_hook(service: ServiceProcess, service_id: str, body: Mapping[str, Any],
              session: requests.Session | None = None) -> Outcome:
    """POST a hook request and reduce the answer.

    Args:
        service: the running service.
        service_id: the CDS service id.
        body: the request.
        session: an HTTP session (default: a one-off request).

    Returns:
        The outcome.
    """
    http = session or requests
    started = time.perf_counter()
    response = http.post(f"{service.base_url}/cds-services/{service_id}", data=json.dumps(body),
                         headers={"Content-Type": "application/json"}, timeout=HTTP_TIMEOUT_S)
    seconds = time.perf_counter() - started
    doc = response.json()
    cards: tuple[tuple[str, str], ...] = ()
    locations: tuple[str, ...] = ()
    if response.status_code == 200:
        assert response_issues(doc) == [], f"invalid CDS Hooks response: {response_issues(doc)}"
        cards = tuple((c["extension"]["org.lbp-cds.rule"]["ruleId"], c["indicator"])
                      for c in doc.get("cards", []))
    elif isinstance(doc, dict) and doc.get("resourceType") == "OperationOutcome":
        locations = tuple(loc for i in doc.get("issue", []) for loc in i.get("expression", []))
    return Outcome(response.status_code, cards, locations, doc, seconds)


def discover(service: ServiceProcess) -> dict[str, dict[str, Any]]:
    """The discovery entries of the running service, by hook (the first service of each hook)."""
    doc = requests.get(f"{service.base_url}/cds-services", timeout=HTTP_TIMEOUT_S).json()
    out: dict[str, dict[str, Any]] = {}
    for entry in doc["services"]:
        out.setdefault(entry["hook"], entry)
    return out


def scenario_context(sc: Scenario) -> dict[str, Any]:
    """The hook context of a scenario (its drafts; its selections, else all drafts)."""
    return hook_context(sc.hook, sc.patient_id, sc.draft_orders, sc.selections or None)


def prefetch_request(sc: Scenario, entry: Mapping[str, Any], server: FhirServer,
                     *, leave_out: Sequence[str] = (), replace: Mapping[str, Any] | None = None,
                     ) -> dict[str, Any]:
    """Mode (a): the EHR resolves the templates against its FHIR server and sends no fhirServer.

    Args:
        sc: the (dated) scenario.
        entry: the service's discovery entry.
        server: the FHIR server holding the record.
        leave_out: keys the EHR could not supply (left out of the prefetch).
        replace: keys whose value is replaced (e.g. by an OperationOutcome).

    Returns:
        The request.
    """
    context = scenario_context(sc)
    draft = HookRequest(hook=sc.hook, hook_instance=str(uuid.uuid4()), context=context,
                        prefetch={})
    resolved = resolve_prefetch(entry.get("prefetch") or {}, draft, server.base_url,
                                server.token)
    failed = {k: why for k, why in resolved.omitted.items() if k not in leave_out}
    assert not failed, f"{sc.id}: the EHR could not resolve prefetch keys: {failed}"
    values = {k: v for k, v in resolved.values.items() if k not in leave_out}
    values.update(replace or {})
    return build_request(sc.hook, context, prefetch=values)


def fetch_request(sc: Scenario, server: FhirServer, token: str | None) -> dict[str, Any]:
    """Mode (b): no prefetch; ``fhirServer`` and a token, so the service fetches everything."""
    return build_request(sc.hook, scenario_context(sc), fhir_server=server.base_url, token=token)


# ==================================================================================================
# The EHR's FHIR server: static bearer token for everything, SMART tokens with narrower scopes
# ==================================================================================================
SMART_CLIENT = "lbp-cds-tests"
SMART_SECRET = secrets.token_urlsafe(16)


@pytest.fixture(scope="module")
def ehr(fhir_server_factory: ServerFactory) -> FhirServer:
    """A sekmet server accepting its static bearer token and SMART access tokens (scoped)."""
    return fhir_server_factory({"server_auth": {
        "types": ["bearer", "smart"],
        "smart_clients": [{"client_id": SMART_CLIENT, "client_secret": SMART_SECRET,
                           "scopes": "system/*.read"}],
    }}, name="sekmet-ehr")


def smart_token(server: FhirServer, resource_types: Sequence[str]) -> str:
    """A SMART access token that may read only these resource types (others answer 403).

    Args:
        server: a server started by the ``ehr`` fixture.
        resource_types: the types the token may read; none gives a token for ``Device`` only.

    Returns:
        The access token.
    """
    scopes = " ".join(f"system/{t}.read" for t in sorted(set(resource_types)) or ["Device"])
    response = requests.post(f"{server.root_url}/auth/token",
                             data={"grant_type": "client_credentials", "scope": scopes},
                             auth=(SMART_CLIENT, SMART_SECRET), timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


@pytest.fixture(scope="module")
def services(cds_service: ServiceProcess) -> dict[str, dict[str, Any]]:
    """Discovery entries by hook."""
    return discover(cds_service)


@pytest.fixture(scope="module")
def pack() -> knowledge.Knowledge:
    """The knowledge pack the service process serves (for the services' required keys)."""
    return knowledge.load(KNOWLEDGE_DIR)


def key_types(entry: Mapping[str, Any]) -> dict[str, str]:
    """Each prefetch key's resource type."""
    return {k: template_type(t) for k, t in (entry.get("prefetch") or {}).items()}


def required_keys(pack: knowledge.Knowledge, entry: Mapping[str, Any]) -> set[str]:
    """The keys without which the service answers 412."""
    service = next(s for s in pack.services if s.id == entry["id"] and s.hook == entry["hook"])
    return set(service.required)


def load_dated(server: FhirServer, sc: Scenario, now: datetime) -> Scenario:
    """Load a scenario's record dated to ``now``; return the dated scenario (drafts too)."""
    dated = rebase(sc, now)
    post_transaction(server.base_url, server.token, transaction_bundle(dated))
    return dated


# ==================================================================================================
# Every scenario, prefetch versus fetch
# ==================================================================================================
def _scenarios() -> tuple[list[Scenario], str]:
    try:
        return load_scenarios(root=SCENARIO_ROOT), ""
    except FixtureError as exc:
        return [], str(exc)


SCENARIOS, SCENARIO_ERROR = _scenarios()
COMPARISON: dict[str, Any] = {"compared": 0, "equal": 0, "different": [], "prefetch_only": [],
                              "seconds": {}}


@pytest.fixture(scope="module", autouse=True)
def comparison_report() -> Iterator[None]:
    """Print the prefetch-versus-fetch counts at the end of the module (and keep them in .cache)."""
    yield
    if not COMPARISON["compared"] and not COMPARISON["prefetch_only"]:
        return
    summary = {k: COMPARISON[k] for k in ("compared", "equal", "different", "prefetch_only")}
    CACHE.mkdir(exist_ok=True)
    (CACHE / "prefetch-vs-fetch.json").write_text(json.dumps(
        summary | {"seconds": COMPARISON["seconds"]}, indent=2))
    print(f"\nprefetch vs fetch: {summary['compared']} scenarios compared, "
          f"{summary['equal']} equal, {len(summary['different'])} different "
          f"{summary['different'] or ''}; prefetch-only: {summary['prefetch_only'] or 'none'}")


def test_there_are_scenarios() -> None:
    """The scenario folder exists and every file reads."""
    assert not SCENARIO_ERROR, SCENARIO_ERROR
    assert SCENARIOS, "no scenario files in fixtures/scenarios"


def unavailable_reproducible(sc: Scenario, entry: Mapping[str, Any]) -> tuple[bool, list[str]]:
    """Whether a scoped token can make exactly the scenario's unavailable keys fail.

    Scopes are per resource type: when another key shares a type with an unavailable key, the
    token would take that key away too, which is not the scenario any more.

    Returns:
        ``(reproducible, the types the token may read)``.
    """
    types = key_types(entry)
    denied = {types[k] for k in sc.unavailable if k in types}
    collateral = {k for k, t in types.items() if t in denied} - set(sc.unavailable)
    allowed = sorted({t for t in types.values() if t not in denied})
    return not collateral, allowed


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_scenario_prefetch_and_fetch_agree(scenario: Scenario, ehr: FhirServer,
                                           cds_service: ServiceProcess,
                                           services: dict[str, dict[str, Any]]) -> None:
    """Prefetched or fetched by the service, the record gives the cards the scenario expects."""
    started = time.perf_counter()
    entry = services[scenario.hook]
    assert set(scenario.unavailable) <= set(entry.get("prefetch") or {}), (
        f"unavailable keys {scenario.unavailable} are not prefetch keys of {entry['id']}")
    sc = load_dated(ehr, scenario, datetime.now(timezone.utc))
    with requests.Session() as http:
        a = post_hook(cds_service, entry["id"],
                      prefetch_request(sc, entry, ehr, leave_out=sc.unavailable), http)
        reproducible, allowed = unavailable_reproducible(sc, entry)
        b: Outcome | None = None
        if not sc.unavailable:
            b = post_hook(cds_service, entry["id"], fetch_request(sc, ehr, ehr.token), http)
        elif reproducible:
            b = post_hook(cds_service, entry["id"],
                          fetch_request(sc, ehr, smart_token(ehr, allowed)), http)
    COMPARISON["seconds"][sc.id] = round(time.perf_counter() - started, 3)
    if a.status == 200:
        assert response_issues(a.body) == [], f"{sc.id}: invalid response {a.body}"
    if b is None:
        # The unavailable keys share a resource type with keys the scenario keeps: a scoped
        # token cannot take away one without the other, so mode (b) cannot reproduce the case.
        COMPARISON["prefetch_only"].append(sc.id)
    else:
        COMPARISON["compared"] += 1
        same = (a.status, a.cards, a.locations) == (b.status, b.cards, b.locations)
        if same:
            COMPARISON["equal"] += 1
        else:
            COMPARISON["different"].append(sc.id)
        assert same, (f"{sc.id}: prefetch and fetch disagree\n  prefetch: {a.describe()}\n"
                      f"  fetch:    {b.describe()}")
    expected = sorted(sc.expected_cards)
    assert (a.status, sorted(a.cards)) == (sc.expected_status, expected), (
        f"{sc.id} ({sc.title}): expected {sc.expected_status} {expected}, got {a.describe()}"
        + (f"\n  notes: {sc.expect.get('notes')}" if sc.expect.get("notes") else ""))


# ==================================================================================================
# Choosing scenarios for the behaviour tests
# ==================================================================================================
def plain_scenarios(hook: str | None = None) -> list[Scenario]:
    """Scenarios answering 200 with at least one card and no unavailable keys."""
    return [s for s in SCENARIOS if s.expected_status == 200 and s.expected_cards
            and not s.unavailable and (hook is None or s.hook == hook)]


def clone(sc: Scenario, prefix: str) -> Scenario:
    """The same case for another patient: every id of the record and drafts gets ``prefix``.

    References to those resources (relative ``Type/id``) follow; selections too.
    """
    own = {(r["resourceType"], r["id"]) for r in [*sc.record(), *sc.draft_orders]}

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "reference" and isinstance(value, str) and value.count("/") == 1:
                    rtype, rid = value.split("/")
                    out[key] = f"{rtype}/{prefix}{rid}" if (rtype, rid) in own else value
                else:
                    out[key] = walk(value)
            if (node.get("resourceType"), node.get("id")) in own:
                out["id"] = prefix + node["id"]
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return Scenario(
        id=prefix + sc.id, title=sc.title, now=sc.now, hook=sc.hook,
        patient=walk(sc.patient), resources=walk(sc.resources),
        draft_orders=walk(sc.draft_orders),
        selections=[f"{s.split('/')[0]}/{prefix}{s.split('/')[1]}" for s in sc.selections],
        unavailable=list(sc.unavailable), expect=copy.deepcopy(sc.expect), path=sc.path)


def empty_bundle() -> dict[str, Any]:
    """A searchset with no match (the EHR has no such data)."""
    return {"resourceType": "Bundle", "type": "searchset", "total": 0, "entry": []}


def operation_outcome(text: str) -> dict[str, Any]:
    """What an EHR puts in a prefetch key it could not resolve."""
    return {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "exception", "diagnostics": text}]}


def height_fillers(patient_id: str, count: int, now: datetime, prefix: str
                   ) -> list[dict[str, Any]]:
    """Observations that change no rule: body heights of 175 cm, months old."""
    return [{
        "resourceType": "Observation", "id": f"{prefix}{n}", "status": "final",
        "category": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "vital-signs"}]}],
        "code": {"coding": [{"system": LOINC, "code": "8302-2", "display": "Body height"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": (now - timedelta(days=400 + n)).date().isoformat(),
        "valueQuantity": {"value": 175, "unit": "cm", "system": UCUM, "code": "cm"},
    } for n in range(count)]


def put_all(server: FhirServer, resources: Sequence[Mapping[str, Any]]) -> None:
    """Store resources with PUT in one transaction."""
    post_transaction(server.base_url, server.token, {
        "resourceType": "Bundle", "type": "transaction",
        "entry": [{"resource": dict(r), "request": {"method": "PUT",
                                                    "url": f"{r['resourceType']}/{r['id']}"}}
                  for r in resources]})


def search_pages(server: FhirServer, query: str) -> list[list[str]]:
    """The ids on each page of a search at the server's default page size."""
    pages: list[list[str]] = []
    url: str | None = server.url(query)
    while url:
        doc = server.read_json(url)
        pages.append([e["resource"]["id"] for e in doc.get("entry", [])
                      if e.get("search", {}).get("mode", "match") == "match"])
        url = next((lk["url"] for lk in doc.get("link", []) if lk["relation"] == "next"), None)
    return pages


# ==================================================================================================
# FHIR server behaviours
# ==================================================================================================
def test_service_follows_next_links(ehr: FhirServer, cds_service: ServiceProcess,
                                    services: dict[str, dict[str, Any]]) -> None:
    """With more Observations than one page, the one the cards need is on the last page.

    The service's templates carry no ``_count``, so sekmet answers 20 a page: 25 body heights
    stored first push the scenario's own Observations to the last page. A scenario is used
    whose cards change when its Observations are taken away (so a card needs them).
    """
    now = datetime.now(timezone.utc)
    chosen: tuple[Scenario, dict[str, Any], Outcome] | None = None
    tried = []
    for sc in plain_scenarios():
        if not any(r["resourceType"] == "Observation" for r in sc.resources):
            continue
        entry = services[sc.hook]
        obs_keys = [k for k, t in key_types(entry).items() if t == "Observation"]
        if not obs_keys:
            continue
        dated = load_dated(ehr, sc, now)
        without = post_hook(cds_service, entry["id"], prefetch_request(
            dated, entry, ehr, replace={k: empty_bundle() for k in obs_keys}))
        tried.append(sc.id)
        if sorted(without.cards) != sorted(dated.expected_cards):
            chosen = (sc, entry, without)
            break
    assert chosen, f"no scenario's cards depend on its Observations (tried {tried})"
    sc, entry, without = chosen

    paged = rebase(clone(sc, "pg-"), now)
    fillers = height_fillers(paged.patient_id, SEKMET_PAGE_SIZE + 5, now, f"{paged.id}-h")
    put_all(ehr, [paged.patient, *fillers])
    post_transaction(ehr.base_url, ehr.token, transaction_bundle(paged))  # stored after them
    own_obs = {r["id"] for r in paged.resources if r["resourceType"] == "Observation"}
    for key, template in entry["prefetch"].items():
        if template_type(template) != "Observation":
            continue
        query = template.replace("{{context.patientId}}", paged.patient_id)
        assert "{{" not in query, f"template {template} needs more than the patient id"
        assert "_count" not in dict(parse_qsl(urlsplit(query).query)), template
        pages = search_pages(ehr, query)
        assert len(pages) >= 2, f"{key}: {query} fits one page"
        assert len(pages[0]) == SEKMET_PAGE_SIZE
        found = {i for page in pages for i in page} & own_obs
        assert found == own_obs, f"{key}: {query} does not find {own_obs - found}"
        assert not found & set(pages[0]), f"{key}: the first page holds {found & set(pages[0])}"

    fetched = post_hook(cds_service, entry["id"], fetch_request(paged, ehr, ehr.token))
    prefetched = post_hook(cds_service, entry["id"], prefetch_request(paged, entry, ehr))
    expected = sorted(paged.expected_cards)
    assert sorted(fetched.cards) == expected, (
        f"{sc.id} paged, fetched by the service: {fetched.describe()} (without its "
        f"Observations: {without.describe()})")
    assert fetched.cards == prefetched.cards


def test_absolute_references_give_the_same_cards(fhir_server_factory: ServerFactory,
                                                 cds_service: ServiceProcess,
                                                 services: dict[str, dict[str, Any]]) -> None:
    """A FHIR server that answers with absolute references changes no card."""
    server = fhir_server_factory({"server_behaviour": {"absolute_references": True}},
                                 name="sekmet-absolute")
    now = datetime.now(timezone.utc)
    chosen: list[Scenario] = []
    rules: set[str] = set()
    for sc in plain_scenarios():  # a spread: each brings a rule or a hook not yet covered
        new_rule = not {r for r, _ in sc.expected_cards} <= rules
        if new_rule or sc.hook not in {c.hook for c in chosen}:
            chosen.append(sc)
            rules |= {r for r, _ in sc.expected_cards}
        if len(chosen) >= 8:
            break
    assert chosen
    checked_absolute = False
    for scenario in chosen:
        entry = services[scenario.hook]
        sc = load_dated(server, scenario, now)
        if not checked_absolute and len(sc.resources):
            res = sc.resources[0]
            stored = server.read_json(f"{res['resourceType']}/{res['id']}")
            refs = [v["reference"] for v in stored.values()
                    if isinstance(v, dict) and "reference" in v]
            assert refs and all(r.startswith(server.base_url + "/") for r in refs), refs
            checked_absolute = True
        a = post_hook(cds_service, entry["id"], prefetch_request(sc, entry, server))
        b = post_hook(cds_service, entry["id"], fetch_request(sc, server, server.token))
        expected = sorted(sc.expected_cards)
        assert sorted(a.cards) == expected, f"{sc.id} prefetched: {a.describe()}"
        assert sorted(b.cards) == expected, f"{sc.id} fetched: {b.describe()}"
    assert checked_absolute


def test_one_key_failing_degrades_the_answer(ehr: FhirServer, cds_service: ServiceProcess,
                                             services: dict[str, dict[str, Any]],
                                             pack: knowledge.Knowledge) -> None:
    """An OperationOutcome (prefetch) or a 403 (fetch) for one optional key: cards still come.

    The cards that need the lost data say what could not be checked; both ways of losing the key
    give the same answer.
    """
    now = datetime.now(timezone.utc)
    entry = services["patient-view"]
    types = key_types(entry)
    required = required_keys(pack, entry)
    optional_types = {t for k, t in types.items() if k not in required} - {
        t for k, t in types.items() if k in required}
    lost = "Observation" if "Observation" in optional_types else min(optional_types)
    lost_keys = [k for k, t in types.items() if t == lost]
    seen = []
    for scenario in plain_scenarios("patient-view"):
        sc = load_dated(ehr, scenario, now)
        outcome_way = post_hook(cds_service, entry["id"], prefetch_request(
            sc, entry, ehr, replace={k: operation_outcome("search failed") for k in lost_keys}))
        http_way = post_hook(cds_service, entry["id"], fetch_request(
            sc, ehr, smart_token(ehr, [t for t in types.values() if t != lost])))
        for got in (outcome_way, http_way):
            assert got.status == 200, f"{sc.id} without {lost}: {got.describe()}"
            assert response_issues(got.body) == []
        assert outcome_way.cards == http_way.cards, (
            f"{sc.id}: {outcome_way.describe()} vs {http_way.describe()}")
        seen.append((sc.id, outcome_way.cards))
        if any(NOT_CHECKED in d for d in outcome_way.details):
            return
    pytest.fail(f"no card said what could not be checked without {lost_keys}: {seen}")


def test_required_key_failing_is_412(ehr: FhirServer, cds_service: ServiceProcess,
                                     services: dict[str, dict[str, Any]],
                                     pack: knowledge.Knowledge) -> None:
    """An OperationOutcome or a 403 for a required key: 412 naming that key."""
    entry = services["patient-view"]
    required = sorted(required_keys(pack, entry) - {"patient"})
    assert required, f"{entry['id']} requires no key beyond the patient"
    key = required[0]
    types = key_types(entry)
    sc = load_dated(ehr, plain_scenarios("patient-view")[0], datetime.now(timezone.utc))
    outcome_way = post_hook(cds_service, entry["id"], prefetch_request(
        sc, entry, ehr, replace={key: operation_outcome("search failed")}))
    http_way = post_hook(cds_service, entry["id"], fetch_request(
        sc, ehr, smart_token(ehr, [t for k, t in types.items() if t != types[key]])))
    for got in (outcome_way, http_way):
        assert got.status == 412, got.describe()
        assert f"prefetch.{key}" in got.locations, got.describe()


def test_token_refused_at_patient_view_is_412(ehr: FhirServer, cds_service: ServiceProcess,
                                              services: dict[str, dict[str, Any]],
                                              pack: knowledge.Knowledge) -> None:
    """The FHIR server answers 401 to the token: the required keys cannot be had, 412 names them."""
    entry = services["patient-view"]
    sc = load_dated(ehr, plain_scenarios("patient-view")[0], datetime.now(timezone.utc))
    got = post_hook(cds_service, entry["id"], fetch_request(sc, ehr, "not-a-valid-token"))
    assert got.status == 412, got.describe()
    assert got.body["resourceType"] == "OperationOutcome"
    assert {f"prefetch.{k}" for k in required_keys(pack, entry)} <= set(got.locations)
    assert "401" in json.dumps(got.body)


def lumbar_mri_for_back_pain(patient_id: str, now: datetime) -> dict[str, Any]:
    """A draft lumbar MRI whose reason (lumbar radiculopathy, M54.16) is stated on the order."""
    return {
        "resourceType": "ServiceRequest", "id": f"mri-{uuid.uuid4().hex[:8]}",
        "status": "draft", "intent": "order",
        "code": {"coding": [{"system": LOINC, "code": "30679-5",
                             "display": "MR Lumbar spine WO contrast"},
                            {"system": "http://www.ama-assn.org/go/cpt", "code": "72148"}]},
        "reasonCode": [{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm",
                                    "code": "M54.16",
                                    "display": "Radiculopathy, lumbar region"}]}],
        "subject": {"reference": f"Patient/{patient_id}"},
        "authoredOn": now.isoformat(timespec="seconds"),
    }


def test_token_refused_at_order_select_answers_on_the_order(
        ehr: FhirServer, cds_service: ServiceProcess,
        services: dict[str, dict[str, Any]]) -> None:
    """The FHIR server answers 401: order-select (no required key) judges the order alone.

    Its cards say the record could not be obtained, for the scenarios' drafts and for a lumbar MRI
    whose back-pain reason is on the order (which must draw a card).
    """
    now = datetime.now(timezone.utc)
    entry = services["order-select"]
    cases = [load_dated(ehr, s, now) for s in plain_scenarios("order-select")]
    pid = cases[0].patient_id if cases else "no-record"
    cases.append(Scenario(id="reason-on-order", title="MRI with its reason", now=now,
                          hook="order-select",
                          patient={"resourceType": "Patient", "id": pid},
                          draft_orders=[lumbar_mri_for_back_pain(pid, now)]))
    answered = []
    for sc in cases:
        got = post_hook(cds_service, entry["id"], fetch_request(sc, ehr, "not-a-valid-token"))
        assert got.status == 200, f"{sc.id}: {got.describe()}"
        assert response_issues(got.body) == []
        for detail in got.details:
            assert RECORD_NOT_OBTAINED in detail, f"{sc.id}: {detail}"
        answered.append((sc.id, got.cards))
    assert answered[-1][1], f"no card for a lumbar MRI for back pain on the order alone: {answered}"


def test_unknown_patient_is_412_naming_the_patient(ehr: FhirServer, cds_service: ServiceProcess,
                                                   services: dict[str, dict[str, Any]]) -> None:
    """The FHIR server answers 404 for the patient: 412, OperationOutcome on prefetch.patient.

    Both as an EHR that sends what it found (the patient key left out, no fhirServer) and with the
    service fetching the patient itself.
    """
    entry = services["patient-view"]
    ghost = Scenario(id="ghost", title="no such patient", now=datetime.now(timezone.utc),
                     hook="patient-view",
                     patient={"resourceType": "Patient", "id": f"no-such-{uuid.uuid4().hex}"})
    assert ehr.get(f"Patient/{ghost.patient_id}").status_code == 404
    patient_keys = [k for k, t in key_types(entry).items() if t == "Patient"]
    fetched = post_hook(cds_service, entry["id"], fetch_request(ghost, ehr, ehr.token))
    prefetched = post_hook(cds_service, entry["id"],
                           prefetch_request(ghost, entry, ehr, leave_out=patient_keys))
    for got in (fetched, prefetched):
        assert got.status == 412, got.describe()
        assert got.body["resourceType"] == "OperationOutcome"
        assert "prefetch.patient" in got.locations, got.describe()
    assert "404" in json.dumps(fetched.body)
