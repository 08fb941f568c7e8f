"""Render rule matches into CDS Hooks 2.0 cards: pure, no I/O.

Every word comes from ``cards.yaml``; this module fills in uuids, the evidence, what could not be
checked, the sources, the suggestions as complete FHIR resources, override reasons and links.
No field is ever null or empty (CDS Hooks §"Use of JSON").
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from lbp_cds.facts import NOT_ASKED, UNAVAILABLE, UNREADABLE, Evidence, Unknown
from lbp_cds.knowledge import Knowledge, Orderable, Phrase, ask_card
from lbp_cds.rules import RuleMatch

RULE_EXTENSION = "org.lbp-cds.rule"
SOURCES_SHOWN = 2  # source ids at the foot of the detail; all are in the card's links
# Hex digits of the knowledge digest a card shows (as a short git commit id: enough to tell the
# pack versions a site has run apart; the store keeps all 64).
KNOWLEDGE_DIGEST_SHOWN = 12
REQUESTER_TYPES = ("Practitioner/", "PractitionerRole/")


@dataclass(frozen=True)
class CardContext:
    """What card rendering needs from the hook call."""

    patient_id: str
    now: datetime
    encounter_id: str | None = None
    user_id: str | None = None
    base_url: str = ""
    record_checked: bool = True
    sex: str | None = None  # the patient's, to leave out what cannot apply to them
    age: float | None = None
    draft_raw: Callable[[str], dict[str, Any] | None] = lambda _id: None
    drafts: tuple[dict[str, Any], ...] = ()  # every draft order of the call, as received
    asking: frozenset[str] = frozenset()  # rules in their ask state in this answer

#: The intake app link's label: what the click does, in a few words.
INTAKE_LINK_LABEL = "Answer the missing red-flag questions"


@dataclass(frozen=True)
class IssuedCard:
    """A rendered card with what the store keeps about it (no patient data)."""

    card: dict[str, Any]
    rule_id: str
    indicator: str
    suggestion_uuids: tuple[str, ...]


def render(matches: list[RuleMatch], knowledge: Knowledge, cc: CardContext) -> list[IssuedCard]:
    """Turn matches into cards, in the matches' order.

    Args:
        matches: fired rules, most urgent first.
        knowledge: the pack (card text, citations, orderables, override reasons).
        cc: the hook call's context.

    Returns:
        Rendered cards with their rule ids.
    """
    # A rule asking its question on another card of this answer is named first where it is
    # not checked ("No red flag recorded" beside "a fall or sudden onset?" must not bury it).
    asking = frozenset(m.rule.id for m in matches if m.state == "ask")
    if asking:
        cc = replace(cc, asking=asking)
    return [_card(m, knowledge, cc) for m in matches]


def _card(m: RuleMatch, k: Knowledge, cc: CardContext) -> IssuedCard:
    spec = k.cards[m.rule.card]
    if m.state == "ask":
        spec = ask_card(spec)
    summary = (spec.get("summary_by_indicator") or {}).get(m.indicator) or spec["summary"]
    citation = k.citations[spec["source"]]
    source: dict[str, Any] = {"label": citation.label}
    if citation.url:
        source["url"] = citation.url
    topic = spec.get("topic") or citation.topic
    if topic:
        source["topic"] = {key: str(v) for key, v in topic.items() if v}
    card: dict[str, Any] = {
        "uuid": str(uuid.uuid4()),
        "summary": summary,
        "indicator": m.indicator,
        "detail": _detail(m, spec, k, cc),
        "source": source,
    }
    drafted = [_suggestion(s, m, k, cc) for s in spec.get("suggestions") or []]
    suggestions = [s for s in drafted if s]
    if suggestions:
        card["suggestions"] = suggestions
        card["selectionBehavior"] = spec["selectionBehavior"]
    reasons = [dict(k.override_reasons[r]) for r in spec.get("overrideReasons") or []]
    if reasons:
        card["overrideReasons"] = reasons
    links = _links(m, spec, k, cc)
    if links:
        card["links"] = links
    ext: dict[str, Any] = {"ruleId": m.rule.id,
                           "knowledgeDigest": k.digest[:KNOWLEDGE_DIGEST_SHOWN]}
    if m.state != "fire":
        ext["state"] = m.state
    # The whole lists, for integrators and the audit: the detail names only what fits.
    if m.evidence:
        ext["evidence"] = [" · ".join(b for b in (e.what, e.value, e.when) if b)
                           for e in m.evidence]
    if m.unknowns:
        ext["notChecked"] = list(m.not_checked)
    card["extension"] = {RULE_EXTENSION: ext}
    return IssuedCard(card, m.rule.id, m.indicator,
                      tuple(s["uuid"] for s in suggestions))


def words(text: str) -> int:
    """Words as the card budget counts them: whitespace-separated tokens with a letter or digit."""
    return sum(1 for token in text.split() if _WORDY.search(token))


_WORDY = re.compile(r"[^\W_]")


def _detail(m: RuleMatch, spec: dict[str, Any], k: Knowledge, cc: CardContext) -> str:
    """The pack's words, then what the record showed, what could not be checked, and the sources,
    within the card budget (``card-style.yaml``): evidence lines are dropped, counted, before
    anything else, and the whole lists stay in the card's extension."""
    style = k.style
    head = [str(spec.get("detail", "")).strip()]
    for note in m.notes:
        text = str(spec["notes"][note]).strip()
        if "{evidence}" in text:  # the note names what made it hold ("age 62 years")
            said = "; ".join(_evidence_lines(m.note_evidence.get(note, ())))
            text = text.replace("{evidence}", _md(said[:1].lower() + said[1:]))
        head.append(text)
    if not cc.record_checked:
        head.append("**The record could not be obtained: red flags and mimics were not checked.** "
                    "This rests on the order alone.")
    gaps, named, more = _not_checked(m, k, cc)
    sources = m.rule.sources[:SOURCES_SHOWN]
    rest = len(m.rule.sources) - len(sources)
    footer = f"_{m.rule.id} · {', '.join(sources)}" + (f" +{rest}" if rest else "") + "_"
    limit = style.detail_words[m.indicator]

    def tail_of(n: int) -> list[str]:
        out = []
        if named[:n]:
            extra = more + len(named) - n
            out.append("**Not checked:** " + "; ".join(_md(x) for x in named[:n])
                       + (f" (+{extra} more)" if extra else "") + ".")
        if gaps:
            out.append("**Could not be checked:** " + "; ".join(_md(g) for g in gaps) + ".")
        return out

    # Over budget, the unasked questions shrink to the most dangerous one before the pack's
    # words would be cut (they never are: check-knowledge holds them to their own budget).
    n = len(named)
    tail = tail_of(n)
    while n > 1 and sum(words(p) for p in (*head, *tail, footer)) > limit:
        n -= 1
        tail = tail_of(n)
    room = limit - sum(words(p) for p in (*head, *tail, footer)) - 5
    lines = _evidence_lines(m.evidence)
    shown: list[str] = []
    for line in lines[:style.evidence_lines]:
        if words(line) > room:
            break
        shown.append(line)
        room -= words(line)
    parts = [*head]
    if shown:
        rest = len(lines) - len(shown)
        parts.append("**On record:** " + "; ".join(_md(x) for x in shown)
                     + (f" (+{rest} more)" if rest else "") + ".")
    parts.extend(tail)
    parts.append(footer)
    return "\n\n".join(p for p in parts if p)


