"""The SMART intake app end to end, with real parts only.

* **The service**: ``lbp-cds serve`` (gunicorn) with the shipped knowledge pack, *not* in dev
  mode: signed JWTs on hook calls, a clients file whose client lists the EHR's FHIR base as its
  SMART ``iss`` (the app's allowlist), Secure session cookies.
* **The EHR**: ``lbp_cds.devehr.SmartEhr``: authlib's authorization server (authorization code,
  PKCE S256 required) and a FHIR gateway that checks the tokens it issued (expiry, scopes,
  patient compartment) in front of the suite's sekmet-fhir server.
* **The browser**: Debian's headless Chromium driven by Playwright (``tests/browser.py``).

The EHR's part in each test is what an EHR does: it calls patient-view, takes the card's link of
type ``smart``, creates a launch context carrying the link's ``appContext``, and opens
``url?iss=...&launch=...`` in a browser. Each page state is saved as a screenshot in
``.cache/screenshots/smart/`` (CI's artefacts).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import requests

from lbp_cds.devehr import SmartEhr
from lbp_cds.probe import build_request, hook_context
from tests.builders import condition, patient
from tests.fhir_server import FhirServer
from tests.service_server import CdsClientKeys, ServiceServer, start_service, stop_process_group

pytestmark = [pytest.mark.fhir_server, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / ".cache" / "screenshots" / "smart"
CLIENT_ID = "lbp-cds-intake-test"
TIMINGS: dict[str, float] = {}


# -------------------------------------------------------------------------------- the parts
@pytest.fixture(scope="module")
def ehr(fhir_server: FhirServer) -> Iterator[SmartEhr]:
    with SmartEhr(fhir_server) as running:
        yield running


@pytest.fixture(scope="module")
def ehr_v1(fhir_server: FhirServer) -> Iterator[SmartEhr]:
    """An EHR whose authorization server offers SMART v1 scopes only."""
    with SmartEhr(fhir_server, permission="v1") as running:
        yield running


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory, ehr: SmartEhr, ehr_v1: SmartEhr
         ) -> CdsClientKeys:
    return CdsClientKeys(tmp_path_factory.mktemp("keys"), client_fields={
        "fhir_servers": [ehr.iss], "allow_private": True,
        "smart": {"client_id": CLIENT_ID, "iss": [ehr.iss, ehr_v1.iss]}})


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, keys: CdsClientKeys, ehr: SmartEhr,
            ehr_v1: SmartEhr) -> Iterator[ServiceServer]:
    server = start_service(tmp_path_factory.mktemp("service"), env={
        "LBP_CDS_KNOWLEDGE_DIR": str(ROOT / "cds_services"),
        "LBP_CDS_PUBLIC_BASE_URL": "{base_url}",
        "LBP_CDS_FHIR_DEADLINE_SECONDS": "8", "LBP_CDS_FHIR_READ_TIMEOUT_SECONDS": "6"},
        args=["--clients", str(keys.clients_file), "--threads", "8"])
    ehr.register_client(CLIENT_ID, [server.url("/smart/callback")])
    ehr_v1.register_client(CLIENT_ID, [server.url("/smart/callback")])
    try:
        yield server
    finally:
        server.stop()
        stop_process_group(server.process)


def new_patient(fhir: FhirServer, *, gender: str = "male", age: int = 45) -> str:
    """A patient with a new right sciatica 10 days ago and nothing else: CC-1 with cauda equina
    symptoms "not asked"."""
    pid = f"smart-{uuid.uuid4().hex[:12]}"
    born = datetime.now(timezone.utc).date().replace(year=datetime.now().year - age, day=1)
    onset = (datetime.now(timezone.utc) - timedelta(days=10)).date().isoformat()
    fhir.put({**patient(gender, born.isoformat(), pid),
              "name": [{"family": "Intake", "given": ["Test"]}]})
    sciatica = condition("M54.41", onset=onset, rid=f"{pid}-sciatica", recorded=onset,
                         verification="confirmed",
                         display="Lumbago with sciatica, right side")
    fhir.put({**sciatica, "subject": {"reference": f"Patient/{pid}"}})
    return pid


def patient_view(service: ServiceServer, keys: CdsClientKeys, ehr: SmartEhr, pid: str
                 ) -> list[dict[str, Any]]:
    """The EHR's patient-view call: the service fetches through the gateway with a token."""
    body = build_request("patient-view", hook_context(
        "patient-view", pid, user_id="Practitioner/smart-ehr-clinician"),
        fhir_server=ehr.iss, token=ehr.system_token)
    url = service.url("/cds-services/lbp-triage")
    resp = service.post("/cds-services/lbp-triage", json=body, headers={
        "Authorization": f"Bearer {keys.token(url)}"})
    assert resp.status_code == 200, resp.text
    return list(resp.json()["cards"])


