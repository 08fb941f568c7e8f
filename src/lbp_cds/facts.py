"""The vocabulary rules may use: small pure functions over a ``PatientRecord``.

Each fact answers **present** (with the evidence that shows it), **absent** (the data were there
and say no) or **unknown** (the data were not there). Unknown is never absent: a fact handed a
resource that could not be read, or was read without an element facts read, cannot answer absent
(``evaluate_fact``, through which the engine calls every fact, makes it unknown and names the
resources, as an unavailable query is named). Every number and
code a fact compares against comes from its arguments, that is from the knowledge pack; the only
vocabulary here is FHIR's own (statuses, interpretation flags, units).

The table of facts, their arguments and meaning is ``docs/knowledge-format.md``; ``FACTS`` below
is the registry ``rules.py`` compiles rule trees against.
"""

from __future__ import annotations

import calendar
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from lbp_cds.fhir_data import SEX_EXTENSION, Flaw, PatientRecord, as_list, plural
from lbp_cds.knowledge import Knowledge, ValueSet

PRESENT, ABSENT, UNKNOWN = "present", "absent", "unknown"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ACTIVE_CLINICAL = {"active", "recurrence", "relapse"}
IGNORED_VERIFICATION = {"refuted", "entered-in-error"}
OBSERVATION_OK = {"final", "amended", "corrected", "preliminary"}
HIGH_FLAGS = {"H", "HH", "HU", "A", "AA"}
LOW_FLAGS = {"L", "LL", "LU"}
POSITIVE_FLAGS = {"POS", "DET", "A", "H", "HH"}
NEGATIVE_FLAGS = {"NEG", "ND"}
OPS: dict[str, Callable[[Any, Any], bool]] = {
    "gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le,
    "eq": operator.eq,
}
OP_WORDS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "eq": "="}
# UCUM conversions to the unit a rule asks for: (from, to) -> function.
UNIT_CONVERSIONS: dict[tuple[str, str], Callable[[float], float]] = {
    ("[degF]", "Cel"): lambda v: (v - 32.0) * 5.0 / 9.0,
    ("Cel", "[degF]"): lambda v: v * 9.0 / 5.0 + 32.0,
    ("[lb_av]", "kg"): lambda v: v * 0.45359237,
    ("g", "kg"): lambda v: v / 1000.0,
    ("L", "mL"): lambda v: v * 1000.0,
    ("/min", "{beats}/min"): lambda v: v,
    ("{beats}/min", "/min"): lambda v: v,
    ("mm[Hg]", "mm[Hg]"): lambda v: v,
    ("d", "wk"): lambda v: v / 7.0,
    ("wk", "d"): lambda v: v * 7.0,
}
UNIT_ALIASES = {"degF": "[degF]", "°F": "[degF]", "F": "[degF]", "°C": "Cel", "C": "Cel",
                "degC": "Cel", "lb": "[lb_av]", "lbs": "[lb_av]", "bpm": "/min",
                "beats/min": "/min", "mmHg": "mm[Hg]", "ml": "mL"}


@dataclass(frozen=True)
class Evidence:
    """One thing in the record that shows a fact: what, its value, when, and which resource."""

    what: str
    value: str = ""
    when: str = ""
    reference: str = ""


# What kind of gap an unknown is: the card names the first two always (data that could not be had
# or read), and only the few most dangerous of the last two (questions nobody asked yet).
UNAVAILABLE, UNREADABLE, NOT_ASKED, NOT_RECORDED = (
    "unavailable", "unreadable", "not-asked", "not-recorded")


@dataclass(frozen=True)
class Unknown:
    """Why a fact could not be answered, and what would settle it.

    ``topic`` is the intake item, value set id or resource type that would settle it (the pack's
    ``card-style.yaml`` says it in clinical words); ``rule`` the innermost rule it came through,
    so a card can say "cauda equina symptoms not asked" instead of four intake items.
    """

    reason: str
    kind: str = NOT_RECORDED
    topic: str = ""
    rule: str = ""
    fetch: str = ""  # unavailable: the resource type that could not be had
    why: str = ""  # unavailable: why ("the FHIR server answered HTTP 503")

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class Result:
    """A fact's answer."""

    status: str
    evidence: tuple[Evidence, ...] = ()
    unknown: tuple[Unknown, ...] = ()
    ask: tuple[str, ...] = ()  # intake questionnaire items that would settle an unknown
    value: Any = None

    @staticmethod
    def present(evidence: Iterable[Evidence], value: Any = None) -> Result:
        return Result(PRESENT, tuple(evidence), value=value)

    @staticmethod
    def absent(evidence: Iterable[Evidence] = ()) -> Result:
        return Result(ABSENT, tuple(evidence))

    @staticmethod
    def not_known(reason: str, ask: Iterable[str] = (), kind: str = NOT_RECORDED,
                  topic: str = "", fetch: str = "", why: str = "") -> Result:
        items = tuple(ask)
        return Result(UNKNOWN, unknown=(Unknown(reason, kind, topic or (items[0] if items else ""),
                                                fetch=fetch, why=why),), ask=items)


@dataclass
class Context:
    """What a fact may look at: the record, the knowledge, the clock, the hook, the order."""

    record: PatientRecord
    knowledge: Knowledge
    now: datetime
    hook: str
    orders: list[Any] = field(default_factory=list)  # the judged draft orders
    order: Any | None = None  # the one being judged by a for_each_order rule
    cache: dict[Any, Any] = field(default_factory=dict)

    def reason_orders(self) -> list[Any]:
        """Orders whose reasons count as clinical context."""
        return [self.order] if self.order is not None else self.orders


# -- small readers of R4B models ----------------------------------------------------------------
def codings(concept: Any) -> list[Any]:
    """Codings of a CodeableConcept (or of a list of them)."""
    if concept is None:
        return []
    if isinstance(concept, list):
        return [c for cc in concept for c in (cc.coding or [])]
    return list(concept.coding or [])


def match(concept: Any, valueset: ValueSet) -> Any | None:
    """The first coding of ``concept`` in the value set, or None."""
    for coding in codings(concept):
        if valueset.contains(coding.system, coding.code):
            return coding
    return None


def status_code(concept: Any) -> str | None:
    """The code of a status CodeableConcept (clinicalStatus, verificationStatus)."""
    for coding in codings(concept):
        if coding.code:
            return str(coding.code)
    return None


