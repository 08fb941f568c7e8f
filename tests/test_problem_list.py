"""Which problem-list entries count (``problem-list.yaml`` through ``facts.problem_entries``).

Real problem lists keep acute illnesses ``active`` for decades, resolve cancers that remain a
history of cancer, and rarely record the end of a pregnancy. These tests run the facts over the
real pack, so they check both the engine and the pack's windows; the loader's refusals use a copy
of the mini pack.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from lbp_cds import facts, knowledge
from lbp_cds.errors import KnowledgeError
from lbp_cds.fhir_data import record_from_resources
from lbp_cds.lint import lint
from lbp_cds.rules import RuleEngine
from tests.builders import ICD, SCT, condition, patient
from tests.conftest import MINI, NOW


@pytest.fixture(scope="module")
def pack() -> knowledge.Knowledge:
    k = knowledge.load()
    RuleEngine(k)
    return k


def fact(pack: knowledge.Knowledge, name: str, resources: list[dict[str, Any]],
         **args: Any) -> facts.Result:
    """Evaluate one fact with the pack's value set and a label, as a compiled rule would."""
    record = record_from_resources("p1", [patient(), *resources])
    ctx = facts.Context(record, pack, NOW, "patient-view")
    a = {"label": "test", **args, "valueset": pack.valuesets[args["valueset"]]}
    return facts.FACTS[name].fn(ctx, a)


def procedure(code: str, performed: str, rid: str = "pr1") -> dict[str, Any]:
    return {"resourceType": "Procedure", "id": rid, "status": "completed",
            "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": SCT, "code": code}]},
            "performedDateTime": performed}


def test_an_appendicitis_left_active_since_1956_does_not_count(pack):
    old = condition("74400008", SCT, onset="1956-05-01")
    assert fact(pack, "condition", [old], valueset="appendicitis").status == facts.ABSENT


def test_a_recent_appendicitis_counts(pack):
    recent = condition("74400008", SCT, onset="2026-02-25")
    result = fact(pack, "condition", [recent], valueset="appendicitis")
    assert result.status == facts.PRESENT
    assert result.evidence[0].when == "2026-02-25"


def test_an_undated_acute_entry_counts_and_says_undated(pack):
    undated = condition("K35.80", ICD, onset=None)
    result = fact(pack, "condition", [undated], valueset="appendicitis")
    assert result.status == facts.PRESENT
    assert "undated" in result.evidence[0].value


@pytest.mark.parametrize("removal", [
    condition("428251008", SCT, onset="1990-01-01", rid="h1"),  # history of appendectomy
    condition("428251008", SCT, onset="1990-01-01", rid="h1", clinical="resolved"),
    procedure("80146002", "2026-02-26T10:00:00Z"),  # appendectomy
])
def test_an_appendectomy_rules_out_even_a_recent_appendicitis(pack, removal):
    recent = condition("74400008", SCT, onset="2026-02-25")
    assert fact(pack, "condition", [recent, removal], valueset="appendicitis").status == \
        facts.ABSENT


def test_a_refuted_appendectomy_does_not_rule_out_appendicitis(pack):
    recent = condition("74400008", SCT, onset="2026-02-25")
    refuted = condition("428251008", SCT, onset="1990-01-01", rid="h1", verification="refuted")
    assert fact(pack, "condition", [recent, refuted], valueset="appendicitis").status == \
        facts.PRESENT


def test_a_tubal_pregnancy_of_2000_is_not_an_ectopic_pregnancy_now(pack):
    old = condition("79586000", SCT, onset="2000-06-01")
    assert fact(pack, "condition", [old], valueset="ectopic-pregnancy").status == facts.ABSENT


def test_a_resolved_cancer_is_still_a_history_of_cancer(pack):
    resolved = condition("C50.911", ICD, onset="2010-01-01", clinical="resolved")
    result = fact(pack, "condition", [resolved], valueset="cancer-active")
    assert result.status == facts.PRESENT
    assert result.evidence[0].value == "resolved (a history counts)"


def test_a_refuted_cancer_never_counts(pack):
    refuted = condition("C50.911", ICD, onset="2010-01-01", verification="refuted")
    assert fact(pack, "condition", [refuted], valueset="cancer-active").status == facts.ABSENT


