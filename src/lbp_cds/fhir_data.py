"""One patient's FHIR data: from the request's prefetch first, else from the EHR's FHIR server.

This is the only module that talks to a FHIR server or parses FHIR. Raw resources are indexed by
code when the record is built; a resource is parsed with ``fhir.resources.R4B`` once, the first
time a rule could use it (a record of thousands of resources costs only what the rules touch).

Reading is lenient, and only after strict parsing failed (a valid resource costs what it always
did). Known client bends are repaired (a single object where FHIR wants an array; a DSTU2/STU3
Condition's ``patient``, string statuses and ``dateRecorded``), then elements that still fail are
left out, by pydantic's error locations, and the rest is read (``read_leniently``). A resource
that cannot be read even so is *unreadable*, counted per type. Neither is silent: every resource
handed to a fact with a flaw (unreadable, or read without an element a fact reads) is logged in
``PatientRecord.misses``, and the fact's answer then says so (``facts.evaluate_fact``): an absent
becomes unknown, and the card lists it under "Could not be checked". Resources that name another
patient are left out and make their type unavailable, with the reason.

Prefetch semantics (CDS Hooks 2.0 §Prefetch): a key sent as ``null`` means "no data"; a missing
key or one holding an OperationOutcome is fetched from ``fhirServer`` with the bearer token from
``fhirAuthorization``. Fetches run in parallel under one deadline and follow ``next`` links within
a page budget. The access token is never logged. Where a fetch may go is ``egress.py``'s
decision: the ``fhirServer`` is approved (URL, then resolved addresses) before the first
request, and every connection goes to the approved address.
"""

from __future__ import annotations

import copy
import functools
import logging
import re
import socket
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import orjson
import requests
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from lbp_cds import egress
from lbp_cds.egress import Approved, EgressRule, Unresolvable
from lbp_cds.errors import Issue, PreconditionFailed
from lbp_cds.hooks import HookRequest
from lbp_cds.knowledge import ICD10CM, CodeUniverse, Service, ValueSet, normalize_code
from lbp_cds.rawfhir import CODE_PATHS, DATE_PATHS, PATIENT_REFERENCE_FIELDS, LazyResource

log = logging.getLogger(__name__)

# What rules read of the Patient (facts ``age`` and ``sex``), and the extensions kept with it.
SEX_EXTENSION = "http://hl7.org/fhir/StructureDefinition/patient-sexParameterForClinicalUse"
PATIENT_ELEMENTS = frozenset({"resourceType", "id", "birthDate", "gender", "extension"})
PATIENT_EXTENSIONS = frozenset({SEX_EXTENSION})

TEMPLATE_TYPE = re.compile(r"^([A-Z][A-Za-z]+)[/?]")


@dataclass
class KeyStatus:
    """What became of one prefetch key."""

    key: str
    resource_type: str
    state: str  # prefetched | fetched | null | unavailable
    reason: str = ""
    code: str = "not-found"  # the FHIR issue type of a 412 naming this key
    count: int = 0
    pages: int = 0
    seconds: float = 0.0


@dataclass
class FetchPolicy:
    """Limits on fetching from the EHR's FHIR server."""

    connect_timeout: float = 2.0
    read_timeout: float = 3.0
    deadline: float = 4.0
    max_pages: int = 50
    page_size: int = 500
    max_resources: int = 20000
    max_response_bytes: int = 20_000_000
    parallelism: int = 8
    allow_http: bool = True


