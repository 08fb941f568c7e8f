"""Fixture patients: the clinical scenarios of ``fixtures/scenarios/``, dated and loaded.

Each scenario file is one clinical case (see ``docs/knowledge-format.md`` and the scenario suite):
a patient, the resources of the record, the draft orders of the hook context, the fixed clock
``now`` of the case and what the service is expected to answer. This module finds and reads those
files, moves a case's dates so that its ``now`` falls on another day (``rebase``), and loads the
records into a FHIR server as one transaction per case (``load_into_server``, behind
``lbp-cds fixtures load``), so that a probe or an EHR sandbox run today sees the same clinical
timeline the scenario describes.

Draft orders are never loaded: they live in the hook context (``context.draftOrders``), as they do
in an EHR before the order is signed.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import requests
import yaml

#: Keys whose string values are FHIR ``date``, ``dateTime`` or ``instant`` values.
DATE_KEYS: frozenset[str] = frozenset({
    "birthDate", "deceasedDateTime",
    "onsetDateTime", "abatementDateTime", "recordedDate", "assertedDate",
    "effectiveDateTime", "effectiveInstant", "issued",
    "authoredOn", "occurrenceDateTime", "performedDateTime",
    "started", "start", "end", "authored",
    "valueDate", "valueDateTime", "valueInstant",
    "date",
})

#: A FHIR date / dateTime / instant: ``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD``, or a date with a time
#: (seconds and fraction optional in the pattern, as written) and an optional zone.
DATE_VALUE = re.compile(
    r"^(?P<year>\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2})"
    r"(?P<time>T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})?)?)?)?$"
)

SCENARIO_HOOKS = ("patient-view", "order-select", "order-sign")
REQUEST_TIMEOUT_S = 60.0
FHIR_JSON = "application/fhir+json"


class FixtureError(Exception):
    """A scenario file is missing or malformed, or loading it into a FHIR server failed.

    Attributes:
        status: the FHIR server's HTTP status when the server refused (else ``None``).
        outcome: the server's OperationOutcome (or other body), if any.
    """

    def __init__(self, message: str, status: int | None = None, outcome: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.outcome = outcome


#: A safe YAML loader (LibYAML's when available) that keeps timestamps as written: FHIR wants
#: the strings, not ``date``s.
_StringDatesLoader: Any = type(
    "_StringDatesLoader", (getattr(yaml, "CSafeLoader", yaml.SafeLoader),), {
        "yaml_implicit_resolvers": {
            first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
            for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
        },
    })


@dataclass(frozen=True)
class Scenario:
    """One clinical case of ``fixtures/scenarios/<id>.yaml``.

    Attributes:
        id: the file's stem (also the ``id`` field).
        title: one line saying what the case is.
        now: the case's fixed clock (timezone-aware).
        hook: ``patient-view``, ``order-select`` or ``order-sign``.
        patient: the Patient resource.
        resources: the other resources of the record (FHIR R4 JSON).
        draft_orders: draft ServiceRequests / MedicationRequests of the hook context.
        selections: ``Type/id`` of the selected drafts (order-select).
        unavailable: prefetch keys the EHR could not supply and the service cannot fetch.
        expect: the expected answer (``cards: [{rule, indicator}]``, ``status``, ``notes``).
        path: the file it was read from (``None`` when built in code).
        raw: the whole document as read, for keys this class does not name.
    """

    id: str
    title: str
    now: datetime
    hook: str
    patient: dict[str, Any]
    resources: list[dict[str, Any]] = field(default_factory=list)
    draft_orders: list[dict[str, Any]] = field(default_factory=list)
    selections: list[str] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)
    expect: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def patient_id(self) -> str:
        """The Patient's id."""
        return str(self.patient["id"])

    @property
    def expected_status(self) -> int:
        """The expected HTTP status (200 unless the scenario says otherwise)."""
        return int(self.expect.get("status", 200))

    @property
    def expected_cards(self) -> list[tuple[str, str]]:
        """The expected cards as ``(rule id, indicator)``, in the order written."""
        return [(str(c["rule"]), str(c["indicator"])) for c in self.expect.get("cards") or []]

    def record(self) -> list[dict[str, Any]]:
        """The patient followed by the record's resources (what a FHIR server would hold)."""
        return [self.patient, *self.resources]


