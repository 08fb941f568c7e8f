"""The ``medication`` fact's ``for_episode`` option over the real pack (issue 14).

OPI-1 and STER-1 speak of a prescription of this back-pain episode: one whose reason is back pain
or sciatica, or, with no reason, one started within the episode that continues no earlier
prescription of the same drug. A monthly refill of long-standing therapy, or gabapentin for
post-herpetic neuralgia, or a prednisone burst for COPD, is not this episode's.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from lbp_cds import knowledge
from lbp_cds.facts import ABSENT, PRESENT, UNKNOWN, Context, medication
from lbp_cds.fhir_data import record_from_resources
from tests.builders import PID, condition
from tests.test_knowledge_pack import PACK

ICD = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
NOW = datetime.fromisoformat("2026-03-02T10:00:00+00:00")
PREDNISONE_20 = ("312615", "prednisone 20 MG Oral Tablet")
GABAPENTIN_300 = ("310431", "gabapentin 300 MG Oral Capsule")


@pytest.fixture(scope="module")
def pack() -> knowledge.Knowledge:
    return knowledge.load(PACK)


def request(drug: tuple[str, str], authored: str, rid: str = "m1", status: str = "active",
            reason: str | None = None, reason_ref: str | None = None) -> dict[str, Any]:
    mr: dict[str, Any] = {
        "resourceType": "MedicationRequest", "id": rid, "status": status, "intent": "order",
        "subject": {"reference": f"Patient/{PID}"}, "authoredOn": authored,
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": drug[0],
                                                  "display": drug[1]}]}}
    if reason:
        mr["reasonCode"] = [{"coding": [{"system": ICD, "code": reason}]}]
    if reason_ref:
        mr["reasonReference"] = [{"reference": f"Condition/{reason_ref}"}]
    return mr


def ask(pack: knowledge.Knowledge, resources: list[dict[str, Any]], valueset: str,
        drafts: list[dict[str, Any]] | None = None, source: str = "record") -> str:
    record = record_from_resources(PID, [{"resourceType": "Patient", "id": PID}, *resources],
                                   draft_orders=drafts)
    ctx = Context(record, pack, NOW, "order-sign" if drafts else "patient-view",
                  record.draft_orders())
    args = {"valueset": pack.medication_valueset(valueset), "source": source,
            "within_days": 30, "for_episode": True, "label": "drug"}
    return medication(ctx, args).status


SCIATICA = condition("M54.41", onset="2026-02-20")


def test_the_pack_defines_one_episode(pack):
    assert pack.episode_valueset == "lbp-sciatica"


def test_started_within_the_episode_without_a_reason_counts(pack):
    mr = request(PREDNISONE_20, "2026-02-25")
    assert ask(pack, [SCIATICA, mr], "systemic-corticosteroids") == PRESENT


def test_reason_back_pain_counts_even_for_a_drug_taken_before(pack):
    old = request(PREDNISONE_20, "2025-06-01", rid="m0", status="completed")
    mr = request(PREDNISONE_20, "2026-02-25", reason="M54.41")
    assert ask(pack, [SCIATICA, old, mr], "systemic-corticosteroids") == PRESENT


def test_a_burst_for_copd_is_not_this_episodes(pack):
    mr = request(PREDNISONE_20, "2026-02-25", reason="J44.1")
    assert ask(pack, [SCIATICA, mr], "systemic-corticosteroids") == ABSENT


def test_a_reason_reference_to_another_condition_is_not_this_episodes(pack):
    phn = condition("B02.23", onset="2025-11-01", rid="phn")
    mr = request(GABAPENTIN_300, "2026-02-25", reason_ref="phn")
    assert ask(pack, [SCIATICA, phn, mr], "gabapentinoids") == ABSENT
    sciatica = condition("M54.41", onset="2026-02-20", rid="sci")
    mr = request(GABAPENTIN_300, "2026-02-25", reason_ref="sci")
    assert ask(pack, [sciatica, mr], "gabapentinoids") == PRESENT


def test_a_refill_of_therapy_started_before_the_episode_is_not_this_episodes(pack):
    first = request(GABAPENTIN_300, "2025-05-10", rid="m0", status="completed")
    refill = request(GABAPENTIN_300, "2026-02-25")
    assert ask(pack, [SCIATICA, first, refill], "gabapentinoids") == ABSENT
    # A cancelled earlier order was never therapy: the new one is the episode's.
    cancelled = request(GABAPENTIN_300, "2025-05-10", rid="m0", status="cancelled")
    assert ask(pack, [SCIATICA, cancelled, refill], "gabapentinoids") == PRESENT


def test_a_prescription_authored_before_the_onset_is_not_this_episodes(pack):
    mr = request(PREDNISONE_20, "2026-02-10")
    resources = [SCIATICA, mr]
    record = record_from_resources(PID, [{"resourceType": "Patient", "id": PID}, *resources])
    ctx = Context(record, pack, NOW, "patient-view")
    args = {"valueset": pack.medication_valueset("systemic-corticosteroids"),
            "source": "record", "within_days": 30, "for_episode": True, "label": "drug"}
    assert medication(ctx, args).status == ABSENT
    assert medication(ctx, args | {"for_episode": False}).status == PRESENT


def test_a_draft_at_order_sign_follows_the_same_reading(pack):
    first = request(PREDNISONE_20, "2025-01-10", rid="m0", status="stopped")
    draft = request(PREDNISONE_20, "2026-03-02", rid="d1", status="draft")
    assert ask(pack, [SCIATICA], "systemic-corticosteroids", [draft], "draft") == PRESENT
    assert ask(pack, [SCIATICA, first], "systemic-corticosteroids", [draft], "draft") == ABSENT
    copd = request(PREDNISONE_20, "2026-03-02", rid="d1", status="draft", reason="J44.1")
    assert ask(pack, [SCIATICA], "systemic-corticosteroids", [copd], "draft") == ABSENT


def test_without_an_episode_onset_it_cannot_tell(pack):
    undated = condition("M54.41", onset=None)
    mr = request(PREDNISONE_20, "2026-02-25")
    assert ask(pack, [undated, mr], "systemic-corticosteroids") == UNKNOWN
    # A back-pain reason settles it without the onset.
    mr = request(PREDNISONE_20, "2026-02-25", reason="M54.41")
    assert ask(pack, [undated, mr], "systemic-corticosteroids") == PRESENT
