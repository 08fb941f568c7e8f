"""Appropriateness ratings of imaging orders as CDS Hooks system actions: pure, no I/O.

The Argonaut "CDS Hooks for PAMA" implementation guide
(https://argonautproject.github.io/cds-hooks-for-pama/) has a service attach a rating to each
draft ``ServiceRequest`` it judges: an ``update`` system action carrying the order unchanged plus
the guide's extensions (the rating, the qualified CDS mechanism consulted, a consultation id, the
criterion applied). Which orders are rated and how is the pack's ``pama.yaml``; this module reads
the rules that fired (``rules.RuleMatch``) and the pack's condition trees, and builds the actions.
Cards are ``cards.py``'s business and stay as they are.

Cost: about 0.1 ms of CPU per order-hook call beside 4-5 ms of rule evaluation, 0.4 ms when the
variant-3 tree of ``pama.yaml`` is read (process time, mean of 200 in-process calls on four order
scenarios, the 2-core development machine, 2026-12-03).
"""

from __future__ import annotations

import copy
import logging
import uuid
import weakref
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lbp_cds.facts import ABSENT, PRESENT, Context
from lbp_cds.fhir_data import PatientRecord
from lbp_cds.knowledge import Knowledge, Pama, PamaEntry
from lbp_cds.rules import Node, RuleEngine, RuleMatch

log = logging.getLogger(__name__)

# The guide's extension URLs and code system (docs/index.md, "Argonaut FHIR extensions for PAMA").
RATING_URL = "http://fhir.org/argonaut/Extension/pama-rating"
RATING_SYSTEM = "http://fhir.org/argonaut/CodeSystem/pama-rating"
QCDSM_URL = "http://fhir.org/argonaut/Extension/pama-rating-qcdsm-consulted"
CONSULT_ID_URL = "http://fhir.org/argonaut/Extension/pama-rating-consult-id"
AUC_APPLIED_URL = "http://fhir.org/argonaut/Extension/pama-rating-auc-applied"
PAMA_URLS = frozenset({RATING_URL, QCDSM_URL, CONSULT_ID_URL, AUC_APPLIED_URL})


@dataclass(frozen=True)
class Rating:
    """The rating of one order: its PAMA code, the text shown with it, the criterion's URL."""

    code: str
    text: str
    criterion: str | None = None
    auc_url: str | None = None


class Rater:
    """``pama.yaml`` compiled against a rule engine (condition trees checked once).

    Args:
        pama: the pack's ``pama.yaml``.
        engine: the compiled rules; ``when`` trees use its grammar and its rules.

    Raises:
        KnowledgeError: a ``when`` tree names an unknown fact, argument, value set or rule.
    """

    def __init__(self, pama: Pama, engine: RuleEngine) -> None:
        self.pama = pama
        self.knowledge: Knowledge = engine.knowledge
        self.engine = engine
        compile_ = engine._compile  # the rules' own grammar and checks (rules.py)
        self.orders = compile_({"fact": "order", "valueset": pama.orders}, "pama.yaml orders")
        self.studies: list[tuple[str, Node]] = [
            (sid, compile_({"fact": "order", "valueset": vs}, f"pama.yaml study {sid}"))
            for sid, vs in pama.studies]
        self.when: dict[int, Node] = {
            pos: compile_(e.when, f"pama.yaml decide[{pos}]")
            for pos, e in enumerate(pama.decide) if e.when is not None}

    def serves(self, service_id: str) -> bool:
        """Whether calls to this service get ratings."""
        return service_id in self.pama.services

    def rate(self, record: PatientRecord, hook: str, now: datetime, orders: list[Any],
             matches: list[RuleMatch]) -> list[tuple[Any, Rating]]:
        """The rated orders among the judged ones, with their ratings.

        Args:
            record: the patient's data.
            hook: the hook called.
            now: the clock.
            orders: the judged draft orders (parsed).
            matches: the rules that fired for this call.

        Returns:
            ``(order, rating)`` for each judged order in ``orders`` whose rating could be
            determined; orders outside it, and undetermined ones, are left out.
        """
        cache: dict[Any, Any] = {}
        incomplete = any(s.state == "unavailable" for s in record.statuses)
        out = []
        for order in orders:
            ctx = Context(record, self.knowledge, now, hook, orders, order, cache)
            if self.orders.evaluate(ctx, self.engine).status != PRESENT:
                continue
            rating = self._decide(ctx, order, matches, incomplete)
            if rating is not None:
                out.append((order, rating))
        return out

    def _decide(self, ctx: Context, order: Any, matches: list[RuleMatch], incomplete: bool
                ) -> Rating | None:
        # A rule's ask state is its own entry ("FX-1/ask"): an unanswered question is not a
        # fired red flag, and the answer decides the rating.
        fired = {m.rule.id + ("/ask" if m.state == "ask" else "")
                 for m in matches if m.order is None or m.order is order}
        for pos, entry in enumerate(self.pama.decide):
            if entry.rule is not None:
                if entry.rule not in fired:
                    continue
            else:
                status = self.when[pos].evaluate(ctx, self.engine).status
                if status == ABSENT:
                    continue
                if status != PRESENT:
                    return None  # unknown: the guide asks for no rating rather than a guess
            if entry.withhold is not None or (entry.withhold_if_record_incomplete and incomplete):
                return None
            return self._rating(entry, ctx)
        return None

    def _rating(self, entry: PamaEntry, ctx: Context) -> Rating | None:
        if entry.criterion is None:
            return Rating("no-criteria-apply", entry.text)
        criterion = self.pama.criteria[entry.criterion]
        study = next((sid for sid, node in self.studies
                      if node.evaluate(ctx, self.engine).status == PRESENT), None)
        level_id = criterion.ratings.get(study or "")
        if level_id is None:
            return None  # the criterion does not rate this study
        level = self.pama.levels[level_id]
        return Rating(level.pama, f"{level.text}: {criterion.text}", criterion.id,
                      self.knowledge.citations[criterion.source].url)