def rule_of(card: dict[str, Any]) -> str:
    return str(card["extension"]["org.lbp-cds.rule"]["ruleId"])


def smart_link(cards: list[dict[str, Any]], rule: str) -> dict[str, Any]:
    (card,) = [c for c in cards if rule_of(c) == rule]
    (link,) = [link for link in card.get("links", []) if link["type"] == "smart"]
    return link


def launch_url(ehr: SmartEhr, link: dict[str, Any], pid: str) -> str:
    """What the EHR opens when the clinician clicks the link (CDS Hooks 2.0 + SMART)."""
    launch = ehr.new_launch(pid, app_context=link.get("appContext"))
    return f"{link['url']}?{urlencode({'iss': ehr.iss, 'launch': launch})}"


def card_link_for_new_patient(service: ServiceServer, keys: CdsClientKeys, ehr: SmartEhr,
                              fhir: FhirServer) -> tuple[str, dict[str, Any]]:
    """A new patient with only a sciatica, and the smart link of the CC-1 card they get."""
    pid = new_patient(fhir)
    return pid, smart_link(patient_view(service, keys, ehr, pid), "CC-1")


def save(page: Any) -> None:
    """Press save; the saved page must follow."""
    page.get_by_role("button", name="Save answers to the record").click()
    page.wait_for_url(re.compile(r"/saved$"))


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def stored_responses(fhir: FhirServer, pid: str) -> list[dict[str, Any]]:
    """The intake responses the FHIR store holds for the patient (read straight from sekmet)."""
    found, _pages = fhir.search_all("QuestionnaireResponse", _count=200)
    return [r for r in found if (r.get("subject") or {}).get("reference") == f"Patient/{pid}"]


# ---------------------------------------------------------------------------------- the loop
def test_card_to_saved_answer_to_changed_card(service, keys, ehr, fhir_server, browser_page):
    """patient-view → CC-1 with a smart link → launch → form (the card's questions first) →
    "saddle numbness: yes" → QuestionnaireResponse on the FHIR server → patient-view → CES-1."""
    pid = new_patient(fhir_server)
    cards = patient_view(service, keys, ehr, pid)
    assert [rule_of(c) for c in cards] == ["CC-1"]
    link = smart_link(cards, "CC-1")
    assert link["url"] == service.url("/smart/launch")
    assert json.loads(link["appContext"]) == {"rule": "CC-1", "patient": pid}

    page = browser_page
    started = time.monotonic()
    response = page.goto(launch_url(ehr, link, pid))
    assert response is not None and response.status == 200
    assert re.search(r"/smart/s/[A-Za-z0-9_-]{16}/intake$", page.url)
    shot(page, "01-form-opened-from-cc1")
    # The authorization request the EHR received: PKCE S256, state, aud, v2 scopes, launch.
    asked = ehr.authorize_log[-1]
    assert asked["code_challenge_method"] == "S256" and asked["aud"] == ehr.iss
    assert asked["launch"] and asked["state"] and asked["client_id"] == CLIENT_ID
    assert "patient/QuestionnaireResponse.cu" in asked["scope"].split()
    assert ehr.token_log[-1]["code_verifier_sent"] is True
    # The card's questions come first: CC-1 stands because cauda equina symptoms were not asked.
    first = page.locator("section.group").first
    assert first.locator("h2").inner_text() == "Questions for this card"
    assert first.locator("#q-ces-saddle").count() == 1
    # The page keeps its promises: a CSP with no inline script, a Secure HttpOnly cookie.
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    (cookie,) = [c for c in page.context.cookies() if "lbp-smart-" in c["name"]]
    assert cookie["name"].startswith("__Secure-") and cookie["httpOnly"] and cookie["secure"]
    assert cookie["sameSite"] == "Lax"

    page.check("#f-ces-saddle")
    page.check("#f-ces-bladder-false")
    shot(page, "02-saddle-numbness-yes")
    save(page)
    TIMINGS["launch_to_saved_s"] = time.monotonic() - started
    shot(page, "03-saved")
    assert "Saved to the patient's record" in page.locator("main").inner_text()

    (qr,) = stored_responses(fhir_server, pid)
    assert qr["status"] == "completed"
    assert qr["questionnaire"].startswith(
        "https://lbp-cds.example.org/fhir/Questionnaire/lbp-intake|")
    assert qr["subject"] == {"reference": f"Patient/{pid}"}
    assert qr["author"] == {"reference": "Practitioner/smart-ehr-clinician"}
    assert datetime.fromisoformat(qr["authored"]).tzinfo is not None
    assert qr["identifier"]["value"].startswith("urn:uuid:")
    answers = {i["linkId"]: i["answer"][0] for i in qr["item"]}
    assert answers["ces-saddle"] == {"valueBoolean": True}
    assert answers["ces-bladder"] == {"valueBoolean": False}

    after = patient_view(service, keys, ehr, pid)
    assert rule_of(after[0]) == "CES-1" and after[0]["indicator"] == "critical"
    assert "CC-1" not in [rule_of(c) for c in after]
    SHOTS.mkdir(parents=True, exist_ok=True)
    (SHOTS / "timings.json").write_text(json.dumps(TIMINGS, indent=1))
    # Neither the patient's id nor a token reaches the service's log.
    log = service.log_text()
    assert pid not in log and ehr.system_token not in log


