"""Render rule matches into CDS Hooks 2.0 cards: pure, no I/O.

Every word comes from ``cards.yaml``; this module fills in uuids, the evidence, what could not be
checked, the sources, the suggestions as complete FHIR resources, override reasons and links.
No field is ever null or empty (CDS Hooks §"Use of JSON").
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lbp_cds.knowledge import Knowledge, Orderable
from lbp_cds.rules import RuleMatch

RULE_EXTENSION = "org.lbp-cds.rule"
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
    draft_raw: Callable[[str], dict[str, Any] | None] = lambda _id: None


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
    return [_card(m, knowledge, cc) for m in matches]


def _card(m: RuleMatch, k: Knowledge, cc: CardContext) -> IssuedCard:
    spec = k.cards[m.rule.card]
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
    card["extension"] = {RULE_EXTENSION: {"ruleId": m.rule.id,
                                          "knowledgeDigest": k.digest[:KNOWLEDGE_DIGEST_SHOWN]}}
    return IssuedCard(card, m.rule.id, m.indicator,
                      tuple(s["uuid"] for s in suggestions))


def _detail(m: RuleMatch, spec: dict[str, Any], k: Knowledge, cc: CardContext) -> str:
    parts = [str(spec.get("detail", "")).strip()]
    for note in m.notes:
        parts.append(str(spec["notes"][note]).strip())
    if not cc.record_checked:
        parts.append("**The patient's record could not be obtained: it was not checked for red "
                     "flags or mimics.** This advice rests only on the order itself.")
    if m.evidence:
        lines = ["**Evidence**", ""]
        for e in m.evidence:
            bits = [e.what]
            if e.value:
                bits.append(e.value)
            if e.when:
                bits.append(e.when)
            lines.append("- " + " · ".join(_md(b) for b in bits))
        parts.append("\n".join(lines))
    if m.not_checked:
        lines = ["**Could not be checked**", ""]
        lines.extend(f"- {_md(u)}" for u in m.not_checked)
        parts.append("\n".join(lines))
    labels = "; ".join(k.citations[s].label for s in m.rule.sources)
    parts.append(f"_Rule {m.rule.id}. Sources: {_md(labels)}._")
    return "\n\n".join(p for p in parts if p)


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
    actions = []
    for a in s.get("actions") or []:
        action = _action(a, m, k, cc)
        if action is None:
            return None  # an action that cannot be built here (e.g. delete without an order)
        actions.append(action)
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
    updated = copy.deepcopy(raw)
    orderable = k.orderables[a["orderable"]]
    updated["code"] = _code(orderable)
    if a.get("priority"):
        updated["priority"] = a["priority"]
    return {"type": "update", "description": a["description"], "resource": updated}


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
    if m.ask and cc.base_url:
        items = ", ".join(dict.fromkeys(m.ask))
        links.append({
            "label": f"Red-flag intake: answer {items}"[:200],
            "url": f"{cc.base_url.rstrip('/')}/questionnaires/lbp-intake",
            "type": "absolute",
        })
    return links