# UCUM units as clinicians write them (display only: the facts compare UCUM values).
CLINICAL_UNITS = (
    ("10*3/uL", "×10⁹/L"), ("10*9/L", "×10⁹/L"), ("10*6/uL", "×10¹²/L"), ("10*12/L", "×10¹²/L"),
    ("[degF]", "°F"), ("mm[Hg]", "mmHg"), ("[lb_av]", "lb"), ("m[IU]/mL", "mIU/mL"),
    ("[IU]/L", "IU/L"), ("/[HPF]", "/HPF"),
)
_CEL = re.compile(r"(?<=\d) ?Cel\b")
_SYSTEM = re.compile(r" \((?:ICD-10-CM|ICD-10-PCS) ([^)]+)\)")
_DROPPED = re.compile(r" \((?:LOINC|RxNorm|recognised)[^)]*\)| \[[^\]]*\]")
_PLAIN_STATUS = frozenset({"active", "completed", "confirmed", "final", "stated on the order",
                           "referenced by the order"})


def clinical(text: str) -> str:
    """A value in the form a clinician reads: 38.4 °C, WBC 14.2 ×10⁹/L, 120 mmHg."""
    out = _CEL.sub(" °C", text)
    for ucum, shown in CLINICAL_UNITS:
        out = out.replace(ucum, shown)
    return out