def test_fhir_server_down_keeps_the_answers_and_the_retry_saves_once(
        service, keys, ehr, fhir_server, browser_page):
    pid, link = card_link_for_new_patient(service, keys, ehr, fhir_server)
    page = browser_page
    page.goto(launch_url(ehr, link, pid))
    page.check("#f-ces-bilateral")
    page.check("#f-ces-saddle-false")
    with ehr.backend_down():
        page.get_by_role("button", name="Save answers to the record").click()
        page.wait_for_load_state()
        alert = page.locator("#error-summary")
        assert alert.get_attribute("role") == "alert"
        assert "could not save" in alert.inner_text() or "could not be reached" in \
            alert.inner_text()
        shot(page, "04-fhir-server-down")
        # Nothing lost: the answers are still selected on the page.
        assert page.is_checked("#f-ces-bilateral") and page.is_checked("#f-ces-saddle-false")
        assert stored_responses(fhir_server, pid) == []
    page.get_by_role("button", name="Try saving again").click()
    page.wait_for_url(re.compile(r"/saved$"))
    shot(page, "05-saved-after-retry")
    (qr,) = stored_responses(fhir_server, pid)
    answers = {i["linkId"]: i["answer"][0] for i in qr["item"]}
    assert answers["ces-bilateral"] == {"valueBoolean": True}


def test_expired_sign_in_keeps_the_answers_and_a_new_launch_restores_them(
        service, keys, ehr, fhir_server, browser_page):
    pid, link = card_link_for_new_patient(service, keys, ehr, fhir_server)
    page = browser_page
    page.goto(launch_url(ehr, link, pid))
    page.check("#f-ces-saddle")
    ehr.expire_tokens()
    page.get_by_role("button", name="Save answers to the record").click()
    page.wait_for_load_state()
    text = page.locator("#error-summary").inner_text()
    assert "expired" in text and "open the app again" in text.lower()
    assert page.is_checked("#f-ces-saddle")
    shot(page, "06-sign-in-expired")
    assert stored_responses(fhir_server, pid) == []
    # Reopening the form with the refused token says so (the record is not read with it).
    response = page.goto(page.url)
    assert response is not None and response.status == 401
    assert "no longer accepts this sign-in" in page.locator("main").inner_text()
    # The clinician clicks the card's link again: a new launch, the same browser.
    page.goto(launch_url(ehr, link, pid))
    assert page.is_checked("#f-ces-saddle"), "the unsaved answer came back"
    shot(page, "07-answers-restored-after-new-launch")
    save(page)
    (qr,) = stored_responses(fhir_server, pid)
    assert {i["linkId"] for i in qr["item"]} >= {"ces-saddle"}


