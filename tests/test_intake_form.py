"""The SMART intake form over the real knowledge pack: which questions, in what order, prefilled
from what, how answers are read, the QuestionnaireResponse they make (read back by the rules),
and the HTML (labelled, no inline script or style, answers kept after a failed save)."""

from __future__ import annotations

import json
import re
from datetime import date, datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.questionnaire import Questionnaire
from fhir.resources.R4B.questionnaireresponse import QuestionnaireResponse

from lbp_cds import intake, knowledge, pages
from lbp_cds.errors import KnowledgeError
from lbp_cds.fhir_data import record_from_resources
from lbp_cds.fixtures import read_scenario
from lbp_cds.intake import Prefill
from lbp_cds.knowledge import Knowledge
from lbp_cds.rules import RuleEngine
from tests.builders import condition, medication, observation, patient, questionnaire_response
from tests.conftest import NOW, ROOT

CES = ["ces-bilateral", "ces-saddle", "ces-bladder", "ces-bowel", "ces-sexual"]
STARTBACK = [f"startback-{n}" for n in range(1, 10)]
UUID = "urn:uuid:5b0c1e9e-3f43-4a59-9d0f-0d6f2c1a7b11"


@pytest.fixture(scope="module")
def k() -> Knowledge:
    return knowledge.load()


def ids(items: list[intake.FormItem]) -> list[str]:
    return [i.link_id for i in items]


def form_of(**answers: Any) -> dict[str, list[str]]:
    return {key.replace("_", "-"): v if isinstance(v, list) else [v] for key, v in answers.items()}


# -- the questionnaire itself -------------------------------------------------------------------
def test_questionnaire_is_valid_r4_and_versioned_with_enable_when(k):
    Questionnaire.model_validate(k.questionnaire)
    assert k.questionnaire["version"] == "1.1.0"
    items = {i["linkId"]: i for i in k.questionnaire["item"]}
    onset = items["ces-onset-days"]
    assert onset["enableBehavior"] == "any"
    assert {c["question"] for c in onset["enableWhen"]} == set(CES)
    weeks = items["conservative-weeks"]
    codes = {c["answerCoding"]["code"] for c in weeks["enableWhen"]}
    options = {o["valueCoding"]["code"] for o in items["conservative-tried"]["answerOption"]}
    assert codes == options - {"none"}


# -- order and applies --------------------------------------------------------------------------
def test_cauda_equina_questions_come_before_start_back(k):
    order = ids(intake.form_items(k, sex=None, age=None, first_rule=None))
    assert len(order) == 43
    assert max(order.index(c) for c in CES) < min(order.index(s) for s in STARTBACK)
    # The most dangerous rule's questions lead the red flags.
    assert order.index("ces-saddle") < order.index("fever-chills") < order.index("dysuria")


def test_the_cards_rule_puts_its_questions_first(k):
    items = intake.form_items(k, sex="male", age=40, first_rule="INF-1")
    card = [i.link_id for i in items if i.group == "card"]
    assert {"fever-chills", "ivdu", "recent-infection", "immunosuppressed"} <= set(card)
    assert ids(items)[:len(card)] == card
    # INF-1's own questions first; then those of the rules it escalates on (cauda equina).
    own = [i for i in card if i in intake.rule_items(k, "INF-1")]
    assert card[:len(own)] == own and "ces-saddle" in card[len(own):]
    assert {i.group for i in items[len(card):]} <= {"danger", "other"}


def test_a_card_standing_for_absent_red_flags_opens_on_those_red_flags(k):
    """CC-1 stands because no red-flag rule fired: its questions are those rules' questions,
    most dangerous first."""
    items = intake.form_items(k, sex="male", age=40, first_rule="CC-1")
    card = [i.link_id for i in items if i.group == "card"]
    assert {"ces-saddle", "fever-chills", "cancer-history"} <= set(card)
    assert card.index("ces-saddle") < card.index("fever-chills")