def as_datetime(value: Any) -> datetime | None:
    """A FHIR date/dateTime value (model or string) as an aware datetime."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=timezone.utc)
    if isinstance(value, str):
        from lbp_cds.fhir_data import parse_datetime

        return parse_datetime(value)
    return None


def day(value: datetime | None) -> str:
    """A date for card text."""
    return value.date().isoformat() if value else ""


def describe(coding: Any) -> str:
    """``display (SYSTEM code)`` for card text."""
    system = {
        "http://hl7.org/fhir/sid/icd-10-cm": "ICD-10-CM", "http://snomed.info/sct": "SNOMED CT",
        "http://loinc.org": "LOINC", RXNORM: "RxNorm", "http://www.ama-assn.org/go/cpt": "CPT",
    }.get(coding.system or "", coding.system or "")
    display = coding.display or coding.code
    return f"{display} ({system} {coding.code})"


def ref(resource: Any) -> str:
    """``Type/id`` of a resource."""
    return f"{resource.get_resource_type()}/{resource.id}" if resource.id else \
        resource.get_resource_type()


def since(ctx: Context, days: float | None) -> datetime | None:
    """The start of a look-back window of ``days`` before now."""
    return None if days is None else ctx.now - timedelta(days=float(days))


def window_words(days: float | None) -> str:
    return f" in the last {int(days) if float(days).is_integer() else days} days" if days else ""


def verdict(ctx: Context, found: list[Evidence], resource_type: str, label: str) -> Result:
    """Present with the evidence found; else unknown if that data could not be had; else absent."""
    if found:
        return Result.present(found)
    if not ctx.record.available(resource_type):
        return unavailable(ctx, resource_type, label)
    return Result.absent()


def unavailable(ctx: Context, resource_type: str, label: str) -> Result:
    reason = ctx.record.missing_reason(resource_type) or "not available"
    return Result.not_known(f"{label}: {resource_type} data could not be checked ({reason})",
                            kind=UNAVAILABLE, fetch=resource_type, why=reason)


# -- the problem list: which entries count ---------------------------------------------------
DONE_PROCEDURE = ("completed", "in-progress")
ABATEMENT_ELEMENTS = ("abatementDateTime", "abatementAge", "abatementPeriod", "abatementRange",
                      "abatementString")


def entry_date(c: Any) -> datetime | None:
    """When a problem-list entry began: its onset, else the date it was recorded."""
    return as_datetime(c.onsetDateTime) or as_datetime(
        c.onsetPeriod.start if c.onsetPeriod else None) or as_datetime(c.recordedDate)


def performed(p: Any) -> datetime | None:
    """When a Procedure was done: its performed date, else the start of its period."""
    return as_datetime(p.performedDateTime) or as_datetime(
        p.performedPeriod.start if p.performedPeriod else None)


def abated(c: Any, now: datetime) -> bool:
    """The entry says the condition ended (an abatement date not in the future, or any other
    abatement element), whatever its clinical status says."""
    for name in ABATEMENT_ELEMENTS:
        value = getattr(c, name, None)
        if value is None:
            continue
        if name == "abatementDateTime":
            when = as_datetime(value)
            return when is None or when <= now
        if name == "abatementPeriod":
            when = as_datetime(value.end) or as_datetime(value.start)
            return when is None or when <= now
        return True
    return False


@dataclass(frozen=True)
class Entry:
    """A problem-list entry that counts now: the Condition, its date and its status words."""

    condition: Any
    when: datetime | None
    status: str


def problem_entries(ctx: Context, vs: ValueSet, status: str = "active") -> list[Entry]:
    """The Conditions of a value set that count now, by the pack's problem-list rules.

    The one place that decides which problem-list entries count, for every rule. Entries whose
    verification status is refuted or entered-in-error never count. How the others count is the
    value set's ``problem-list.yaml`` entry (``Knowledge.currency``); for a value set without one,
    the rule's ``status`` argument: ``any`` counts every entry (history codes), ``active`` only
    current ones (clinical status active, recurrence or relapse, or none given, and not abated).

    Args:
        ctx: the evaluation context.
        vs: the value set.
        status: the rule's ``status`` argument (used only without a problem-list entry).
    """
    # Not cached per call: reading the entries again is what tells evaluate_fact (through
    # PatientRecord.misses) that an entry could not be read, for every fact that asks.
    cur = ctx.knowledge.currency(vs.id)
    counts = cur.counts if cur is not None else ("ever" if status == "any" else "current")
    window = since(ctx, ctx.knowledge.param(cur.within_days)) \
        if cur is not None and cur.within_days is not None else None
    out: list[Entry] = []
    if cur is None or not _on_record(ctx, cur.ruled_out_by):
        endings = [d for d in _on_record(ctx, cur.ended_by) if d is not None] \
            if cur is not None else []
        for c in ctx.record.coded("Condition", vs):
            if status_code(c.verificationStatus) in IGNORED_VERIFICATION:
                continue
            clinical = status_code(c.clinicalStatus)
            when = entry_date(c)
            words = clinical or "no status given"
            if counts != "ever":
                if clinical not in (None, *ACTIVE_CLINICAL) or abated(c, ctx.now):
                    continue
                if window is not None and when is not None and when < window:
                    continue
                if when is not None and any(when < end <= ctx.now for end in endings):
                    continue
            elif clinical not in (None, *ACTIVE_CLINICAL) or abated(c, ctx.now):
                words = f"{clinical or 'abated'} (a history counts)"
            out.append(Entry(c, when, words if when is not None or counts != "recent"
                             else f"{words}, undated"))
    return out


def _on_record(ctx: Context, valuesets: tuple[str, ...]) -> list[datetime | None]:
    """The dates (None when undated) of the Conditions (any status, not refuted) and done
    Procedures of these value sets: what rules an entry out, or ends it."""
    out: list[datetime | None] = []
    for vs_id in valuesets:
        vs = ctx.knowledge.valuesets[vs_id]
        out += [entry_date(c) for c in ctx.record.coded("Condition", vs)
                if status_code(c.verificationStatus) not in IGNORED_VERIFICATION]
        out += [performed(p) for p in ctx.record.coded("Procedure", vs)
                if p.status in DONE_PROCEDURE]
    return out


def unreadable_reason(label: str, noun: str, count: int) -> str:
    """What a card says of resources a fact was handed and could not read."""
    return f"{label}: {count} {plural(noun, count)} could not be read"


def flaw_reasons(label: str, flaws: Iterable[Flaw]) -> tuple[str, ...]:
    """The unknowns that flawed resources handed to a fact add to its answer, grouped: how many
    of each type could not be read, and which elements of how many were left out."""
    unread: dict[str, int] = {}
    lost: dict[tuple[str, tuple[str, ...]], int] = {}
    for flaw in flaws:
        if flaw.unreadable:
            unread[flaw.noun] = unread.get(flaw.noun, 0) + 1
        else:
            lost[(flaw.noun, flaw.lost)] = lost.get((flaw.noun, flaw.lost), 0) + 1
    reasons = [unreadable_reason(label, noun, n) for noun, n in unread.items()]
    reasons += [f"{label}: {' and '.join(elements)} of {n} {plural(noun, n)} could not be read"
                for (noun, elements), n in lost.items()]
    return tuple(reasons)


def evaluate_fact(fn: Callable[[Context, dict[str, Any]], Result], ctx: Context,
                  a: dict[str, Any]) -> Result:
    """A fact's answer, with what it could not read made part of it.

    Resources handed to the fact that could not be read, or were read without an element facts
    read (``PatientRecord.misses``, logged as the fact runs), are named among its unknowns; an
    answer of absent then becomes unknown: what could not be read might have said yes.
    """
    misses = ctx.record.misses
    mark = len(misses)
    result = fn(ctx, a)
    if len(misses) == mark:
        if result.unknown and not all(u.topic for u in result.unknown):
            return Result(result.status, result.evidence, _topical(result.unknown, a), result.ask,
                          result.value)
        return result
    flaws = list({id(f): f for f in misses[mark:]}.values())  # one per resource (equal flaws
    # of two resources are two objects; one resource's flaw is one object, logged each time)
    del misses[mark:]
    label = str(a.get("label") or "")
    unread = tuple(Unknown(r, UNREADABLE, topic_of(a)) for r in flaw_reasons(label, flaws))
    unknown = tuple(dict.fromkeys(_topical(result.unknown, a) + unread))
    status = UNKNOWN if result.status == ABSENT else result.status
    return Result(status, result.evidence, unknown, result.ask, result.value)


def topic_of(a: dict[str, Any]) -> str:
    """What would settle a fact with these arguments: its intake item, else its value set."""
    if a.get("item"):
        return str(a["item"])
    vs = a.get("valueset")
    return str(getattr(vs, "id", "") or "").removesuffix("+products")


def _topical(unknowns: tuple[Unknown, ...], a: dict[str, Any]) -> tuple[Unknown, ...]:
    """The unknowns, each with the topic the fact's arguments give when it named none."""
    if all(u.topic for u in unknowns):
        return unknowns
    topic = topic_of(a)
    return tuple(u if u.topic else replace(u, topic=topic) for u in unknowns)


