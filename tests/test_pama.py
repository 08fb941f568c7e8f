"""Appropriateness ratings (Argonaut CDS Hooks for PAMA) as system actions: shape, decisions, pack.

The guide is argonautproject/cds-hooks-for-pama (docs/index.md at 36a3db1, 2023-08-07, rendered at
https://argonautproject.github.io/cds-hooks-for-pama/). Its example responses are copied into
``tests/data/argonaut-pama/`` (with their origin in its README); ``GUIDE_*`` below restates what
they and the guide's extension table fix: the URLs, each extension's value type, the rating code
system and codes, and ``test_shape_matches_the_guides_example_files`` compares our actions with the
example responses.
"""

from __future__ import annotations

import copy
import json
import os
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from fhir.resources.R4B.servicerequest import ServiceRequest

from lbp_cds import knowledge, pama
from lbp_cds.errors import KnowledgeError
from lbp_cds.fixtures import Scenario, hook_request, read_scenario
from lbp_cds.hooks import response_issues
from lbp_cds.rules import RuleEngine

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "fixtures" / "scenarios"
GUIDE_FILES = Path(os.environ.get("LBP_CDS_PAMA_EXAMPLES")
                   or ROOT / "tests" / "data" / "argonaut-pama")

# docs/index.md, "Argonaut FHIR extensions for PAMA": url -> the value[x] its type gives.
GUIDE_EXTENSIONS = {
    "http://fhir.org/argonaut/Extension/pama-rating": "valueCodeableConcept",  # REQUIRED
    "http://fhir.org/argonaut/Extension/pama-rating-qcdsm-consulted": "valueString",  # REQUIRED
    "http://fhir.org/argonaut/Extension/pama-rating-consult-id": "valueUri",  # REQUIRED
    "http://fhir.org/argonaut/Extension/pama-rating-auc-applied": "valueUri",  # OPTIONAL
}
GUIDE_REQUIRED = set(list(GUIDE_EXTENSIONS)[:3])
GUIDE_RATING_SYSTEM = "http://fhir.org/argonaut/CodeSystem/pama-rating"
GUIDE_RATINGS = {"appropriate", "not-appropriate", "no-criteria-apply"}
ACR_LBP = "https://acsearch.acr.org/docs/69483/Narrative/"


def call(app: Any, scenario: Scenario, body: dict[str, Any] | None = None) -> dict[str, Any]:
    app.config["clock"]["now"] = scenario.now
    service = next(s for s in app.extensions["lbp_cds"].knowledge.services
                   if s.hook == scenario.hook)
    body = body or hook_request(scenario, service.prefetch)
    resp = app.test_client().post(f"/cds-services/{service.id}", json=body)
    assert resp.status_code == 200, resp.json
    doc: dict[str, Any] = resp.json
    assert response_issues(doc) == []
    return doc


def scenario(name: str) -> Scenario:
    return read_scenario(SCENARIOS / f"{name}.yaml")


