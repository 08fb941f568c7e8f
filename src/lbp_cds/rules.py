"""Evaluate the knowledge pack's rules over a patient record: pure, no I/O.

Rule trees are compiled once (``RuleEngine(knowledge)``): every fact name and argument, value set,
parameter and rule reference is checked then, so a pack that loads cannot fail at evaluation.
Evaluation is three-valued (present / absent / unknown, Kleene logic); a rule fires when its
tree is present. The engine returns ``RuleMatch`` objects and nothing else: card text is
``cards.py``'s business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from lbp_cds.errors import KnowledgeError
from lbp_cds.facts import (
    ABSENT,
    FACTS,
    NUMBER_ARGS,
    PRESENT,
    UNKNOWN,
    Context,
    Evidence,
    Result,
    Unknown,
    evaluate_fact,
)
from lbp_cds.fhir_data import PatientRecord
from lbp_cds.knowledge import Knowledge, RuleSpec, Service

SEVERITY = {"critical": 0, "warning": 1, "info": 2}


def _merge(results: Sequence[Result], status: str, value: Any = None) -> Result:
    """One result of ``status`` holding the children's evidence, unknowns and questions, each
    once, in first-seen order (dict keys keep insertion order; Evidence is frozen, so hashable).
    """
    if len(results) == 1:
        r = results[0]
        return Result(status, _once(r.evidence), _once(r.unknown), _once(r.ask), value)
    return Result(status, tuple(dict.fromkeys(e for r in results for e in r.evidence)),
                  tuple(dict.fromkeys(u for r in results for u in r.unknown)),
                  tuple(dict.fromkeys(q for r in results for q in r.ask)), value)


def _once(items: tuple[Any, ...]) -> tuple[Any, ...]:
    return items if len(items) < 2 else tuple(dict.fromkeys(items))


class Node:
    """A compiled condition: evaluates to a ``Result``."""

    label: str = ""
    if_unknown: str | None = None

    def evaluate(self, ctx: Context, engine: RuleEngine) -> Result:
        result = self._evaluate(ctx, engine)
        if result.status == UNKNOWN and self.if_unknown:
            return Result(self.if_unknown, result.evidence, result.unknown, result.ask)
        return result

    def _evaluate(self, ctx: Context, engine: RuleEngine) -> Result:
        raise NotImplementedError


@dataclass
class Leaf(Node):
    fact: str
    args: dict[str, Any]
    label: str = ""
    if_unknown: str | None = None
    key: tuple[Any, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Equal leaves of different rules (the episode's back-pain Condition, say) share one
        # evaluation per call: facts are pure functions of the context and their arguments.
        self.key = ("leaf", self.fact, _frozen(self.args))

    def _evaluate(self, ctx: Context, engine: RuleEngine) -> Result:
        key = (self.key, id(ctx.order))
        result: Result | None = ctx.cache.get(key)
        if result is None:
            result = ctx.cache[key] = evaluate_fact(FACTS[self.fact].fn, ctx, self.args)
        return result


def _frozen(value: Any) -> Any:
    """A hashable stand-in for a leaf's arguments; compiled objects (value sets) by identity."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return ("object", id(value))  # lives as long as the engine that compiled it


@dataclass
class All(Node):
    children: list[Node]
    label: str = ""
    if_unknown: str | None = None

    def _evaluate(self, ctx: Context, engine: RuleEngine) -> Result:
        results = []
        for child in self.children:
            r = child.evaluate(ctx, engine)
            if r.status == ABSENT:
                return _merge([r], ABSENT)
            results.append(r)
        if all(r.status == PRESENT for r in results):
            return _merge(results, PRESENT)
        return _merge([r for r in results if r.status == UNKNOWN], UNKNOWN)


@dataclass
class Any_(Node):
    children: list[Node]
    label: str = ""
    if_unknown: str | None = None

    def _evaluate(self, ctx: Context, engine: RuleEngine) -> Result:
        results = [child.evaluate(ctx, engine) for child in self.children]
        present = [r for r in results if r.status == PRESENT]
        if present:
            return _merge(present, PRESENT)
        if all(r.status == ABSENT for r in results):
            return _merge(results, ABSENT)
        return _merge([r for r in results if r.status == UNKNOWN], UNKNOWN)