# -- the facts ----------------------------------------------------------------------------------
def condition(ctx: Context, a: dict[str, Any]) -> Result:
    """A Condition that counts now (``problem_entries``), or a reason of the judged order, with a
    code in the value set; ``within_days`` narrows to entries dated in the window."""
    vs: ValueSet = a["valueset"]
    start = since(ctx, a.get("within_days"))
    found: list[Evidence] = []
    for entry in problem_entries(ctx, vs, a.get("status", "active")):
        if start is not None and (entry.when is None or entry.when < start):
            continue
        coding = match(entry.condition.code, vs)
        found.append(Evidence(f"Condition: {describe(coding)}", entry.status, day(entry.when),
                              ref(entry.condition)))
    for order in ctx.reason_orders():
        for cc in getattr(order, "reasonCode", None) or []:
            coding = match(cc, vs)
            if coding is not None:
                found.append(Evidence(f"Reason on the draft order: {describe(coding)}",
                                      "stated on the order", "", ref(order)))
        for reference in getattr(order, "reasonReference", None) or []:
            target = ctx.record.by_reference(reference.reference or "")
            if target is not None and target.get_resource_type() == "Condition":
                coding = match(target.code, vs)
                if coding is not None and status_code(target.verificationStatus) not in (
                        IGNORED_VERIFICATION):
                    found.append(Evidence(f"Reason on the draft order: {describe(coding)}",
                                          "referenced by the order", "", ref(target)))
    return verdict(ctx, found, "Condition", a["label"])


def _observations(ctx: Context, vs: ValueSet, days: float | None) -> list[Any]:
    start = since(ctx, days)
    out = []
    for ob in ctx.record.coded("Observation", vs, since=start):
        if ob.status not in OBSERVATION_OK:
            continue
        when = observation_time(ob)
        if start is not None and (when is None or when < start):
            continue
        out.append(ob)
    return out


def observation_time(ob: Any) -> datetime | None:
    """When an Observation applies."""
    return (as_datetime(ob.effectiveDateTime) or as_datetime(ob.effectiveInstant)
            or as_datetime(ob.effectivePeriod.start if ob.effectivePeriod else None)
            or as_datetime(ob.issued))


def _flags(ob: Any) -> set[str]:
    return {str(c.code) for c in codings(ob.interpretation) if c.code}


def finding(ctx: Context, a: dict[str, Any]) -> Result:
    """An Observation recording the finding (as its code or its coded value), not negated."""
    vs: ValueSet = a["valueset"]
    negative: ValueSet = ctx.knowledge.valueset("observation-negative")
    found: list[Evidence] = []
    denied: list[Evidence] = []
    for ob in _observations(ctx, vs, a.get("within_days")):
        coding = match(ob.code, vs) or match(ob.valueCodeableConcept, vs)
        when = day(observation_time(ob))
        negated = (ob.valueBoolean is False or _flags(ob) & NEGATIVE_FLAGS
                   or (match(ob.code, vs) is not None and match(ob.valueCodeableConcept, negative)
                       is not None))
        (denied if negated else found).append(
            Evidence(f"Observation: {describe(coding)}", "recorded absent" if negated
                     else "recorded present", when, ref(ob)))
    return _screened(ctx, a, found, 0, denied, "not recorded")


def _quantities(ob: Any, vs: ValueSet) -> list[tuple[Any, Any]]:
    """(coding, Quantity) pairs of a parsed Observation for codes in the value set."""
    out = []
    coding = match(ob.code, vs)
    if coding is not None and ob.valueQuantity is not None:
        out.append((coding, ob.valueQuantity))
    for comp in ob.component or []:
        ccoding = match(comp.code, vs)
        if ccoding is not None and comp.valueQuantity is not None:
            out.append((ccoding, comp.valueQuantity))
    return out


def convert(quantity: Any, unit: str | None) -> float | None:
    """A Quantity's value in ``unit`` (UCUM), or None when it cannot be converted."""
    return convert_value(quantity.value, quantity.code or quantity.unit, unit)


def convert_value(value: Any, have: str | None, unit: str | None) -> float | None:
    """A number in unit ``have`` expressed in ``unit`` (UCUM), or None."""
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        return None
    number = float(value)
    if not unit:
        return number
    have = have if isinstance(have, str) else ""  # a malformed Quantity.code/unit
    have = UNIT_ALIASES.get(have, have)
    if have == unit:
        return number
    fn = UNIT_CONVERSIONS.get((have, unit))
    return fn(number) if fn else None


# -- raw screening --------------------------------------------------------------------------
# Observations are most of a record. Facts over measured values screen the raw JSON first and
# parse (validate) only the resources they keep as evidence; a resource that would have been
# evidence but does not parse is counted and reported as unreadable, never silently dropped.
def _raw_match(concept: Any, vs: ValueSet) -> dict[str, Any] | None:
    if not isinstance(concept, dict):
        return None
    for coding in as_list(concept.get("coding")):
        if isinstance(coding, dict) and isinstance(coding.get("system"), str) \
                and isinstance(coding.get("code"), str) \
                and vs.contains(coding["system"], coding["code"]):
            return coding
    return None


def _raw_quantities(raw: dict[str, Any], vs: ValueSet) -> list[dict[str, Any]]:
    out = []
    qty = raw.get("valueQuantity")
    if isinstance(qty, dict) and _raw_match(raw.get("code"), vs) is not None:
        out.append(qty)
    for comp in as_list(raw.get("component")):
        if isinstance(comp, dict) and isinstance(comp.get("valueQuantity"), dict) \
                and _raw_match(comp.get("code"), vs) is not None:
            out.append(comp["valueQuantity"])
    return out


def _raw_observations(ctx: Context, vs: ValueSet, days: float | None
                      ) -> list[tuple[int, dict[str, Any], datetime | None]]:
    start = since(ctx, days)
    out = []
    for pos, raw in ctx.record.coded_raw("Observation", vs, since=start):
        status = raw.get("status")
        if not isinstance(status, str) or status not in OBSERVATION_OK:  # a list is unhashable
            continue
        when = ctx.record.raw_date("Observation", pos)
        if start is not None and when is None:
            continue
        out.append((pos, raw, when))
    return out


def _screened(ctx: Context, a: dict[str, Any], found: list[Evidence], unreadable: int,
              seen: int | list[Evidence], nothing: str) -> Result:
    """The verdict of a fact over Observations: present with evidence; unknown when evidence did
    not parse, or nothing was recorded; absent when results were there and none qualified
    (``seen``: how many, or the evidence that they say no)."""
    if found:
        return Result.present(found)
    if unreadable:
        return _unreadable(a, unreadable)
    if seen:
        return Result.absent(seen if isinstance(seen, list) else ())
    if not ctx.record.available("Observation"):
        return unavailable(ctx, "Observation", a["label"])
    return Result.not_known(f"{a['label']}: {nothing}{window_words(a.get('within_days'))}")


def _screen(ctx: Context, a: dict[str, Any], keep: Callable[[dict[str, Any]], bool | None]
            ) -> tuple[list[Any], int, int]:
    """Screen the window's raw Observations with ``keep`` and parse only those it keeps.

    ``keep`` answers True (evidence), False (a result that says no) or None (nothing usable).

    Returns:
        (the kept Observations, parsed; how many said no; how many kept did not parse).
    """
    kept: list[Any] = []
    seen = unreadable = 0
    for pos, raw, _when in _raw_observations(ctx, a["valueset"], a.get("within_days")):
        verdict = keep(raw)
        if verdict is None:
            continue
        if not verdict:
            seen += 1
            continue
        ob = ctx.record.parse("Observation", pos)
        if ob is None:
            unreadable += 1
        else:
            kept.append(ob)
    return kept, seen, unreadable