# -- finding and reading ----------------------------------------------------------------------
def default_root() -> Path:
    """Find the fixtures folder: inside the installed package, else the checkout's ``fixtures/``.

    Returns:
        The folder holding ``scenarios/``.

    Raises:
        FixtureError: when neither exists.
    """
    packaged = resources.files("lbp_cds").joinpath("fixtures")
    if packaged.is_dir():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parents[2] / "fixtures"
    if checkout.is_dir():
        return checkout
    raise FixtureError("no fixtures folder found (neither in the package nor in the checkout)")


def scenario_paths(root: Path | None = None) -> list[Path]:
    """The scenario files, sorted by name.

    Args:
        root: the fixtures folder (default: :func:`default_root`).

    Returns:
        ``<root>/scenarios/*.yaml`` (and ``*.yml``); empty when the folder has none.
    """
    folder = (root or default_root()) / "scenarios"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def read_scenario(path: Path) -> Scenario:
    """Read and check one scenario file.

    Timestamps stay strings exactly as written (YAML would otherwise turn ``1970-05-01`` into a
    ``date``, which is not FHIR JSON).

    Args:
        path: the YAML file.

    Returns:
        The scenario.

    Raises:
        FixtureError: the file does not parse, or a required field is missing or wrong.
    """
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_StringDatesLoader)  # noqa: S506
    except (OSError, yaml.YAMLError) as exc:
        raise FixtureError(f"{path.name}: cannot read: {exc}") from None
    if not isinstance(doc, dict):
        raise FixtureError(f"{path.name}: a scenario is a mapping")

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise FixtureError(f"{path.name}: {what}")

    sid = str(doc.get("id") or path.stem)
    need(sid == path.stem, f"id {sid!r} differs from the file name {path.stem!r}")
    need(doc.get("hook") in SCENARIO_HOOKS, f"hook must be one of {', '.join(SCENARIO_HOOKS)}")
    patient = doc.get("patient")
    need(isinstance(patient, dict) and patient.get("resourceType") == "Patient"
         and bool(patient.get("id")), "patient must be a Patient resource with an id")
    now = _parse_now(doc.get("now"))
    need(now is not None, "now must be an ISO 8601 date-time with a zone: 2026-03-02T10:00:00Z")
    assert now is not None and isinstance(patient, dict)
    lists: dict[str, list[Any]] = {}
    for key in ("resources", "draft_orders", "selections", "unavailable"):
        value = doc.get(key) or []
        need(isinstance(value, list), f"{key} must be a list")
        lists[key] = value
    for pos, res in enumerate(lists["resources"] + lists["draft_orders"]):
        need(isinstance(res, dict) and bool(res.get("resourceType")) and bool(res.get("id")),
             f"resource #{pos} needs resourceType and id")
    expect = doc.get("expect") or {}
    need(isinstance(expect, dict), "expect must be a mapping")
    for card in expect.get("cards") or []:
        need(isinstance(card, dict) and "rule" in card and "indicator" in card,
             "each expected card needs rule and indicator")
    return Scenario(
        id=sid, title=str(doc.get("title", "")), now=now, hook=str(doc["hook"]),
        patient=patient, resources=lists["resources"], draft_orders=lists["draft_orders"],
        selections=[str(s) for s in lists["selections"]],
        unavailable=[str(u) for u in lists["unavailable"]],
        expect=expect, path=path, raw=doc,
    )