def test_rule_items_reads_answers_startback_and_unknown_rules(k):
    assert set(CES) | {"ces-onset-days"} <= set(intake.rule_items(k, "CES-1"))
    assert set(STARTBACK) <= set(intake.rule_items(k, "CC-STRAT-HIGH"))
    assert intake.rule_items(k, "NO-SUCH-RULE") == []


def test_questions_that_cannot_apply_are_left_off(k):
    man = ids(intake.form_items(k, sex="male", age=40, first_rule=None))
    woman = ids(intake.form_items(k, sex="female", age=30, first_rule=None))
    unknown = ids(intake.form_items(k, sex=None, age=None, first_rule=None))
    older = ids(intake.form_items(k, sex="female", age=70, first_rule=None))
    for item in ("lmp-date", "possibly-pregnant"):
        assert item not in man
        assert item in woman
        assert item in unknown
        assert item not in older
    assert "abnormal-vaginal-bleeding" in older  # female >= 12, no upper limit


def test_sex_and_age_from_a_patient(k):
    now = datetime(2026, 3, 2, tzinfo=timezone.utc)
    assert intake.sex_and_age(patient("female", "1996-01-01"), now) == ("female", 30)
    # A year-only birth date that allows two ages gives no age: no question is left off on it.
    assert intake.sex_and_age(patient("male", "1970"), now) == ("male", None)
    # On its last day the year allows one age only.
    assert intake.sex_and_age(patient("male", "1960"), datetime(2026, 12, 31, 12,
                                                                tzinfo=timezone.utc))[1] == 66
    assert intake.sex_and_age({"resourceType": "Patient", "id": "p", "gender": "unknown"},
                              now) == (None, None)
    assert intake.sex_and_age(None, now) == (None, None)


# -- prefill ------------------------------------------------------------------------------------
def resources(*items: dict[str, Any], who: dict[str, Any] | None = None) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"Patient": [who or patient()], "Condition": [],
                                 "Observation": [], "QuestionnaireResponse": []}
    for item in items:
        out.setdefault(item["resourceType"], []).append(item)
    return out


def test_a_coded_cancer_prefills_yes_with_its_source(k):
    found = intake.prefill(k, resources(condition("C50.911", display="Breast cancer")), now=NOW)
    assert found["cancer-history"].value is True
    assert "C50.911" in found["cancer-history"].source


def test_an_excluded_code_prefills_nothing(k):
    # Non-melanoma skin cancer: Z85.828 is excluded from cancer-history; C44 is not in
    # cancer-active.
    for code in ("Z85.828", "C44.91"):
        assert "cancer-history" not in intake.prefill(k, resources(condition(code)), now=NOW)


def test_a_refuted_cancer_prefills_nothing(k):
    refuted = condition("C50.911", verification="refuted")
    assert "cancer-history" not in intake.prefill(k, resources(refuted), now=NOW)


def test_nothing_is_prefilled_no_from_an_empty_record(k):
    found = intake.prefill(k, resources(), now=NOW)
    assert found == {}
    found = intake.prefill(k, resources(condition("M54.41", onset="2026-02-20")), now=NOW)
    assert all(p.value is not False for p in found.values())


def test_onset_side_aneurysm_and_pregnancy_from_the_record(k):
    woman = patient("female", "1996-01-01")
    hcg = observation("2106-3", rid="o-hcg", when="2026-02-25T10:00:00Z",
                      valueCodeableConcept={"coding": [{
                          "system": "http://snomed.info/sct", "code": "10828004"}]})
    found = intake.prefill(k, resources(
        condition("M54.41", onset="2026-02-20"), condition("I71.40", rid="c2"), hcg, who=woman),
        now=NOW)
    assert found["lbp-onset-date"].value == date(2026, 2, 20)
    assert found["leg-pain-side"].value == "right"
    assert found["pulsatile-mass"].value is True
    assert found["possibly-pregnant"].value is True, found