def test_wrong_state_is_refused_and_nothing_is_exchanged(service, ehr, fhir_server,
                                                         browser_page):
    """The EHR's redirect back, replayed with another ``state``, is refused before the code is
    exchanged; the genuine one then goes through (the refusal is about the state alone)."""
    pid = new_patient(fhir_server)
    link = {"url": service.url("/smart/launch"),
            "appContext": json.dumps({"rule": "CC-1", "patient": pid})}
    # Walk the redirects without following them, to hold the EHR's answer in hand.
    http = requests.Session()
    http.trust_env = False
    started = http.get(launch_url(ehr, link, pid), allow_redirects=False, timeout=30)
    assert started.status_code == 302
    name, _, value = started.headers["Set-Cookie"].split(";", 1)[0].partition("=")
    answered = http.get(started.headers["Location"], allow_redirects=False, timeout=30)
    assert answered.status_code == 302
    callback = answered.headers["Location"]
    assert callback.startswith(service.url("/smart/callback?"))
    page = browser_page
    page.context.add_cookies([{"name": name, "value": value, "domain": "127.0.0.1",
                               "path": "/smart", "secure": True, "httpOnly": True,
                               "sameSite": "Lax"}])
    tokens_before = len(ehr.token_log)
    forged = re.sub(r"(state=[^.&]+\.)[^&]+", r"\1forged", callback)
    assert forged != callback
    response = page.goto(forged)
    assert response is not None and response.status == 400
    assert "wrong or missing state" in page.locator("main").inner_text()
    shot(page, "08-wrong-state")
    assert len(ehr.token_log) == tokens_before, "no code was exchanged"
    response = page.goto(callback)
    assert response is not None and response.status == 200 and page.url.endswith("/intake")
    assert len(ehr.token_log) == tokens_before + 1


def test_launch_for_another_patient_than_the_card_is_refused(service, keys, ehr, fhir_server,
                                                             browser_page):
    """The card was for patient A; the EHR's launch context says B: nothing is read or shown."""
    a, b = new_patient(fhir_server), new_patient(fhir_server)
    link = smart_link(patient_view(service, keys, ehr, a), "CC-1")
    launch = ehr.new_launch(b, app_context=link["appContext"])
    response = browser_page.goto(f"{link['url']}?{urlencode({'iss': ehr.iss, 'launch': launch})}")
    assert response is not None and response.status == 403
    assert "another patient" in browser_page.locator("main").inner_text()
    shot(browser_page, "09-card-for-another-patient")


def test_iss_off_the_allowlist_is_refused_before_any_connection(service, browser_page):
    # A name under .invalid (RFC 2606) is refused by the allowlist before any lookup.
    response = browser_page.goto(service.url("/smart/launch?") + urlencode(
        {"iss": "https://ehr.invalid/fhir", "launch": "x"}))
    assert response is not None and response.status == 403
    assert "not on the allowlist" in browser_page.locator("main").inner_text()
    shot(browser_page, "10-iss-not-allowed")


def test_standalone_patient_launch_from_a_portal(service, ehr, fhir_server, browser_page):
    """A patient portal opens the app with `iss` alone: `launch/patient`, the signed-in patient
    is the subject and the author."""
    pid = new_patient(fhir_server, gender="female", age=30)
    ehr.portal_patient = pid
    try:
        page = browser_page
        page.goto(service.url("/smart/launch?") + urlencode({"iss": ehr.iss}))
        assert page.url.endswith("/intake")
        assert "launch/patient" in ehr.authorize_log[-1]["scope"].split()
        assert "launch" not in ehr.authorize_log[-1]
        # A 30-year-old woman is asked about pregnancy; the banner names her.
        assert page.locator("#q-possibly-pregnant").count() == 1
        shot(page, "11-standalone-portal-launch")
        page.check("#f-fever-chills")
        save(page)
    finally:
        ehr.portal_patient = None
    (qr,) = stored_responses(fhir_server, pid)
    assert qr["author"] == {"reference": f"Patient/{pid}"}