def _unreadable(a: dict[str, Any], count: int) -> Result:
    return Result.not_known(unreadable_reason(a["label"], "Observation", count), kind=UNREADABLE)


def observation_value(ctx: Context, a: dict[str, Any]) -> Result:
    """A measured value in the window meets the comparison."""
    vs: ValueSet = a["valueset"]
    op, limit, unit = a["op"], float(a["value"]), a.get("unit")
    met: list[Evidence] = []

    def meets(raw: dict[str, Any]) -> bool | None:
        values = [convert_value(q.get("value"), q.get("code") or q.get("unit"), unit)
                  for q in _raw_quantities(raw, vs)]
        values = [v for v in values if v is not None]
        return any(OPS[op](v, limit) for v in values) if values else None

    kept, seen, unreadable = _screen(ctx, a, meets)
    for ob in kept:
        for coding, qty in _quantities(ob, vs):
            value = convert(qty, unit)
            if value is not None and OPS[op](value, limit):
                met.append(Evidence(f"Observation: {describe(coding)}",
                                    f"{qty.value} {qty.unit or qty.code or ''}".strip(),
                                    day(observation_time(ob)), ref(ob)))
    return _screened(ctx, a, met, unreadable, seen, "no measurement")


def _raw_flags(raw: dict[str, Any]) -> set[str]:
    flags = set()
    for cc in as_list(raw.get("interpretation")):
        if isinstance(cc, dict):
            for coding in as_list(cc.get("coding")):
                if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                    flags.add(coding["code"])
    return flags


def _raw_outside_range(raw: dict[str, Any], qty: dict[str, Any], side: str) -> bool:
    value = qty.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    for rr in as_list(raw.get("referenceRange")):
        bound = rr.get(side) if isinstance(rr, dict) else None
        limit = bound.get("value") if isinstance(bound, dict) else None
        if isinstance(limit, int | float) and not isinstance(limit, bool):
            if (value > limit) if side == "high" else (value < limit):
                return True
    return False


def _lab(ctx: Context, a: dict[str, Any], flags: set[str], side: str) -> Result:
    vs: ValueSet = a["valueset"]
    out: list[Evidence] = []

    def abnormal(raw: dict[str, Any]) -> bool:
        return bool(_raw_flags(raw) & flags) or any(
            _raw_outside_range(raw, q, side) for q in _raw_quantities(raw, vs))

    kept, seen, unreadable = _screen(ctx, a, abnormal)
    for ob in kept:
        pairs = _quantities(ob, vs) or [(match(ob.code, vs) or codings(ob.code)[0], None)]
        for coding, qty in pairs[:1]:
            shown = f"{qty.value} {qty.unit or qty.code or ''}".strip() if qty else ", ".join(
                sorted(_flags(ob))) or "abnormal"
            out.append(Evidence(f"Observation: {describe(coding)}", shown,
                                day(observation_time(ob)), ref(ob)))
    return _screened(ctx, a, out, unreadable, seen, "no result")


def lab_high(ctx: Context, a: dict[str, Any]) -> Result:
    """A result flagged high, or above its reference range."""
    return _lab(ctx, a, HIGH_FLAGS, "high")


def lab_low(ctx: Context, a: dict[str, Any]) -> Result:
    """A result flagged low, or below its reference range."""
    return _lab(ctx, a, LOW_FLAGS, "low")


def lab_positive(ctx: Context, a: dict[str, Any]) -> Result:
    """A qualitative positive, or a quantity at or above the threshold."""
    vs: ValueSet = a["valueset"]
    positive: ValueSet = ctx.knowledge.valueset("observation-positive")
    negative: ValueSet = ctx.knowledge.valueset("observation-negative")
    pos: list[Evidence] = []
    neg: list[Evidence] = []
    for ob in _observations(ctx, vs, a.get("within_days")):
        coding = match(ob.code, vs)
        flags = _flags(ob)
        verdict: bool | None = None
        shown = ""
        if match(ob.valueCodeableConcept, positive) is not None or flags & POSITIVE_FLAGS:
            verdict, shown = True, "positive"
        elif match(ob.valueCodeableConcept, negative) is not None or flags & NEGATIVE_FLAGS:
            verdict, shown = False, "negative"
        elif isinstance(ob.valueString, str) and ob.valueString.strip().lower() in (
                "positive", "pos", "detected"):
            verdict, shown = True, ob.valueString
        elif isinstance(ob.valueString, str) and ob.valueString.strip().lower() in (
                "negative", "neg", "not detected"):
            verdict, shown = False, ob.valueString
        elif ob.valueQuantity is not None and "value" in a:
            value = convert(ob.valueQuantity, a.get("unit"))
            if value is not None:
                verdict = value >= float(a["value"])
                shown = f"{ob.valueQuantity.value} {ob.valueQuantity.unit or ''}".strip()
        if verdict is None:
            continue
        ev = Evidence(f"Observation: {describe(coding)}", shown, day(observation_time(ob)),
                      ref(ob))
        (pos if verdict else neg).append(ev)
    return _screened(ctx, a, pos, 0, neg, "no result")


def observation_recorded(ctx: Context, a: dict[str, Any]) -> Result:
    """Any Observation with a code of the value set in the window."""
    vs: ValueSet = a["valueset"]
    found = [Evidence(f"Observation: {describe(match(ob.code, vs) or codings(ob.code)[0])}",
                      "recorded", day(observation_time(ob)), ref(ob))
             for ob in _observations(ctx, vs, a.get("within_days")) if match(ob.code, vs)]
    return verdict(ctx, found, "Observation", a["label"])


def weight_loss(ctx: Context, a: dict[str, Any]) -> Result:
    """The latest weight is lower than the highest in the window by at least ``percent``."""
    vs: ValueSet = a["valueset"]
    points = []
    for pos, raw, when in _raw_observations(ctx, vs, a.get("within_days")):
        for qty in _raw_quantities(raw, vs):
            value = convert_value(qty.get("value"), qty.get("code") or qty.get("unit"), "kg")
            if value is not None and when is not None:
                points.append((when, value, pos))
    if len(points) < 2:
        if not ctx.record.available("Observation"):
            return unavailable(ctx, "Observation", a["label"])
        return Result.not_known(f"{a['label']}: fewer than two weights"
                                f"{window_words(a.get('within_days'))}")
    points.sort(key=lambda p: p[0])
    latest = points[-1]
    peak = max(points[:-1], key=lambda p: p[1])
    loss = (peak[1] - latest[1]) / peak[1] * 100.0 if peak[1] else 0.0
    if loss < float(a["percent"]):
        return Result.absent()
    models = [ctx.record.parse("Observation", p[2]) for p in (peak, latest)]
    if any(m is None for m in models):
        return _unreadable(a, sum(m is None for m in models))
    ev = [Evidence("Body weight", f"{peak[1]:.1f} kg", day(peak[0]), ref(models[0])),
          Evidence("Body weight", f"{latest[1]:.1f} kg ({loss:.1f} % lower)", day(latest[0]),
                   ref(models[1]))]
    return Result.present(ev)


