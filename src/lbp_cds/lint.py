"""Checks of the knowledge pack beyond what loading enforces (``lbp-cds check-knowledge``)."""

from __future__ import annotations

from typing import Any

from lbp_cds.knowledge import EXTENSION_BASE, Knowledge

VERIFICATION_URL = EXTENSION_BASE + "code-verification"
PROVENANCE_EXTENSIONS = ("valueset-source", "valueset-inclusion-criteria",
                         "valueset-exclusion-criteria")
ENGINE_VALUESETS = {"observation-positive", "observation-negative"}
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
SINGLE_SYSTEM_URL = EXTENSION_BASE + "valueset-single-system-reason"


def lint(k: Knowledge) -> list[str]:
    """Problems a reviewer must fix: unused value sets, missing provenance, unused cards.

    Call after ``rules.RuleEngine(k)`` has compiled the rules (it records value set use).
    """
    import json

    problems = []
    unused = set(k.valuesets) - k.valueset_use - ENGINE_VALUESETS
    unused = {u for u in unused if not u.endswith("+products")}
    problems += [f"value set {u} is not used by any rule" for u in sorted(unused)]
    used_cards = {r.card for r in k.rules}
    problems += [f"card {c} is not used by any rule" for c in sorted(set(k.cards) - used_cards)]
    for vs_id in sorted(k.valuesets):
        if vs_id.endswith("+products"):
            continue
        doc = json.loads((k.root / "valuesets" / f"{vs_id}.json").read_text(encoding="utf-8"))
        for key in ("url", "version", "date", "publisher", "description", "status"):
            if not doc.get(key):
                problems.append(f"value set {vs_id} lacks {key}")
        urls = {e.get("url") for e in doc.get("extension", [])}
        for name in PROVENANCE_EXTENSIONS:
            if EXTENSION_BASE + name not in urls:
                problems.append(f"value set {vs_id} lacks the {name} extension")
        problems += _terminology_parity(k, vs_id, doc)
        for inc in (doc.get("compose") or {}).get("include", []):
            tagged_include = any(e.get("url") == VERIFICATION_URL
                                 for e in inc.get("extension", []))
            for concept in inc.get("concept", []):
                if not tagged_include and not any(e.get("url") == VERIFICATION_URL
                                                  for e in concept.get("extension", [])):
                    problems.append(f"value set {vs_id}: {concept.get('code')} has no "
                                    "verification tag")
            if inc.get("filter") and not tagged_include:
                problems.append(f"value set {vs_id}: a filter include has no verification tag")
    problems += _problem_list_conflicts(k)
    problems += card_budget(k)
    for name, p in sorted(k.parameters.items()):
        if not p.source:
            problems.append(f"parameter {name} has no source")
        elif p.source not in k.citations:
            problems.append(f"parameter {name}: source {p.source} is not a citation")
    return problems


def _problem_list_conflicts(k: Knowledge) -> list[str]:
    """A rule that gives ``status`` for a value set whose problem-list entry decides."""
    out = []
    for rule in k.rules:
        stack: list[Any] = [rule.when, *(w for _, w in rule.escalate), *(w for _, w in rule.notes)]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if node.get("fact") == "condition" and "status" in node and \
                        k.currency(str(node.get("valueset"))) is not None:
                    out.append(f"rule {rule.id}: status of {node['valueset']} is decided by "
                               "problem-list.yaml; remove it from the rule")
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
    return out


def _terminology_parity(k: Knowledge, vs_id: str, doc: dict[str, Any]) -> list[str]:
    """A value set a ``condition`` fact uses must list SNOMED CT and ICD-10-CM codes (US EHRs
    send one or both on a Condition), unless it says why one system is enough."""
    if "condition" not in k.valueset_facts.get(vs_id, set()):
        return []
    systems = {inc.get("system") for inc in (doc.get("compose") or {}).get("include", [])}
    missing = [name for name, url in (("SNOMED CT", SNOMED), ("ICD-10-CM", ICD10CM))
               if url not in systems]
    if not missing:
        return []
    reason = next((e.get("valueMarkdown") for e in doc.get("extension", [])
                   if e.get("url") == SINGLE_SYSTEM_URL), None)
    if reason and str(reason).strip():
        return []
    return [f"value set {vs_id} is used by a condition fact but has no {' or '.join(missing)} "
            "code and no valueset-single-system-reason extension"]


def card_budget(k: Knowledge) -> list[str]:
    """The pack's own words on each card within ``card-style.yaml``'s budget: the summary under
    the spec's limit, and the detail plus its longest note within the static words of the
    strictest indicator the card can be shown at (a card that escalates to critical still reads
    as its warning self first). The rendered whole is checked over every fixture."""
    from lbp_cds.cards import words
    from lbp_cds.knowledge import ask_card

    style = k.style
    shown_at: dict[str, set[str]] = {}
    asked_at: dict[str, set[str]] = {}
    for rule in k.rules:
        shown_at.setdefault(rule.card, set()).update(
            {rule.indicator, *(i for i, _ in rule.escalate)})
        if rule.ask:
            asked_at.setdefault(rule.card, set()).add(rule.ask.indicator)
    problems = []
    for card_id, card in sorted(k.cards.items()):
        variants = [(card_id, card, shown_at.get(card_id, set()))]
        if isinstance(card.get("ask"), dict):
            variants.append((f"{card_id} (ask)", ask_card(card), asked_at.get(card_id, set())))
        for name, spec, indicators in variants:
            if not indicators:
                continue
            summaries = [spec.get("summary", ""),
                         *(spec.get("summary_by_indicator") or {}).values()]
            for summary in summaries:
                if len(summary) >= style.summary_chars:
                    problems.append(f"card {name}: summary of {len(summary)} characters "
                                    f"(budget < {style.summary_chars})")
            limit = min(style.static_words[i] for i in indicators)
            notes = [words(str(n)) for n in (spec.get("notes") or {}).values()]
            used = words(str(spec.get("detail", ""))) + max(notes, default=0)
            if used > limit:
                problems.append(f"card {name}: detail and longest note have {used} words "
                                f"(budget {limit} for {'/'.join(sorted(indicators))})")
    return problems