def load_scenarios(ids: Iterable[str] | None = None, root: Path | None = None) -> list[Scenario]:
    """Read the scenarios, all of them or those named.

    Args:
        ids: scenario ids (file stems) to read; ``None`` (or empty) for all.
        root: the fixtures folder (default: :func:`default_root`).

    Returns:
        The scenarios, sorted by id.

    Raises:
        FixtureError: an id names no file, or a file is malformed.
    """
    paths = {p.stem: p for p in scenario_paths(root)}
    wanted = list(ids or [])
    if wanted:
        unknown = [i for i in wanted if i not in paths]
        if unknown:
            known = ", ".join(sorted(paths)) if len(paths) <= 10 else (
                f"{len(paths)} scenarios in {(root or default_root()) / 'scenarios'}")
            raise FixtureError(f"no scenario {', '.join(unknown)} (known: {known or 'none'})")
        chosen = sorted(set(wanted))
    else:
        chosen = sorted(paths)
    return [read_scenario(paths[i]) for i in chosen]


def _parse_now(value: Any) -> datetime | None:
    if not isinstance(value, str) or "T" not in value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else None


# -- dates ------------------------------------------------------------------------------------
def shift_date_value(value: str, days: int) -> str:
    """Move one FHIR date / dateTime / instant string by whole days, keeping its form.

    The precision (year, month, day, minutes, seconds, fraction) and the zone (``Z``, an offset,
    or none) are kept as written; only the calendar date moves. A partial date (``2024`` or
    ``2024-05``) is moved from its first day and written back at its own precision.

    Args:
        value: e.g. ``2026-02-20``, ``2026-02-20T08:30:00.000+01:00``.
        days: how many days to move (negative: earlier).

    Returns:
        The moved value; a string that is not a FHIR date comes back unchanged.
    """
    match = DATE_VALUE.match(value)
    if not match:
        return value
    year, month, day = int(match["year"]), int(match["month"] or 1), int(match["day"] or 1)
    try:
        moved = date(year, month, day) + timedelta(days=days)
    except (ValueError, OverflowError):
        return value
    if match["month"] is None:
        return f"{moved.year:04d}"
    if match["day"] is None:
        return f"{moved.year:04d}-{moved.month:02d}"
    return f"{moved.isoformat()}{match['time'] or ''}"


def shift_dates(obj: Any, days: int) -> Any:
    """Return a deep copy with every FHIR date-bearing value moved by ``days`` whole days.

    Values are recognised by key (:data:`DATE_KEYS`, at any depth: ``onsetDateTime``,
    ``effectivePeriod.start``, ``item[].answer[].valueDate``, extensions' ``valueDateTime`` ...)
    and by pattern (:data:`DATE_VALUE`); anything else is copied unchanged. The argument is not
    modified.

    Args:
        obj: a resource, a list of resources, or any JSON-like value.
        days: how many days to move (negative: earlier).

    Returns:
        The moved copy.
    """
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            if key in DATE_KEYS and isinstance(value, str):
                out[key] = shift_date_value(value, days)
            else:
                out[key] = shift_dates(value, days)
        return out
    if isinstance(obj, list):
        return [shift_dates(item, days) for item in obj]
    return copy.deepcopy(obj)


def days_between(then: datetime, now: datetime | date) -> int:
    """The whole number of days that moves ``then`` closest to ``now``.

    Args:
        then: a scenario's clock.
        now: the target: a datetime (rounded to the nearest whole day, so the time of day of the
            case is off by at most 12 hours) or a date (the case keeps its time of day).

    Returns:
        The days to add to ``then``.
    """
    if isinstance(now, datetime):
        target = now if now.tzinfo else now.replace(tzinfo=timezone.utc)
        return round((target - then).total_seconds() / 86400)
    return (now - then.date()).days