def _therapy_days(mr: Any, now: datetime) -> float:
    start = as_datetime(mr.authoredOn)
    elapsed = (now - start).total_seconds() / 86400 if start else 0.0
    supply = 0.0
    dr = mr.dispenseRequest
    if dr is not None and dr.expectedSupplyDuration is not None and \
            dr.expectedSupplyDuration.value is not None:
        per_fill = float(dr.expectedSupplyDuration.value)
        unit = dr.expectedSupplyDuration.code or dr.expectedSupplyDuration.unit or "d"
        per_fill *= {"d": 1, "day": 1, "days": 1, "wk": 7, "week": 7, "mo": 30,
                     "month": 30}.get(str(unit), 1)
        supply = per_fill * (1 + int(dr.numberOfRepeatsAllowed or 0))
    return max(elapsed if start and mr.status == "active" else 0.0, supply)


def _record_requests(ctx: Context, vs: ValueSet) -> list[Any]:
    """The record's MedicationRequests for a drug of the value set (by code, or by the name of
    one of its ingredients), parsed; those that cannot be parsed are left out (and counted)."""
    coded = {pos for pos, _raw in ctx.record.coded_raw("MedicationRequest", vs)}
    out = []
    for pos, raw in ctx.record.raw_all("MedicationRequest"):
        if pos in coded or _raw_names(raw, vs):
            model = ctx.record.parse("MedicationRequest", pos)
            if model is not None:
                out.append(model)
    return out


def medication(ctx: Context, a: dict[str, Any]) -> Result:
    """A MedicationRequest for a drug of the value set (ingredient, or product mapped to one).

    With ``for_episode: true`` only a prescription of this episode counts (``_episode_claim``):
    one whose reason is the episode's diagnosis, or, without a reason, one started on or after
    the episode began that continues no earlier prescription of the same ingredient.
    """
    vs: ValueSet = a["valueset"]
    source = a.get("source", "any")
    want_active = a.get("status", "active") == "active"
    start = since(ctx, a.get("within_days"))
    record = _record_requests(ctx, vs) if source in ("record", "any") or a.get("for_episode") \
        else []
    candidates: list[tuple[Any, bool]] = []
    if source in ("record", "any"):
        candidates += [(m, False) for m in record]
    if source in ("draft", "any"):
        candidates += [(m, True) for m in ctx.record.draft_orders()
                       if m.get_resource_type() == "MedicationRequest"
                       and (match(m.medicationCodeableConcept, vs) is not None
                            or _names(m, vs))]
    found = []
    undecided: list[str] = []
    for mr, draft in candidates:
        if not draft and want_active and mr.status != "active":
            continue
        when = as_datetime(mr.authoredOn)
        if start is not None and not draft and (when is None or when < start):
            continue
        if "min_days" in a and _therapy_days(mr, ctx.now) < float(a["min_days"]):
            continue
        coding = match(mr.medicationCodeableConcept, vs)
        what = describe(coding) if coding is not None else (
            f"{_drug_text(mr.medicationCodeableConcept)} (recognised by its ingredient name: "
            "the product code is not in the knowledge's RxNorm map)")
        value = "draft" if draft else str(mr.status)
        if a.get("for_episode"):
            claim, why = _episode_claim(ctx, mr, draft, vs, record)
            if claim is None:
                undecided.append(f"{_drug_text(mr.medicationCodeableConcept)}: {why}")
                continue
            if not claim:
                continue
            value = f"{value}; {why}"
        found.append(Evidence(f"{'Draft order' if draft else 'MedicationRequest'}: {what}",
                              value, day(when), ref(mr)))
    if found:
        return Result.present(found)
    if undecided:
        return Result.not_known(f"{a['label']}: could not tell whether "
                                f"{'; '.join(undecided)}", ask=["lbp-onset-date"])
    if source != "draft" and not ctx.record.available("MedicationRequest"):
        return unavailable(ctx, "MedicationRequest", a["label"])
    return Result.absent()


NOT_THERAPY = ("entered-in-error", "cancelled", "draft")


def _episode_claim(ctx: Context, mr: Any, draft: bool, vs: ValueSet, record: list[Any]
                   ) -> tuple[bool | None, str]:
    """Whether a prescription belongs to this episode (True / False / None: cannot tell), and
    why, in words for the card.

    Its stated reason decides first: a reason in the episode's value set (the one
    ``problem-list.yaml`` gives ``episode_gap_days``) makes it the episode's; a coded reason
    outside it (post-herpetic neuralgia, COPD) makes it another indication's. Without a reason,
    the dates decide: started before the episode began, or continuing a prescription of the
    same ingredient dated before the episode began (a refill of long-standing therapy), it is
    not the episode's; otherwise it is. The episode's onset is ``episode_onset``'s.
    """
    episode_id = ctx.knowledge.episode_valueset
    if episode_id is None:
        return None, "the knowledge defines no episode"
    episode = ctx.knowledge.valuesets[episode_id]
    reasons = list(codings(mr.reasonCode))
    for reference in mr.reasonReference or []:
        target = ctx.record.by_reference(reference.reference or "")
        if target is not None and target.get_resource_type() == "Condition" and \
                status_code(target.verificationStatus) not in IGNORED_VERIFICATION:
            reasons += codings(target.code)
    for coding in reasons:
        if episode.contains(coding.system, coding.code):
            return True, f"prescribed for {describe(coding)}"
    if any(c.code for c in reasons):
        other = next(c for c in reasons if c.code)
        return False, f"prescribed for another indication: {describe(other)}"
    onset, _ev = episode_onset(ctx, episode)
    if onset is None:
        return None, "it belongs to this episode (no onset date of the episode)"
    when = as_datetime(mr.authoredOn) or (ctx.now if draft else None)
    if when is None:
        return None, "it belongs to this episode (no date on the prescription)"
    if when.date() < onset.date():
        return False, f"started {day(when)}, before this episode began ({day(onset)})"
    mine = _ingredients(ctx, mr, vs)
    for other in record:
        if other is mr or other.status in NOT_THERAPY:
            continue
        before = as_datetime(other.authoredOn)
        if before is None or before.date() >= onset.date():
            continue
        theirs = _ingredients(ctx, other, vs)
        if not mine or not theirs or mine & theirs:
            return False, (f"continues {_drug_text(other.medicationCodeableConcept)} prescribed "
                           f"{day(before)}, before this episode began ({day(onset)})")
    return True, f"started within this episode (began {day(onset)})"


def _ingredients(ctx: Context, mr: Any, vs: ValueSet) -> frozenset[str]:
    """The RxNorm ingredients of the value set a prescription names by code (a product through
    the ConceptMap); empty when it is recognised by name only."""
    out: set[str] = set()
    for c in codings(mr.medicationCodeableConcept):
        if c.system == RXNORM and c.code:
            out |= {i for i in ctx.knowledge.ingredient_map.get(c.code, frozenset({c.code}))
                    if vs.contains(RXNORM, i)}
    return frozenset(out)


def _raw_names(raw: dict[str, Any], vs: ValueSet) -> bool:
    """A stored MedicationRequest names an ingredient of ``vs`` in a form and by a route the
    value set does not exclude."""
    concept = raw.get("medicationCodeableConcept")
    if not isinstance(concept, dict):
        return False
    texts = [concept.get("text")] + [c.get("display") for c in as_list(concept.get("coding"))
                                     if isinstance(c, dict) and c.get("system") == RXNORM]
    routes: list[Any] = []
    for dosage in as_list(raw.get("dosageInstruction")):
        route = dosage.get("route") if isinstance(dosage, dict) else None
        if isinstance(route, dict):
            routes += [route.get("text")] + [c.get("display") for c in as_list(route.get("coding"))
                                             if isinstance(c, dict)]
    return _named(texts, routes, vs)