def _evidence_text(e: Evidence) -> str:
    what = e.what
    intake = what.startswith("Intake answer: ")
    what = what.split(": ", 1)[1] if ": " in what and what.split(": ", 1)[0] in _PREFIXES \
        else what
    what = _DROPPED.sub("", _SYSTEM.sub(r" (\1)", what))
    bits = [what]
    if e.value and e.value not in _PLAIN_STATUS:
        bits.append(clinical(e.value))
    answer = {"true": "yes", "false": "no"}.get(e.value, e.value)
    text = " ".join(bits) if not intake else f"{what}: {answer}"
    if intake and "intake" not in text:
        text += " (intake)"
    if e.when and not e.what.startswith("Onset of "):
        text += f", {e.when}"
    return text


_PREFIXES = frozenset({"Condition", "Observation", "Procedure", "MedicationRequest",
                       "MedicationStatement", "Intake answer", "DiagnosticReport",
                       "ImagingStudy", "ServiceRequest", "Encounter"})


def _evidence_lines(evidence: tuple[Evidence, ...]) -> list[str]:
    """One short line per resource: a Condition and its onset read as one."""
    onset: dict[str, str] = {}
    for e in evidence:
        if e.what.startswith("Onset of ") and e.reference:
            onset[e.reference] = e.value
    lines: list[str] = []
    done: set[str] = set()
    for e in evidence:
        if e.what.startswith("Onset of "):
            if e.reference in done:
                continue
            what = _evidence_text(Evidence(e.what.removeprefix("Onset of "), "", "", e.reference))
            lines.append(f"{what}, since {e.value}" if e.value else _evidence_text(e))
        elif e.reference and e.reference in onset:
            what = _evidence_text(Evidence(e.what, e.value, "", e.reference))
            lines.append(f"{what}, since {onset[e.reference]}")
            done.add(e.reference)
        else:
            lines.append(_evidence_text(e))
    # "; " separates lines on the card: a display holding one (CPT's) reads as a comma
    return list(dict.fromkeys(line.replace("; ", ", ") for line in lines))


def _not_checked(m: RuleMatch, k: Knowledge, cc: CardContext) -> tuple[list[str], list[str], int]:
    """(data that could not be had or read, always named, with the few most dangerous things it
    leaves unchecked; the few most dangerous unasked questions that would change this card, in
    clinical words, for this patient; how many more)."""
    style = k.style
    fetched: dict[str, tuple[str, dict[str, int]]] = {}
    unread: list[str] = []
    ranked: dict[str, int] = {}
    for pos, u in enumerate(m.unknowns):
        if u.kind == UNREADABLE:
            unread.append(u.reason)
            continue
        said = _phrase(u, pos, m, k, cc)
        if said is not None and not said[0].applies(cc.sex, cc.age):
            continue
        if u.kind == UNAVAILABLE:
            source = style.topics.get(u.fetch)
            what = source.say if source else (u.fetch or "record data")
            _, affected = fetched.setdefault(what, (u.why, {}))
            if said is not None and said[0].say != what:
                affected.setdefault(said[0].say, said[1])
            continue
        if said is not None:
            ranked.setdefault(said[0].say, said[1])
    n = style.not_checked_named
    gaps = []
    for what, (why, affected) in fetched.items():
        names = sorted(affected, key=affected.__getitem__)
        line = f"{what} could not be fetched" + (f" ({why})" if why else "")
        if names:
            line += ": " + ", ".join(names[:n]) + (f" (+{len(names) - n})" if len(names) > n
                                                    else "") + " not checked"
        gaps.append(line)
    gaps += unread[:n]
    if len(unread) > n:
        gaps.append(f"{len(unread) - n} more could not be read")
    names = sorted(ranked, key=ranked.__getitem__)
    return gaps, names[:n], max(0, len(names) - n)