class PatientRecord:
    """One patient's data, as the rules see it.

    Args:
        patient_id: the patient in context.
        resources: raw resources by type: dicts, or prefetch resources still in JSON text
            (``rawfhir.LazyResource``), decoded the first time a rule is handed them.
        unavailable: resource types that could not be obtained, with the reason.
        draft_orders: raw draft orders of the hook context (order-select / order-sign).
        statuses: what became of each prefetch key (for logs, metrics and tests).
        universe: the codes the knowledge can ask for (others are not indexed); None indexes all.

    What could not be read is kept per type: ``parse_failures`` (unreadable resources),
    ``dropped`` (elements left out of resources read leniently), ``repaired`` (resources read after
    a repair) and ``other_patient`` (resources left out because they name another patient).
    ``misses`` logs each flawed resource handed to a fact (``Flaw``), for the fact to report.
    """

    def __init__(
        self,
        patient_id: str,
        resources: dict[str, list[Any]],
        unavailable: dict[str, str] | None = None,
        draft_orders: list[dict[str, Any]] | None = None,
        statuses: list[KeyStatus] | None = None,
        universe: CodeUniverse | None = None,
    ) -> None:
        self.patient_id = patient_id
        self._raw = resources
        self.unavailable = dict(unavailable or {})
        self.statuses = statuses or []
        self.parse_failures: Counter[str] = Counter()  # unreadable, per type
        self.dropped: dict[str, Counter[str]] = {}  # type -> element left out -> resources
        self.repaired: Counter[str] = Counter()
        self.other_patient: Counter[str] = Counter()
        self.misses: list[Flaw] = []
        self._flaws: dict[int, Flaw] = {}  # by id() of the raw resource, like _parsed
        self._parsed: dict[int, Any] = {}
        self._code_index: dict[str, dict[tuple[str, str], list[int]]] = {}
        self._vs_cache: dict[tuple[str, str], _Hits] = {}
        self._draft_raw = list(draft_orders or [])
        self._dates: dict[str, list[Any]] = {}  # by type, by position; _UNDATED until read
        self._patient: Any = _UNDATED
        self._patient_key = 0
        self._sources: list[dict[str, Any]] = []
        exact = universe.exact if universe is not None else None
        prefixed = universe.prefixed_systems if universe is not None else frozenset()
        for rtype, items in resources.items():
            index: dict[tuple[str, str], list[int]] = {}
            for pos, item in enumerate(items):
                found = item.codings(rtype) if type(item) is LazyResource \
                    else _raw_codings(rtype, item)
                for system, code in found:
                    if system == ICD10CM:
                        code = normalize_code(system, code)
                    # Only codes some value set holds: no fact can ask for the others.
                    if exact is not None and system not in prefixed and \
                            code not in exact.get(system, ()):
                        continue
                    where = index.get((system, code))
                    if where is None:
                        index[(system, code)] = [pos]
                    elif where[-1] != pos:
                        where.append(pos)
            self._code_index[rtype] = index

    # -- availability -------------------------------------------------------------------------
    def available(self, resource_type: str) -> bool:
        """Tell whether data of that type were obtained (possibly none: that is still data)."""
        return resource_type not in self.unavailable

    def missing_reason(self, resource_type: str) -> str:
        """Why data of that type are not available ('' when they are)."""
        return self.unavailable.get(resource_type, "")

    def count(self, resource_type: str) -> int:
        """Number of raw resources of that type."""
        return len(self._raw.get(resource_type, ()))

    @property
    def total(self) -> int:
        """Number of raw resources in the record."""
        return sum(len(v) for v in self._raw.values())

    # -- access -------------------------------------------------------------------------------
    @property
    def patient(self) -> Any | None:
        """The Patient, parsed, with only the elements rules read (``PATIENT_ELEMENTS``); or None.

        An EHR's Patient carries names, addresses, identifiers and a dozen extensions (race,
        ethnicity, birthplace...) that no rule reads and that cost fhir.resources most of a
        millisecond to validate on every call. The projection is validated as a Patient; an
        invalid element outside it no longer makes age and sex unknown.
        """
        if self._patient is not _UNDATED:
            if self._flaws and self._patient_key in self._flaws:
                self.misses.append(self._flaws[self._patient_key])
            return self._patient
        self._patient = None
        for pos in range(self.count("Patient")):
            raw = self._item("Patient", pos)
            if type(raw) is not dict:
                continue
            projection = {k: v for k, v in raw.items() if k in PATIENT_ELEMENTS}
            if isinstance(projection.get("extension"), list):
                projection["extension"] = [
                    e for e in projection["extension"]
                    if not isinstance(e, dict) or e.get("url") in PATIENT_EXTENSIONS]
            self._sources.append(projection)  # _parse_one caches by id(): keep it alive
            self._patient_key = id(projection)
            self._patient = self._parse_one("Patient", pos, projection)
            if self._patient is not None:
                break
        return self._patient

    def all(self, resource_type: str) -> list[Any]:
        """Every parsable resource of a type."""
        return self._parse_many(resource_type, range(self.count(resource_type)))

    def coded(self, resource_type: str, valueset: ValueSet, since: datetime | None = None
              ) -> list[Any]:
        """Resources of a type carrying a code of the value set (in any coded element).

        Args:
            resource_type: e.g. ``Condition``.
            valueset: the value set to match.
            since: when given, drop resources whose date is known and earlier (before parsing).

        Returns:
            Parsed resources, in record order; those that failed to parse are counted and skipped.
        """
        return self._parse_many(resource_type,
                                [pos for pos, _raw in self.coded_raw(resource_type, valueset,
                                                                     since)])

    def coded_raw(self, resource_type: str, valueset: ValueSet, since: datetime | None = None
                  ) -> list[tuple[int, dict[str, Any]]]:
        """Like ``coded`` but unparsed: (position, raw resource) pairs, for cheap screening.

        A fact may screen raw values (a temperature above a threshold) and must then parse,
        with ``parse``, every resource it uses as evidence.
        """
        key = (resource_type, valueset.id)
        hits = self._vs_cache.get(key)
        if hits is None:
            where: set[int] = set()
            for (system, code), positions in self._code_index.get(resource_type, {}).items():
                if valueset.contains(system, code):
                    where.update(positions)
            hits = self._vs_cache[key] = _Hits(self, resource_type, sorted(where))
        item = self._item
        return [(p, item(resource_type, p)) for p in hits.since(since)]

    def raw_all(self, resource_type: str) -> list[tuple[int, dict[str, Any]]]:
        """Every raw resource of a type with its position (for screening before parsing)."""
        return [(p, self._item(resource_type, p)) for p in range(self.count(resource_type))]

    def raw_date(self, resource_type: str, pos: int) -> datetime | None:
        """The date of a raw resource (cached)."""
        dates = self._dates.get(resource_type)
        if dates is None:
            dates = self._dates[resource_type] = [_UNDATED] * self.count(resource_type)
        when = dates[pos]
        if when is _UNDATED:
            item = self._raw[resource_type][pos]
            when = dates[pos] = item.first_date(resource_type, parse_datetime) \
                if type(item) is LazyResource else raw_date(resource_type, item)
        return when  # type: ignore[no-any-return]

    def _item(self, resource_type: str, pos: int) -> dict[str, Any]:
        """The raw resource at a position, decoded (once) if it is still JSON text."""
        items = self._raw[resource_type]
        item = items[pos]
        if type(item) is LazyResource:
            item = items[pos] = item.decode()
        return item  # type: ignore[no-any-return]

    def parse(self, resource_type: str, pos: int) -> Any | None:
        """The parsed resource at a position (None, counted, when it is not valid FHIR R4)."""
        return self._parse_one(resource_type, pos, self._item(resource_type, pos))

    def draft_orders(self) -> list[Any]:
        """The draft orders of the hook context, parsed (unparsable ones counted and skipped)."""
        out = []
        for pos, raw in enumerate(self._draft_raw):
            model = self._parse_one("draft", pos, raw)
            if model is not None:
                out.append(model)
        return out

    def by_reference(self, reference: str) -> Any | None:
        """Resolve a relative or absolute reference (``Condition/12``) within the record."""
        parts = reference.rstrip("/").split("/")
        if len(parts) < 2:
            return None
        rtype, rid = parts[-2], parts[-1]
        for pos, item in enumerate(self._raw.get(rtype, [])):
            if (item.id if type(item) is LazyResource else item.get("id")) == rid:
                return self._parse_one(rtype, pos, self._item(rtype, pos))
        return None

    def _parse_many(self, resource_type: str, positions: Iterable[int]) -> list[Any]:
        out = []
        for pos in positions:
            model = self._parse_one(resource_type, pos, self._item(resource_type, pos))
            if model is not None:
                out.append(model)
        return out

    def _parse_one(self, bucket: str, pos: int, raw: dict[str, Any]) -> Any | None:
        key = id(raw)
        if key in self._parsed:
            if self._flaws and key in self._flaws:
                self.misses.append(self._flaws[key])
            return self._parsed[key]
        model: Any | None
        try:
            model = get_fhir_model_class(raw["resourceType"]).model_validate(raw)
        except (ValidationError, KeyError, ValueError, TypeError, RecursionError) as exc:
            model = self._read_leniently(bucket, key, raw, exc)
        self._parsed[key] = model
        return model

    def _read_leniently(self, bucket: str, key: int, raw: dict[str, Any], exc: Exception
                        ) -> Any | None:
        """The resource read leniently (or None, unreadable), its flaws counted and logged."""
        rtype = raw.get("resourceType") if type(raw) is dict else None
        name = rtype if isinstance(rtype, str) else bucket
        reading = read_leniently(raw, exc) if isinstance(exc, ValidationError) \
            and type(raw) is dict else Reading(None)
        noun = f"draft {name}" if bucket == "draft" else name
        if reading.model is None:
            self.parse_failures[name] += 1
            flaw = self._flaws[key] = Flaw(noun)
            self.misses.append(flaw)
            return None
        if reading.repaired:
            self.repaired[name] += 1
        if reading.dropped:
            counts = self.dropped.setdefault(name, Counter())
            counts.update(reading.dropped)
            lost = tuple(e for e in reading.dropped if e in READ_ELEMENTS.get(name, ()))
            if lost:
                flaw = self._flaws[key] = Flaw(noun, lost)
                self.misses.append(flaw)
        return reading.model

    def readable(self, resource_type: str) -> bool:
        """Tell whether at least one resource of the type can be read (True when there is none).

        Stops at the first that can: on a sound record, that costs one parse, reused later.
        """
        if resource_type == "Patient":
            return self.count("Patient") == 0 or self.patient is not None
        return not self.count(resource_type) or any(
            self.parse(resource_type, pos) is not None for pos in range(self.count(resource_type)))


