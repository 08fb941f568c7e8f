"""Lint of the real knowledge pack (cds_services/): it loads, compiles, is complete and covered."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from fhir.resources.R4B import get_fhir_model_class

from lbp_cds import knowledge
from lbp_cds.facts import PRESENT, Context
from lbp_cds.fhir_data import record_from_resources
from lbp_cds.lint import lint
from lbp_cds.rules import All, Any_, AtLeast, Leaf, Node, Not, RuleEngine, RuleRef

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / "cds_services"
SCENARIOS = sorted((ROOT / "fixtures" / "scenarios").glob("*.yaml"))
# Facts that place a patient in scope rather than describe the finding a rule is about.
CONTEXT_FACTS = {"age", "sex", "hook", "parameter", "symptom_duration", "order"}
RULE_IDS_REQUIRED = [
    "CES-1", "NEU-1", "MAL-1", "MAL-2", "INF-1", "IMM-1", "FX-1", "SURG-1", "APP-1",
    "STONE-1", "PYE-1", "GYN-ECT-1", "GYN-TOR-1", "GYN-1", "AAA-1", "AAA-2", "PAD-1", "PREG-1",
    "CC-1", "CC-2", "CC-3", "OPI-1", "STER-1", "LV-1", "LV-2", "LV-4", "LV-5",
]


@pytest.fixture(scope="module")
def pack() -> knowledge.Knowledge:
    return knowledge.load(PACK)


@pytest.fixture(scope="module")
def engine(pack: knowledge.Knowledge) -> RuleEngine:
    return RuleEngine(pack)


def test_the_pack_loads_compiles_and_lints_clean(pack, engine):
    assert lint(pack) == []


def test_every_rule_of_the_clinical_specification_is_there(pack):
    ids = {r.id for r in pack.rules}
    assert [r for r in RULE_IDS_REQUIRED if r not in ids] == []
    assert any(i.startswith("LV-3") for i in ids) and any(i.startswith("CC-STRAT") for i in ids)


@pytest.mark.parametrize("folder", ["valuesets", "conceptmaps", "questionnaires"])
def test_fhir_artefacts_are_valid_r4(folder):
    for path in sorted((PACK / folder).glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        get_fhir_model_class(doc["resourceType"]).model_validate(doc)


def test_every_rule_has_provenance_and_plain_words(pack):
    for rule in pack.rules:
        assert "When" in rule.rationale and "Then" in rule.rationale, rule.id
        assert rule.sources, rule.id


def test_warning_and_critical_cards_offer_override_reasons(pack):
    for rule in pack.rules:
        indicators = {rule.indicator, *(i for i, _ in rule.escalate)}
        if indicators & {"warning", "critical"}:
            assert pack.cards[rule.card].get("overrideReasons"), rule.id


def test_no_card_recommends_what_guidelines_advise_against(pack):
    forbidden = ["traction", "lumbar support belt", "corset", "tens ", "bed rest",
                 "gabapentin", "pregabalin", "prednisone burst", "diazepam"]
    for card_id, card in pack.cards.items():
        for suggestion in card.get("suggestions") or []:
            words = json.dumps(suggestion).lower()
            assert not [w for w in forbidden if w in words], card_id


def test_acupuncture_is_only_a_site_setting(pack):
    for card_id, card in pack.cards.items():
        detail = str(card.get("detail", "")).lower()
        assert "acupuncture" not in detail or "not" in detail, card_id


def _leaves(node: Node) -> list[Node]:
    if isinstance(node, Leaf | RuleRef):
        return [node]
    if isinstance(node, Not):
        return []  # what a rule must NOT see is no evidence of nearness
    children = node.children if isinstance(node, All | Any_ | AtLeast) else []
    return [leaf for child in children for leaf in _leaves(child)]


def _context(case: dict[str, Any], pack: knowledge.Knowledge, hook: str) -> Context:
    record = record_from_resources(case["patient"]["id"], [case["patient"],
                                                           *(case.get("resources") or [])],
                                   draft_orders=case.get("draft_orders") or [])
    now = datetime.fromisoformat(str(case["now"]).replace("Z", "+00:00"))
    orders = record.draft_orders()
    return Context(record, pack, now, hook, orders, orders[0] if orders else None)


def test_every_rule_fires_in_a_scenario_and_is_nearly_met_in_another(pack, engine):
    cases = [yaml.safe_load(p.read_text(encoding="utf-8")) for p in SCENARIOS]
    fired: dict[str, list[str]] = {}
    near: dict[str, list[str]] = {}
    for case in cases:
        expected = {c["rule"] for c in case["expect"].get("cards") or []}
        for rule in pack.rules:
            if case["hook"] not in rule.hooks:
                continue
            if rule.id in expected:
                fired.setdefault(rule.id, []).append(case["id"])
                continue
            ctx = _context(case, pack, case["hook"])
            specific = [leaf for leaf in _leaves(engine.rules[rule.id].when)
                        if getattr(leaf, "fact", None) not in CONTEXT_FACTS]
            if any(leaf.evaluate(ctx, engine).status == PRESENT for leaf in specific):
                near.setdefault(rule.id, []).append(case["id"])
    never_fired = [r.id for r in pack.rules if r.id not in fired]
    never_near = [r.id for r in pack.rules if r.id not in near]
    assert never_fired == [], f"rules no scenario expects to fire: {never_fired}"
    assert never_near == [], f"rules with no near-miss scenario: {never_near}"


@pytest.mark.req("29", "35", "55", "56", "57", "58", "59")
def test_prefetch_templates_stay_in_the_spec_subset(pack):
    """Reads and patient-scoped type searches with spec tokens only (CDS Hooks 2.0 §Prefetch)."""
    import re

    allowed = re.compile(r"^(Patient/\{\{context\.patientId\}\}|[A-Z][A-Za-z]+\?patient="
                         r"\{\{context\.patientId\}\}(&[a-z_-]+=[A-Za-z0-9|:.,-]+)*)$")
    for service in pack.services:
        assert service.prefetch, service.id
        for key, template in service.prefetch.items():
            assert allowed.match(template), (service.id, key, template)


def test_the_pack_digest_changes_with_any_file_and_only_with_the_files(tmp_path):
    """Same files, same digest wherever they lie; a comment, a new file or site parameters make a
    new one; Python caches and hidden files do not count."""
    pack = tmp_path / "pack"
    shutil.copytree(knowledge.default_root(), pack, ignore=shutil.ignore_patterns(
        "__pycache__", ".*"))
    base = knowledge.pack_digest(pack)
    assert base == knowledge.pack_digest(knowledge.default_root())
    (pack / "tools" / "__pycache__").mkdir(exist_ok=True)
    (pack / "tools" / "__pycache__" / "x.pyc").write_bytes(b"cache")
    (pack / ".DS_Store").write_bytes(b"finder")
    assert knowledge.pack_digest(pack) == base
    rules = next(pack.glob("*/rules.yaml"))
    rules.write_text(rules.read_text() + "# reviewed\n")
    commented = knowledge.pack_digest(pack)
    assert commented != base
    site = tmp_path / "site.yaml"
    site.write_text("parameters: {}\n")
    assert knowledge.pack_digest(pack, site) not in (base, commented)
    # A file moved to another name is another pack, though no byte changed.
    rules.rename(rules.with_name("rules-old.yaml"))
    assert knowledge.pack_digest(pack) not in (base, commented)
    assert knowledge.load(knowledge.default_root()).digest == base


def test_a_drug_named_by_its_ingredient_in_a_local_form_or_route_is_not_systemic(pack):
    """The name fallback (products the RxNorm map does not know) skips creams, sprays, eye drops
    and epidural or intra-articular injections: they neither suppress immunity nor are the
    systemic steroids that STER-1 advises against."""
    from lbp_cds.facts import PRESENT, medication

    steroids = pack.valueset("systemic-corticosteroids")
    assert steroids.names_ingredient("methylprednisolone 4 MG Oral Tablet")
    assert not steroids.names_ingredient("hydrocortisone 10 MG/ML Topical Cream")
    assert not steroids.names_ingredient("triamcinolone acetonide 0.055 MG/ACTUAT Nasal Spray")
    immuno = pack.valueset("immunosuppressant-drugs")
    assert immuno.names_ingredient("tacrolimus 1 MG Oral Capsule")
    assert not immuno.names_ingredient("tacrolimus 1 MG/ML Topical Ointment")
    assert not immuno.names_ingredient("cycloSPORINE 0.5 MG/ML Ophthalmic Emulsion")

    def request(route: str | None) -> dict[str, Any]:
        mr: dict[str, Any] = {
            "resourceType": "MedicationRequest", "id": "mr1", "status": "active",
            "intent": "order", "subject": {"reference": "Patient/p1"},
            "authoredOn": "2026-02-28",
            "medicationCodeableConcept": {"coding": [{
                "system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "999999901",
                "display": "triamcinolone acetonide 40 MG/ML Injectable Suspension"}]}}
        if route:
            mr["dosageInstruction"] = [{"route": {"coding": [{
                "system": "http://snomed.info/sct", "code": "404820008", "display": route}]}}]
        return mr

    now = datetime.fromisoformat("2026-03-02T10:00:00+00:00")
    args = {"valueset": steroids, "label": "steroid"}
    for route, expected in ((None, True), ("Intramuscular route", True),
                            ("Epidural route", False), ("Intra-articular route", False)):
        record = record_from_resources("p1", [{"resourceType": "Patient", "id": "p1"},
                                              request(route)])
        got = medication(Context(record, pack, now, "patient-view"), args).status == PRESENT
        assert got is expected, route
        draft = record_from_resources("p1", [{"resourceType": "Patient", "id": "p1"}],
                                      draft_orders=[request(route)])
        ctx = Context(draft, pack, now, "order-sign", draft.draft_orders())
        assert (medication(ctx, args | {"source": "draft"}).status == PRESENT) is expected, route


def test_a_recent_lumbar_cord_or_root_injury_justifies_early_imaging(pack):
    """HEDIS's trauma exclusion (clinical-rules 1.7) covers injuries of the lumbar cord, cauda
    equina and nerve roots (S34), and dislocations and traumatic disc rupture (S33.0-S33.4)."""
    trauma = pack.valueset("lumbar-trauma")
    icd = "http://hl7.org/fhir/sid/icd-10-cm"
    assert trauma.contains(icd, "S33.0XXA") and trauma.contains(icd, "S34.21XA")
    assert trauma.contains(icd, "S33.141A")
    assert not trauma.contains(icd, "M54.50")


def test_a_lumbar_sprain_is_not_trauma_that_justifies_early_imaging(pack):
    """Issue 14: a sprain (S33.5, S33.6, S33.8, S33.9) is ordinary mechanical low back pain, not
    the injury with fracture risk of ACR-LBP-2021 variant 6: it must not silence LV-1."""
    trauma = pack.valueset("lumbar-trauma")
    icd = "http://hl7.org/fhir/sid/icd-10-cm"
    for code in ("S33.5XXA", "S33.6XXA", "S33.8XXD", "S33.9XXA"):
        assert not trauma.contains(icd, code), code


def test_a_sciatic_nerve_lesion_is_episode_context_but_not_radiculopathy(pack):
    """Issue 14: G57.0x (sciatic nerve lesion, piriformis) lies distal to the lumbar roots: it
    keeps the patient in the back-pain episode but does not make a lumbar MRI appropriate."""
    icd = "http://hl7.org/fhir/sid/icd-10-cm"
    assert not pack.valueset("lumbosacral-radiculopathy").contains(icd, "G57.01")
    assert pack.valueset("lumbosacral-radiculopathy").contains(icd, "M54.16")
    assert pack.valueset("lbp-sciatica").contains(icd, "G57.01")