def test_a_previous_intake_prefills_what_it_answered_but_never_a_no(k):
    qr = questionnaire_response({"ces-saddle": False, "ces-bilateral": True, "trauma": "minor",
                                 "ces-onset-days": 3, "conservative-tried": ["nsaid", "heat"],
                                 "lbp-onset-date": "2026-02-10"},
                                authored="2026-02-28T09:00:00Z")
    found = intake.prefill(k, resources(qr), now=NOW)
    # A red flag denied earlier is asked again: a prefilled "no" would be saved with one click.
    assert "ces-saddle" not in found
    assert found["ces-bilateral"] == Prefill(True, "previous intake, 2026-02-28")
    assert found["trauma"].value == "minor"
    assert found["ces-onset-days"].value == 3
    assert found["conservative-tried"].value == ["nsaid", "heat"]
    assert found["lbp-onset-date"].value == date(2026, 2, 10)


def test_an_intake_older_than_the_window_prefills_nothing(k):
    days = k.param("$intake_prefill_previous_days")
    old = (NOW - timedelta(days=days + 1)).isoformat()
    qr = questionnaire_response({"ces-bilateral": True, "trauma": "minor"}, authored=old)
    assert intake.prefill(k, resources(qr), now=NOW) == {}


def test_the_record_wins_over_a_previous_intake(k):
    qr = questionnaire_response({"cancer-history": False}, authored="2026-02-28T09:00:00Z")
    found = intake.prefill(k, resources(qr, condition("C50.911")), now=NOW)
    assert found["cancer-history"].value is True
    assert "previous intake" not in found["cancer-history"].source


# -- parse_answers ------------------------------------------------------------------------------
def test_answers_are_typed(k):
    values, errors = intake.parse_answers(k, form_of(
        ces_saddle="true", ces_bladder="false", ces_onset_days="3", trauma="minor",
        conservative_tried=["heat", "nsaid"], conservative_weeks="6",
        lbp_onset_date="2026-02-20", csrf="x", identifier=UUID, unknown_field="1"), now=NOW)
    assert errors == {}
    assert values == {"ces-saddle": True, "ces-bladder": False, "ces-onset-days": 3,
                      "trauma": "minor", "conservative-tried": ["nsaid", "heat"],
                      "conservative-weeks": 6, "lbp-onset-date": date(2026, 2, 20)}


def test_bad_answers_get_plain_errors(k):
    values, errors = intake.parse_answers(k, form_of(
        ces_saddle="maybe", trauma="huge", ces_bilateral="true", ces_onset_days="-2",
        lbp_onset_date="2027-01-01", lmp_date="01/02/2026",
        conservative_tried=["nsaid"], conservative_weeks="9999"), now=NOW)
    assert set(errors) == {"ces-saddle", "trauma", "ces-onset-days", "lbp-onset-date",
                           "lmp-date", "conservative-weeks"}
    assert errors["ces-saddle"] == "Choose Yes or No."
    assert "future" in errors["lbp-onset-date"]
    assert "0 to 520" in errors["conservative-weeks"]
    assert values == {"ces-bilateral": True, "conservative-tried": ["nsaid"]}


def test_blank_and_not_sure_are_unanswered(k):
    values, errors = intake.parse_answers(k, form_of(ces_saddle="", trauma=" "), now=NOW)
    assert (values, errors) == ({}, {})


def test_answers_to_disabled_questions_are_dropped(k):
    values, errors = intake.parse_answers(k, form_of(
        ces_saddle="false", ces_onset_days="3", conservative_tried=["none"],
        conservative_weeks="x"), now=NOW)
    assert values == {"ces-saddle": False, "conservative-tried": ["none"]}
    assert errors == {}
    values, _ = intake.parse_answers(k, form_of(ces_sexual="true", ces_onset_days="3"), now=NOW)
    assert values["ces-onset-days"] == 3