def rebase(scenario: Scenario, now: datetime | date) -> Scenario:
    """Move a scenario in time so that its ``now`` falls on the day of ``now``.

    Every date of the patient, the record and the draft orders moves by the same whole number of
    days (:func:`days_between`), so ages, durations and look-back windows stay as the case wrote
    them, within a day's rounding at their edges.

    Args:
        scenario: the case as written.
        now: the new clock (a datetime, or a date).

    Returns:
        A new scenario whose ``now`` is the old one plus those days.
    """
    days = days_between(scenario.now, now)
    if days == 0:
        return scenario
    return replace(
        scenario,
        now=scenario.now + timedelta(days=days),
        patient=shift_dates(scenario.patient, days),
        resources=shift_dates(scenario.resources, days),
        draft_orders=shift_dates(scenario.draft_orders, days),
    )


# -- FHIR -------------------------------------------------------------------------------------
def transaction_bundle(scenario: Scenario) -> dict[str, Any]:
    """The transaction that stores a scenario's record: ``PUT Type/id`` for each resource.

    Loading it twice leaves the same data (the ids are the scenario's). Draft orders are not part
    of it: they belong to the hook context.

    Args:
        scenario: the case (rebase it first to date it).

    Returns:
        A FHIR R4 ``transaction`` Bundle.
    """
    entries = []
    for res in scenario.record():
        rtype, rid = res["resourceType"], res["id"]
        entries.append({
            "resource": copy.deepcopy(res),
            "request": {"method": "PUT", "url": f"{rtype}/{rid}"},
        })
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def id_collisions(scenarios: Sequence[Scenario]) -> dict[str, list[str]]:
    """Resources that two scenarios would store under the same ``Type/id`` with other content.

    Several cases may share a record (the same patient with different draft orders): that is
    harmless when the shared resources are identical. Different content under one ``Type/id``
    would let the later scenario overwrite the earlier one's resource.

    Args:
        scenarios: the cases to load together (dated alike).

    Returns:
        ``{"Condition/c1": ["scenario-a", "scenario-b"]}`` for each ``Type/id`` stored with
        differing content, naming every scenario that holds it.
    """
    owners: dict[str, list[tuple[str, str]]] = {}
    for sc in scenarios:
        for res in sc.record():
            owners.setdefault(f"{res['resourceType']}/{res['id']}", []).append(
                (sc.id, json.dumps(res, sort_keys=True)))
    return {ref: [sid for sid, _ in held] for ref, held in owners.items()
            if len({content for _, content in held}) > 1}


def outcome_text(body: Any) -> str:
    """An OperationOutcome's issues as one line (or the body itself, shortened).

    Args:
        body: a decoded JSON body or text.

    Returns:
        ``"error/invalid: diagnostics (expression); ..."``.
    """
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        parts = []
        for issue in body.get("issue") or []:
            text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or ""
            where = ", ".join(issue.get("expression") or issue.get("location") or [])
            parts.append(f"{issue.get('severity')}/{issue.get('code')}: {text}"
                         + (f" ({where})" if where else ""))
        return "; ".join(parts) or "OperationOutcome without issues"
    text = body if isinstance(body, str) else json.dumps(body)
    return text[:1000]


def post_transaction(base_url: str, token: str | None, bundle: dict[str, Any],
                     session: requests.Session | None = None) -> dict[str, Any]:
    """POST a transaction Bundle to a FHIR server's base.

    Args:
        base_url: the FHIR base URL.
        token: a bearer token, or ``None``.
        bundle: the transaction.
        session: the HTTP session to use (default: a new one).

    Returns:
        The ``transaction-response`` Bundle.

    Raises:
        FixtureError: the server could not be reached, or refused (with its OperationOutcome).
    """
    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    http = session or requests.Session()
    try:
        response = http.post(base_url.rstrip("/"), data=json.dumps(bundle), headers=headers,
                             timeout=REQUEST_TIMEOUT_S)
    except requests.RequestException as exc:
        raise FixtureError(f"cannot reach the FHIR server at {base_url}: "
                           f"{type(exc).__name__}: {exc}") from None
    finally:
        if session is None:
            http.close()
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    if response.status_code >= 400:
        raise FixtureError(f"the FHIR server refused the transaction (HTTP "
                           f"{response.status_code}): {outcome_text(body)}",
                           response.status_code, body)
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise FixtureError(f"the FHIR server answered HTTP {response.status_code} without a "
                           f"Bundle: {outcome_text(body)}", response.status_code, body)
    return body