def test_an_abated_entry_is_not_current_whatever_its_status_says(pack):
    stone = condition("N20.0", ICD, onset="2026-02-25")
    stone["abatementDateTime"] = "2026-02-28"
    assert fact(pack, "condition", [stone], valueset="urinary-stone").status == facts.ABSENT
    stone["abatementDateTime"] = "2026-04-01"  # ends in the future: still current
    assert fact(pack, "condition", [stone], valueset="urinary-stone").status == facts.PRESENT


@pytest.mark.parametrize("onset, ended, counts", [
    ("2025-12-01", None, True),                            # 13 weeks pregnant
    ("2025-04-01", None, False),                           # over 42 weeks ago
    ("2025-08-01", "2026-02-20T08:00:00Z", False),          # delivered since
    ("2025-12-01", "2025-06-01T08:00:00Z", True),           # an earlier delivery
])
def test_a_pregnancy_counts_within_42_weeks_until_it_ends(pack, onset, ended, counts):
    resources = [condition("72892002", SCT, onset=onset)]
    if ended:
        resources.append(procedure("66348005", ended))
    result = fact(pack, "condition", resources, valueset="pregnancy")
    assert result.status == (facts.PRESENT if counts else facts.ABSENT)


def test_a_pregnancy_ends_at_a_coded_miscarriage(pack):
    resources = [condition("72892002", SCT, onset="2026-01-01"),
                 condition("19169002", SCT, onset="2026-02-10", rid="c2")]
    assert fact(pack, "condition", resources, valueset="pregnancy").status == facts.ABSENT


def test_the_rule_window_still_narrows_an_entry_that_counts_for_ever(pack):
    old = condition("M81.0", ICD, onset="2010-01-01")
    assert fact(pack, "condition", [old], valueset="osteoporosis").status == facts.PRESENT
    assert fact(pack, "condition", [old], valueset="osteoporosis",
                within_days=90).status == facts.ABSENT


def duration(pack: knowledge.Knowledge, resources: list[dict[str, Any]]) -> float:
    result = fact(pack, "symptom_duration", resources, valueset="lbp-sciatica", op="ge", days=0)
    assert result.status == facts.PRESENT
    return float(result.value)


def test_an_old_back_pain_entry_left_active_does_not_make_a_new_episode_chronic(pack):
    old = condition("M54.50", ICD, onset="2015-04-01", rid="old")
    new = condition("M54.42", ICD, onset="2026-02-20", rid="new")
    assert round(duration(pack, [old, new])) == 10
    assert round(duration(pack, [old])) > 3900  # alone, the old entry is the episode


def test_entries_less_than_180_days_apart_are_one_episode(pack):
    entries = [condition("M54.50", ICD, onset="2025-06-01", rid="a"),
               condition("M54.41", ICD, onset="2025-10-01", rid="b"),
               condition("M54.42", ICD, onset="2026-02-20", rid="c")]
    assert round(duration(pack, entries)) == 274  # from 2025-06-01


def test_a_resolved_back_pain_entry_does_not_date_the_episode(pack):
    old = condition("M54.50", ICD, onset="2025-12-01", rid="old", clinical="resolved")
    new = condition("M54.42", ICD, onset="2026-02-20", rid="new")
    assert round(duration(pack, [old, new])) == 10


def test_the_real_pack_gives_no_status_where_the_problem_list_decides(pack):
    assert [p for p in lint(pack) if "problem-list" in p] == []


# -- the loader's refusals, over a copy of the mini pack ----------------------------------------
def mini_with(tmp_path: Path, text: str) -> Path:
    root = tmp_path / "pack"
    shutil.copytree(MINI, root)
    (root / "problem-list.yaml").write_text(text)
    return root