# -- build_response -----------------------------------------------------------------------------
def test_the_response_is_valid_r4_with_typed_answers(k):
    values, _ = intake.parse_answers(k, form_of(
        ces_saddle="true", ces_onset_days="2", conservative_tried=["nsaid", "heat"],
        lbp_onset_date="2026-02-20"), now=NOW)
    qr = intake.build_response(k, values, patient_id="p1", author="Practitioner/d1",
                               authored=NOW, identifier=UUID)
    assert qr["questionnaire"] == "https://lbp-cds.example.org/fhir/Questionnaire/lbp-intake|1.1.0"
    assert qr["status"] == "completed"
    QuestionnaireResponse.model_validate(qr)
    assert qr["identifier"] == {"system": "urn:ietf:rfc:3986", "value": UUID}
    assert qr["subject"] == {"reference": "Patient/p1"}
    assert qr["author"] == {"reference": "Practitioner/d1"}
    assert qr["authored"] == "2026-03-02T10:00:00+00:00"
    by_id = {i["linkId"]: i["answer"] for i in qr["item"]}
    assert list(by_id) == ["lbp-onset-date", "ces-saddle", "ces-onset-days",
                           "conservative-tried"]  # questionnaire order
    assert by_id["ces-saddle"] == [{"valueBoolean": True}]
    assert by_id["ces-onset-days"] == [{"valueInteger": 2}]
    assert by_id["lbp-onset-date"] == [{"valueDate": "2026-02-20"}]
    assert [a["valueCoding"]["code"] for a in by_id["conservative-tried"]] == ["nsaid", "heat"]
    assert by_id["conservative-tried"][0]["valueCoding"]["system"].endswith("lbp-intake-answers")
    assert by_id["conservative-tried"][0]["valueCoding"]["display"]
    assert "author" not in intake.build_response(k, values, patient_id="p1", author=None,
                                                 authored=NOW, identifier=UUID)


def test_the_response_refuses_what_does_not_fit(k):
    good = {"ces-saddle": True}
    with pytest.raises(ValueError, match="timezone"):
        intake.build_response(k, good, patient_id="p1", author=None,
                              authored=datetime(2026, 3, 2), identifier=UUID)
    with pytest.raises(ValueError, match="urn:uuid"):
        intake.build_response(k, good, patient_id="p1", author=None, authored=NOW,
                              identifier="abc")
    with pytest.raises(ValueError, match="trauma"):
        intake.build_response(k, {"trauma": "huge"}, patient_id="p1", author=None,
                              authored=NOW, identifier=UUID)
    with pytest.raises(ValueError, match="not items"):
        intake.build_response(k, {"nope": True}, patient_id="p1", author=None, authored=NOW,
                              identifier=UUID)
    with pytest.raises(ValueError, match="FHIR id"):
        intake.build_response(k, good, patient_id="../p1", author=None, authored=NOW,
                              identifier=UUID)


def test_a_saved_saddle_numbness_fires_cauda_equina_for_a_fixture_patient(k):
    """The round trip: the form's response, read by the real rules, gives the CES-1 card."""
    sc = read_scenario(ROOT / "fixtures" / "scenarios" / "cc1-weak-factor-treatment-not-asked.yaml")
    engine = RuleEngine(knowledge.load())
    service = next(s for s in engine.knowledge.services if s.hook == sc.hook)

    def fired(extra: list[dict[str, Any]]) -> set[tuple[str, str]]:
        record = record_from_resources(sc.patient["id"], [sc.patient, *sc.resources, *extra])
        return {(m.rule.id, m.indicator) for m in engine.evaluate(service, record, sc.now, [])}

    assert not {r for r, _ in fired([])} & {"CES-1"}
    values, errors = intake.parse_answers(k, form_of(ces_saddle="true"), now=sc.now)
    assert errors == {}
    qr = intake.build_response(k, values, patient_id=sc.patient["id"], author=None,
                               authored=sc.now, identifier=UUID)
    assert ("CES-1", "critical") in fired([qr])