def load_into_server(base_url: str, token: str | None = None, only: Iterable[str] | None = None,
                     now: datetime | date | None = None, *, root: Path | None = None,
                     session: requests.Session | None = None) -> list[tuple[str, int]]:
    """Load scenario records into a FHIR server, one transaction per scenario.

    Each case is first moved so that its ``now`` is today (or ``now``): a probe or an EHR run
    today then sees the clinical timeline the case describes. Resources are stored with ``PUT``
    under their own ids, so loading twice yields the same data. Draft orders are not loaded.

    Args:
        base_url: the FHIR R4 base URL.
        token: a bearer token for it, or ``None``.
        only: scenario ids to load (default: all).
        now: the clock to date the cases to (default: the current time, UTC).
        root: the fixtures folder (default: :func:`default_root`).
        session: the HTTP session to use.

    Returns:
        ``(scenario id, resources stored)`` for each scenario, in id order.

    Raises:
        FixtureError: a scenario is malformed, two scenarios store different resources under one
            ``Type/id``, or the server refused a transaction (the message carries its
            OperationOutcome's text).
    """
    clock = now or datetime.now(timezone.utc)
    scenarios = [rebase(sc, clock) for sc in load_scenarios(only, root)]
    clashes = id_collisions(scenarios)
    if clashes:
        listed = "; ".join(f"{ref} in {', '.join(sorted(set(ids)))}"
                           for ref, ids in sorted(clashes.items()))
        raise FixtureError("scenarios store different resources under the same id and would "
                           f"overwrite each other: {listed}")
    http = session or requests.Session()
    loaded: list[tuple[str, int]] = []
    try:
        for scenario in scenarios:
            bundle = transaction_bundle(scenario)
            try:
                post_transaction(base_url, token, bundle, http)
            except FixtureError as exc:
                raise FixtureError(f"scenario {scenario.id}: {exc}", exc.status,
                                   exc.outcome) from None
            loaded.append((scenario.id, len(bundle["entry"])))
    finally:
        if session is None:
            http.close()
    return loaded


# -- hook requests ------------------------------------------------------------------------------
def hook_request(scenario: Scenario, prefetch_templates: Mapping[str, str],
                 hook_instance: str | None = None) -> dict[str, Any]:
    """The hook request an EHR would send for a scenario, with full prefetch.

    Each prefetch key is filled from the record by its template's resource type (a read for
    Patient, a searchset Bundle otherwise); keys the scenario names ``unavailable`` are left out.

    Args:
        scenario: the case.
        prefetch_templates: the service's discovery templates (key -> template).
        hook_instance: the hookInstance (default: a fresh uuid4).

    Returns:
        A CDS Hooks 2.0 request body.
    """
    from lbp_cds.fhir_data import template_type

    prefetch: dict[str, Any] = {}
    for key, template in prefetch_templates.items():
        if key in scenario.unavailable:
            continue
        rtype = template_type(template)
        if rtype == "Patient":
            prefetch[key] = scenario.patient
        else:
            prefetch[key] = {"resourceType": "Bundle", "type": "searchset", "entry": [
                {"resource": r} for r in scenario.resources if r.get("resourceType") == rtype]}
    context: dict[str, Any] = {"userId": "Practitioner/example", "patientId": scenario.patient_id}
    if scenario.hook in ("order-select", "order-sign"):
        context["draftOrders"] = {"resourceType": "Bundle", "type": "collection",
                                  "entry": [{"resource": d} for d in scenario.draft_orders]}
    if scenario.hook == "order-select":
        context["selections"] = scenario.selections or [
            f"{d['resourceType']}/{d['id']}" for d in scenario.draft_orders]
    return {"hook": scenario.hook, "hookInstance": hook_instance or str(uuid.uuid4()),
            "context": context, "prefetch": prefetch}