@dataclass
class AtLeast(Node):
    n: int
    children: list[Node]
    label: str = ""
    if_unknown: str | None = None

    def _evaluate(self, ctx: Context, engine: RuleEngine) -> Result:
        results = [child.evaluate(ctx, engine) for child in self.children]
        present = [r for r in results if r.status == PRESENT]
        unknown = [r for r in results if r.status == UNKNOWN]
        if len(present) >= self.n:
            return _merge(present, PRESENT)
        if len(present) + len(unknown) < self.n:
            return _merge(results, ABSENT)
        return _merge(unknown, UNKNOWN)


@dataclass
class Not(Node):
    child: Node
    label: str = ""
    if_unknown: str | None = None

    def evaluate(self, ctx: Context, engine: RuleEngine) -> Result:
        # On `not`, if_unknown speaks of the negated condition: `not: {any: [red flags]}` with
        # `if_unknown: absent` reads "red flags that cannot be assessed are taken as absent".
        r = self.child.evaluate(ctx, engine)
        if r.status == UNKNOWN and self.if_unknown:
            r = Result(self.if_unknown, r.evidence, r.unknown, r.ask)
        flipped = {PRESENT: ABSENT, ABSENT: PRESENT, UNKNOWN: UNKNOWN}[r.status]
        # The evidence of what was checked stays; what fired the child is not evidence for "not".
        return Result(flipped, r.evidence if flipped == ABSENT else (), r.unknown, r.ask)

    def _evaluate(self, ctx: Context, engine: RuleEngine) -> Result:  # pragma: no cover
        raise AssertionError("Not.evaluate is complete")


@dataclass
class RuleRef(Node):
    rule_id: str
    label: str = ""
    if_unknown: str | None = None

    def _evaluate(self, ctx: Context, engine: RuleEngine) -> Result:
        key = ("tagged", self.rule_id, id(ctx.order))
        cached: Result | None = ctx.cache.get(key)
        if cached is not None:
            return cached
        r = engine.outcome(self.rule_id, ctx)
        if r.unknown and not all(u.rule for u in r.unknown):
            # Unknowns remember the innermost rule they came through: "cauda equina symptoms not
            # asked" reads better on a conservative-care card than four intake items.
            tagged = tuple(u if u.rule else replace(u, rule=self.rule_id) for u in r.unknown)
            r = Result(r.status, r.evidence, tagged, r.ask, r.value)
        ctx.cache[key] = r
        return r


@dataclass
class CompiledRule:
    """A rule ready to evaluate."""

    spec: RuleSpec
    when: Node
    escalate: list[tuple[str, Node]]
    notes: list[tuple[str, Node]]
    order_filter: Node | None
    position: int
    ask_when: Node | None = None


@dataclass
class RuleMatch:
    """A rule that fired: its indicator, the evidence, what could not be checked."""

    rule: RuleSpec
    indicator: str
    evidence: tuple[Evidence, ...]
    unknowns: tuple[Unknown, ...]
    ask: tuple[str, ...]
    notes: tuple[str, ...] = ()
    order: Any | None = None
    position: int = 0
    values: dict[str, Any] = field(default_factory=dict)
    state: str = "fire"  # or "ask": only unknowns stand between the rule and firing
    silent_beside: tuple[str, ...] = ()
    note_evidence: dict[str, tuple[Evidence, ...]] = field(default_factory=dict)
    # The site runs this rule silently: the card is recorded, never shown (go-live period).
    silent: bool = False

    @property
    def not_checked(self) -> tuple[str, ...]:
        """Every unknown, as a sentence (the audit's and the card extension's full list)."""
        return tuple(dict.fromkeys(u.reason for u in self.unknowns))