_UNDATED = object()


class _Hits:
    """The positions of a type's resources in one value set, and the same by date.

    A long series (years of temperatures) is asked for with many windows; the window's start
    is found by bisection rather than by comparing every date.
    """

    __slots__ = ("dated", "positions", "undated", "whens")

    def __init__(self, record: PatientRecord, resource_type: str, positions: list[int]) -> None:
        self.positions = positions  # record order
        by_date = []
        self.undated: list[int] = []
        for pos in positions:
            when = record.raw_date(resource_type, pos)
            if when is None:
                self.undated.append(pos)
            else:
                by_date.append((when, pos))
        by_date.sort()
        self.whens: list[datetime] = [when for when, _pos in by_date]
        self.dated: list[int] = [pos for _when, pos in by_date]

    def since(self, since: datetime | None) -> list[int]:
        """Positions, in record order, dated ``since`` or later, or undated (all if None)."""
        start = 0 if since is None else bisect_left(self.whens, since)
        if start == 0:
            return self.positions
        return sorted(self.undated + self.dated[start:])


def _raw_codings(resource_type: str, raw: dict[str, Any]) -> list[tuple[str, str]]:
    """(system, code) of every coding where the type carries the codes rules match on.

    Written for speed (it runs over every resource of the record): plain loops, no generators.
    """
    out: list[tuple[str, str]] = []
    for path in CODE_PATHS.get(resource_type, ()):
        node = raw.get(path[0])
        if node is None:
            continue
        if len(path) == 2:
            concepts = [c.get(path[1]) for c in node if type(c) is dict] \
                if type(node) is list else []
        else:
            concepts = node if type(node) is list else [node]
        for cc in concepts:
            if type(cc) is not dict:
                continue
            codings = cc.get("coding")
            if type(codings) is dict:
                codings = [codings]  # one coding sent as an object: read leniently too
            elif type(codings) is not list:
                continue
            for coding in codings:
                if type(coding) is dict:
                    system, code = coding.get("system"), coding.get("code")
                    if type(system) is str and type(code) is str:
                        out.append((system, code))
    return out


def raw_date(resource_type: str, raw: dict[str, Any]) -> datetime | None:
    """The first date of the resource's date paths, as an aware datetime (None if absent/bad)."""
    texts = []
    for path in DATE_PATHS.get(resource_type, ()):
        node: Any = raw
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, str):
            texts.append(node)
    return _first_date(texts)


def _first_date(texts: list[str]) -> datetime | None:
    for text in texts:
        parsed = parse_datetime(text)
        if parsed is not None:
            return parsed
    return None


def parse_datetime(text: str) -> datetime | None:
    """Parse a FHIR date or dateTime (partial dates to their first instant, UTC if no zone)."""
    try:
        if len(text) == 4:
            text = f"{text}-01-01"
        elif len(text) == 7:
            text = f"{text}-01"
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


