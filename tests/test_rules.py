"""The rule engine over the mini knowledge pack: three-valued logic, references, escalation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from lbp_cds import knowledge
from lbp_cds.errors import KnowledgeError
from lbp_cds.fhir_data import record_from_resources
from lbp_cds.rules import RuleEngine, RuleMatch
from tests.builders import (
    condition,
    imaging_order,
    medication,
    observation,
    patient,
    questionnaire_response,
)
from tests.conftest import MINI, NOW


@pytest.fixture(scope="module")
def engine() -> RuleEngine:
    return RuleEngine(knowledge.load(MINI))


def run(engine: RuleEngine, resources: list[dict[str, Any]], hook: str = "patient-view",
        orders: list[dict[str, Any]] | None = None,
        unavailable: dict[str, str] | None = None) -> list[RuleMatch]:
    record = record_from_resources("p1", [patient(), *resources], unavailable, orders)
    service = next(s for s in engine.knowledge.services if s.hook == hook)
    return engine.evaluate(service, record, NOW, record.draft_orders())


def fired(matches: list[RuleMatch]) -> list[tuple[str, str]]:
    return [(m.rule.id, m.indicator) for m in matches]


def test_uncomplicated_back_pain_gets_conservative_care_with_unknowns_listed(engine):
    matches = run(engine, [condition("M54.41")])
    assert fired(matches) == [("CC", "info")]
    cc = matches[0]
    # The red flags could not be assessed: the card says so instead of claiming they are absent.
    assert any("saddle numbness" in u for u in cc.not_checked)
    assert "ces-saddle" in cc.ask


def test_red_flag_from_the_intake_is_critical_and_silences_conservative_care(engine):
    matches = run(engine, [condition("M54.41"), questionnaire_response({"ces-saddle": True})])
    assert fired(matches) == [("RF", "critical")]


def test_red_flag_denied_in_the_intake_leaves_conservative_care_without_that_unknown(engine):
    matches = run(engine, [condition("M54.41"), questionnaire_response({"ces-saddle": False})])
    assert fired(matches) == [("CC", "info")]
    assert not any("saddle" in u for u in matches[0].not_checked if "intake" in u)


def test_refuted_and_entered_in_error_conditions_are_ignored(engine):
    matches = run(engine, [condition("M54.41"),
                           condition("G83.4", rid="c2", verification="refuted"),
                           condition("G83.4", rid="c3", verification="entered-in-error")])
    assert ("RF", "critical") not in fired(matches)


def test_resolved_condition_is_not_active(engine):
    assert fired(run(engine, [condition("M54.41", clinical="resolved")])) == []


def test_out_of_scope_patient_gets_no_card(engine):
    assert fired(run(engine, [condition("I10")])) == []


def test_fever_in_fahrenheit_is_converted_and_crp_escalates(engine):
    temp = observation("8310-5", 101.5, "[degF]")
    assert ("FEV", "warning") in fired(run(engine, [condition("M54.41"), temp]))
    crp = observation("1988-5", 42, "mg/L", rid="o2",
                      interpretation=[{"coding": [{"code": "H"}]}])
    assert ("FEV", "critical") in fired(run(engine, [condition("M54.41"), temp, crp]))


def test_temperature_below_threshold_is_absent_not_unknown(engine):
    matches = run(engine, [condition("M54.41"), observation("8310-5", 37.6)])
    assert fired(matches) == [("CC", "info")]
    assert not any("temperature" in u for u in matches[0].not_checked)


def test_old_temperature_outside_window_is_unknown(engine):
    matches = run(engine, [condition("M54.41"),
                           observation("8310-5", 39.0, when="2026-02-01T10:00:00Z")])
    assert fired(matches) == [("CC", "info")]
    assert any("temperature" in u for u in matches[0].not_checked)


def test_unavailable_observations_are_unknown_with_the_reason(engine):
    matches = run(engine, [condition("M54.41")],
                  unavailable={"Observation": "the FHIR server answered HTTP 503"})
    assert any("HTTP 503" in u for u in matches[0].not_checked)


def test_long_term_steroid_by_product_code_and_supply(engine):
    # 312617 is a prednisone product mapped to the ingredient by the ConceptMap.
    assert ("STER", "info") in fired(run(engine, [medication("312617",
                                                             authored="2025-10-01")]))
    assert ("STER", "info") not in fired(run(engine, [medication("312617",
                                                                 authored="2026-02-20")]))
    assert ("STER", "info") in fired(run(engine, [medication(
        "8640", authored="2026-02-20", supply_days=30, repeats=2)]))


def test_startback_high_risk(engine):
    qr = questionnaire_response({"sb-1": True, "sb-2": False, "sb-3": "very-much"})
    assert ("SB-HIGH", "info") in fired(run(engine, [condition("M54.41"), qr]))
    qr_low = questionnaire_response({"sb-1": False, "sb-2": False, "sb-3": "slightly"})
    assert ("SB-HIGH", "info") not in fired(run(engine, [condition("M54.41"), qr_low]))


def test_duration_from_intake_onset_date_beats_condition_dates(engine):
    old = condition("M54.41", onset="2025-01-01")
    assert fired(run(engine, [old])) == []  # chronic: no conservative-care (acute) card
    qr = questionnaire_response({"lbp-onset-date": "2026-02-25"})
    assert fired(run(engine, [old, qr])) == [("CC", "info")]


def test_order_rule_fires_per_judged_order_with_the_order_as_evidence(engine):
    orders = [imaging_order(rid="sr1"), imaging_order(code="72148",
                                                      system="http://www.ama-assn.org/go/cpt",
                                                      rid="sr2")]
    matches = run(engine, [condition("M54.41")], hook="order-select", orders=orders)
    assert fired(matches) == [("LV", "warning"), ("LV", "warning")]
    assert {m.order.id for m in matches} == {"sr1", "sr2"}
    assert matches[0].evidence[0].what.startswith("Draft order")


def test_order_matched_only_by_text_says_so(engine):
    matches = run(engine, [condition("M54.41")], hook="order-sign",
                  orders=[imaging_order(text="MRI of the lumbar spine")])
    assert fired(matches) == [("LV", "warning")]
    assert "matched by text" in matches[0].evidence[0].what


def test_red_flag_replaces_the_low_value_warning_at_order_time(engine):
    matches = run(engine, [condition("M54.41"), condition("G83.4", rid="c2")],
                  hook="order-sign", orders=[imaging_order()])
    assert fired(matches) == [("RF", "critical")]


def test_order_reason_counts_as_context_when_the_record_lacks_it(engine):
    order = imaging_order()
    order["reasonCode"] = [{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm",
                                        "code": "M54.42"}]}]
    order["authoredOn"] = "2026-03-01"
    assert fired(run(engine, [], hook="order-sign", orders=[order])) == [("LV", "warning")]


def _broken_pack(tmp_path: Path, edit: Any) -> Path:
    import shutil

    root = tmp_path / "pack"
    shutil.copytree(MINI, root)
    path = root / "triage" / "rules.yaml"
    doc = yaml.safe_load(path.read_text())
    edit(doc["rules"])
    path.write_text(yaml.safe_dump(doc))
    return root


@pytest.mark.parametrize("edit, message", [
    (lambda r: r[0]["when"]["all"].append({"fact": "nonsense"}), "unknown fact"),
    (lambda r: r[0]["when"]["all"].append({"fact": "condition"}), r"missing \['valueset'\]"),
    (lambda r: r[0]["when"]["all"].append({"fact": "condition", "valueset": "nope"}),
     "unknown value set"),
    (lambda r: r[1]["when"]["all"][1].update(value="$nope"), "unknown parameter"),
    (lambda r: r[0]["when"]["all"].append({"rule": "CC"}), "cycle"),
    (lambda r: r[0]["when"]["all"].append({"rule": "GHOST"}), "unknown rule"),
    (lambda r: r[0]["when"]["all"].append({"fact": "answer", "item": "not-an-item"}),
     "not in the questionnaire"),
    (lambda r: r[0].update(indicator="hard-stop"), "indicator"),
    (lambda r: r[0]["when"].update(if_unknown="maybe"), "if_unknown"),
])
def test_broken_packs_are_refused_at_load(tmp_path, edit, message):
    root = _broken_pack(tmp_path, edit)
    with pytest.raises(KnowledgeError, match=message):
        RuleEngine(knowledge.load(root))


def test_text_is_the_last_resort_only_for_orders_without_known_codes(engine):
    local = imaging_order(code="MRI-LSP-01", system="https://hospital.example/orders",
                          text=None)
    local["code"]["text"] = "MRI lumbar spine"
    assert fired(run(engine, [condition("M54.41")], hook="order-sign",
                     orders=[local])) == [("LV", "warning")]
    # A LOINC-coded order is judged by its code: a LOINC code outside the value set is not
    # lumbar imaging, whatever its text says.
    loinc = imaging_order(code="24558-9")
    loinc["code"]["text"] = "MRI lumbar spine"
    assert fired(run(engine, [condition("M54.41")], hook="order-sign", orders=[loinc])) == []


def test_equal_leaves_of_different_rules_are_evaluated_once_per_call(monkeypatch):
    """A leaf shared by many rules (the episode's back-pain Condition, say) costs one evaluation
    per call; leaves that differ in any argument (a label included) stay apart."""
    import dataclasses
    from collections import Counter

    from lbp_cds import facts

    calls: Counter[int] = Counter()
    for name, fact in list(facts.FACTS.items()):
        def counting(ctx: Any, args: dict[str, Any], _fn=fact.fn) -> Any:
            calls[id(args)] += 1
            return _fn(ctx, args)
        monkeypatch.setitem(facts.FACTS, name, dataclasses.replace(fact, fn=counting))
    real = RuleEngine(knowledge.load(Path(__file__).resolve().parents[1] / "cds_services"))
    leaves = _leaves(real)
    shared = Counter(leaf.key for leaf in leaves)
    most_shared, copies = shared.most_common(1)[0]
    assert copies > 5, "the real pack shares leaves between rules"
    service = next(s for s in real.knowledge.services if s.hook == "patient-view")
    real.evaluate(service, record_from_resources("p1", [patient(), condition("M54.41")]), NOW,
                  [])
    by_key: Counter[Any] = Counter()
    key_of = {id(leaf.args): leaf.key for leaf in leaves}
    for args_id, n in calls.items():
        by_key[key_of[args_id]] += n
    assert by_key[most_shared] == 1
    assert max(by_key.values()) == 1
    assert len({leaf.key for leaf in leaves if leaf.label != leaves[0].label}) > 1


def _leaves(engine: RuleEngine) -> list[Any]:
    from lbp_cds.rules import Leaf

    out: list[Any] = []
    seen: set[int] = set()

    def walk(node: Any) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, Leaf):
            out.append(node)
        for name in ("children", "child", "when"):
            sub = getattr(node, name, None)
            for s in sub if isinstance(sub, list) else [sub] if sub is not None else []:
                walk(s)

    for rule in engine.rules.values():
        for node in [rule.when, rule.order_filter, rule.ask_when,
                     *(n for _i, n in rule.escalate), *(n for _n, n in rule.notes)]:
            if node is not None:
                walk(node)
    return out


@pytest.mark.parametrize("nest", ["group", "answer"])
def test_intake_answers_are_found_in_nested_items(engine, nest):
    qr = questionnaire_response({"ces-saddle": True, "other": False})
    saddle, other = qr["item"]
    if nest == "group":
        qr["item"] = [other, {"linkId": "red-flags", "item": [saddle]}]
    else:
        qr["item"] = [{**other, "answer": [{**other["answer"][0], "item": [saddle]}]}]
    assert fired(run(engine, [condition("M54.41"), qr])) == [("RF", "critical")]


def test_merging_keeps_each_piece_of_evidence_once_in_first_seen_order():
    from lbp_cds.facts import PRESENT, UNKNOWN, Evidence, Result
    from lbp_cds.rules import _merge

    a, b, c = (Evidence(w, "v", "2026-03-01", f"Observation/{w}") for w in "abc")
    first = Result(PRESENT, (a, b, a), ("no temperature",), ("q1", "q1"))
    second = Result(UNKNOWN, (c, b), ("no temperature", "no intake"), ("q2", "q1"))
    merged = _merge([first, second], PRESENT, value=3)
    assert merged == Result(PRESENT, (a, b, c), ("no temperature", "no intake"), ("q1", "q2"), 3)
    assert _merge([first], UNKNOWN) == Result(UNKNOWN, (a, b), ("no temperature",), ("q1",))
    # Equal evidence from two resources is two pieces of evidence.
    twin = Evidence("a", "v", "2026-03-01", "Observation/other")
    assert _merge([Result(PRESENT, (a, twin))], PRESENT).evidence == (a, twin)


def test_ages_of_a_partial_birth_date():
    from datetime import datetime, timezone

    from datetime import date as d

    from lbp_cds.facts import ages

    now = datetime(2026, 3, 2, tzinfo=timezone.utc)
    assert ages(d(1970, 3, 3), now) == (55, 55)
    assert ages("1970", now) == (55, 56)
    assert ages("1970-03", now) == (55, 56)
    assert ages("1970-02", now) == (56, 56)
    assert ages("1970-12", now) == (55, 55)
    assert ages("1970-13", now) is None and ages("soon", now) is None