def test_a_smart_v1_server_gets_v1_scopes(service, keys, ehr_v1, fhir_server, browser_page):
    pid = new_patient(fhir_server)
    link = {"url": service.url("/smart/launch"),
            "appContext": json.dumps({"rule": "CC-1", "patient": pid})}
    browser_page.goto(launch_url(ehr_v1, link, pid))
    assert browser_page.url.endswith("/intake")
    scopes = ehr_v1.authorize_log[-1]["scope"].split()
    assert "patient/QuestionnaireResponse.write" in scopes
    assert not [s for s in scopes if s.endswith((".rs", ".cu"))]
    browser_page.check("#f-ces-saddle-false")
    save(browser_page)
    assert len(stored_responses(fhir_server, pid)) == 1


def test_the_form_on_a_phone_by_keyboard_with_questions_that_open(
        service, keys, ehr, fhir_server, chromium_browser):
    """320 px wide, no horizontal scrolling; every field named; Tab and Space answer; the
    follow-up question appears only when a cauda equina answer is yes; no CSP violation."""
    pid, link = card_link_for_new_patient(service, keys, ehr, fhir_server)
    context = chromium_browser.new_context(viewport={"width": 320, "height": 720},
                                           is_mobile=True, has_touch=True)
    try:
        page = context.new_page()
        violations: list[str] = []
        page.on("console", lambda m: violations.append(m.text)
                if "Content Security Policy" in m.text else None)
        page.goto(launch_url(ehr, link, pid))
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 320, f"the page scrolls sideways on a phone ({width} px)"
        # Every control a person can reach has an accessible name (label or legend).
        unnamed = page.evaluate("""() => Array.from(document.querySelectorAll(
            'input:not([type=hidden]), select, textarea, button')).filter(e => {
              const own = e.labels && e.labels.length > 0;
              return !own && !e.getAttribute('aria-label') && !(e.tagName === 'BUTTON'
                && e.textContent.trim());
            }).map(e => e.name || e.id)""")
        assert unnamed == []
        onset = page.locator("#q-ces-onset-days")
        assert onset.is_hidden(), "the follow-up shows before any cauda equina answer"
        shot(page, "12-phone-form")
        # Keyboard only: focus the first "Yes" of the saddle question and answer with Space.
        page.focus("#f-ces-bilateral")
        page.keyboard.press("Tab")  # radio groups are one tab stop: Tab leaves the group
        focused = page.evaluate("document.activeElement.name")
        assert focused and focused != "ces-bilateral"
        page.keyboard.press("Shift+Tab")
        page.keyboard.press("Space")
        assert page.is_checked("#f-ces-bilateral")
        assert onset.is_visible(), "a yes opens the 'how many days ago' question"
        page.fill("#f-ces-onset-days", "2")
        shot(page, "13-phone-follow-up-open")
        save(page)
        shot(page, "14-phone-saved")
        assert violations == []
    finally:
        context.close()
    (qr,) = stored_responses(fhir_server, pid)
    answers = {i["linkId"]: i["answer"][0] for i in qr["item"]}
    assert answers["ces-onset-days"] == {"valueInteger": 2}


def test_a_wrong_answer_is_named_and_nothing_is_sent(service, keys, ehr, fhir_server,
                                                     browser_page):
    pid, link = card_link_for_new_patient(service, keys, ehr, fhir_server)
    page = browser_page
    page.goto(launch_url(ehr, link, pid))
    page.check("#f-ces-saddle")
    future = (datetime.now(timezone.utc) + timedelta(days=30)).date().isoformat()
    page.fill("#f-lbp-onset-date", future)
    page.get_by_role("button", name="Save answers to the record").click()
    page.wait_for_load_state()
    summary = page.locator("#error-summary")
    assert summary.is_visible() and "Check these answers" in summary.inner_text()
    assert page.evaluate("document.activeElement.id") == "error-summary"
    assert summary.locator("a[href='#f-lbp-onset-date']").count() == 1
    assert page.is_checked("#f-ces-saddle") and page.input_value("#f-lbp-onset-date") == future
    shot(page, "15-wrong-answer-named")
    assert stored_responses(fhir_server, pid) == []