# -- reading leniently --------------------------------------------------------------------------
# The elements facts read, per type. A resource read without one of them (it had to be left out)
# is reported by the facts handed it; other elements are left out quietly (counted for the logs).
READ_ELEMENTS: dict[str, frozenset[str]] = {
    "Patient": frozenset({"birthDate", "gender", "extension"}),
    "Condition": frozenset({
        "code", "clinicalStatus", "verificationStatus", "category", "onsetDateTime",
        "onsetPeriod", "onsetAge", "onsetString", "recordedDate", "abatementDateTime",
        "abatementPeriod", "abatementAge", "abatementRange", "abatementString"}),
    "Observation": frozenset({
        "code", "status", "valueQuantity", "valueCodeableConcept", "valueBoolean",
        "valueString", "component", "interpretation", "referenceRange", "effectiveDateTime",
        "effectiveInstant", "effectivePeriod", "issued"}),
    "MedicationRequest": frozenset({
        "status", "medicationCodeableConcept", "authoredOn", "dispenseRequest",
        "dosageInstruction", "reasonCode", "reasonReference"}),
    "Procedure": frozenset({"code", "status", "performedDateTime", "performedPeriod"}),
    "ServiceRequest": frozenset({"code", "status", "authoredOn", "occurrenceDateTime",
                                 "reasonCode", "reasonReference"}),
    "ImagingStudy": frozenset({"procedureCode", "started"}),
    "DiagnosticReport": frozenset({"code", "status", "effectiveDateTime", "effectivePeriod",
                                   "issued"}),
    "QuestionnaireResponse": frozenset({"questionnaire", "status", "authored", "item"}),
}
# Never left out: without them the rest means something else (a modifier extension, the rules
# the resource was written under) or there is nothing left to match on (the coded elements the
# record indexes, ``CODE_PATHS``). A resource that cannot be read with them is unreadable.
KEPT_ELEMENTS = frozenset({"resourceType", "modifierExtension", "implicitRules"})
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VER_STATUS = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
# DSTU2 and STU3 status codes as R4 codes (STU3's 'unknown' verification became 'unconfirmed').
_CLINICAL_CODES = {c: c for c in ("active", "recurrence", "relapse", "inactive", "remission",
                                  "resolved")}
_VERIFICATION_CODES = {c: c for c in ("unconfirmed", "provisional", "differential", "confirmed",
                                      "refuted", "entered-in-error")} | {"unknown": "unconfirmed"}
# Elements renamed since DSTU2 / STU3: old name -> R4 name, per type.
_RENAMED: dict[str, dict[str, str]] = {
    "Condition": {"patient": "subject", "dateRecorded": "recordedDate",
                  "assertedDate": "recordedDate", "context": "encounter"},
    "MedicationRequest": {"context": "encounter"},
    "Procedure": {"context": "encounter"},
    "ServiceRequest": {"context": "encounter"},
}
# Elements a client may send as a bare "Type/id" string rather than a Reference.
_REFERENCE_ELEMENTS = frozenset({"subject", "patient", "encounter", "asserter", "recorder",
                                 "requester"})
_MISSING_ERRORS = frozenset({"missing", "model_field_validation.missing"})
# How an element R4 does not define is counted: its name is the caller's text, which must not
# reach logs or metrics (it could be anything, a patient's name included).
NOT_R4 = "(not an R4 element)"
_ROUNDS = 4


class Flaw(NamedTuple):
    """A resource handed to a fact that could not be read as sent.

    ``noun`` names it for a card ("Condition", "draft MedicationRequest"); ``lost`` holds the
    elements facts read that had to be left out; empty when the resource could not be read at all.
    """

    noun: str
    lost: tuple[str, ...] = ()

    @property
    def unreadable(self) -> bool:
        return not self.lost


class Reading(NamedTuple):
    """What lenient reading made of a resource: the model (None: unreadable), the top-level
    elements left out, and those repaired."""

    model: Any | None
    dropped: tuple[str, ...] = ()
    repaired: tuple[str, ...] = ()


def read_leniently(raw: dict[str, Any], error: ValidationError) -> Reading:
    """Read a resource that failed strict validation, as much of it as can be read.

    Each round takes the errors' locations: a known bend at that element is repaired (an object
    where FHIR wants an array is wrapped; a DSTU2/STU3 element is renamed or recoded), anything
    else that fails is left out, and the rest is validated again. Called only after strict
    parsing failed, so valid resources never pay for it.

    Args:
        raw: the resource as sent (not changed: repairs are made on a copy).
        error: the strict validation's error.

    Returns:
        The reading; its model is None when the resource cannot be read (an error without a
        location, a required element missing, or one of ``KEPT_ELEMENTS`` or the type's coded
        elements failing).
    """
    rtype = raw.get("resourceType")
    if not isinstance(rtype, str):
        return Reading(None)
    try:
        cls = get_fhir_model_class(rtype)
    except (KeyError, ValueError, TypeError):
        return Reading(None)  # another FHIR version's type (DSTU2 MedicationOrder...)
    kept = KEPT_ELEMENTS | {path[0] for path in CODE_PATHS.get(rtype, ())}
    doc = dict(raw)
    dropped: list[str] = []
    repaired: list[str] = []
    errors = error.errors()
    for _round in range(_ROUNDS):
        # Renames first: a renamed element fills what another error calls missing.
        errors.sort(key=lambda e: e.get("type") != "extra_forbidden")
        changed = False
        for err in errors:
            loc = tuple(err.get("loc") or ())
            name = loc[0] if loc else None
            if not isinstance(name, str):
                return Reading(None)  # a whole-resource error (choice types...): nothing to drop
            if err.get("type") in _MISSING_ERRORS:
                if name in doc:
                    continue  # filled by a rename of this round
                return Reading(None)
            if name not in doc:
                continue  # left out or renamed earlier this round
            if _repair(rtype, doc, name, loc, err):
                repaired.append(name)
            elif name in kept:
                return Reading(None)
            else:
                del doc[name]
                dropped.append(name if name in _element_names(cls) else NOT_R4)
            changed = True
        if not changed:
            return Reading(None)
        try:
            return Reading(cls.model_validate(doc), tuple(dict.fromkeys(dropped)),
                           tuple(dict.fromkeys(repaired)))
        except ValidationError as exc:
            errors = exc.errors()
        except (KeyError, ValueError, TypeError, RecursionError):
            return Reading(None)
    return Reading(None)