@pytest.mark.parametrize("text, error", [
    ("valuesets:\n  lbp: {counts: sometimes, source: TEST}\n", "counts must be one of"),
    ("valuesets:\n  lbp: {counts: ever, within_days: 30, source: TEST}\n",
     "within_days goes with counts: recent"),
    ("valuesets:\n  lbp: {counts: recent, source: TEST}\n",
     "within_days goes with counts: recent"),
    ("valuesets:\n  nope: {counts: ever, source: TEST}\n", "unknown value set 'nope'"),
    ("valuesets:\n  lbp: {counts: ever, ruled_out_by: [nope], source: TEST}\n",
     "unknown value set 'nope'"),
    ("valuesets:\n  lbp: {counts: ever}\n", "is not a citation"),
    ("valuesets:\n  lbp: {counts: recent, within_days: -3, source: TEST}\n",
     "within_days must be a positive number"),
    ("valuesets:\n  lbp: {counts: ever, window: 3, source: TEST}\n", "unknown keys"),
])
def test_the_loader_refuses_a_problem_list_it_cannot_apply(tmp_path, text, error):
    with pytest.raises(KnowledgeError, match=error):
        knowledge.load(mini_with(tmp_path, text))


def test_lint_names_a_rule_that_sets_a_status_the_problem_list_decides(tmp_path):
    root = mini_with(tmp_path, "valuesets:\n  ces: {counts: ever, source: TEST}\n")
    rules = root / "triage" / "rules.yaml"
    rules.write_text(rules.read_text().replace(
        "{fact: condition, valueset: ces,", "{fact: condition, valueset: ces, status: any,"))
    k = knowledge.load(root)
    RuleEngine(k)
    assert any("status of ces is decided by problem-list.yaml" in p for p in lint(k))


# -- issue 14: red flags corrected on the guideline ---------------------------------------------
def test_a_neurogenic_bladder_explained_by_multiple_sclerosis_is_not_a_new_ces_feature(pack):
    bladder = condition("N31.9", ICD, onset=None, recorded="2026-03-02", rid="nb")
    ms = condition("G35", ICD, onset="2018-01-10", rid="ms")
    assert fact(pack, "condition", [bladder, ms], valueset="neurogenic-bladder-bowel",
                within_days=14).status == facts.ABSENT
    assert fact(pack, "condition", [bladder], valueset="neurogenic-bladder-bowel",
                within_days=14).status == facts.PRESENT


def test_sciatica_of_each_side_counts_for_bilateral_only_when_recent(pack):
    new_left = condition("M54.42", ICD, onset="2026-02-25", rid="l")
    old_left = condition("M54.42", ICD, onset="2025-10-01", rid="l")
    assert fact(pack, "condition", [new_left], valueset="sciatica-left",
                within_days=14).status == facts.PRESENT
    assert fact(pack, "condition", [old_left], valueset="sciatica-left",
                within_days=14).status == facts.ABSENT


def test_arthrodesis_status_and_skin_cancer_history_are_not_in_the_red_flag_sets(pack):
    assert not pack.valuesets["prior-lumbar-surgery"].contains(ICD, "Z98.1")
    assert pack.valuesets["prior-lumbar-surgery"].contains(
        "http://www.cms.gov/Medicare/Coding/ICD10", "0SG00AJ")
    assert not pack.valuesets["cancer-history"].contains(ICD, "Z85.828")
    assert pack.valuesets["cancer-history"].contains(ICD, "Z85.820")


def imaging_report(when: str) -> dict[str, Any]:
    return {"resourceType": "DiagnosticReport", "id": "dr1", "status": "final",
            "subject": {"reference": "Patient/p1"}, "effectiveDateTime": when,
            "code": {"coding": [{"system": "http://loinc.org", "code": "30679-5"}]}}


@pytest.mark.parametrize(("imaged", "status"), [("2026-02-25", facts.PRESENT),
                                                ("2025-11-01", facts.ABSENT)])
def test_prior_imaging_since_the_episode_onset(pack, imaged, status):
    episode = condition("M54.42", ICD, onset="2026-01-20", rid="lbp")
    result = fact(pack, "prior_imaging", [episode, imaging_report(imaged)],
                  valueset="lumbar-imaging", since_onset_of="lbp-sciatica")
    assert result.status == status


def test_prior_imaging_since_onset_is_unknown_without_an_onset(pack):
    undated = condition("M54.42", ICD, onset=None, rid="lbp")
    result = fact(pack, "prior_imaging", [undated, imaging_report("2026-02-25")],
                  valueset="lumbar-imaging", since_onset_of="lbp-sciatica")
    assert result.status == facts.UNKNOWN