def test_a_post_without_this_sessions_csrf_token_saves_nothing(service, keys, ehr, fhir_server,
                                                               browser_page):
    pid, link = card_link_for_new_patient(service, keys, ehr, fhir_server)
    page = browser_page
    page.goto(launch_url(ehr, link, pid))
    page.evaluate("document.querySelector('input[name=csrf]').value = 'forged'")
    page.check("#f-ces-saddle")
    page.get_by_role("button", name="Save answers to the record").click()
    page.wait_for_load_state()
    assert "CSRF" in page.locator("main").inner_text()
    assert stored_responses(fhir_server, pid) == []
    # Another browser (no session cookie) cannot open the form of this session either.
    other = requests.get(page.url, timeout=30)
    assert other.status_code == 401 and "session has ended" in other.text


def test_the_session_row_holds_no_readable_token(service, ehr, fhir_server, browser_page):
    """The store keeps the session encrypted with a key only the browser's cookie gives."""
    import sqlite3

    pid = new_patient(fhir_server)
    link = {"url": service.url("/smart/launch"),
            "appContext": json.dumps({"rule": "CC-1", "patient": pid})}
    browser_page.goto(launch_url(ehr, link, pid))
    (cookie,) = [c for c in browser_page.context.cookies() if "lbp-smart-" in c["name"]]
    sid = cookie["name"].removeprefix("__Secure-lbp-smart-")
    with sqlite3.connect(service.workdir / "store.sqlite3") as db:
        (hashed, payload), = db.execute(
            "SELECT secret_hash, payload FROM smart_sessions WHERE sid = ?", (sid,)).fetchall()
    assert cookie["value"] not in hashed
    assert pid.encode() not in payload and b"token" not in payload and b"patient" not in payload


def test_dev_launcher_plays_the_ehr_from_card_to_changed_card(
        module_service_server, fhir_server, browser_page):
    """`make run` + `make fhir`: the dev launcher lists the FHIR server's patients, shows the
    cards, launches the app from a card through a stand-in EHR, and shows the changed cards."""
    pid = new_patient(fhir_server)
    dev = module_service_server(env={"LBP_CDS_KNOWLEDGE_DIR": str(ROOT / "cds_services")},
                                args=["--dev", "--threads", "8"])
    page = browser_page
    page.goto(dev.url("/smart/dev?") + urlencode({"fhir": fhir_server.base_url,
                                                 "token": fhir_server.token or "",
                                                 "patient": pid}))
    cards = page.locator(".dev-card")
    assert cards.count() == 1 and "CC-1" in cards.first.inner_text()
    shot(page, "16-dev-launcher")
    page.get_by_role("button", name="Answer the missing red-flag questions").click()
    page.wait_for_url(re.compile(r"/intake$"))
    page.check("#f-ces-saddle")
    save(page)
    page.goto(dev.url("/smart/dev?") + urlencode({"fhir": fhir_server.base_url,
                                                 "token": fhir_server.token or "",
                                                 "patient": pid}))
    first = page.locator(".dev-card").first
    assert "CES-1" in first.inner_text() and "critical" in first.inner_text()
    shot(page, "17-dev-launcher-after")


def test_the_dev_launcher_does_not_exist_outside_dev_mode(service):
    assert service.get("/smart/dev").status_code == 404


def test_the_ehr_refusing_the_app_is_said_plainly(service, ehr, browser_page):
    """A portal with nobody signed in answers `access_denied`: the page says the EHR did not
    authorise the app; no token was asked for."""
    ehr.portal_patient = None
    tokens_before = len(ehr.token_log)
    response = browser_page.goto(service.url("/smart/launch?") + urlencode({"iss": ehr.iss}))
    assert response is not None and response.status == 403
    assert "did not authorise the app (access_denied" in browser_page.locator("main").inner_text()
    assert len(ehr.token_log) == tokens_before
    shot(browser_page, "18-ehr-refused")


def test_the_record_unreachable_when_the_form_opens_then_back(service, keys, ehr, fhir_server,
                                                              browser_page):
    pid, link = card_link_for_new_patient(service, keys, ehr, fhir_server)
    with ehr.backend_down():
        response = browser_page.goto(launch_url(ehr, link, pid))
        assert response is not None and response.status == 502
        said = browser_page.locator("main").inner_text()
        assert "did not give the patient's record (HTTP 502)" in said and "Try again" in said
        shot(browser_page, "19-record-unreachable")
    response = browser_page.reload()
    assert response is not None and response.status == 200
    assert browser_page.locator("#q-ces-saddle").count() == 1