def _repair(rtype: str, doc: dict[str, Any], name: str, loc: tuple[Any, ...],
            err: Any) -> bool:
    """Repair a known bend at ``doc[name]`` in place (on a copy of the element); True if done."""
    value = doc[name]
    target = _RENAMED.get(rtype, {}).get(name)
    if err.get("type") == "extra_forbidden" and target is not None:
        del doc[name]
        if target not in doc:
            doc[target] = value
        return True
    if rtype == "Condition" and name in ("clinicalStatus", "verificationStatus") \
            and isinstance(value, str):
        table, system = (_CLINICAL_CODES, CONDITION_CLINICAL) if name == "clinicalStatus" \
            else (_VERIFICATION_CODES, CONDITION_VER_STATUS)
        code = table.get(value.strip().lower())
        if code is None:
            return False
        doc[name] = {"coding": [{"system": system, "code": code}]}
        return True
    if rtype == "Condition" and name == "abatementBoolean" and isinstance(value, bool):
        # DSTU2: true means the condition abated (R4 says so with any abatement[x]).
        del doc[name]
        if value and not any(k.startswith("abatement") for k in doc):
            doc["abatementString"] = "abated"
        return True
    if name in _REFERENCE_ELEMENTS and isinstance(value, str) and "/" in value:
        doc[name] = {"reference": value}
        return True
    if err.get("type") == "list_type":
        # An object where FHIR wants an array, at any depth: wrap it.
        element = copy.deepcopy(value)
        holder: Any = {name: element}
        node: Any = holder
        for part in loc[:-1]:
            node = node[part] if isinstance(node, dict | list) and _has(node, part) else None
        last = loc[-1]
        if node is None or not _has(node, last) or not isinstance(node[last], dict):
            return False
        node[last] = [node[last]]
        doc[name] = holder[name]
        return True
    return False


@functools.lru_cache(maxsize=None)
def _element_names(cls: Any) -> frozenset[str]:
    """The JSON names of a model's elements (``status``, ``_status``...)."""
    return frozenset(f.alias or n for n, f in cls.model_fields.items()) | frozenset(
        cls.model_fields)


def _has(node: Any, part: Any) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)


# -- building the record ----------------------------------------------------------------------
def template_type(template: str) -> str:
    """The resource type a prefetch template asks for (``Condition?patient=..`` -> Condition)."""
    match = TEMPLATE_TYPE.match(template)
    return match.group(1) if match else ""


def resolve_template(template: str, request: HookRequest) -> str | None:
    """Fill a prefetch template's tokens from the request; None if a token has no value."""
    values: dict[str, str | None] = {
        "context.patientId": request.patient_id,
        "context.encounterId": request.encounter_id,
        "context.userId": request.user_id,
    }
    user = request.user_id or ""
    for kind in ("Practitioner", "PractitionerRole", "Patient", "RelatedPerson"):
        values[f"user{kind}Id"] = user.split("/", 1)[1] if user.startswith(kind + "/") else None
    missing = False

    def fill(match: re.Match[str]) -> str:
        nonlocal missing
        value = values.get(match.group(1).strip())
        if not value:
            missing = True
            return ""
        return value

    url = re.sub(r"\{\{\s*([^}]+?)\s*\}\}", fill, template)
    return None if missing else url


