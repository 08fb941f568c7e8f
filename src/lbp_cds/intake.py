"""The red-flag intake as a form: which questions, in what order, prefilled from what, and the
QuestionnaireResponse the answers make.

Pure functions over the knowledge pack (``questionnaires/lbp-intake.json`` and its companion
``questionnaires/lbp-intake-form.yaml``) and raw FHIR JSON; no HTTP, no Flask, no templates. The
SMART blueprint (``smart.py``) fetches, renders (``pages.py``) and posts; this module decides.

What the record says is read through the rules' own facts (``facts.py``), so a question is
prefilled "yes" exactly when the rules would hold it on record, and never "no": a record that
does not mention a cancer does not say there was none.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import yaml
from fhir.resources.R4B.questionnaireresponse import QuestionnaireResponse
from pydantic import ValidationError

from lbp_cds import facts, knowledge
from lbp_cds.errors import KnowledgeError
from lbp_cds.fhir_data import record_from_resources
from lbp_cds.knowledge import Knowledge

FORM_FILE = "lbp-intake-form.yaml"
MIN_VALUE_URL = "http://hl7.org/fhir/StructureDefinition/minValue"
MAX_VALUE_URL = "http://hl7.org/fhir/StructureDefinition/maxValue"
# An integer question without a maxValue extension: far above any count of days or weeks a
# patient could mean, low enough to catch a date or a phone number typed in the wrong box.
DEFAULT_MAX_INTEGER = 10_000
# The intake item facts read the episode onset from (facts.episode_onset), and the facts that
# read the episode onset: a rule using them reads that question too.
ONSET_ITEM = "lbp-onset-date"
ONSET_FACTS = {"symptom_duration": None, "prior_imaging": "since_onset_of",
               "medication": "for_episode"}
ANSWER_TYPES = ("boolean", "choice", "integer", "date")
FACT_KINDS = ("condition", "finding", "lab_positive", "medication", "procedure",
              "observation_value", "lab_high")
ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
URN_UUID = re.compile(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class Prefill:
    """An answer the record (or a previous intake) gives, and where it comes from.

    ``value`` is typed as ``parse_answers`` types an answer: bool, a code (str), a list of codes
    (a repeating choice), int or ``datetime.date``.
    """

    value: Any
    source: str


@dataclass(frozen=True)
class Condition:
    """One enableWhen, with its answer as the form sends it (``"true"``, a code, ``"3"``)."""

    question: str
    operator: str
    answer: str


@dataclass(frozen=True)
class EnableWhen:
    """An item's enableWhen list and its enableBehavior (``all`` or ``any``)."""

    behavior: str
    conditions: tuple[Condition, ...]

    def as_json(self) -> str:
        """The JSON ``intake.js`` reads from ``data-enable-when``."""
        return json.dumps({"behavior": self.behavior, "conditions": [
            {"question": c.question, "operator": c.operator, "answer": c.answer}
            for c in self.conditions]}, separators=(",", ":"))


@dataclass(frozen=True)
class FormItem:
    """One question as the form shows it.

    ``group``: ``card`` (read by the rule of the card that opened the app), ``danger`` (read by a
    rule of card-style.yaml's danger-ordered ``rules``) or ``other``.
    """

    link_id: str
    text: str
    type: str
    options: list[tuple[str, str]]
    repeats: bool
    enable_when: EnableWhen | None
    group: str
    hint: str = ""
    minimum: int | None = None
    maximum: int | None = None


@dataclass(frozen=True)
class Applies:
    """The patients a question can concern (unknown sex or age: it might)."""

    sex: str | None = None
    min_age: float | None = None
    max_age: float | None = None

    def admits(self, sex: str | None, age: int | None) -> bool:
        """Tell whether the question can concern this patient."""
        return knowledge.admits(self, sex, age)


@dataclass(frozen=True)
class PrefillCase:
    """One case of an item's ``prefill``: an answer and the facts that give it, or an onset."""

    answer: Any = None
    mode: str = "any"  # any | all
    leaves: tuple[dict[str, Any], ...] = ()
    onset_of: str | None = None


