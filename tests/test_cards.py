"""Card rendering: text from the pack, evidence, suggestions as valid FHIR, no empty fields."""

from __future__ import annotations

import json

from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from lbp_cds import cards, knowledge
from lbp_cds.fhir_data import record_from_resources
from lbp_cds.hooks import response_issues
from lbp_cds.rules import RuleEngine
from tests.builders import condition, imaging_order, observation, patient, questionnaire_response
from tests.conftest import MINI, NOW


@pytest.fixture(scope="module")
def engine() -> RuleEngine:
    return RuleEngine(knowledge.load(MINI))


def render(engine: RuleEngine, resources: list[dict[str, Any]], hook: str = "patient-view",
           orders: list[dict[str, Any]] | None = None, **cc: Any) -> list[dict[str, Any]]:
    record = record_from_resources("p1", [patient(), *resources], draft_orders=orders)
    service = next(s for s in engine.knowledge.services if s.hook == hook)
    matches = engine.evaluate(service, record, NOW, record.draft_orders())
    raw = {o["id"]: o for o in orders or []}
    context = cards.CardContext(patient_id="p1", now=NOW, encounter_id="e1",
                                user_id="Practitioner/doc", draft_raw=raw.get, **cc)
    out = [c.card for c in cards.render(matches, engine.knowledge, context)]
    assert response_issues({"cards": out}) == []
    return out


def empty_fields(node: Any, path: str = "") -> list[str]:
    found = []
    if node in (None, "", [], {}):
        found.append(path)
    elif isinstance(node, dict):
        for k, v in node.items():
            found += empty_fields(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += empty_fields(v, f"{path}[{i}]")
    return found


@pytest.mark.req("99", "104", "106", "108", "113", "116")
def test_critical_card_carries_everything_a_clinician_needs(engine):
    (card,) = render(engine, [condition("M54.41", display="Lumbago with sciatica, right side"),
                              questionnaire_response({"ces-saddle": True})])
    assert card["indicator"] == "critical"
    assert card["summary"] == "Possible cauda equina syndrome - emergency MRI"
    assert card["source"] == {"label": "Test guideline", "url": "https://example.org/guideline",
                              "topic": {"system": "http://snomed.info/sct",
                                        "code": "279039007", "display": "Low back pain"}}
    assert "**On record:** Lumbago with sciatica, right side (M54.41), 2026-02-20" in card["detail"]
    assert "saddle numbness: yes (intake), 2026-03-01" in card["detail"]
    assert card["extension"]["org.lbp-cds.rule"]["evidence"] == [
        "Condition: Lumbago with sciatica, right side (ICD-10-CM M54.41) · active · 2026-02-20",
        "Intake answer: saddle numbness · true · 2026-03-01"]
    assert card["overrideReasons"][0]["display"]
    assert card["links"] == [{"label": "Test guideline", "url": "https://example.org/guideline",
                              "type": "absolute"}]
    assert empty_fields(card) == []


@pytest.mark.req("118", "123", "129", "131")
def test_created_service_request_is_a_complete_valid_r4_resource(engine):
    (card,) = render(engine, [condition("M54.41"), questionnaire_response({"ces-saddle": True})])
    action = card["suggestions"][0]["actions"][0]
    assert card["selectionBehavior"] == "at-most-one" and card["suggestions"][0]["uuid"]
    sr = action["resource"]
    get_fhir_model_class("ServiceRequest").model_validate(sr)
    assert sr["priority"] == "stat" and sr["status"] == "draft" and sr["intent"] == "order"
    assert sr["subject"] == {"reference": "Patient/p1"}
    assert sr["encounter"] == {"reference": "Encounter/e1"}
    assert sr["requester"] == {"reference": "Practitioner/doc"}
    assert [c["code"] for c in sr["code"]["coding"]] == ["30679-5", "72148"]
    assert sr["category"][0]["coding"][0]["code"] == "363679005"


@pytest.mark.req("110")
def test_unknowns_are_listed_and_link_to_the_intake(engine):
    (card,) = render(engine, [condition("M54.41")], base_url="https://cds.example.org")
    assert "**Not checked:**" in card["detail"] and "saddle numbness" in card["detail"]
    assert any("saddle numbness" in u for u in card["extension"]["org.lbp-cds.rule"]["notChecked"])
    intake = [link for link in card["links"] if link["type"] == "smart"]
    assert [link["url"] for link in intake] == ["https://cds.example.org/smart/launch"]
    assert json.loads(intake[0]["appContext"]) == {"rule": card["extension"][
        "org.lbp-cds.rule"]["ruleId"], "patient": "p1"}


@pytest.mark.req("94")
def test_escalated_card_uses_its_own_summary(engine):
    crp = observation("1988-5", 50, "mg/L", rid="o2", interpretation=[{"coding": [{
        "code": "H"}]}])
    out = render(engine, [condition("M54.41"), observation("8310-5", 38.5), crp])
    assert out[0]["summary"] == "Fever and raised CRP with back pain - urgent assessment"


def test_record_text_cannot_inject_markdown_or_html(engine):
    (card,) = render(engine, [condition("M54.41", display="<script>x</script> [click](http://x)"),
                              questionnaire_response({"ces-saddle": True})])
    import re

    # Escaped (\< \[ \]) so that GitHub-flavoured Markdown shows them as text.
    assert not re.search(r"(?<!\\)<script", card["detail"])
    assert not re.search(r"(?<!\\)\]\(http", card["detail"])
    assert "\\<script\\>" in card["detail"]


@pytest.mark.req("125", "132", "133", "134")
def test_order_suggestions_delete_and_update_the_judged_order(engine):
    order = imaging_order(rid="draft-7", code="24972-2")
    order["note"] = [{"text": "keep me"}]
    (card,) = render(engine, [condition("M54.41")], hook="order-sign", orders=[order])
    delete, create = card["suggestions"][0]["actions"]
    assert delete == {"type": "delete", "description": "Remove the draft imaging order",
                      "resourceId": "ServiceRequest/draft-7"}
    assert create["resource"]["code"]["text"] == "Physiotherapy referral"
    (update,) = card["suggestions"][1]["actions"]
    assert update["resource"]["id"] == "draft-7" and update["resource"]["note"] == [
        {"text": "keep me"}]
    assert update["resource"]["code"]["coding"][0]["code"] == "30679-5"
    get_fhir_model_class("ServiceRequest").model_validate(update["resource"])


def test_record_not_checked_is_said_plainly(engine):
    order = imaging_order()
    order["reasonCode"] = [{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm",
                                        "code": "M54.41"}]}]
    (card,) = render(engine, [], hook="order-sign", orders=[order], record_checked=False)
    assert "could not be obtained" in card["detail"]