def _phrase(u: Unknown, pos: int, m: RuleMatch, k: Knowledge, cc: CardContext
            ) -> tuple[Phrase, int] | None:
    """How to name an unknown on this card, and its rank (lower is more dangerous): the question
    an ask state asks first; then another rule's red flag by that rule; then the topic."""
    style = k.style
    ask = m.rule.ask
    if m.state == "ask" and ask and u.topic in ask.about:
        return (style.topics.get(u.topic) or Phrase(_fallback(u, k)),
                -len(ask.about) + ask.about.index(u.topic))
    if u.rule and u.rule != m.rule.id and u.rule in style.rules:
        first = -100 if u.rule in cc.asking else 0
        return style.rules[u.rule], first + list(style.rules).index(u.rule)
    if u.topic in style.topics:
        return style.topics[u.topic], 1000 + list(style.topics).index(u.topic)
    if not u.topic:
        return None
    return Phrase(_fallback(u, k)), 2000 + pos


def _fallback(u: Unknown, k: Knowledge) -> str:
    """Words for an unknown the style file does not name: its value set's title, else the
    reason's label."""
    vs = k.valuesets.get(u.topic)
    if vs is not None and vs.title:
        return vs.title.lower() if vs.title[1:2].islower() else vs.title
    return u.reason.split(":", 1)[0]


def _md(text: str) -> str:
    """Keep record text from acting as Markdown or HTML inside the card."""
    out = str(text)
    for ch in ("\\", "`", "*", "_", "[", "]", "<", ">", "|"):
        out = out.replace(ch, "\\" + ch)
    return out.replace("\n", " ")


def _suggestion(s: dict[str, Any], m: RuleMatch, k: Knowledge, cc: CardContext
                ) -> dict[str, Any] | None:
    # A suggestion for one kind of patient only ("if pregnant: ultrasound") follows the rule's
    # note for that kind: shown when it fired (when_note), hidden when it fired (unless_note).
    if "when_note" in s and s["when_note"] not in m.notes:
        return None
    if "unless_note" in s and s["unless_note"] in m.notes:
        return None
    # Alternatives for one body region ("abdomen and pelvis: ultrasound") follow the judged order.
    if "when_order" in s and not _order_in(m, k, s["when_order"]):
        return None
    if "unless_order" in s and _order_in(m, k, s["unless_order"]):
        return None
    actions = []
    for a in s.get("actions") or []:
        if a["type"] == "create" and _drafted(k.orderables[a["orderable"]], cc):
            continue  # already drafted in this call: accepting would duplicate the order
        action = _action(a, m, k, cc)
        if action is None:
            return None  # an action that cannot be built here (e.g. delete without an order)
        actions.append(action)
    if s.get("actions") and not actions:
        return None
    out: dict[str, Any] = {"label": s["label"], "uuid": str(uuid.uuid4())}
    if s.get("isRecommended"):
        out["isRecommended"] = True
    if actions:
        out["actions"] = actions
    return out