def _names(mr: Any, vs: ValueSet) -> bool:
    """A draft MedicationRequest (a model) names an ingredient of ``vs`` in a form and by a
    route the value set does not exclude."""
    concept = mr.medicationCodeableConcept
    if concept is None:
        return False
    texts = [concept.text] + [c.display for c in codings(concept) if c.system == RXNORM]
    routes = [t for d in mr.dosageInstruction or [] if d.route is not None
              for t in [d.route.text] + [c.display for c in codings(d.route)]]
    return _named(texts, routes, vs)


def _named(names: list[Any], routes: list[Any], vs: ValueSet) -> bool:
    """One of ``names`` names an ingredient of ``vs`` and no route is one the set excludes."""
    return (any(isinstance(t, str) and vs.names_ingredient(t) for t in names)
            and not any(isinstance(t, str) and vs.excludes_by_name(t) for t in routes))


def _drug_text(concept: Any) -> str:
    for c in codings(concept):
        if c.display:
            return f"{c.display} (RxNorm {c.code})" if c.code else str(c.display)
    return str(getattr(concept, "text", "") or "a medication")


def procedure(ctx: Context, a: dict[str, Any]) -> Result:
    """A completed (or in-progress) Procedure of the value set."""
    vs: ValueSet = a["valueset"]
    start = since(ctx, a.get("within_days"))
    found = []
    for p in ctx.record.coded("Procedure", vs, since=start):
        if p.status not in DONE_PROCEDURE:
            continue
        when = performed(p)
        if start is not None and (when is None or when < start):
            continue
        found.append(Evidence(f"Procedure: {describe(match(p.code, vs))}", str(p.status),
                              day(when), ref(p)))
    return verdict(ctx, found, "Procedure", a["label"])


def _judged_ids(ctx: Context) -> set[str]:
    return {str(o.id) for o in ([ctx.order] if ctx.order is not None else ctx.orders) if o.id}


def service_request(ctx: Context, a: dict[str, Any]) -> Result:
    """A ServiceRequest in the record (not a judged draft) of the value set."""
    vs: ValueSet = a["valueset"]
    statuses = set(a.get("status") or ("active", "completed"))
    start = since(ctx, a.get("within_days"))
    skip = _judged_ids(ctx)
    found = []
    for sr in ctx.record.coded("ServiceRequest", vs, since=start):
        if sr.status not in statuses or str(sr.id) in skip:
            continue
        when = as_datetime(sr.authoredOn) or as_datetime(sr.occurrenceDateTime)
        if start is not None and (when is None or when < start):
            continue
        found.append(Evidence(f"ServiceRequest: {describe(match(sr.code, vs))}", str(sr.status),
                              day(when), ref(sr)))
    return verdict(ctx, found, "ServiceRequest", a["label"])


def prior_imaging(ctx: Context, a: dict[str, Any]) -> Result:
    """Imaging of the value set already done (ImagingStudy, DiagnosticReport, completed order).

    ``since_onset_of`` (the id of the value set defining the episode) narrows to imaging dated
    on or after the episode onset (``episode_onset``); without an onset, imaging found at any
    time answers unknown (it cannot be placed before or after the episode).
    """
    vs: ValueSet = a["valueset"]
    start = since(ctx, a.get("within_days"))
    no_onset = False
    if a.get("since_onset_of"):
        onset, _ = episode_onset(ctx, ctx.knowledge.valueset(str(a["since_onset_of"])))
        if onset is None:
            no_onset = True
        elif start is None or onset > start:
            start = onset
    skip = _judged_ids(ctx)
    found, missing = [], []
    studies: tuple[tuple[str, Callable[[Any], Any], Callable[[Any], Any]], ...] = (
        ("ImagingStudy", lambda r: r.procedureCode, lambda r: r.started),
        ("DiagnosticReport", lambda r: r.code,
         lambda r: r.effectiveDateTime or (r.effectivePeriod.start if r.effectivePeriod else None)
         or r.issued),
        ("ServiceRequest", lambda r: r.code, lambda r: r.occurrenceDateTime or r.authoredOn),
    )
    for rtype, concept_of, when_of in studies:
        if not ctx.record.available(rtype):
            missing.append(rtype)
        for r in ctx.record.coded(rtype, vs, since=start):
            if str(r.id) in skip:
                continue
            if rtype == "ServiceRequest" and r.status != "completed":
                continue
            if rtype == "DiagnosticReport" and r.status in ("entered-in-error", "cancelled"):
                continue
            when = as_datetime(when_of(r))
            if start is not None and (when is None or when < start):
                continue
            found.append(Evidence(f"{rtype}: {describe(match(concept_of(r), vs))}",
                                  str(getattr(r, "status", "") or ""), day(when), ref(r)))
    if found and no_onset:
        return Result.not_known(f"{a['label']}: no episode onset recorded to compare with",
                                ask=["lbp-onset-date"])
    if found:
        return Result.present(found)
    if missing:
        return Result.not_known(f"{a['label']}: {', '.join(missing)} could not be checked",
                                kind=UNAVAILABLE, fetch=missing[0])
    return Result.absent()


# -- intake questionnaire -----------------------------------------------------------------------
def _responses(ctx: Context) -> list[Any]:
    key = "responses"
    if key in ctx.cache:
        # Responses that could not be read are named by every fact that reads the responses.
        ctx.record.misses.extend(ctx.cache["responses-flaws"])
    else:
        mark = len(ctx.record.misses)
        url = ctx.knowledge.questionnaire_url
        found = [qr for qr in ctx.record.all("QuestionnaireResponse")
                 if (qr.questionnaire or "").split("|")[0] == url
                 and qr.status in ("completed", "amended")]
        found.sort(key=lambda qr: as_datetime(qr.authored) or datetime.min.replace(
            tzinfo=timezone.utc), reverse=True)
        ctx.cache[key] = found
        ctx.cache["responses-flaws"] = ctx.record.misses[mark:]
    return list(ctx.cache[key])


def _answers(ctx: Context, qr: Any, link_id: str) -> list[Any]:
    """The answers to an item of a response (an intake has dozens of items, and rules ask for
    dozens of them: the response is indexed by linkId once per call)."""
    key = ("answers", id(qr))  # the record keeps qr alive for the call: its id stays its own
    index: dict[str, list[Any]] | None = ctx.cache.get(key)
    if index is None:
        index = ctx.cache[key] = {}
        # Depth first from the last item; when a linkId repeats, the first found keeps its
        # answers (the order the item-by-item search this replaces returned them in).
        stack = list(qr.item or [])
        while stack:
            item = stack.pop()
            if item.linkId not in index:
                index[item.linkId] = list(item.answer or [])
            stack.extend(item.item or [])
            for answer in item.answer or []:
                stack.extend(answer.item or [])
    return index.get(link_id, [])


def _answer_value(answer: Any) -> Any:
    for name in ("valueBoolean", "valueInteger", "valueDecimal", "valueDate", "valueDateTime",
                 "valueString"):
        value = getattr(answer, name, None)
        if value is not None:
            return value
    if answer.valueCoding is not None:
        return answer.valueCoding.code
    return None


def latest_answers(ctx: Context, link_id: str, within_days: float | None = None
                   ) -> tuple[list[Any], Any | None]:
    """The answers to an intake item in the newest response that answers it, and that response."""
    start = since(ctx, within_days)
    for qr in _responses(ctx):
        authored = as_datetime(qr.authored)
        if start is not None and (authored is None or authored < start):
            continue
        values = [v for v in (_answer_value(a) for a in _answers(ctx, qr, link_id))
                  if v is not None]
        if values:
            return values, qr
    return [], None