# -- the loader ---------------------------------------------------------------------------------
def broken_pack(tmp_path: Path, edit: str) -> Knowledge:
    import shutil

    root = tmp_path / "pack"
    shutil.copytree(ROOT / "cds_services", root)
    path = root / "questionnaires" / "lbp-intake-form.yaml"
    path.write_text(path.read_text(encoding="utf-8") + edit, encoding="utf-8")
    return knowledge.load(root)


@pytest.mark.parametrize(("edit", "message"), [
    ("  no-such-item:\n    hint: x\n", "not an answerable item"),
    ("  trauma:\n    prefill:\n      - answer: major\n        any:\n"
     "          - {fact: condition, valueset: no-such-set}\n", "unknown value set"),
    ("  night-pain:\n    prefill:\n      - answer: false\n        any:\n"
     "          - {fact: condition, valueset: aaa}\n", "true only"),
    ("  dysuria:\n    applies: {sex: female}\n", None),
    ("  hcg-x:\n    applies: {sex: female}\n", "not an answerable item"),
])
def test_the_loader_fails_loudly_on_a_bad_form_file(tmp_path, edit, message):
    pack = broken_pack(tmp_path, edit)
    if message is None:  # a valid edit still loads: the check is not just "any change fails"
        intake.load_form(pack)
        return
    with pytest.raises(KnowledgeError, match=message):
        intake.load_form(pack)


def test_applies_must_match_card_style(tmp_path):
    pack = broken_pack(tmp_path, "")
    path = pack.root / "questionnaires" / "lbp-intake-form.yaml"
    text = path.read_text(encoding="utf-8").replace(
        "lmp-date:\n    applies: {sex: female, min_age: 12, max_age: 55}",
        "lmp-date:\n    applies: {sex: female, min_age: 10, max_age: 55}")
    path.write_text(text, encoding="utf-8")
    with pytest.raises(KnowledgeError, match="card-style"):
        intake.load_form(knowledge.load(pack.root))