def _action(a: dict[str, Any], m: RuleMatch, k: Knowledge, cc: CardContext
            ) -> dict[str, Any] | None:
    kind = a["type"]
    if kind == "create":
        resource = service_request(k.orderables[a["orderable"]], a.get("priority", "routine"),
                                   k, cc, m)
        return {"type": "create", "description": a["description"], "resource": resource}
    order = m.order
    if order is None or not order.id:
        return None
    resource_id = f"{order.get_resource_type()}/{order.id}"
    if kind == "delete":
        return {"type": "delete", "description": a["description"], "resourceId": resource_id}
    raw = cc.draft_raw(str(order.id))
    if raw is None:
        return None
    orderable = k.orderables[a["orderable"]]
    if _same_code(raw, orderable) and a.get("priority", raw.get("priority")) == raw.get("priority"):
        return None  # an update that leaves the order as it is
    updated = copy.deepcopy(raw)
    updated["code"] = _code(orderable)
    if a.get("priority"):
        updated["priority"] = a["priority"]
    return {"type": "update", "description": a["description"], "resource": updated}


def _codings(resource: dict[str, Any]) -> set[tuple[str, str]]:
    code = resource.get("code")
    if not isinstance(code, dict):
        return set()
    return {(str(c.get("system")), str(c.get("code"))) for c in code.get("coding") or []
            if isinstance(c, dict)}


def _same_code(resource: dict[str, Any], o: Orderable) -> bool:
    """The resource is coded as the orderable (any shared system and code: an orderable's
    codes name one procedure, body site included, in several code systems)."""
    return bool(_codings(resource) & {(str(c["system"]), str(c["code"])) for c in o.codes})


def _drafted(o: Orderable, cc: CardContext) -> bool:
    """This call's draft orders already hold the orderable."""
    return any(_same_code(raw, o) for raw in cc.drafts if isinstance(raw, dict))


def _order_in(m: RuleMatch, k: Knowledge, vs_id: str) -> bool:
    order = m.order
    code = getattr(order, "code", None) if order is not None else None
    vs = k.valuesets[vs_id]
    return any(vs.contains(c.system, c.code) for c in (getattr(code, "coding", None) or []))


def _code(o: Orderable) -> dict[str, Any]:
    return {"coding": [dict(c) for c in o.codes], "text": o.display}


def service_request(o: Orderable, priority: str, k: Knowledge, cc: CardContext,
                    m: RuleMatch) -> dict[str, Any]:
    """A complete, valid FHIR R4 ServiceRequest for an orderable."""
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": str(uuid.uuid4()),
        "status": "draft",
        "intent": "order",
        "priority": priority,
        "code": _code(o),
        "subject": {"reference": f"Patient/{cc.patient_id}"},
        "authoredOn": cc.now.isoformat(),
        "note": [{"text": f"Suggested by lbp-cds rule {m.rule.id}: {m.rule.title}."}],
    }
    category = k.categories.get(o.kind)
    if category:
        resource["category"] = [{"coding": [dict(category)]}]
    if cc.encounter_id:
        resource["encounter"] = {"reference": f"Encounter/{cc.encounter_id}"}
    if cc.user_id and cc.user_id.startswith(REQUESTER_TYPES):
        resource["requester"] = {"reference": cc.user_id}
    return resource


def _links(m: RuleMatch, spec: dict[str, Any], k: Knowledge, cc: CardContext
           ) -> list[dict[str, Any]]:
    links = []
    for link in spec.get("links") or []:
        if "citation" in link:
            citation = k.citations[link["citation"]]
            if citation.url:
                links.append({"label": citation.label, "url": citation.url, "type": "absolute"})
        else:
            links.append({"label": link["label"], "url": link["url"], "type": "absolute"})
    if cc.base_url and (m.ask or any(u.kind == NOT_ASKED for u in m.unknowns)):
        # What nobody asked, the intake app asks (CDS Hooks 2.0 Link type "smart": the EHR adds
        # `iss` and `launch`, and hands `appContext` to the app in its token answer). The rule
        # opens its own questions first; the patient lets the app refuse a launch for another.
        links.append({
            "label": INTAKE_LINK_LABEL,
            "url": f"{cc.base_url.rstrip('/')}/smart/launch",
            "type": "smart",
            "appContext": json.dumps({"rule": m.rule.id, "patient": cc.patient_id},
                                     separators=(",", ":")),
        })
    return links