def _unanswered(ctx: Context, label: str, link_id: str) -> Result:
    if not ctx.record.available("QuestionnaireResponse"):
        return Result.not_known(f"{label}: the intake questionnaire could not be checked",
                                ask=[link_id], kind=UNAVAILABLE, fetch="QuestionnaireResponse")
    return Result.not_known(f"{label}: not asked (intake item {link_id} unanswered)",
                            ask=[link_id], kind=NOT_ASKED)


def answer(ctx: Context, a: dict[str, Any]) -> Result:
    """The newest intake response answers the item as asked."""
    link_id = a["item"]
    values, qr = latest_answers(ctx, link_id, a.get("within_days"))
    if qr is None:
        return _unanswered(ctx, a["label"], link_id)
    if "op" in a:
        hit = [v for v in values if isinstance(v, int | float | Decimal)
               and not isinstance(v, bool) and OPS[a["op"]](float(v), float(a["value"]))]
    else:
        wanted = a.get("equals", True)
        wanted_list = wanted if isinstance(wanted, list) else [wanted]
        hit = [v for v in values if any(_same_answer(v, w) for w in wanted_list)]
    shown = ", ".join(str(v).lower() if isinstance(v, bool) else str(v) for v in values)
    ev = Evidence(f"Intake answer: {a['label']}", shown, day(as_datetime(qr.authored)), ref(qr))
    return Result.present([ev]) if hit else Result.absent([ev])


def _same_answer(value: Any, wanted: Any) -> bool:
    if isinstance(value, bool) or isinstance(wanted, bool):
        return isinstance(value, bool) and isinstance(wanted, bool) and value == wanted
    return str(value) == str(wanted)


def answer_date_within(ctx: Context, a: dict[str, Any]) -> Result:
    """The item's date answer lies within the last ``days``."""
    values, qr = latest_answers(ctx, a["item"])
    parsed = [as_datetime(v) for v in values if isinstance(v, date | str)]
    dates = [d for d in parsed if d is not None]
    if qr is None or not dates:
        return _unanswered(ctx, a["label"], a["item"])
    newest = max(dates)
    ev = Evidence(f"Intake answer: {a['label']}", day(newest), day(as_datetime(qr.authored)),
                  ref(qr))
    return Result.present([ev]) if newest >= ctx.now - timedelta(days=float(a["days"])) \
        else Result.absent([ev])


def startback_scores(ctx: Context) -> tuple[int, int] | None:
    """(total, psychosocial subscale) of the STarT Back items, or None if any is unanswered."""
    k = ctx.knowledge
    items = k.param("$startback_items")
    sub_items = set(k.param("$startback_subscale_items"))
    scoring = set(k.param("$startback_item9_scoring_answers"))
    total = sub = 0
    for link_id in items:
        values, qr = latest_answers(ctx, link_id)
        if qr is None:
            return None
        value = values[0]
        point = 1 if (value is True or (isinstance(value, str) and value in scoring)) else 0
        total += point
        if link_id in sub_items:
            sub += point
    return total, sub


def startback(ctx: Context, a: dict[str, Any]) -> Result:
    """The STarT Back risk group the intake answers give."""
    scores = startback_scores(ctx)
    if scores is None:
        if not ctx.record.available("QuestionnaireResponse"):
            return Result.not_known("STarT Back: the intake questionnaire could not be checked",
                                    kind=UNAVAILABLE, topic="startback",
                                    fetch="QuestionnaireResponse")
        return Result.not_known("STarT Back: not every item answered",
                                ask=tuple(ctx.knowledge.param("$startback_items")),
                                kind=NOT_ASKED, topic="startback")
    total, sub = scores
    k = ctx.knowledge
    if sub >= int(k.param("$startback_high_min_subscale")):
        risk = "high"
    elif total <= int(k.param("$startback_low_max_total")):
        risk = "low"
    else:
        risk = "medium"
    _values, qr = latest_answers(ctx, k.param("$startback_items")[0])
    ev = Evidence("STarT Back", f"total {total}/9, psychosocial {sub}/5: {risk} risk",
                  day(as_datetime(qr.authored)) if qr else "", ref(qr) if qr else "")
    return Result.present([ev], value=risk) if risk == a["risk"] else Result.absent([ev])


# -- the patient --------------------------------------------------------------------------------
def age_years(birth: date, now: datetime) -> int:
    """Completed years of age."""
    today = now.date()
    return today.year - birth.year - ((today.month, today.day) < (birth.month, birth.day))


def ages(birth: Any, now: datetime) -> tuple[int, int] | None:
    """(youngest, oldest) completed years for a birth date that may be partial: FHIR allows
    ``1970`` or ``1970-05`` (de-identified records send them; they stay strings when parsed),
    so the patient is any age between the last and the first day it allows. None: unreadable."""
    if isinstance(birth, date):
        years = age_years(birth, now)
        return years, years
    match = _PARTIAL_DATE.fullmatch(str(birth or ""))
    if match is None:
        return None
    year, month = int(match.group(1)), match.group(2)
    if month is None:
        first, last = date(year, 1, 1), date(year, 12, 31)
    elif 1 <= int(month) <= 12:
        first = date(year, int(month), 1)
        last = first.replace(day=calendar.monthrange(year, int(month))[1])
    else:
        return None
    return age_years(last, now), age_years(first, now)


_PARTIAL_DATE = re.compile(r"(\d{4})(?:-(\d{2}))?")


def age(ctx: Context, a: dict[str, Any]) -> Result:
    """The patient's age in completed years meets the comparison (a birth date given only to
    the year or month answers when every age it allows agrees, else unknown)."""
    patient = ctx.record.patient
    birth = getattr(patient, "birthDate", None) if patient is not None else None
    if birth is None:
        if not ctx.record.available("Patient"):
            return unavailable(ctx, "Patient", "age")
        return Result.not_known("age: no birth date")
    span = ages(birth, ctx.now)
    if span is None:
        return Result.not_known("age: the birth date could not be read")
    young, old = span
    shown = f"{young} years" if young == old else f"{young} or {old} years (born {birth})"
    ev = Evidence("Age", shown, "", ref(patient))
    held = {OPS[a["op"]](years, float(a["value"])) for years in span}
    if held == {True}:
        return Result.present([ev], value=young)
    if held == {False}:
        return Result.absent([ev])
    return Result.not_known(f"age: born {birth}, {young} or {old} years")


def clinical_sex(patient: Any) -> str | None:
    """Patient.gender, or the sex-parameter-for-clinical-use extension where it says more."""
    value = patient.gender
    for ext in patient.extension or []:
        if ext.url == SEX_EXTENSION:
            for sub in ext.extension or []:
                if sub.url == "value" and sub.valueCodeableConcept is not None:
                    code = status_code(sub.valueCodeableConcept) or ""
                    value = {"female-typical": "female", "male-typical": "male"}.get(code, value)
    return str(value) if value else None


def sex_and_age(record: PatientRecord, now: datetime) -> tuple[str | None, int | None]:
    """The patient's clinical sex (female / male, else None) and age in years (else None), for
    leaving off a card what cannot apply to them."""
    patient = record.patient
    if patient is None:
        return None, None
    value = clinical_sex(patient)
    birth = getattr(patient, "birthDate", None)
    span = ages(birth, now) if birth is not None else None
    return (value if value in ("female", "male") else None, span[0] if span else None)


def sex(ctx: Context, a: dict[str, Any]) -> Result:
    """Patient.gender (or the sex-parameter-for-clinical-use extension) is as asked."""
    patient = ctx.record.patient
    if patient is None:
        if not ctx.record.available("Patient"):
            return unavailable(ctx, "Patient", "sex")
        return Result.not_known("sex: no Patient resource")
    value = clinical_sex(patient)
    if value not in ("female", "male"):
        return Result.not_known(f"sex: recorded as {value or 'nothing'}")
    ev = Evidence("Sex", str(value), "", ref(patient))
    return Result.present([ev]) if value == a["is"] else Result.absent([ev])