class FhirFetcher:
    """Fetches what prefetch did not bring, from the EHR's FHIR server.

    Args:
        session: the ``requests.Session`` of the fetches; ``None``: ``egress.pinned_session``,
            the only one that holds connections to the approved address (tests pass their own
            transport).
        policy: timeouts, deadline and budgets.
        executor: the thread pool the fetches run on.
        resolver: resolves the FHIR server's host name for the egress check
            (``socket.getaddrinfo``'s signature; tests map names to the addresses they need).
    """

    def __init__(self, session: requests.Session | None, policy: FetchPolicy,
                 executor: ThreadPoolExecutor | None = None, *,
                 resolver: egress.Resolver = socket.getaddrinfo) -> None:
        self.session = session or egress.pinned_session(policy.parallelism)
        self.policy = policy
        self.resolver = resolver
        self.executor = executor or ThreadPoolExecutor(
            max_workers=policy.parallelism, thread_name_prefix="fhir-fetch")

    def approve(self, base: str, rule: EgressRule) -> Approved:
        """Check the FHIR server for this caller and pick the address to connect to.

        Raises:
            FhirServerRefused: the URL or an address is refused (400).
            Unresolvable: the host name did not resolve.
        """
        return egress.approve(base, rule, self.resolver)

    def fetch_all(self, base: str, token: str | None, urls: dict[str, tuple[str, str]],
                  deadline: float, approved: Approved
                  ) -> dict[str, tuple[list[dict[str, Any]] | None, KeyStatus]]:
        """Fetch several prefetch keys in parallel under one deadline (a ``time.monotonic``).

        Args:
            base: the FHIR server's base URL.
            token: the bearer token, or None.
            urls: for each key, the (relative or absolute) URL and the resource type expected.
            deadline: a ``time.monotonic()`` instant after which nothing more is awaited.
            approved: ``approve(base, ...)``: every request goes to its address and stays on
                its origin and paths.

        Returns:
            For each key: the resources (None when unobtainable) and its status.
        """
        futures: dict[Future[tuple[list[dict[str, Any]], int]], str] = {}
        started = time.monotonic()
        for key, (url, rtype) in urls.items():
            futures[self.executor.submit(self._fetch_key, base, token, url, rtype,
                                         deadline, approved)] = key
        results: dict[str, tuple[list[dict[str, Any]] | None, KeyStatus]] = {}
        pending = set(futures)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            done, pending = wait(pending, timeout=remaining, return_when=FIRST_COMPLETED)
            for fut in done:
                key = futures[fut]
                rtype = urls[key][1]
                try:
                    resources, pages = fut.result()
                    results[key] = (resources, KeyStatus(
                        key, rtype, "fetched", count=len(resources), pages=pages,
                        seconds=time.monotonic() - started))
                except Incomplete as exc:
                    results[key] = (exc.resources, KeyStatus(
                        key, rtype, "unavailable", reason=str(exc), count=len(exc.resources),
                        seconds=time.monotonic() - started))
                except FetchError as exc:
                    results[key] = (None, KeyStatus(key, rtype, "unavailable", reason=str(exc),
                                                    code=exc.code,
                                                    seconds=time.monotonic() - started))
        for fut in pending:
            fut.cancel()
            key = futures[fut]
            results[key] = (None, KeyStatus(key, urls[key][1], "unavailable",
                                            reason="the FHIR server did not answer in time",
                                            seconds=time.monotonic() - started))
        return results

    def _fetch_key(self, base: str, token: str | None, url: str, rtype: str, deadline: float,
                   approved: Approved) -> tuple[list[dict[str, Any]], int]:
        target = urljoin(base.rstrip("/") + "/", url)
        resources: list[dict[str, Any]] = []
        pages = 0
        retried = False
        while target:
            if pages >= self.policy.max_pages:
                raise Incomplete(resources, f"more than {self.policy.max_pages} pages")
            doc = self._get(target, token, deadline, approved)
            pages += 1
            rt = doc.get("resourceType")
            if rt == "OperationOutcome":
                raise FetchError("the FHIR server answered with an OperationOutcome")
            if rt == "Bundle":
                resources.extend(_matches(doc, rtype))
                if len(resources) > self.policy.max_resources:
                    raise FetchError(f"more than {self.policy.max_resources} resources")
                target = _next_link(doc, base)
                total = doc.get("total")
                if not target and type(total) is int and total > len(resources):
                    # A server that cuts a search short without a `next` link (some ignore
                    # paging): ask once for everything, else the rest is unknown, not absent.
                    if pages == 1 and not retried and total <= self.policy.max_resources:
                        retried, pages, resources = True, 0, []
                        target = _with_count(urljoin(base.rstrip("/") + "/", url), total)
                        continue
                    raise Incomplete(resources, f"the FHIR server returned {len(resources)} of "
                                     f"{total} resources and no link to the rest")
            elif rt == rtype:
                resources.append(doc)
                target = ""
            else:
                raise FetchError(f"expected {rtype} or Bundle, got {rt!r}")
        return resources, pages

    def _get(self, url: str, token: str | None, deadline: float, approved: Approved
             ) -> dict[str, Any]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError("the deadline passed")
        try:
            approved.check(url)  # a next link (ours or the prefetch's) stays where approved
        except ValueError as exc:
            raise FetchError(f"not fetched: {exc}") from None
        headers = {"Accept": "application/fhir+json, application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        timeout = (min(self.policy.connect_timeout, remaining),
                   min(self.policy.read_timeout, remaining))
        prepared = self.session.prepare_request(requests.Request("GET", url, headers=headers))
        prepared.lbp_egress = approved  # type: ignore[attr-defined]  # read by PinnedAdapter
        try:
            with self.session.send(prepared, timeout=timeout, stream=True, proxies={},
                                   allow_redirects=False) as resp:
                if resp.status_code != 200:
                    raise _status_error(resp.status_code, token)
                body = bytearray()
                for chunk in resp.iter_content(65536):
                    body.extend(chunk)
                    if len(body) > self.policy.max_response_bytes:
                        raise FetchError("the FHIR response was larger than allowed")
                    if time.monotonic() > deadline:
                        raise FetchError("the deadline passed while reading")
        except requests.RequestException as exc:
            raise FetchError(f"the FHIR server could not be reached ({type(exc).__name__})"
                             ) from None
        try:
            doc = orjson.loads(bytes(body))
        except orjson.JSONDecodeError:
            raise FetchError("the FHIR server sent something that is not JSON") from None
        if not isinstance(doc, dict):
            raise FetchError("the FHIR server sent JSON that is not a resource")
        return doc


def _status_error(status: int, token: str | None) -> FetchError:
    """The FetchError of a non-200 answer, saying what an integrator can act on."""
    if status in (401, 403):
        if not token:
            return FetchError(f"the FHIR server answered HTTP {status}: no access token was "
                              "sent (the request has no fhirAuthorization)", code="security")
        return FetchError(f"the FHIR server answered HTTP {status}: it refused the access "
                          "token of fhirAuthorization (expired, or its scope does not cover "
                          "this search)", code="security")
    if 300 <= status < 400:
        return FetchError(f"the FHIR server answered HTTP {status} (a redirect, which is not "
                          "followed: give the final URL as fhirServer)")
    return FetchError(f"the FHIR server answered HTTP {status}")


class FetchError(Exception):
    """A prefetch key could not be fetched; the message says why (never with the token).

    Args:
        message: why.
        code: the FHIR issue type a 412 about this key carries.
    """

    def __init__(self, message: str, code: str = "not-found") -> None:
        super().__init__(message)
        self.code = code


class Incomplete(FetchError):
    """Only part of a search came back: what came is evidence of presence, not of absence."""

    def __init__(self, resources: list[dict[str, Any]], message: str) -> None:
        super().__init__(message)
        self.resources = resources