_RATERS: weakref.WeakKeyDictionary[RuleEngine, Rater | None] = weakref.WeakKeyDictionary()


def rater_for(engine: RuleEngine) -> Rater | None:
    """The engine's pack's rater, compiled once (None when the pack has no ``pama.yaml``).

    Raises:
        KnowledgeError: a ``when`` tree of ``pama.yaml`` does not compile.
    """
    if engine not in _RATERS:
        pama = engine.knowledge.pama
        _RATERS[engine] = Rater(pama, engine) if pama is not None else None
    return _RATERS[engine]


def system_actions(engine: RuleEngine, service_id: str, hook: str, record: PatientRecord,
                   now: datetime, orders: list[Any], matches: list[RuleMatch],
                   draft_raw: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One ``update`` system action per rated order: the order as received, rating attached.

    Args:
        engine: the compiled rules (and through it the pack).
        service_id: the service called; only ``pama.yaml``'s services rate.
        hook: the hook called.
        record: the patient's data.
        now: the clock.
        orders: the judged draft orders (parsed).
        matches: the rules that fired for this call.
        draft_raw: the draft orders as the client sent them, by id.

    Returns:
        The actions, in the orders' order; empty when nothing was rated.
    """
    rater = rater_for(engine)
    if rater is None or not rater.serves(service_id):
        return []
    actions = []
    logged = []
    for order, rating in rater.rate(record, hook, now, orders, matches):
        raw = draft_raw.get(str(order.id))
        if raw is None:
            continue  # the update must carry the order as received
        consult = f"urn:uuid:{uuid.uuid4()}"
        actions.append({
            "type": "update",
            "description": f"Appropriateness rating (PAMA): {rating.code}. {rating.text}",
            "resource": rated_resource(raw, rating, rater.pama.qcdsm, consult),
        })
        logged.append({"rating": rating.code, "criterion": rating.criterion, "consult": consult})
    if logged:
        # Codes and our own consult ids only: never order ids or content.
        log.info("appropriateness rated", extra={"service": service_id, "ratings": logged})
    return actions


def rated_resource(raw: dict[str, Any], rating: Rating, qcdsm: str, consult_id: str
                   ) -> dict[str, Any]:
    """A copy of the draft order with the guide's extensions (earlier ones replaced)."""
    resource = copy.deepcopy(raw)
    kept = [e for e in resource.get("extension") or []
            if not (isinstance(e, dict) and e.get("url") in PAMA_URLS)]
    added: list[dict[str, Any]] = [
        {"url": RATING_URL, "valueCodeableConcept": {
            "coding": [{"system": RATING_SYSTEM, "code": rating.code}], "text": rating.text}},
        {"url": QCDSM_URL, "valueString": qcdsm},
        {"url": CONSULT_ID_URL, "valueUri": consult_id},
    ]
    if rating.auc_url:
        added.append({"url": AUC_APPLIED_URL, "valueUri": rating.auc_url})
    resource["extension"] = kept + added
    return resource


def response(cards: list[dict[str, Any]], actions: list[dict[str, Any]], engine: RuleEngine
             ) -> dict[str, Any]:
    """The CDS Hooks response body: the cards, and the system actions if any.

    CDS Hooks 2.0 clients read ``systemActions``; the guide (and the HL7 sandbox) read
    ``extension.systemActions``: ``pama.yaml`` ``also_in_extension`` sends both.
    """
    body: dict[str, Any] = {"cards": cards}
    if actions:
        body["systemActions"] = actions
        pama = engine.knowledge.pama
        if pama is not None and pama.also_in_extension:
            body["extension"] = {"systemActions": actions}
    return body