def episode_onset(ctx: Context, vs: ValueSet) -> tuple[datetime | None, Evidence | None]:
    """Start of the current episode: the intake onset date, else in-scope Condition dates.

    With an ``episode_gap_days`` for the value set in ``problem-list.yaml`` (HEDIS: no back-pain
    diagnosis in the prior 180 days makes a new episode), an entry that long before the next
    belongs to an earlier episode: an entry left active for years must not make a new episode
    chronic. Walking back from the newest in-scope entry that counts, the episode begins at the
    earliest entry reached without such a gap; without a gap, at the earliest entry.
    """
    values, qr = latest_answers(ctx, "lbp-onset-date")
    dates = [d for d in (as_datetime(v) for v in values) if d is not None]
    if qr is not None and dates:
        onset = max(dates)
        return onset, Evidence("Intake answer: onset of this episode", day(onset),
                               day(as_datetime(qr.authored)), ref(qr))
    dated: list[tuple[datetime, Entry]] = sorted(
        ((e.when, e) for e in problem_entries(ctx, vs) if e.when is not None),
        key=lambda pair: pair[0], reverse=True)
    best: tuple[datetime, Evidence] | None = None
    if dated:
        cur = ctx.knowledge.currency(vs.id)
        gap = timedelta(days=float(ctx.knowledge.param(cur.episode_gap_days))) \
            if cur is not None and cur.episode_gap_days is not None else None
        start, entry = dated[0]
        for earlier_when, earlier in dated[1:]:
            if gap is not None and start - earlier_when > gap:
                break
            start, entry = earlier_when, earlier
        best = (start, Evidence(f"Onset of {describe(match(entry.condition.code, vs))}",
                                day(start), "", ref(entry.condition)))
    if best is None:
        for order in ctx.reason_orders():
            if any(match(cc, vs) for cc in getattr(order, "reasonCode", None) or []):
                when = as_datetime(getattr(order, "authoredOn", None))
                if when is not None:
                    best = (when, Evidence("Draft order with a back-pain reason", day(when),
                                           "", ref(order)))
    return (best[0], best[1]) if best else (None, None)


def symptom_duration(ctx: Context, a: dict[str, Any]) -> Result:
    """The episode began ``days`` or more (op) before now."""
    onset, ev = episode_onset(ctx, a["valueset"])
    if onset is None or ev is None:
        if not ctx.record.available("Condition"):
            return unavailable(ctx, "Condition", a["label"])
        return Result.not_known(f"{a['label']}: no onset date recorded",
                                ask=["lbp-onset-date"])
    days = (ctx.now - onset).total_seconds() / 86400
    ev = Evidence(ev.what, f"{ev.value} ({int(days)} days ago)", ev.when, ev.reference)
    return Result.present([ev], value=days) if OPS[a["op"]](days, float(a["days"])) \
        else Result.absent([ev])


# -- the order being judged ---------------------------------------------------------------------
def order(ctx: Context, a: dict[str, Any]) -> Result:
    """The judged draft order is in the value set (by code, else by its text)."""
    vs: ValueSet = a["valueset"]
    target = ctx.order
    if target is None:
        return Result.absent()
    concept = getattr(target, "code", None) or getattr(target, "medicationCodeableConcept", None)
    coding = match(concept, vs)
    if coding is not None:
        return Result.present([Evidence(f"Draft order: {describe(coding)}", "draft", "",
                                        ref(target))])
    # Text is the last resort: only for an order none of whose codes is in a code system the
    # value set is written in (a local code, or text alone). A LOINC- or CPT-coded order is
    # judged by its code, so "MR ... WO and W contrast" is never read as "WO" by its text.
    known_systems = set(vs.exact) | set(vs.prefixes)
    if any(c.system in known_systems for c in codings(concept)):
        return Result.absent()
    texts = [getattr(concept, "text", None)] + [c.display for c in codings(concept)]
    for text in texts:
        if text and vs.matches_text(text):
            return Result.present([Evidence(f"Draft order: {text!r} (matched by text: its codes "
                                            "were not recognised)", "draft", "", ref(target))])
    return Result.absent()


def hook(ctx: Context, a: dict[str, Any]) -> Result:
    """The hook being served."""
    return Result.present([]) if ctx.hook == a["is"] else Result.absent()


def parameter(ctx: Context, a: dict[str, Any]) -> Result:
    """A site parameter has the given value."""
    return Result.present([]) if ctx.knowledge.param("$" + a["name"]) == a["equals"] \
        else Result.absent()


@dataclass(frozen=True)
class Fact:
    """A fact's function, the arguments it takes, and what it reads from the pack by name."""

    fn: Callable[[Context, dict[str, Any]], Result]
    required: frozenset[str]
    optional: frozenset[str] = frozenset()
    parameters: frozenset[str] = frozenset()
    valuesets: frozenset[str] = frozenset()
    choices: tuple[tuple[str, frozenset[Any]], ...] = ()


def _f(fn: Callable[[Context, dict[str, Any]], Result], required: str, optional: str = "",
       parameters: str = "", valuesets: str = "") -> Fact:
    return Fact(fn, frozenset(required.split()), frozenset(optional.split()),
                frozenset(parameters.split()), frozenset(valuesets.split()))


STARTBACK_PARAMETERS = ("startback_items startback_subscale_items "
                        "startback_item9_scoring_answers startback_low_max_total "
                        "startback_high_min_subscale")


FACTS: dict[str, Fact] = {
    "condition": replace(_f(condition, "valueset", "status within_days"),
                         choices=(("status", frozenset({"active", "any"})),)),
    "finding": _f(finding, "valueset", "within_days", valuesets="observation-negative"),
    "observation_value": _f(observation_value, "valueset op value", "unit within_days"),
    "lab_high": _f(lab_high, "valueset", "within_days"),
    "lab_low": _f(lab_low, "valueset", "within_days"),
    "lab_positive": _f(lab_positive, "valueset", "within_days value unit",
                       valuesets="observation-positive observation-negative"),
    "observation_recorded": _f(observation_recorded, "valueset", "within_days"),
    "weight_loss": _f(weight_loss, "valueset percent", "within_days"),
    "medication": replace(_f(medication, "valueset",
                             "status min_days within_days source for_episode"),
                          choices=(("status", frozenset({"active", "any"})),
                                   ("source", frozenset({"record", "draft", "any"})),
                                   ("for_episode", frozenset({True, False})))),
    "procedure": _f(procedure, "valueset", "within_days"),
    "service_request": _f(service_request, "valueset", "within_days status"),
    "prior_imaging": _f(prior_imaging, "valueset", "within_days since_onset_of"),
    "answer": _f(answer, "item", "equals op value within_days"),
    "answer_date_within": _f(answer_date_within, "item days"),
    "startback": replace(_f(startback, "risk", parameters=STARTBACK_PARAMETERS),
                         choices=(("risk", frozenset({"low", "medium", "high"})),)),
    "age": _f(age, "op value"),
    "sex": replace(_f(sex, "is"), choices=(("is", frozenset({"female", "male"})),)),
    "symptom_duration": _f(symptom_duration, "valueset op days"),
    "order": _f(order, "valueset"),
    "hook": replace(_f(hook, "is"), choices=(("is", frozenset({
        "patient-view", "order-select", "order-sign"})),)),
    "parameter": _f(parameter, "name equals"),
}
VALUESET_ARGS = {"valueset"}
NUMBER_ARGS = {"within_days", "value", "min_days", "days", "percent"}