class RuleEngine:
    """The compiled rules of a knowledge pack.

    Args:
        knowledge: a loaded pack.

    Raises:
        KnowledgeError: a tree names an unknown fact, argument, value set, parameter or rule, or
            rules refer to each other in a cycle.
    """

    def __init__(self, knowledge: Knowledge) -> None:
        self.knowledge = knowledge
        self.rules: dict[str, CompiledRule] = {}
        ids = {r.id for r in knowledge.rules}
        self._ids = ids
        for pos, spec in enumerate(knowledge.rules):
            where = f"{spec.folder}/rules.yaml rule {spec.id}"
            order_filter = None
            if spec.for_each_order:
                order_filter = self._compile(
                    {"fact": "order", "valueset": spec.for_each_order}, where)
            self.rules[spec.id] = CompiledRule(
                spec=spec,
                when=self._compile(spec.when, where),
                escalate=[(i, self._compile(t, f"{where} escalate")) for i, t in spec.escalate],
                notes=[(n, self._compile(t, f"{where} note {n}")) for n, t in spec.notes],
                order_filter=order_filter,
                position=pos,
                ask_when=self._compile(spec.ask.when, f"{where} ask") if spec.ask else None,
            )
        self._check_cycles()

    # -- compilation ----------------------------------------------------------------------------
    def _compile(self, tree: Any, where: str) -> Node:
        if not isinstance(tree, dict):
            raise KnowledgeError(f"{where}: a condition must be a mapping, got {tree!r}")
        label = str(tree.get("label", ""))
        if_unknown = tree.get("if_unknown")
        if if_unknown not in (None, PRESENT, ABSENT):
            raise KnowledgeError(f"{where}: if_unknown must be present or absent")
        kinds = [k for k in ("all", "any", "not", "at_least", "rule", "fact") if k in tree]
        if len(kinds) != 1:
            raise KnowledgeError(f"{where}: a condition needs exactly one of all/any/not/"
                                 f"at_least/rule/fact, got {sorted(tree)}")
        kind = kinds[0]
        node: Node
        if kind in ("all", "any"):
            items = tree[kind]
            if not isinstance(items, list) or not items:
                raise KnowledgeError(f"{where}: '{kind}' needs a non-empty list")
            children = [self._compile(c, where) for c in items]
            node = All(children) if kind == "all" else Any_(children)
        elif kind == "not":
            node = Not(self._compile(tree["not"], where))
        elif kind == "at_least":
            items = tree.get("of")
            n = tree["at_least"]
            if not isinstance(items, list) or not isinstance(n, int) or not 0 < n <= len(items):
                raise KnowledgeError(f"{where}: at_least needs 1..len(of) and a list 'of'")
            node = AtLeast(n, [self._compile(c, where) for c in items])
        elif kind == "rule":
            if tree["rule"] not in self._ids:
                raise KnowledgeError(f"{where}: refers to unknown rule {tree['rule']!r}")
            node = RuleRef(str(tree["rule"]))
        else:
            node = self._compile_fact(tree, where)
        node.label = label or getattr(node, "label", "")
        node.if_unknown = if_unknown
        return node

    def _compile_fact(self, tree: dict[str, Any], where: str) -> Leaf:
        name = tree["fact"]
        if name not in FACTS:
            raise KnowledgeError(f"{where}: unknown fact {name!r} (known: {sorted(FACTS)})")
        fact = FACTS[name]
        args = {k: v for k, v in tree.items() if k not in ("fact", "label", "if_unknown")}
        missing = fact.required - set(args)
        extra = set(args) - fact.required - fact.optional
        if missing or extra:
            raise KnowledgeError(f"{where}: fact {name} missing {sorted(missing)} / "
                                 f"unexpected {sorted(extra)}")
        resolved: dict[str, Any] = {}
        k = self.knowledge
        for arg, allowed in fact.choices:
            if arg in args and args[arg] not in allowed:
                raise KnowledgeError(f"{where}: fact {name} {arg} must be one of "
                                     f"{sorted(allowed)}, got {args[arg]!r}")
        for pname in sorted(fact.parameters):
            if pname not in k.parameters:
                raise KnowledgeError(f"{where}: fact {name} needs parameter {pname}")
        for vs_id in sorted(fact.valuesets):
            if vs_id not in k.valuesets:
                raise KnowledgeError(f"{where}: fact {name} needs value set {vs_id}")
            k.valueset(vs_id)
        for key, value in args.items():
            try:
                value = k.param(value)
            except KnowledgeError as exc:
                raise KnowledgeError(f"{where}: {exc}") from None
            if key == "valueset":
                k.valueset_facts.setdefault(str(value), set()).add(name)
                try:
                    value = k.medication_valueset(value) if name == "medication" else \
                        k.valueset(value)
                except KnowledgeError as exc:
                    raise KnowledgeError(f"{where}: {exc}") from None
            elif key in NUMBER_ARGS and not isinstance(value, int | float):
                raise KnowledgeError(f"{where}: {key} must be a number, got {value!r}")
            elif key == "op" and value not in ("gt", "ge", "lt", "le", "eq"):
                raise KnowledgeError(f"{where}: op must be gt/ge/lt/le/eq")
            elif key == "item" and value not in k.questionnaire_items():
                raise KnowledgeError(f"{where}: intake item {value!r} is not in the questionnaire")
            resolved[key] = value
        if name == "parameter" and args["name"] not in k.parameters:
            raise KnowledgeError(f"{where}: unknown parameter {args['name']!r}")
        resolved["label"] = str(tree.get("label") or _default_label(name, args))
        return Leaf(name, resolved)

    def _check_cycles(self) -> None:
        def refs(node: Node) -> list[str]:
            if isinstance(node, RuleRef):
                return [node.rule_id]
            out: list[str] = []
            for child in getattr(node, "children", []) or []:
                out.extend(refs(child))
            if isinstance(node, Not):
                out.extend(refs(node.child))
            return out

        graph = {rid: set(refs(r.when)) | {x for _, n in r.escalate + r.notes for x in refs(n)}
                 | (set(refs(r.ask_when)) if r.ask_when is not None else set())
                 for rid, r in self.rules.items()}
        state: dict[str, int] = {}

        def visit(rid: str, path: list[str]) -> None:
            if state.get(rid) == 2:
                return
            if state.get(rid) == 1:
                raise KnowledgeError("rules refer to each other in a cycle: "
                                     + " -> ".join([*path, rid]))
            state[rid] = 1
            for nxt in sorted(graph[rid]):
                visit(nxt, [*path, rid])
            state[rid] = 2

        for rid in graph:
            visit(rid, [])

    # -- evaluation -----------------------------------------------------------------------------
    def outcome(self, rule_id: str, ctx: Context) -> Result:
        """The result of a rule's ``when`` tree (memoised per evaluation and judged order)."""
        rule = self.rules[rule_id]
        if rule.order_filter is not None and ctx.order is None:
            results = []
            for order in ctx.orders:
                sub = Context(ctx.record, ctx.knowledge, ctx.now, ctx.hook, ctx.orders, order,
                              ctx.cache)
                if rule.order_filter.evaluate(sub, self).status == PRESENT:
                    results.append(self.outcome(rule_id, sub))
            present = [r for r in results if r.status == PRESENT]
            if present:
                return _merge(present, PRESENT)
            if any(r.status == UNKNOWN for r in results):
                return _merge([r for r in results if r.status == UNKNOWN], UNKNOWN)
            return Result(ABSENT)
        key = ("rule", rule_id, id(ctx.order))
        if key not in ctx.cache:
            ctx.cache[key] = rule.when.evaluate(ctx, self)
        result: Result = ctx.cache[key]
        return result

    def evaluate(self, service: Service, record: PatientRecord, now: datetime,
                 orders: list[Any] | None = None,
                 silent: frozenset[str] = frozenset()) -> list[RuleMatch]:
        """Every rule of the service's hook that fires, most urgent first.

        Args:
            service: the service called (its hook selects the rules).
            record: the patient's data.
            now: the clock (tests and scenarios fix it).
            orders: the judged draft orders (parsed), for order hooks.
            silent: ids of the rules the site runs silently. Their matches come back marked
                ``silent`` and count as absent for the shown cards: a silent critical card
                does not silence a shown card beside it. A silent match is itself dropped when
                it would have been silenced had every rule been live (what it would have shown).

        Returns:
            One match per fired rule (per judged order for order rules), critical first, with
            cards that must stay silent beside a more urgent one removed.
        """
        ctx = Context(record, self.knowledge, now, service.hook, list(orders or []))
        matches: list[RuleMatch] = []
        for rule in self.rules.values():
            if service.hook not in rule.spec.hooks:
                continue
            if rule.order_filter is None:
                match = self._match(rule, ctx)
                if match:
                    matches.append(match)
                continue
            for order in ctx.orders:
                sub = Context(record, self.knowledge, now, service.hook, ctx.orders, order,
                              ctx.cache)
                if rule.order_filter.evaluate(sub, self).status != PRESENT:
                    continue
                match = self._match(rule, sub)
                if match:
                    matches.append(match)
        for m in matches:
            m.silent = m.rule.id in silent
        shown = {m.indicator for m in matches if m.state == "fire" and not m.silent}
        live = {m.indicator for m in matches if m.state == "fire"}
        matches = [m for m in matches
                   if not set(m.silent_beside) & (live if m.silent else shown)]
        matches.sort(key=lambda m: (SEVERITY[m.indicator], m.position))
        return matches

    def _match(self, rule: CompiledRule, ctx: Context) -> RuleMatch | None:
        result = self.outcome(rule.spec.id, ctx)
        if result.status == UNKNOWN and rule.ask_when is not None:
            return self._ask(rule, ctx, result)
        if result.status != PRESENT:
            return None
        indicator = rule.spec.indicator
        for escalated, node in rule.escalate:
            if node.evaluate(ctx, self).status == PRESENT:
                indicator = escalated
                break
        notes, note_evidence = self._notes(rule, ctx)
        evidence = result.evidence
        if ctx.order is not None and rule.order_filter is not None:
            judged = rule.order_filter.evaluate(ctx, self).evidence
            evidence = judged + tuple(e for e in evidence if e not in judged)
        return RuleMatch(rule.spec, indicator, evidence, result.unknown, result.ask, notes,
                         ctx.order, rule.position,
                         {"value": result.value} if result.value is not None else {},
                         silent_beside=rule.spec.silent_beside, note_evidence=note_evidence)

    def _ask(self, rule: CompiledRule, ctx: Context, result: Result) -> RuleMatch | None:
        """The rule's ask state: its known part holds and the unknowns standing between it and
        firing include those the pack lets it ask about."""
        spec = rule.spec.ask
        assert spec is not None and rule.ask_when is not None
        about = set(spec.about)
        asked = tuple(u for u in result.unknown if u.topic in about)
        if not asked:
            return None
        known = rule.ask_when.evaluate(ctx, self)
        if known.status != PRESENT:
            return None
        # The questions first (most decisive), then whatever else was unknown.
        unknowns = asked + tuple(u for u in result.unknown if u.topic not in about)
        items = tuple(q for q in result.ask if q in about)
        notes, note_evidence = self._notes(rule, ctx)
        return RuleMatch(rule.spec, spec.indicator, known.evidence, unknowns, items, notes,
                         ctx.order, rule.position, state="ask",
                         silent_beside=spec.silent_beside, note_evidence=note_evidence)

    def _notes(self, rule: CompiledRule, ctx: Context
               ) -> tuple[tuple[str, ...], dict[str, tuple[Evidence, ...]]]:
        """The rule's notes that hold, and the evidence of each (a note may name it)."""
        held = [(n, r) for n, node in rule.notes
                if (r := node.evaluate(ctx, self)).status == PRESENT]
        return tuple(n for n, _ in held), {n: r.evidence for n, r in held if r.evidence}


def _default_label(fact: str, args: dict[str, Any]) -> str:
    for key in ("valueset", "item", "risk", "name", "is"):
        if key in args:
            return str(args[key]).replace("-", " ")
    return fact.replace("_", " ")