@dataclass(frozen=True)
class FormSpec:
    """``lbp-intake-form.yaml`` read and checked against the pack."""

    applies: Mapping[str, Applies]
    hints: Mapping[str, str]
    prefill: Mapping[str, tuple[PrefillCase, ...]]
    items: tuple[dict[str, Any], ...] = field(default=())  # the questionnaire's answerable items


_SPECS: dict[str, FormSpec] = {}


# -- loading ------------------------------------------------------------------------------------
def load_form(k: Knowledge) -> FormSpec:
    """Read and check ``questionnaires/lbp-intake-form.yaml`` (once per pack digest).

    The blueprint calls this when it is registered, so an inconsistent file stops the app at
    start-up; every other function here calls it too (cached).

    Args:
        k: the loaded knowledge pack.

    Returns:
        The form's applies, hints and prefill rules.

    Raises:
        KnowledgeError: the file is missing or malformed; it names an unknown linkId, value set,
            fact or parameter; an answer is not among the item's options; an ``applies`` differs
            from card-style.yaml's for the same topic; or an enableWhen item has no hint.
    """
    key = k.digest or str(id(k))
    spec = _SPECS.get(key)
    if spec is None:
        spec = _SPECS[key] = _load_form(k)
    return spec


def _load_form(k: Knowledge) -> FormSpec:
    path = k.root / "questionnaires" / FORM_FILE
    where = f"questionnaires/{FORM_FILE}"
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KnowledgeError(f"{where} is missing") from None
    except yaml.YAMLError as exc:
        raise KnowledgeError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != 1:
        raise KnowledgeError(f"{where}: expected a mapping with version: 1")
    unknown_keys = set(doc) - {"version", "items"}
    if unknown_keys:
        raise KnowledgeError(f"{where}: unknown keys {sorted(unknown_keys)}")
    items = _answerable(k.questionnaire.get("item") or [])
    by_id = {i["linkId"]: i for i in items}
    applies: dict[str, Applies] = {}
    hints: dict[str, str] = {}
    prefill: dict[str, tuple[PrefillCase, ...]] = {}
    for link_id, entry in (doc.get("items") or {}).items():
        at = f"{where} {link_id}"
        if link_id not in by_id:
            raise KnowledgeError(f"{at}: not an answerable item of the questionnaire")
        if not isinstance(entry, dict) or set(entry) - {"applies", "hint", "prefill"}:
            raise KnowledgeError(f"{at}: takes applies, hint and prefill")
        if "applies" in entry:
            applies[link_id] = _applies(k, entry["applies"], link_id, at)
        if "hint" in entry:
            if not isinstance(entry["hint"], str) or not entry["hint"].strip():
                raise KnowledgeError(f"{at}: hint must be a non-empty string")
            hints[link_id] = entry["hint"].strip()
        if "prefill" in entry:
            prefill[link_id] = _prefill_cases(k, entry["prefill"], by_id[link_id], at)
    for item in items:
        if item.get("enableWhen"):
            if item["linkId"] not in hints:
                raise KnowledgeError(f"{where}: {item['linkId']} has an enableWhen and needs a "
                                     "hint (the form must read right without JavaScript)")
            for cond in item["enableWhen"]:
                if cond.get("question") not in by_id:
                    raise KnowledgeError(f"questionnaire {item['linkId']}: enableWhen names "
                                         f"unknown item {cond.get('question')!r}")
    return FormSpec(applies, hints, prefill, tuple(items))