# -- the HTML -----------------------------------------------------------------------------------
class Page(HTMLParser):
    """Collects inputs, labels, legends and everything CSP would refuse."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[dict[str, str | None]] = []
        self.labels: set[str] = set()
        self.ids: set[str] = set()
        self.inline: list[str] = []
        self.fieldsets = 0
        self.legends = 0
        self.in_script = False
        self.stack: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(str(a["id"]))
        for name, _ in attrs:
            if name == "style" or name.startswith("on"):
                self.inline.append(f"{tag} {name}")
        if tag == "style":
            self.inline.append("style element")
        if tag == "script":
            if not a.get("src", "").startswith("/smart/static/"):
                self.inline.append("script without a static src")
            self.in_script = True
        if tag == "link" and a.get("rel") == "stylesheet" and not str(a.get("href")).startswith(
                "/smart/static/"):
            self.inline.append("stylesheet outside static")
        if tag == "input":
            self.inputs.append({**a, "_in_fieldset": "1" if "fieldset" in self.stack else ""})
        if tag == "label" and a.get("for"):
            self.labels.add(str(a["for"]))
        if tag == "fieldset":
            self.fieldsets += 1
        if tag == "legend":
            self.legends += 1
        if tag == "a" and a.get("href"):
            self.links.append(str(a["href"]))
        if tag not in ("input", "meta", "link", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self.in_script = False
        if tag in self.stack:
            while self.stack and self.stack.pop() != tag:
                pass

    def handle_data(self, data: str) -> None:
        if self.in_script and data.strip():
            self.inline.append("script body")


def render(k: Knowledge, **over: Any) -> str:
    context: dict[str, Any] = dict(
        items=intake.form_items(k, sex="female", age=30, first_rule="CES-1"), values={},
        prefills={}, errors={}, save_error=None, csrf="tok", identifier=UUID,
        action="/smart/intake", static="/smart/static", patient=None, title="Back pain questions")
    context.update(over)
    return pages.render("smart/intake.html", **context)


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    return page


def test_every_input_is_labelled_and_nothing_is_inline(k):
    html = render(k, patient={"name": "Ann Lee", "sex": "female", "birth_date": "1996-01-01"},
                  errors={"ces-onset-days": "Enter a whole number, like 3."},
                  save_error="The record system did not answer.")
    page = parse(html)
    assert page.inline == []
    visible = [i for i in page.inputs if i.get("type") != "hidden"]
    assert len(visible) > 43
    for i in visible:
        assert i["id"] in page.labels, i
        if i.get("type") in ("radio", "checkbox"):
            assert i["_in_fieldset"], i
    assert page.fieldsets == page.legends > 0
    assert html.startswith("<!doctype html>")
    assert '<html lang="en">' in html and 'name="viewport"' in html
    assert "Ann Lee" in html and "Skip to the questions" in html
    for heading in ("Questions for this card", "Red flags", "Other questions"):
        assert heading in html
    assert html.count("Save answers to the record") == 1
    assert "Try saving again" in html
    # enableWhen questions carry their rule for intake.js and a hint for everyone else.
    ew = re.search(r'id="q-ces-onset-days" data-enable-when="([^"]+)"', html)
    assert ew and json.loads(ew.group(1).replace("&#34;", '"'))["behavior"] == "any"
    assert 'id="h-ces-onset-days"' in html and "Answer if" in html


def test_errors_are_summarised_with_links_to_each_field(k):
    errors = {"ces-onset-days": "Enter a whole number, like 3.", "trauma": "Choose one."}
    html = render(k, errors=errors, values={"ces-onset-days": ["abc"], "ces-saddle": ["true"]})
    page = parse(html)
    start = html.index('id="error-summary"')
    summary = html[start - 40:html.index("</div>", start)]
    assert 'role="alert"' in summary and 'tabindex="-1"' in summary
    for link_id in errors:
        assert f'href="#f-{link_id}"' in summary
        assert f"f-{link_id}" in page.ids
    # The field says so too, and is tied to its message.
    assert re.search(r'id="f-ces-onset-days"[^>]*aria-describedby="[^"]*e-ces-onset-days', html)
    assert 'value="abc"' in html  # what was typed stays, even when it was wrong


def test_answers_stay_on_the_page_after_a_failed_save(k):
    values = {"ces-saddle": True, "trauma": "minor", "conservative-tried": ["nsaid", "heat"],
              "lbp-onset-date": date(2026, 2, 20), "ces-onset-days": 2}
    prefills = {"cancer-history": Prefill(True, "Condition: Breast cancer"),
                "ces-saddle": Prefill(False, "previous intake, 2026-02-01")}
    html = render(k, values=values, prefills=prefills, save_error="The EHR refused the answers.")
    assert re.search(r'id="f-ces-saddle" name="ces-saddle" value="true" checked', html)
    assert re.search(r'name="trauma" value="minor" checked', html)
    assert re.search(r'name="conservative-tried" value="nsaid" checked', html)
    assert re.search(r'name="conservative-tried" value="heat" checked', html)
    assert 'name="lbp-onset-date"\n  value="2026-02-20"' in html
    assert 'value="2"' in html
    assert "The EHR refused the answers." in html
    assert UUID in html  # the retry saves the same response, not a second one
    # After a submission the user's answers count, not the record's.
    assert not re.search(r'name="cancer-history" value="true" checked', html)
    assert "previous intake, 2026-02-01" not in html


def test_prefilled_answers_show_their_source(k):
    source = "Condition: Breast cancer (C50.911)"
    html = render(k, prefills={"cancer-history": Prefill(True, source)})
    assert re.search(r'name="cancer-history" value="true" checked', html)
    assert re.search(r'aria-describedby="p-cancer-history"', html)
    assert 'id="p-cancer-history">From the record: Condition: Breast cancer (C50.911)' in html


def test_static_files_exist_and_hold_no_secrets_of_the_page(k):
    static = ROOT / "src" / "lbp_cds" / "static" / "smart"
    js = (static / "intake.js").read_text(encoding="utf-8")
    css = (static / "intake.css").read_text(encoding="utf-8")
    assert "data-enable-when" in js and "disabled" in js and "error-summary" in js
    assert ":focus" in css


def test_unknown_context_variable_is_an_error(k):
    with pytest.raises(Exception, match="undefined"):
        pages.render("smart/intake.html", items=[], title="x")


# -- intake.js in a real browser ----------------------------------------------------------------
def test_intake_js_hides_what_does_not_apply_yet_and_focuses_the_summary(k, browser_page):
    """Served as the app serves it (a strict CSP, static files only): ces-onset-days appears
    when a cauda equina question is answered yes, and its input is disabled (not sent) while
    hidden; the error summary takes the focus."""
    page = browser_page
    static = ROOT / "src" / "lbp_cds" / "static" / "smart"
    html = render(k, errors={"trauma": "Choose one of the answers listed."})
    csp = "default-src 'none'; script-src 'self'; style-src 'self'; form-action 'self'"
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    def serve(route: Any) -> None:
        url = route.request.url
        if url.startswith("http://app.test/smart/static/"):
            name = url.rsplit("/", 1)[1]
            kind = "text/javascript" if name.endswith(".js") else "text/css"
            route.fulfill(status=200, content_type=kind,
                          body=(static / name).read_text(encoding="utf-8"))
        elif url == "http://app.test/smart/intake":
            route.fulfill(status=200, content_type="text/html; charset=utf-8", body=html,
                          headers={"Content-Security-Policy": csp})
        else:
            route.abort()

    page.route("**/*", serve)
    page.goto("http://app.test/smart/intake")
    page.wait_for_load_state("load")
    assert errors == []  # no CSP violation, no script error
    assert page.evaluate("document.activeElement.id") == "error-summary"
    onset = page.locator("#q-ces-onset-days")
    assert onset.is_hidden()
    assert page.locator("#f-ces-onset-days").is_disabled()
    page.check("#f-ces-bowel")
    assert onset.is_visible()
    assert page.locator("#f-ces-onset-days").is_enabled()
    page.check("#f-ces-bowel-false")
    assert onset.is_hidden()
    weeks = page.locator("#q-conservative-weeks")
    assert weeks.is_hidden()
    page.check("#f-conservative-tried-heat")
    assert weeks.is_visible()
    page.uncheck("#f-conservative-tried-heat")
    page.check("#f-conservative-tried")  # nsaid, the first option
    assert weeks.is_visible()
    # The stylesheet applied (CSP allowed it): the submit button is full width on a phone.
    page.set_viewport_size({"width": 320, "height": 640})
    width = page.evaluate("document.querySelector('button.button:last-of-type')"
                          ".getBoundingClientRect().width")
    assert width > 250
    assert page.evaluate("document.documentElement.scrollWidth") <= 320


def test_long_term_steroids_on_record_prefill_the_steroid_question(k):
    """Prednisone (RxNorm 8640) for 30 days with 3 repeats: 120 days, over the 90 the rules
    count as long-term; a single 10-day course prefills nothing."""
    long_course = medication("8640", authored="2026-01-02", supply_days=30, repeats=3)
    found = intake.prefill(k, resources(long_course), now=NOW)
    assert found["steroid-3mo"].value is True
    short = medication("8640", authored="2026-02-20", supply_days=10)
    assert "steroid-3mo" not in intake.prefill(k, resources(short), now=NOW)