def _matches(bundle: dict[str, Any], rtype: str) -> list[Any]:
    """The searched-for resources of a Bundle (not included ones, not outcome entries).

    Entries are dicts, or ``LazyResource`` when the Bundle came split from a hook request.
    """
    out: list[Any] = []
    for e in as_list(bundle.get("entry")):
        if type(e) is LazyResource:
            if e.resourceType == rtype and e.search_mode != "outcome":
                out.append(e)
        elif (isinstance(e, dict) and isinstance(e.get("resource"), dict)
              and e["resource"].get("resourceType") == rtype and _search_mode(e) != "outcome"):
            out.append(e["resource"])
    return out


def _with_count(url: str, count: int) -> str:
    """The URL with its `_count` parameter set to ``count``."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "_count"]
    query.append(("_count", str(count)))
    return urlunsplit(parts._replace(query=urlencode(query, safe="|:,/")))


def as_list(value: Any) -> list[Any]:
    """``value`` if it is a JSON array, else ``[]`` (a malformed Bundle must not raise)."""
    return value if isinstance(value, list) else []


def _search_mode(entry: Any) -> Any:
    search = entry.get("search") if isinstance(entry, dict) else None
    return search.get("mode") if isinstance(search, dict) else None


def _next_link(bundle: dict[str, Any], base: str) -> str:
    for link in as_list(bundle.get("link")):
        if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
            url = str(link["url"])
            # Follow only links on the FHIR server we were given: the token must not leave it.
            if urlsplit(urljoin(base, url)).netloc == urlsplit(base).netloc:
                return urljoin(base.rstrip("/") + "/", url)
            raise FetchError("a next link pointed away from the FHIR server")
    return ""


def load_record(request: HookRequest, service: Service, fetcher: FhirFetcher | None,
                policy: FetchPolicy, universe: CodeUniverse | None = None, *,
                egress: EgressRule | None = None) -> PatientRecord:
    """Assemble the patient's record for a hook call.

    Args:
        request: the validated hook request.
        service: the service being called (its prefetch templates and required keys).
        fetcher: fetches missing keys; None disables fetching.
        policy: limits (deadline, budgets).
        universe: the codes the knowledge can ask for (see ``PatientRecord``).
        egress: where the caller may make us fetch (``EgressRule.dev()`` in dev mode, the
            client's rule otherwise); None disables fetching.

    Returns:
        The record, with each key's status.

    Raises:
        PreconditionFailed: a required key could be neither prefetched nor fetched (412).
        FhirServerRefused: a fetch was needed and the ``fhirServer`` is refused for this
            caller (400), before any connection.
    """
    resources: dict[str, list[dict[str, Any]]] = {}
    statuses: list[KeyStatus] = []
    to_fetch: dict[str, tuple[str, str]] = {}
    patient_id = request.patient_id or ""
    can_fetch = not _cannot_fetch(request, fetcher, policy, egress)
    others: Counter[str] = Counter()  # by type: resources naming another patient
    others_by_key: Counter[str] = Counter()
    kept_by_key: Counter[str] = Counter()

    def same_patient(key: str, items: list[Any]) -> list[Any]:
        before = sum(others.values())
        kept = _same_patient(items, patient_id, others)
        others_by_key[key] += sum(others.values()) - before
        kept_by_key[key] += len(kept)
        return kept

    for key, template in service.prefetch.items():
        rtype = template_type(template)
        value = request.prefetch.get(key, _MISSING)
        if value is None:
            statuses.append(KeyStatus(key, rtype, "null"))
            resources.setdefault(rtype, [])
            continue
        usable, next_url, short = _from_prefetch(value, rtype)
        if usable is not None and short:
            if can_fetch:
                usable = None  # fetch the whole key ourselves rather than trust a cut-off list
            else:
                kept = same_patient(key, usable)
                resources.setdefault(rtype, []).extend(kept)
                statuses.append(KeyStatus(key, rtype, "unavailable", reason=short,
                                          count=len(kept)))
                continue
        if usable is not None and not next_url:
            kept = same_patient(key, usable)
            resources.setdefault(rtype, []).extend(kept)
            statuses.append(KeyStatus(key, rtype, "prefetched", count=len(kept)))
            continue
        if usable is not None and next_url:
            # The EHR paged its prefetch: take what came, fetch the rest from the next link.
            resources.setdefault(rtype, []).extend(same_patient(key, usable))
            to_fetch[key] = (next_url, rtype)
            continue
        url = resolve_template(template, request)
        if url is not None and "?" in url and "_count=" not in url:
            # Our own search: ask for large pages (servers default to 20 and cap as they like).
            url = f"{url}&_count={policy.page_size}"
        if url is None:
            statuses.append(KeyStatus(key, rtype, "unavailable",
                                      reason="the template's context token has no value"))
        else:
            to_fetch[key] = (url, rtype)
    unavailable: dict[str, str] = {}
    if to_fetch:
        reason = _cannot_fetch(request, fetcher, policy, egress)
        approved: Approved | None = None
        if not reason:
            assert fetcher is not None and egress is not None and request.fhir_server
            try:
                approved = fetcher.approve(request.fhir_server, egress)
            except Unresolvable as exc:
                reason = str(exc)
        if approved is None:
            for key, (_url, rtype) in to_fetch.items():
                statuses.append(KeyStatus(key, rtype, "unavailable", reason=reason))
        else:
            assert fetcher is not None and request.fhir_server
            token = request.fhir_authorization.access_token if request.fhir_authorization else None
            deadline = time.monotonic() + policy.deadline
            fetched = fetcher.fetch_all(request.fhir_server, token, to_fetch, deadline,
                                        approved)
            for key, (items, status) in fetched.items():
                statuses.append(status)
                if items is not None:
                    resources.setdefault(status.resource_type, []).extend(
                        same_patient(key, items))
    total = sum(len(v) for v in resources.values())
    if total > policy.max_resources:
        raise PreconditionFailed(
            "the record is larger than this service accepts",
            [Issue("prefetch", f"{total} resources exceed the limit of {policy.max_resources}",
                   "too-costly")])
    for status in statuses:
        # Partial data stay usable as evidence of presence, but cannot show absence.
        if status.state == "unavailable":
            unavailable.setdefault(status.resource_type, status.reason)
    missing = [s for s in statuses if s.state == "unavailable" and s.key in service.required]
    if missing:
        raise PreconditionFailed(
            "data this service needs could not be obtained",
            [Issue(f"prefetch.{s.key}",
                   f"{s.key} ({service.prefetch[s.key]}) was not prefetched and could not be "
                   f"fetched: {s.reason}", s.code) for s in missing])
    if others:
        log.warning("left out resources that name another patient",
                    extra={"dropped": dict(others)})
        # What came for this patient still shows presence; absence can no longer be trusted
        # (a server that ignored the patient parameter, or a prefetch for someone else).
        for rtype, n in others.items():
            unavailable.setdefault(rtype, f"{n} {plural(rtype, n)} named another patient and "
                                          f"{'was' if n == 1 else 'were'} left out")
    strangers = [k for k in service.required if others_by_key[k] and not kept_by_key[k]]
    if strangers:
        raise PreconditionFailed(
            "the data this service needs are another patient's",
            [Issue(f"prefetch.{k}",
                   f"{k} ({service.prefetch[k]}): the {others_by_key[k]} resource(s) sent name "
                   "another patient than context.patientId", "business-rule")
             for k in strangers])
    record = PatientRecord(patient_id, resources, unavailable, request.draft_orders, statuses,
                           universe)
    record.other_patient = others
    unreadable = [k for k in service.required if service.prefetch.get(k)
                  and not record.readable(template_type(service.prefetch[k]))]
    if unreadable:
        log.warning("the data this service needs could not be read",
                    extra={"unreadable": dict(record.parse_failures)})
        raise PreconditionFailed(
            "the data this service needs could not be read",
            [Issue(f"prefetch.{k}",
                   f"{k} ({service.prefetch[k]}): none of the "
                   f"{record.count(template_type(service.prefetch[k]))} resource(s) could be "
                   "read as FHIR R4", "structure") for k in unreadable])
    return record


def plural(noun: str, n: int) -> str:
    """``noun`` for ``n`` things (FHIR type names take an s)."""
    return noun if n == 1 else f"{noun}s"


_MISSING = object()


def _from_prefetch(value: Any, rtype: str) -> tuple[list[dict[str, Any]] | None, str, str]:
    """Read one prefetch value: (resources, next link, why it is incomplete).

    Resources are None when the key must be fetched (an OperationOutcome, or not a resource).
    A Bundle whose ``total`` exceeds its entries and that has no ``next`` link is incomplete.
    """
    if not isinstance(value, dict):
        return None, "", ""
    kind = value.get("resourceType")
    if kind == "OperationOutcome":
        return None, "", ""
    if kind == "Bundle":
        items = _matches(value, rtype)
        next_url = ""
        for link in as_list(value.get("link")):
            if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
                next_url = str(link["url"])
        total = value.get("total")
        short = ""
        if not next_url and type(total) is int and total > len(items):
            short = f"the prefetch held {len(items)} of {total} resources and no link to the rest"
        return items, next_url, short
    if kind == rtype:
        return [value], "", ""
    return None, "", ""


def _same_patient(items: list[Any], patient_id: str, dropped: Counter[str]) -> list[Any]:
    """Drop resources that name another patient (a mixed-up prefetch must not leak into cards).

    Some servers ignore a search parameter they do not support and answer with every patient's
    resources. They are dropped here and counted by type in ``dropped``: ``load_record`` then
    makes their type unavailable (the cards say why) and logs the counts, never the resources.
    """
    kept = []
    suffix = f"Patient/{patient_id}"
    for item in items:
        if type(item) is LazyResource:
            rtype, rid, ref = item.resourceType, item.id, item.patient_reference()
        else:
            rtype, rid, ref = item.get("resourceType"), item.get("id"), _patient_reference(item)
        if rtype == "Patient":
            if rid in (patient_id, None):
                kept.append(item)
            else:
                dropped["Patient"] += 1
            continue
        if ref is None:
            kept.append(item)
            continue
        ref = ref.rstrip("/")
        # Relative (Patient/1) or absolute (https://ehr/fhir/Patient/1): same patient.
        if ref == suffix or (ref.endswith(suffix) and ref[-len(suffix) - 1] == "/"):
            kept.append(item)
        else:
            dropped[str(rtype)] += 1
    return kept


def _patient_reference(raw: dict[str, Any]) -> str | None:
    for fld in PATIENT_REFERENCE_FIELDS:
        node = raw.get(fld)
        if type(node) is dict:
            ref = node.get("reference")
            if type(ref) is str:
                return ref
        elif type(node) is str:
            return node  # a bare "Patient/1", which lenient reading takes as a Reference
    return None


def _cannot_fetch(request: HookRequest, fetcher: FhirFetcher | None, policy: FetchPolicy,
                  egress: EgressRule | None) -> str:
    if fetcher is None or egress is None:
        return "fetching from the FHIR server is disabled"
    if not request.fhir_server:
        return "the request named no fhirServer"
    scheme = urlsplit(request.fhir_server).scheme
    if scheme not in ("https", "http") or (scheme == "http" and not policy.allow_http):
        return "the fhirServer URL is not https"
    return ""


def record_from_resources(patient_id: str, items: Iterable[dict[str, Any]],
                          unavailable: dict[str, str] | None = None,
                          draft_orders: list[dict[str, Any]] | None = None) -> PatientRecord:
    """Build a record straight from resources (scenario tests, ``lbp-cds evaluate``)."""
    resources: dict[str, list[dict[str, Any]]] = {}
    for raw in items:
        resources.setdefault(str(raw.get("resourceType")), []).append(raw)
    return PatientRecord(patient_id, resources, unavailable, draft_orders)