def extensions(resource: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for ext in resource.get("extension") or []:
        out.setdefault(ext["url"], []).append(ext)
    return out


def rating_of(action: dict[str, Any]) -> str:
    (ext,) = extensions(action["resource"])[pama.RATING_URL]
    return str(ext["valueCodeableConcept"]["coding"][0]["code"])


def without_pama(resource: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(resource)
    kept = [e for e in out.get("extension") or [] if e["url"] not in GUIDE_EXTENSIONS]
    if kept:
        out["extension"] = kept
    else:
        out.pop("extension", None)
    return out


def check_shape(doc: dict[str, Any], drafts: list[dict[str, Any]]) -> None:
    """Every system action is the guide's: an update of one judged draft, unchanged but for
    the guide's extensions, each with the guide's value type; valid R4."""
    actions = doc["systemActions"]
    assert doc["extension"]["systemActions"] == actions  # where the guide and the sandbox read
    by_id = {d["id"]: d for d in drafts}
    for action in actions:
        assert action["type"] == "update" and action["description"]
        resource = action["resource"]
        assert resource["resourceType"] == "ServiceRequest"
        assert without_pama(resource) == without_pama(by_id[resource["id"]])
        found = extensions(resource)
        assert GUIDE_REQUIRED <= set(found)
        for url, exts in found.items():
            if url in GUIDE_EXTENSIONS:
                assert len(exts) == 1, url
                assert set(exts[0]) == {"url", GUIDE_EXTENSIONS[url]}, exts[0]
        coding = found[pama.RATING_URL][0]["valueCodeableConcept"]["coding"]
        assert any(c["system"] == GUIDE_RATING_SYSTEM and c["code"] in GUIDE_RATINGS
                   for c in coding)
        consult = found[pama.CONSULT_ID_URL][0]["valueUri"]
        assert consult.startswith("urn:uuid:") and uuid.UUID(consult[len("urn:uuid:"):])
        ServiceRequest.model_validate(resource)


# -- shape ------------------------------------------------------------------------------------
def test_constants_are_the_guides():
    assert {pama.RATING_URL, pama.QCDSM_URL, pama.CONSULT_ID_URL, pama.AUC_APPLIED_URL} == \
        set(GUIDE_EXTENSIONS)
    assert pama.RATING_SYSTEM == GUIDE_RATING_SYSTEM


def test_the_guides_own_order_is_rated_as_its_connectathon_expects(real_app):
    """The guide's connectathon scenario 1 order (CPT 72133 lumbar spine CT for SNOMED 279039007
    low back pain, order-select, selected by id) expects `not-appropriate`; here the patient's
    record holds a 12-day-old sciatica episode, so LV-1 (ACR variant 1) decides."""
    base = scenario("lv1-order-select-selected-mri-unselected-xr")
    guide_order = {
        "resourceType": "ServiceRequest", "id": "example-MRI-59879846", "status": "draft",
        "intent": "plan",
        "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "72133"}],
                 "text": "Lumbar spine CT"},
        "subject": {"reference": f"Patient/{base.patient_id}"},
        "reasonCode": [{"coding": [{"system": "http://snomed.info/sct", "code": "279039007",
                                    "display": "Low back pain"}]}],
    }
    case = replace(base, draft_orders=[guide_order],
                   selections=["ServiceRequest/example-MRI-59879846"])
    doc = call(real_app, case)
    check_shape(doc, [guide_order])
    (action,) = doc["systemActions"]
    assert rating_of(action) == "not-appropriate"
    found = extensions(action["resource"])
    assert found[pama.AUC_APPLIED_URL][0]["valueUri"] == ACR_LBP
    assert "variant 1" in found[pama.RATING_URL][0]["valueCodeableConcept"]["text"]
    assert found[pama.QCDSM_URL][0]["valueString"] == "lbp-cds"


def test_shape_matches_the_guides_example_files(real_app):
    files = sorted(GUIDE_FILES.glob("*-response*.json"))
    assert len(files) >= 3, f"the guide's example responses belong in {GUIDE_FILES}"
    doc = call(real_app, scenario("lv1-early-mri"))
    ours = extensions(doc["systemActions"][0]["resource"])
    for path in files:
        example = json.loads(path.read_text(encoding="utf-8"))
        for action in (example.get("extension") or {}).get("systemActions") or []:
            assert action["type"] == "update"
            for ext in action["resource"]["extension"]:
                value_key = next(k for k in ext if k.startswith("value"))
                assert set(ours[ext["url"]][0]) == {"url", value_key}, path.name


# -- decisions, through the fixture scenarios -----------------------------------------------------
RATED = [
    # (scenario, {judged order id: rating}); orders not named get no system action.
    ("ces-mri-stat-ordered", {"ces-07-mri": "appropriate"}),  # CES-1: ACR variant 4, MRI
    ("inf-epidural-injection-fever-order-select", {"inf-07-mri": "appropriate"}),  # INF-1: V7
    ("fx-lumbar-xr-order-select", {"fx-06-xr": "appropriate"}),  # FX-1: V6, radiography
    ("mal2-lumbar-xr-with-esr", {"mal-06-xr": "appropriate"}),  # MAL-2: V7; ESR, CRP unrated
    ("lv2-candidate-after-trial", {"lv-06-mri": "appropriate"}),  # V3 (the when tree)
    ("lv1-early-mri", {"lv-01-mri": "not-appropriate"}),  # LV-1: V1
    ("lv1-order-select-selected-mri-unselected-xr", {"lv-02-mri": "not-appropriate"}),
    ("lv2-eight-weeks-no-conservative-trial", {"lv-05-mri": "not-appropriate"}),  # LV-2: V2
    ("ces-lumbar-xr-ordered", {"ces-06-xr": "not-appropriate"}),  # CES-1: V4, radiography
    ("preg-lumbar-xr-ordered", {"preg-03-xr": "not-appropriate"}),  # LV-4 before LV-1
    ("lv-dup-mri-five-months-ago", {"lv-07-mri": "not-appropriate"}),  # LV-DUP
    ("pama-haemangioma-mri-no-back-pain", {"pama-01-mri": "no-criteria-apply"}),
    ("fx-osteoporosis-no-trauma-mri-order", {}),  # no rule decides: withheld
    ("app-snomed-appendicitis-ct-order", {}),  # CT abdomen: not a judged lumbar study
    ("opi-oxycodone-chronic-sciatica", {}),  # a drug order
]


@pytest.mark.parametrize(("name", "want"), RATED, ids=[n for n, _ in RATED])
def test_rating(real_app, name: str, want: dict[str, str]):
    case = scenario(name)
    doc = call(real_app, case)
    got = {a["resource"]["id"]: rating_of(a) for a in doc.get("systemActions") or []}
    assert got == want, case.title
    assert case.hook in ("order-select", "order-sign")
    if want:
        check_shape(doc, case.draft_orders)
    else:
        assert "extension" not in doc


def test_both_order_hooks_are_covered():
    hooks = {scenario(n).hook for n, want in RATED if want}
    assert hooks == {"order-select", "order-sign"}
    for rating in GUIDE_RATINGS:
        assert any(rating in want.values() for _, want in RATED), rating


def test_withheld_when_part_of_the_record_could_not_be_read(real_app):
    """LV-1 still shows its card, but "no red flag" rests on a record it could not read: the
    guide asks for no rating rather than a guess."""
    case = replace(scenario("lv1-early-mri"), unavailable=["observations"])
    doc = call(real_app, case)
    assert [c["extension"]["org.lbp-cds.rule"]["ruleId"] for c in doc["cards"]] == ["LV-1"]
    assert "systemActions" not in doc and "extension" not in doc


def test_no_system_actions_at_patient_view(real_app):
    for name in ("cc2-persistent-radiculopathy-candidate", "ces-saddle-numbness-urinary-retention"):
        case = scenario(name)
        assert case.hook == "patient-view"
        doc = call(real_app, case)
        assert doc["cards"]
        assert "systemActions" not in doc and "extension" not in doc


def test_earlier_ratings_are_replaced_and_other_extensions_kept(real_app):
    case = scenario("lv1-early-mri")
    draft = copy.deepcopy(case.draft_orders[0])
    local = {"url": "http://ehr.example.org/fhir/StructureDefinition/order-set", "valueString": "x"}
    draft["extension"] = [
        {"url": pama.RATING_URL, "valueCodeableConcept": {"coding": [
            {"system": GUIDE_RATING_SYSTEM, "code": "appropriate"}]}},
        local,
        {"url": pama.CONSULT_ID_URL, "valueUri": "urn:uuid:55f3b7fc-9955-420e-a460-ff284b2956e6"},
    ]
    doc = call(real_app, replace(case, draft_orders=[draft]))
    (action,) = doc["systemActions"]
    check_shape(doc, [draft])
    assert rating_of(action) == "not-appropriate"
    found = extensions(action["resource"])
    assert found[local["url"]] == [local]
    assert found[pama.CONSULT_ID_URL][0]["valueUri"] != draft["extension"][2]["valueUri"]


def test_cards_are_still_stored_and_counted(real_app):
    doc = call(real_app, scenario("lv1-early-mri"))
    store = real_app.extensions["lbp_cds"].store
    assert doc["systemActions"]
    for card in doc["cards"]:
        assert store.card(card["uuid"]) is not None
    metrics = real_app.test_client().get("/metrics")
    assert metrics.status_code == 200


# -- the pack ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pack() -> knowledge.Knowledge:
    return knowledge.load()


def pama_doc() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(
        (ROOT / "cds_services" / "pama.yaml").read_text(encoding="utf-8"))
    return doc


def check(pack: knowledge.Knowledge, doc: dict[str, Any]) -> None:
    knowledge._check_pama(replace(pack, pama=knowledge.parse_pama(doc)))


def test_the_bundled_pack_rates_the_order_services(pack):
    assert pack.pama is not None
    assert set(pack.pama.services) == {"lbp-imaging-order-select", "lbp-imaging-order-sign"}
    assert pama.rater_for(RuleEngine(pack)) is not None


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["decide"].insert(0, {"rule": "NO-SUCH", "criterion": "ACR-LBP-V1"}),
     "unknown rule"),
    (lambda d: d["decide"].insert(0, {"rule": "CC-1", "criterion": "ACR-LBP-V1"}),
     "does not run at every hook"),
    (lambda d: d["not_rated"].pop("OPI-1"), "OPI-1"),
    (lambda d: d["levels"]["usually-appropriate"].update(pama="adheres"), "pama appropriate"),
    (lambda d: d["criteria"]["ACR-LBP-V1"]["ratings"].update(pet="usually-appropriate"),
     "unknown study"),
    (lambda d: d["criteria"]["ACR-LBP-V1"].update(source="ACR-2099"), "not in citations"),
    (lambda d: d["decide"].insert(0, {"rule": "LV-1", "when": {"rule": "LV-1"},
                                      "criterion": "ACR-LBP-V1"}), "exactly one of rule"),
    (lambda d: d["decide"].insert(0, {"rule": "LV-1", "rating": "appropriate"}),
     "only be no-criteria-apply"),
    (lambda d: d.update(services=["no-such-service"]), "unknown service"),
    (lambda d: d.update(services=["lbp-triage"]), "ratings are for order-select"),
    (lambda d: d.update(orders="no-such-valueset"), "unknown value set"),
])
def test_the_loader_refuses_a_bad_pama_yaml(pack, change, message):
    doc = pama_doc()
    change(doc)
    with pytest.raises(KnowledgeError, match=message):
        check(pack, doc)


def test_a_when_tree_is_checked_by_the_rules_grammar(pack):
    doc = pama_doc()
    doc["decide"].append({"when": {"fact": "no_such_fact"}, "withhold": "x"})
    with pytest.raises(KnowledgeError, match="unknown fact"):
        pama.Rater(knowledge.parse_pama(doc), RuleEngine(pack))


def test_without_pama_yaml_there_are_no_system_actions(pack):
    engine = RuleEngine(replace(pack, pama=None))
    assert pama.rater_for(engine) is None
    assert pama.response([], [], engine) == {"cards": []}