def _answerable(nodes: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The questionnaire's answerable items in order (groups opened, display items left out)."""
    out: list[dict[str, Any]] = []
    for item in nodes:
        if item.get("type") in ANSWER_TYPES:
            out.append(item)
        out.extend(_answerable(item.get("item") or []))
    return out


def _applies(k: Knowledge, raw: Any, link_id: str, at: str) -> Applies:
    if not isinstance(raw, dict) or set(raw) - {"sex", "min_age", "max_age"}:
        raise KnowledgeError(f"{at}: applies takes sex, min_age and max_age")
    if raw.get("sex") not in (None, "female", "male"):
        raise KnowledgeError(f"{at}: applies.sex must be female or male")
    out = Applies(raw.get("sex"), raw.get("min_age"), raw.get("max_age"))
    topic = k.style.topics.get(link_id)
    limits = (topic.sex, topic.min_age, topic.max_age) if topic is not None else (None,) * 3
    if limits != (None,) * 3 and limits != (out.sex, out.min_age, out.max_age):
        raise KnowledgeError(f"{at}: applies differs from card-style.yaml topics {link_id}")
    return out


def _options(item: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(o["valueCoding"]["code"]): o["valueCoding"]
            for o in item.get("answerOption") or [] if "valueCoding" in o}


def _prefill_cases(k: Knowledge, raw: Any, item: Mapping[str, Any], at: str
                   ) -> tuple[PrefillCase, ...]:
    if not isinstance(raw, list) or not raw:
        raise KnowledgeError(f"{at}: prefill must be a non-empty list of cases")
    cases = []
    for pos, case in enumerate(raw):
        here = f"{at} prefill[{pos}]"
        if not isinstance(case, dict):
            raise KnowledgeError(f"{here}: expected a mapping")
        if "onset_of" in case:
            if set(case) != {"onset_of"} or item.get("type") != "date":
                raise KnowledgeError(f"{here}: onset_of stands alone, on a date item")
            _valueset(k, case["onset_of"], here)
            cases.append(PrefillCase(onset_of=str(case["onset_of"])))
            continue
        modes = [m for m in ("any", "all") if m in case]
        if set(case) - {"answer", "any", "all"} or "answer" not in case or len(modes) != 1:
            raise KnowledgeError(f"{here}: needs answer and one of any / all")
        answer = case["answer"]
        if item["type"] == "boolean" and answer is not True:
            # Absent is not no: the record can only ever say yes.
            raise KnowledgeError(f"{here}: a boolean item is prefilled true only")
        if item["type"] == "choice" and str(answer) not in _options(item):
            raise KnowledgeError(f"{here}: answer {answer!r} is not an option of the item")
        if item["type"] not in ("boolean", "choice"):
            raise KnowledgeError(f"{here}: only boolean and choice items take an answer")
        leaves = case[modes[0]]
        if not isinstance(leaves, list) or not leaves:
            raise KnowledgeError(f"{here}: {modes[0]} needs a non-empty list of facts")
        cases.append(PrefillCase(answer=answer, mode=modes[0],
                                 leaves=tuple(_leaf(k, leaf, here) for leaf in leaves)))
    return tuple(cases)


def _valueset(k: Knowledge, vs_id: Any, at: str) -> None:
    if not isinstance(vs_id, str) or vs_id not in k.valuesets:
        raise KnowledgeError(f"{at}: unknown value set {vs_id!r}")


def _leaf(k: Knowledge, raw: Any, at: str) -> dict[str, Any]:
    """A fact leaf with its parameters resolved and its value set looked up."""
    if not isinstance(raw, dict) or raw.get("fact") not in FACT_KINDS:
        raise KnowledgeError(f"{at}: each fact must be one of {FACT_KINDS}, got {raw!r}")
    fact = facts.FACTS[raw["fact"]]
    args = {key: v for key, v in raw.items() if key != "fact"}
    missing = fact.required - set(args)
    extra = set(args) - fact.required - fact.optional
    if missing or extra:
        raise KnowledgeError(f"{at}: fact {raw['fact']} missing {sorted(missing)} / unexpected "
                             f"{sorted(extra)}")
    for vs_id in fact.valuesets:
        _valueset(k, vs_id, at)
    resolved: dict[str, Any] = {"fact": raw["fact"]}
    for key, value in args.items():
        try:
            value = k.param(value)
        except KnowledgeError as exc:
            raise KnowledgeError(f"{at}: {exc}") from None
        if key == "valueset":
            _valueset(k, value, at)
            value = k.medication_valueset(value) if raw["fact"] == "medication" \
                else k.valueset(value)
        resolved[key] = value
    resolved["label"] = resolved["valueset"].title
    return resolved


# -- which questions, in what order -------------------------------------------------------------
def rule_items(k: Knowledge, rule_id: str) -> list[str]:
    """The intake items a rule reads: its ``answer`` facts, the STarT Back items of its
    ``startback`` facts, the episode onset its episode facts read, and its ask block's topics.

    Its condition tree, escalations, notes and ask state are read; rules it refers to are not
    (their questions are theirs).

    Args:
        k: the loaded knowledge pack.
        rule_id: a rule id (``CES-1``).

    Returns:
        linkIds in questionnaire order, each once; ``[]`` for an unknown rule.
    """
    rule = next((r for r in k.rules if r.id == rule_id), None)
    if rule is None:
        return []
    found: set[str] = set()
    trees = [rule.when, *(t for _, t in rule.escalate), *(t for _, t in rule.notes)]
    if rule.ask is not None:
        trees.append(rule.ask.when)
        found.update(rule.ask.about)
    for tree in trees:
        _walk(k, tree, found)
    return [i["linkId"] for i in load_form(k).items if i["linkId"] in found]


def card_items(k: Knowledge, rule_id: str) -> list[str]:
    """The questions that can change a card of ``rule_id``: its own (``rule_items``) and those of
    every rule its conditions refer to, transitively. CC-1 stands because no red-flag rule fired:
    its card's questions are those rules' questions.

    Returns:
        linkIds in questionnaire order, each once; ``[]`` for an unknown rule.
    """
    by_id = {r.id: r for r in k.rules}
    seen: set[str] = set()
    todo = [rule_id]
    found: set[str] = set()
    while todo:
        rid = todo.pop()
        rule = by_id.get(rid)
        if rule is None or rid in seen:
            continue
        seen.add(rid)
        found.update(rule_items(k, rid))
        refs: set[str] = set()
        trees = [rule.when, *(t for _, t in rule.escalate), *(t for _, t in rule.notes)]
        if rule.ask is not None:
            trees.append(rule.ask.when)
        for tree in trees:
            _walk(k, tree, set(), refs)
        todo.extend(refs - seen)
    return [i["linkId"] for i in load_form(k).items if i["linkId"] in found]


def _walk(k: Knowledge, tree: Any, found: set[str], refs: set[str] | None = None) -> None:
    if isinstance(tree, list):
        for sub in tree:
            _walk(k, sub, found, refs)
        return
    if not isinstance(tree, dict):
        return
    if "rule" in tree and "fact" not in tree:
        if refs is not None:
            refs.add(str(tree["rule"]))
        return
    fact = tree.get("fact")
    if fact is not None:
        if "item" in tree:
            found.add(str(tree["item"]))
        if fact == "startback":
            found.update(str(i) for i in k.param("$startback_items"))
        if fact in ONSET_FACTS:
            arg = ONSET_FACTS[fact]
            if arg is None or tree.get(arg):
                found.add(ONSET_ITEM)
        return
    for key in ("all", "any", "of", "not"):
        if key in tree:
            _walk(k, tree[key], found, refs)


def form_items(k: Knowledge, *, sex: str | None, age: int | None,
               first_rule: str | None) -> list[FormItem]:
    """The questions to show this patient, most useful first.

    The questions that can change the card's rule come first (group ``card``: ``card_items``),
    the rule's own first, then the others by danger: an
    item's rank is the most dangerous rule that reads it, rules ranked by card-style.yaml
    ``rules`` (group ``danger``), then by the pack's order (group ``other``); questions no rule
    reads come last, in questionnaire order. Ties keep the questionnaire's order.

    Args:
        k: the loaded knowledge pack.
        sex: ``female``, ``male`` or None (unknown: every question stays).
        age: completed years, or None (unknown: every question stays).
        first_rule: the rule of the card that opened the app, or None.

    Returns:
        The items, without those whose ``applies`` excludes this patient.
    """
    spec = load_form(k)
    danger = list(k.style.rules)
    ranked = danger + [r.id for r in k.rules if r.id not in k.style.rules]
    rank: dict[str, int] = {}
    for pos, rid in enumerate(ranked):
        for link_id in rule_items(k, rid):
            rank.setdefault(link_id, pos)
    own = set(rule_items(k, first_rule)) if first_rule else set()
    first = set(card_items(k, first_rule)) if first_rule else set()
    unread = len(ranked)

    def group_of(link_id: str) -> str:
        if link_id in first:
            return "card"
        return "danger" if rank.get(link_id, unread) < len(danger) else "other"

    def order(pair: tuple[int, dict[str, Any]]) -> tuple[int, int, int]:
        pos, item = pair
        link_id = item["linkId"]
        # The rule's own questions, then those of the rules it depends on, then the rest.
        place = 0 if link_id in own else 1 if link_id in first else 2
        return (place, rank.get(link_id, unread), pos)

    out = []
    for _pos, item in sorted(enumerate(spec.items), key=order):
        link_id = item["linkId"]
        applies = spec.applies.get(link_id)
        if applies is not None and not applies.admits(sex, age):
            continue
        minimum, maximum = _bounds(item)
        out.append(FormItem(
            link_id=link_id, text=str(item.get("text", link_id)), type=str(item["type"]),
            options=[(code, str(c.get("display") or code)) for code, c in _options(item).items()],
            repeats=bool(item.get("repeats")), enable_when=_enable_when(item),
            group=group_of(link_id), hint=spec.hints.get(link_id, ""),
            minimum=minimum if item["type"] == "integer" else None,
            maximum=maximum if item["type"] == "integer" else None))
    return out


def _bounds(item: Mapping[str, Any]) -> tuple[int, int]:
    low, high = 0, DEFAULT_MAX_INTEGER
    for ext in item.get("extension") or []:
        if ext.get("url") == MIN_VALUE_URL and isinstance(ext.get("valueInteger"), int):
            low = max(0, ext["valueInteger"])
        if ext.get("url") == MAX_VALUE_URL and isinstance(ext.get("valueInteger"), int):
            high = ext["valueInteger"]
    return low, high


def _enable_when(item: Mapping[str, Any]) -> EnableWhen | None:
    raw = item.get("enableWhen") or []
    if not raw:
        return None
    conditions = []
    for cond in raw:
        answer = ""
        for key, value in cond.items():
            if key == "answerBoolean":
                answer = "true" if value else "false"
            elif key == "answerCoding":
                answer = str(value.get("code", ""))
            elif key.startswith("answer"):
                answer = str(value)
        conditions.append(Condition(str(cond["question"]), str(cond["operator"]), answer))
    return EnableWhen(str(item.get("enableBehavior", "all")), tuple(conditions))


def sex_and_age(patient: Mapping[str, Any] | None, now: datetime
                ) -> tuple[str | None, int | None]:
    """The patient's clinical sex and age in completed years, read as the rules read them.

    Unlike ``facts.sex_and_age`` (which gives a card the youngest age a partial birth date
    allows), the age is None when a partial birth date allows two ages: here an age leaves a
    question off the form, and a question wrongly left off is the costlier mistake.

    Args:
        patient: a FHIR Patient (JSON), or None.
        now: the clock.

    Returns:
        (``female`` / ``male`` / None, completed years / None).
    """
    if not patient:
        return None, None
    record = record_from_resources(str(patient.get("id") or ""), [dict(patient)])
    parsed = record.patient
    if parsed is None:
        return None, None
    sex = facts.clinical_sex(parsed)
    birth = getattr(parsed, "birthDate", None)
    span = facts.ages(birth, now) if birth is not None else None
    age = span[0] if span is not None and span[0] == span[1] else None
    return (sex if sex in ("female", "male") else None), age


def patient_banner(patient: Mapping[str, Any] | None) -> dict[str, str] | None:
    """What the patient banner shows (name, sex, birth date), from a FHIR Patient.

    Args:
        patient: a FHIR Patient (JSON), or None.

    Returns:
        ``{"name", "sex", "birth_date"}`` (empty strings where unknown), or None.
    """
    if not patient:
        return None
    names = patient.get("name") or []
    chosen = next((n for n in names if isinstance(n, dict) and n.get("use") == "official"),
                  names[0] if names and isinstance(names[0], dict) else {})
    name = str(chosen.get("text") or " ".join(
        [*(str(g) for g in chosen.get("given") or []), str(chosen.get("family") or "")]).strip())
    return {"name": name, "sex": str(patient.get("gender") or ""),
            "birth_date": str(patient.get("birthDate") or "")}


# -- prefill ------------------------------------------------------------------------------------
def prefill(k: Knowledge, resources: Mapping[str, Sequence[dict[str, Any]]], *,
            now: datetime) -> dict[str, Prefill]:
    """The answers the record gives, each with its source.

    Record findings (``prefill`` in lbp-intake-form.yaml) come first; then the newest previous
    intake answers what the record did not ("previous intake, <date>"), if it was answered
    within ``$intake_prefill_previous_days`` and is not a "no". Only a finding that is present
    prefills: nothing is prefilled "no", and a finding that could not be read prefills nothing.

    Args:
        k: the loaded knowledge pack.
        resources: raw FHIR JSON by resource type (Patient, Condition, Observation,
            MedicationRequest, Procedure, QuestionnaireResponse).
        now: the clock.

    Returns:
        Prefills by linkId.
    """
    spec = load_form(k)
    patient = next(iter(resources.get("Patient") or ()), None)
    pid = str((patient or {}).get("id") or "")
    record_items = [r for rtype, rs in resources.items() if rtype != "QuestionnaireResponse"
                    for r in rs]
    ctx = facts.Context(record_from_resources(pid, record_items), k, now, "patient-view")
    out: dict[str, Prefill] = {}
    for link_id, cases in spec.prefill.items():
        for case in cases:
            found = _case(ctx, case)
            if found is not None:
                out[link_id] = found
                break
    window = float(k.param("$intake_prefill_previous_days"))
    intake = facts.Context(record_from_resources(pid, resources.get("QuestionnaireResponse")
                                                 or ()), k, now, "patient-view")
    for item in spec.items:
        link_id = item["linkId"]
        if link_id in out:
            continue
        values, qr = facts.latest_answers(intake, link_id, within_days=window)
        value = _typed_previous(item, values)
        if value is False:
            continue  # an earlier "no" is not today's: the question is asked again
        if qr is not None and value is not None:
            when = facts.day(facts.as_datetime(qr.authored))
            out[link_id] = Prefill(value, f"previous intake, {when}" if when
                                   else "previous intake")
    return out


def _case(ctx: facts.Context, case: PrefillCase) -> Prefill | None:
    if case.onset_of is not None:
        onset, ev = facts.episode_onset(ctx, ctx.knowledge.valueset(case.onset_of))
        if onset is None or ev is None:
            return None
        return Prefill(onset.date(), _source(ev))
    results = []
    for leaf in case.leaves:
        args = {key: v for key, v in leaf.items() if key != "fact"}
        results.append(facts.evaluate_fact(facts.FACTS[leaf["fact"]].fn, ctx, args))
    present = [r for r in results if r.status == facts.PRESENT]
    if (case.mode == "any" and not present) or (case.mode == "all" and
                                                len(present) != len(results)):
        return None
    evidence = [e for r in present for e in r.evidence]
    return Prefill(case.answer, "; ".join(dict.fromkeys(_source(e) for e in evidence)))


def _source(ev: facts.Evidence) -> str:
    return f"{ev.what}, {ev.when}" if ev.when else ev.what


def _typed_previous(item: Mapping[str, Any], values: list[Any]) -> Any:
    """A previous intake's answers as ``parse_answers`` would type them, or None when they do
    not fit the item as it is now (an option since removed, say)."""
    kind = item["type"]
    if not values:
        return None
    if kind == "boolean":
        return values[0] if isinstance(values[0], bool) else None
    if kind == "integer":
        low, high = _bounds(item)
        v = values[0]
        return v if isinstance(v, int) and not isinstance(v, bool) and low <= v <= high \
            else None
    if kind == "date":
        v = values[0]
        return v if isinstance(v, date) and not isinstance(v, datetime) else \
            (v.date() if isinstance(v, datetime) else None)
    options = _options(item)
    codes = [str(v) for v in values if str(v) in options]
    if len(codes) != len(values) or not codes:
        return None
    return [c for c in options if c in codes] if item.get("repeats") else codes[0]


# -- answers ------------------------------------------------------------------------------------
def parse_answers(k: Knowledge, form: Mapping[str, list[str]], *,
                  now: datetime | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a submitted form.

    Field names are linkIds; unknown fields (``csrf``, ``identifier``) are ignored; an empty
    field is unanswered, not an error (no question is compulsory). Answers to questions disabled
    by their enableWhen are dropped, with their errors.

    Args:
        k: the loaded knowledge pack.
        form: the submitted fields, each with its list of values
            (``request.form.to_dict(flat=False)``).
        now: the clock, for "not in the future" (default: the current time).

    Returns:
        (typed values by linkId, plain-language errors by linkId). Booleans are bool, choices
        their code (a list of codes for a repeating choice), integers int, dates ``date``.
    """
    spec = load_form(k)
    today = (now or datetime.now().astimezone()).date()
    values: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for item in spec.items:
        link_id = item["linkId"]
        raw = [v.strip() for v in form.get(link_id, []) if isinstance(v, str) and v.strip()]
        if not raw:
            continue
        try:
            values[link_id] = _parse_one(item, raw, today)
        except ValueError as exc:
            errors[link_id] = str(exc)
    for link_id in disabled_items(k, values):
        values.pop(link_id, None)
        errors.pop(link_id, None)
    return values, errors


def _parse_one(item: Mapping[str, Any], raw: list[str], today: date) -> Any:
    kind = item["type"]
    if kind == "boolean":
        if len(raw) != 1 or raw[0] not in ("true", "false"):
            raise ValueError("Choose Yes or No.")
        return raw[0] == "true"
    if kind == "choice":
        options = _options(item)
        if any(v not in options for v in raw):
            raise ValueError("Choose one of the answers listed.")
        if item.get("repeats"):
            return [code for code in options if code in raw]
        if len(raw) != 1:
            raise ValueError("Choose only one answer.")
        return raw[0]
    if kind == "integer":
        low, high = _bounds(item)
        if len(raw) != 1 or not re.fullmatch(r"\d+", raw[0]):
            raise ValueError("Enter a whole number, like 3.")
        number = int(raw[0])
        if not low <= number <= high:
            raise ValueError(f"Enter a number from {low} to {high}.")
        return number
    if len(raw) != 1 or not ISO_DATE.fullmatch(raw[0]):
        raise ValueError("Enter a date as year-month-day, like 2026-03-01.")
    try:
        when = date.fromisoformat(raw[0])
    except ValueError:
        raise ValueError("Enter a real date, like 2026-03-01.") from None
    # One day of slack: the patient's today may be tomorrow on the server's clock.
    if when > today + timedelta(days=1):
        raise ValueError("The date cannot be in the future.")
    if when.year < 1900:
        raise ValueError("Check the year.")
    return when


def disabled_items(k: Knowledge, values: Mapping[str, Any]) -> list[str]:
    """The items whose enableWhen the answers do not meet (FHIR R4 semantics: ``=`` holds when
    some answer equals; ``!=`` when none does; ``exists``; a question without an answer meets
    no condition but ``exists: false``). An item disabled because the question it depends on is
    itself disabled is disabled too.

    Args:
        k: the loaded knowledge pack.
        values: typed answers by linkId.

    Returns:
        linkIds, in questionnaire order.
    """
    items = load_form(k).items
    current = dict(values)
    disabled: list[str] = []
    changed = True
    while changed:
        changed = False
        for item in items:
            link_id = item["linkId"]
            rule = _enable_when(item)
            if link_id in disabled or rule is None:
                continue
            met = [_meets(c, current.get(c.question)) for c in rule.conditions]
            if not (any(met) if rule.behavior == "any" else all(met)):
                disabled.append(link_id)
                current.pop(link_id, None)
                changed = True
    order = [i["linkId"] for i in items]
    return sorted(disabled, key=order.index)


def form_strings(value: Any) -> list[str]:
    """A typed answer (or the strings a form sent) as the strings the form's fields hold."""
    if value is None:
        return []
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, list | tuple):
        return [s for v in value for s in form_strings(v)]
    if isinstance(value, date):
        return [value.isoformat()]
    return [str(value)]


def _meets(cond: Condition, value: Any) -> bool:
    answers = form_strings(value)
    if cond.operator == "exists":
        return bool(answers) == (cond.answer == "true")
    if not answers:
        return False
    if cond.operator == "=":
        return cond.answer in answers
    if cond.operator == "!=":
        return cond.answer not in answers
    ops = {">": lambda a, b: a > b, "<": lambda a, b: a < b,
           ">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b}
    compare = ops.get(cond.operator)
    if compare is None:
        return False
    for answer in answers:
        try:
            if compare(float(answer), float(cond.answer)):
                return True
        except ValueError:
            if ISO_DATE.fullmatch(answer) and compare(answer, cond.answer):
                return True
    return False


# -- the response -------------------------------------------------------------------------------
def build_response(k: Knowledge, values: Mapping[str, Any], *, patient_id: str,
                   author: str | None, authored: datetime, identifier: str) -> dict[str, Any]:
    """The FHIR R4 QuestionnaireResponse of the answers.

    Args:
        k: the loaded knowledge pack.
        values: typed answers by linkId (``parse_answers``).
        patient_id: the patient's id on the EHR's FHIR server.
        author: a reference to who answered (``Practitioner/123``, ``Patient/abc``), or None.
        authored: when, timezone-aware.
        identifier: a ``urn:uuid:`` the form carried from its first display, so a retried save
            is recognisably the same response.

    Returns:
        The QuestionnaireResponse JSON: status completed, items in questionnaire order.

    Raises:
        ValueError: a value does not fit its item, the inputs are malformed, or the result is
            not a valid R4 QuestionnaireResponse (the message says why).
    """
    if not URN_UUID.fullmatch(identifier):
        raise ValueError("identifier must be a urn:uuid:")
    if authored.tzinfo is None:
        raise ValueError("authored must carry a timezone offset")
    if not re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", patient_id):
        raise ValueError("patient_id is not a FHIR id")
    spec = load_form(k)
    known = {i["linkId"] for i in spec.items}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"not items of the questionnaire: {', '.join(unknown)}")
    disabled = set(disabled_items(k, values))
    items = []
    for item in spec.items:
        link_id = item["linkId"]
        if link_id not in values or link_id in disabled or values[link_id] is None:
            continue
        answers = _answers(item, values[link_id])
        if answers:
            items.append({"linkId": link_id, "text": item.get("text", ""), "answer": answers})
    q = k.questionnaire
    response: dict[str, Any] = {
        "resourceType": "QuestionnaireResponse",
        "identifier": {"system": "urn:ietf:rfc:3986", "value": identifier},
        "questionnaire": f"{q.get('url', '')}|{q.get('version', '')}" if q.get("version")
        else str(q.get("url", "")),
        "status": "completed",
        "subject": {"reference": f"Patient/{patient_id}"},
        "authored": authored.isoformat(timespec="seconds"),
    }
    if author:
        response["author"] = {"reference": author}
    if items:
        response["item"] = items
    try:
        QuestionnaireResponse.model_validate(response)
    except ValidationError as exc:
        raise ValueError(f"not a valid QuestionnaireResponse: {exc}") from None
    return response


def _answers(item: Mapping[str, Any], value: Any) -> list[dict[str, Any]]:
    kind, link_id = item["type"], item["linkId"]
    if kind == "boolean":
        if not isinstance(value, bool):
            raise ValueError(f"{link_id}: expected true or false")
        return [{"valueBoolean": value}]
    if kind == "integer":
        low, high = _bounds(item)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{link_id}: expected a whole number from {low} to {high}")
        return [{"valueInteger": value}]
    if kind == "date":
        if isinstance(value, datetime) or not isinstance(value, date):
            raise ValueError(f"{link_id}: expected a date")
        return [{"valueDate": value.isoformat()}]
    options = _options(item)
    codes = list(value) if isinstance(value, list | tuple) else [value]
    if not codes or (len(codes) > 1 and not item.get("repeats")) or \
            any(str(c) not in options for c in codes):
        raise ValueError(f"{link_id}: expected {'codes' if item.get('repeats') else 'a code'} "
                         f"among {', '.join(options)}")
    return [{"valueCoding": {key: options[str(c)][key] for key in ("system", "code", "display")
                             if key in options[str(c)]}} for c in codes]
