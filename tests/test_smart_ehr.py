"""The SMART EHR stand-in (tests/smart_ehr.py), driven over HTTP as a SMART app would drive it.

Plain ``requests`` on loopback, no browser: the authorization redirect is never followed (its
target, ``127.0.0.1:9``, is only read from ``Location``).  The FHIR data is the session's real
sekmet server; each test loads its own patients with random ids.
"""

from __future__ import annotations

import secrets
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
import requests

from tests.fhir_server import FHIR_JSON, FhirServer
from lbp_cds.devehr import SmartEhr, parse_resource_scope, s256

pytestmark = pytest.mark.fhir_server

CLIENT = "lbp-intake"
REDIRECT = "http://127.0.0.1:9/cb"  # discard port: never connected to, only read from Location
APP_CONTEXT = '{"service":"lbp-red-flags","card":"c-1"}'
V2_SCOPES = ("launch openid fhirUser patient/Patient.rs patient/Condition.rs "
             "patient/QuestionnaireResponse.cu")
TIMEOUT = 30


# ----------------------------------------------------------------------------- helpers


def new_patient(fhir_server: FhirServer) -> str:
    pid = f"ehr-{secrets.token_hex(6)}"
    fhir_server.put({"resourceType": "Patient", "id": pid, "gender": "female",
                     "birthDate": "1970-05-01", "name": [{"family": "Test", "given": ["Ehr"]}]})
    return pid


def questionnaire_response(pid: str) -> dict[str, Any]:
    return {
        "resourceType": "QuestionnaireResponse",
        "status": "completed",
        "subject": {"reference": f"Patient/{pid}"},
        "authored": "2026-03-02T10:00:00Z",
        "item": [{"linkId": "pain", "text": "Pain today (0-10)", "answer": [{"valueInteger": 6}]}],
    }


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    return verifier, s256(verifier)


def location_params(response: requests.Response) -> dict[str, str]:
    assert response.status_code == 302, (response.status_code, response.text[:300])
    location = response.headers["Location"]
    assert location.startswith(REDIRECT + "?")
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


class App:
    """What a SMART app does, step by step, so each test can break one step."""

    def __init__(self, ehr: SmartEhr, client_id: str = CLIENT, redirect: str = REDIRECT) -> None:
        self.ehr, self.client_id, self.redirect = ehr, client_id, redirect
        self.verifier, self.challenge = pkce()
        self.state = secrets.token_urlsafe(12)
        self.nonce = secrets.token_urlsafe(12)

    def authorize(self, scope: str = V2_SCOPES, *, launch: str | None = None,
                  drop: tuple[str, ...] = (), **override: str) -> requests.Response:
        params = {
            "response_type": "code", "client_id": self.client_id, "redirect_uri": self.redirect,
            "scope": scope, "state": self.state, "aud": self.ehr.iss, "nonce": self.nonce,
            "code_challenge": self.challenge, "code_challenge_method": "S256",
        }
        if launch is not None:
            params["launch"] = launch
        params.update(override)
        for name in drop:
            params.pop(name)
        return requests.get(f"{self.ehr.base_url}/auth/authorize", params=params,
                            allow_redirects=False, timeout=TIMEOUT)

    def code(self, scope: str = V2_SCOPES, **kwargs: Any) -> str:
        params = location_params(self.authorize(scope, **kwargs))
        assert params["state"] == self.state
        assert "error" not in params, params
        return params["code"]

    def exchange(self, code: str, verifier: str | None = None) -> requests.Response:
        return requests.post(f"{self.ehr.base_url}/auth/token", data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": self.redirect,
            "client_id": self.client_id, "code_verifier": verifier or self.verifier,
        }, timeout=TIMEOUT)

    def token(self, scope: str = V2_SCOPES, **kwargs: Any) -> dict[str, Any]:
        response = self.exchange(self.code(scope, **kwargs))
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


def fhir(ehr: SmartEhr, token: str | None, method: str, path: str, **kwargs: Any
         ) -> requests.Response:
    headers = {"Accept": FHIR_JSON, "Content-Type": FHIR_JSON}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(method, f"{ehr.iss}/{path}", headers=headers, timeout=TIMEOUT,
                            **kwargs)


def outcome_code(response: requests.Response) -> str:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    return str(body["issue"][0]["code"])


@pytest.fixture
def ehr(smart_ehr: SmartEhr) -> SmartEhr:
    smart_ehr.register_client(CLIENT, [REDIRECT])
    return smart_ehr


@pytest.fixture
def patients(fhir_server: FhirServer) -> tuple[str, str]:
    return new_patient(fhir_server), new_patient(fhir_server)


# ------------------------------------------------------------------------------ discovery


def test_discovery_is_smart_2(ehr: SmartEhr) -> None:
    response = requests.get(f"{ehr.iss}/.well-known/smart-configuration", timeout=TIMEOUT)
    assert response.status_code == 200
    conf = response.json()
    assert ehr.iss == f"{ehr.base_url}/fhir" and ehr.base_url.startswith("http://127.0.0.1:")
    assert conf["issuer"] == ehr.iss
    assert conf["authorization_endpoint"] == f"{ehr.base_url}/auth/authorize"
    assert conf["token_endpoint"] == f"{ehr.base_url}/auth/token"
    assert conf["grant_types_supported"] == ["authorization_code"]
    assert conf["response_types_supported"] == ["code"]
    assert conf["code_challenge_methods_supported"] == ["S256"]
    assert conf["token_endpoint_auth_methods_supported"] == ["none"]
    assert {"launch-ehr", "launch-standalone", "client-public", "context-ehr-patient",
            "context-standalone-patient", "sso-openid-connect", "permission-patient",
            "permission-v2"} == set(conf["capabilities"])
    assert "patient/*.rs" in conf["scopes_supported"]
    jwks = requests.get(conf["jwks_uri"], timeout=TIMEOUT).json()
    assert jwks["keys"][0]["kty"] == "RSA" and jwks["keys"][0]["alg"] == "RS256"


def test_metadata_needs_no_token_and_names_the_smart_endpoints(ehr: SmartEhr) -> None:
    response = fhir(ehr, None, "GET", "metadata")
    assert response.status_code == 200
    statement = response.json()
    assert statement["resourceType"] == "CapabilityStatement"
    uris = statement["rest"][0]["security"]["extension"][0]["extension"]
    assert {"url": "token", "valueUri": f"{ehr.base_url}/auth/token"} in uris
    assert ehr.backend.base_url not in response.text


# ------------------------------------------------------------------------ the happy path


def test_ehr_launch_to_questionnaire_response(
    ehr: SmartEhr, patients: tuple[str, str], fhir_server: FhirServer
) -> None:
    pid, _ = patients
    launch = ehr.new_launch(pid, app_context=APP_CONTEXT, encounter="enc-1")
    app = App(ehr)
    code = app.code(launch=launch)
    assert ehr.authorize_log[-1]["code_challenge_method"] == "S256"
    assert ehr.authorize_log[-1]["launch"] == launch and ehr.authorize_log[-1]["status"] == 302

    response = app.exchange(code)
    assert response.status_code == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
    token = response.json()
    assert token["token_type"] == "Bearer" and token["expires_in"] == 300
    assert set(token["scope"].split()) == set(V2_SCOPES.split())
    assert token["patient"] == pid and token["encounter"] == "enc-1"
    assert token["appContext"] == APP_CONTEXT  # exactly the string, not parsed
    assert token["need_patient_banner"] is True
    assert "refresh_token" not in token
    assert ehr.token_log[-1]["code_verifier_sent"] is True and ehr.token_log[-1]["status"] == 200
    assert ehr.issued[-1]["patient"] == pid and ehr.issued[-1]["client_id"] == CLIENT

    jwks = jwt.PyJWKSet.from_dict(requests.get(f"{ehr.base_url}/.well-known/jwks.json",
                                               timeout=TIMEOUT).json())
    header = jwt.get_unverified_header(token["id_token"])
    claims = jwt.decode(token["id_token"], jwks[header["kid"]].key, algorithms=["RS256"],
                        audience=CLIENT, issuer=ehr.iss)
    assert claims["nonce"] == app.nonce
    assert claims["fhirUser"] == f"{ehr.iss}/Practitioner/smart-ehr-clinician"

    access = token["access_token"]
    read = fhir(ehr, access, "GET", f"Patient/{pid}")
    assert read.status_code == 200 and read.json()["id"] == pid
    search = fhir(ehr, access, "GET", "Patient", params={"_id": pid})
    assert search.status_code == 200
    assert search.json()["entry"][0]["fullUrl"] == f"{ehr.iss}/Patient/{pid}"  # rewritten

    created = fhir(ehr, access, "POST", "QuestionnaireResponse",
                   json=questionnaire_response(pid))
    assert created.status_code == 201, created.text
    assert created.headers["Location"].startswith(f"{ehr.iss}/QuestionnaireResponse/")
    qr_id = created.json()["id"]
    stored = fhir_server.read_json(f"QuestionnaireResponse/{qr_id}")  # sekmet, directly
    assert stored["subject"]["reference"] == f"Patient/{pid}"
    assert stored["item"][0]["answer"][0]["valueInteger"] == 6


def test_patient_context_search_must_name_the_patient(
    ehr: SmartEhr, patients: tuple[str, str]
) -> None:
    a, b = patients
    access = App(ehr).token(launch=ehr.new_launch(a))["access_token"]
    for value in (a, f"Patient/{a}", f"{ehr.iss}/Patient/{a}"):
        ok = fhir(ehr, access, "GET", "Condition", params={"patient": value})
        assert ok.status_code == 200, (value, ok.text)
        assert ok.json()["resourceType"] == "Bundle"
    for params in ({}, {"patient": b}, {"subject": f"Patient/{b}"}, {"patient": f"{a},{b}"}):
        refused = fhir(ehr, access, "GET", "Condition", params=params)
        assert refused.status_code == 403, params
        assert outcome_code(refused) == "forbidden"


def test_standalone_patient_launch(ehr: SmartEhr, patients: tuple[str, str]) -> None:
    pid, _ = patients
    ehr.portal_patient = pid
    token = App(ehr).token("launch/patient openid fhirUser patient/Patient.rs")
    assert token["patient"] == pid and "appContext" not in token
    claims = jwt.decode(token["id_token"], options={"verify_signature": False})
    assert claims["fhirUser"] == f"{ehr.iss}/Patient/{pid}"
    assert fhir(ehr, token["access_token"], "GET", f"Patient/{pid}").status_code == 200


def test_system_token_skips_scope_and_compartment(
    ehr: SmartEhr, patients: tuple[str, str]
) -> None:
    a, b = patients
    assert fhir(ehr, ehr.system_token, "GET", f"Patient/{b}").status_code == 200
    listed = fhir(ehr, ehr.system_token, "GET", "Patient", params={"_id": f"{a},{b}"})
    assert listed.status_code == 200 and listed.json().get("total", 2) == 2


def test_client_ceiling_narrows_the_grant(smart_ehr: SmartEhr, patients: tuple[str, str]) -> None:
    smart_ehr.register_client("reader", [REDIRECT], scopes="launch patient/*.rs")
    token = App(smart_ehr, "reader").token(
        "launch patient/Patient.rs patient/QuestionnaireResponse.cu openid",
        launch=smart_ehr.new_launch(patients[0]))
    assert token["scope"] == "launch patient/Patient.rs"
    assert "id_token" not in token


# ------------------------------------------------------------------------------- refusals


def test_authorize_without_code_challenge_is_refused(ehr: SmartEhr, patients: tuple[str, str]
                                                     ) -> None:
    response = App(ehr).authorize(launch=ehr.new_launch(patients[0]),
                                  drop=("code_challenge", "code_challenge_method"))
    params = location_params(response)
    assert params["error"] == "invalid_request" and "code" not in params


@pytest.mark.parametrize("method", ["plain", None])
def test_pkce_plain_is_refused(ehr: SmartEhr, patients: tuple[str, str], method: str | None
                               ) -> None:
    app = App(ehr)
    kwargs: dict[str, Any] = {"code_challenge": app.verifier}  # plain: challenge == verifier
    if method is None:
        kwargs["drop"] = ("code_challenge_method",)  # RFC 7636 default is plain
    else:
        kwargs["code_challenge_method"] = method
    params = location_params(app.authorize(launch=ehr.new_launch(patients[0]), **kwargs))
    assert params["error"] == "invalid_request" and "S256" in params["error_description"]


def test_wrong_verifier_is_invalid_grant(ehr: SmartEhr, patients: tuple[str, str]) -> None:
    app = App(ehr)
    code = app.code(launch=ehr.new_launch(patients[0]))
    response = app.exchange(code, verifier=pkce()[0])
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"
    assert ehr.token_log[-1]["code_verifier_sent"] is True
    assert ehr.token_log[-1]["error"] == "invalid_grant"


def test_code_is_single_use_and_reuse_revokes(ehr: SmartEhr, patients: tuple[str, str]) -> None:
    app = App(ehr)
    code = app.code(launch=ehr.new_launch(patients[0]))
    first = app.exchange(code)
    assert first.status_code == 200
    again = app.exchange(code)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    revoked = fhir(ehr, first.json()["access_token"], "GET", f"Patient/{patients[0]}")
    assert revoked.status_code == 401 and outcome_code(revoked) == "login"
    assert ehr.issued[-1]["revoked"] is True


@pytest.mark.parametrize("override", [{"redirect_uri": "http://127.0.0.1:9/elsewhere"},
                                      {"redirect_uri": REDIRECT + "/x"},
                                      {"client_id": "nobody"}])
def test_unknown_client_or_redirect_is_not_redirected(
    ehr: SmartEhr, patients: tuple[str, str], override: dict[str, Any]
) -> None:
    response = App(ehr).authorize(launch=ehr.new_launch(patients[0]), **override)
    assert response.status_code == 400
    assert "Location" not in response.headers
    assert response.headers["Content-Type"].startswith("text/html")
    assert ehr.authorize_log[-1]["error"] in ("invalid_request", "invalid_client")


@pytest.mark.parametrize("aud", ["http://127.0.0.1:9/fhir", ""])
def test_aud_must_be_the_fhir_base(ehr: SmartEhr, patients: tuple[str, str], aud: str) -> None:
    params = location_params(App(ehr).authorize(launch=ehr.new_launch(patients[0]), aud=aud))
    assert params["error"] == "invalid_request" and "aud" in params["error_description"]


def test_unknown_launch_is_refused(ehr: SmartEhr) -> None:
    params = location_params(App(ehr).authorize(launch="not-a-launch"))
    assert params["error"] == "invalid_request" and "code" not in params


def test_launch_without_launch_scope_is_refused(ehr: SmartEhr, patients: tuple[str, str]) -> None:
    params = location_params(App(ehr).authorize("patient/Patient.rs",
                                                launch=ehr.new_launch(patients[0])))
    assert params["error"] == "invalid_scope"


def test_standalone_needs_launch_patient_and_a_signed_in_patient(
    ehr: SmartEhr, patients: tuple[str, str]
) -> None:
    ehr.portal_patient = patients[0]
    assert location_params(App(ehr).authorize("patient/Patient.rs"))["error"] == "invalid_scope"
    ehr.portal_patient = None
    params = location_params(App(ehr).authorize("launch/patient patient/Patient.rs"))
    assert params["error"] == "access_denied" and "code" not in params


def test_missing_and_expired_tokens_are_401(ehr: SmartEhr, patients: tuple[str, str]) -> None:
    pid = patients[0]
    access = App(ehr).token(launch=ehr.new_launch(pid))["access_token"]
    missing = fhir(ehr, None, "GET", f"Patient/{pid}")
    assert missing.status_code == 401 and outcome_code(missing) == "login"
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    unknown = fhir(ehr, "not-a-token", "GET", f"Patient/{pid}")
    assert unknown.status_code == 401 and outcome_code(unknown) == "login"
    assert fhir(ehr, access, "GET", f"Patient/{pid}").status_code == 200
    ehr.expire_tokens()
    expired = fhir(ehr, access, "GET", f"Patient/{pid}")
    assert expired.status_code == 401 and outcome_code(expired) == "expired"
    assert 'error="invalid_token"' in expired.headers["WWW-Authenticate"]
    assert ehr.issued[-1]["expired"] is True
    assert fhir(ehr, ehr.system_token, "GET", f"Patient/{pid}").status_code == 200


def test_token_lifetime_is_honoured(smart_ehr: SmartEhr, patients: tuple[str, str]) -> None:
    with SmartEhr(smart_ehr.backend, token_lifetime=1,
                  clients={CLIENT: {"redirect_uris": [REDIRECT]}}) as short:
        token = App(short).token(launch=short.new_launch(patients[0]))
        assert token["expires_in"] == 1
        time.sleep(1.2)
        late = fhir(short, token["access_token"], "GET", f"Patient/{patients[0]}")
        assert late.status_code == 401 and outcome_code(late) == "expired"


def test_other_patients_record_is_403(
    ehr: SmartEhr, patients: tuple[str, str], fhir_server: FhirServer
) -> None:
    a, b = patients
    access = App(ehr).token(launch=ehr.new_launch(a))["access_token"]
    read = fhir(ehr, access, "GET", f"Patient/{b}")
    assert read.status_code == 403 and outcome_code(read) == "forbidden"
    assert "does not cover that patient" in read.json()["issue"][0]["diagnostics"]
    write = fhir(ehr, access, "POST", "QuestionnaireResponse", json=questionnaire_response(b))
    assert write.status_code == 403 and "does not cover that patient" in write.text
    stored, _ = fhir_server.search_all("QuestionnaireResponse", _count=1000)
    assert all(r["subject"]["reference"] != f"Patient/{b}" for r in stored)
    # A resource of patient B read by id: only the store's answer says whose it is.
    created = fhir(ehr, ehr.system_token, "POST", "QuestionnaireResponse",
                   json=questionnaire_response(b))
    assert created.status_code == 201
    reader = App(ehr).token("launch patient/QuestionnaireResponse.rs",
                            launch=ehr.new_launch(a))["access_token"]
    by_id = fhir(ehr, reader, "GET", f"QuestionnaireResponse/{created.json()['id']}")
    assert by_id.status_code == 403 and "does not cover that patient" in by_id.text


def test_search_answers_hold_only_the_tokens_patient(
    ehr: SmartEhr, patients: tuple[str, str]
) -> None:
    # sekmet indexes no QuestionnaireResponse parameter: it ignores `patient` and answers all.
    a, b = patients
    for pid in (a, b):
        created = fhir(ehr, ehr.system_token, "POST", "QuestionnaireResponse",
                       json=questionnaire_response(pid))
        assert created.status_code == 201
    unfiltered = fhir(ehr, ehr.system_token, "GET", "QuestionnaireResponse",
                      params={"patient": a, "_count": 1000})
    subjects = {e["resource"]["subject"]["reference"] for e in unfiltered.json()["entry"]
                if e["search"]["mode"] == "match"}
    assert f"Patient/{b}" in subjects  # the store alone would leak
    access = App(ehr).token("launch patient/QuestionnaireResponse.rs",
                            launch=ehr.new_launch(a))["access_token"]
    mine = fhir(ehr, access, "GET", "QuestionnaireResponse", params={"patient": a, "_count": 1000})
    assert mine.status_code == 200
    subjects = {e["resource"]["subject"]["reference"] for e in mine.json()["entry"]
                if e["search"]["mode"] == "match"}
    assert subjects == {f"Patient/{a}"}


def test_write_needs_a_create_scope(ehr: SmartEhr, patients: tuple[str, str]) -> None:
    pid = patients[0]
    access = App(ehr).token("launch patient/Patient.rs patient/QuestionnaireResponse.rs",
                            launch=ehr.new_launch(pid))["access_token"]
    refused = fhir(ehr, access, "POST", "QuestionnaireResponse",
                   json=questionnaire_response(pid))
    assert refused.status_code == 403 and outcome_code(refused) == "forbidden"
    assert "create of QuestionnaireResponse" in refused.text
    assert fhir(ehr, access, "GET", f"Patient/{pid}").status_code == 200
    put = fhir(ehr, access, "PUT", f"Patient/{pid}", json={"resourceType": "Patient", "id": pid})
    assert put.status_code == 403 and "update of Patient" in put.text


def test_v1_server_grants_only_v1_scopes(fhir_server: FhirServer, patients: tuple[str, str]
                                         ) -> None:
    pid = patients[0]
    with SmartEhr(fhir_server, permission="v1",
                  clients={CLIENT: {"redirect_uris": [REDIRECT]}}) as v1:
        conf = requests.get(f"{v1.iss}/.well-known/smart-configuration", timeout=TIMEOUT).json()
        assert "permission-v1" in conf["capabilities"]
        assert "permission-v2" not in conf["capabilities"]
        resource_scopes = [parse_resource_scope(s) for s in conf["scopes_supported"]]
        assert {s.syntax for s in resource_scopes if s is not None} == {"v1"}
        token = App(v1).token("launch patient/Patient.read patient/Condition.rs "
                              "patient/QuestionnaireResponse.write patient/Observation.cruds",
                              launch=v1.new_launch(pid))
        assert token["scope"] == "launch patient/Patient.read patient/QuestionnaireResponse.write"
        access = token["access_token"]
        assert fhir(v1, access, "GET", f"Patient/{pid}").status_code == 200
        assert fhir(v1, access, "GET", "Condition", params={"patient": pid}).status_code == 403
        created = fhir(v1, access, "POST", "QuestionnaireResponse",
                       json=questionnaire_response(pid))
        assert created.status_code == 201, created.text
        only_v2 = App(v1).token("launch patient/Patient.rs", launch=v1.new_launch(pid))
        assert only_v2["scope"] == "launch"
        refused = fhir(v1, only_v2["access_token"], "GET", f"Patient/{pid}")
        assert refused.status_code == 403 and "read of Patient" in refused.text
        nothing = App(v1).authorize("patient/Patient.rs", launch=v1.new_launch(pid))
        assert location_params(nothing)["error"] == "invalid_scope"


def test_backend_down_is_502(ehr: SmartEhr, patients: tuple[str, str]) -> None:
    pid = patients[0]
    access = App(ehr).token(launch=ehr.new_launch(pid))["access_token"]
    with ehr.backend_down():
        down = fhir(ehr, access, "GET", f"Patient/{pid}")
        assert down.status_code == 502 and outcome_code(down) == "transient"
        assert fhir(ehr, None, "GET", "metadata").status_code == 502
    assert fhir(ehr, access, "GET", f"Patient/{pid}").status_code == 200


def test_no_token_or_code_reaches_logs(
    ehr: SmartEhr, patients: tuple[str, str], capfd: pytest.CaptureFixture[str]
) -> None:
    app = App(ehr)
    code = app.code(launch=ehr.new_launch(patients[0]))
    token = app.exchange(code).json()
    fhir(ehr, token["access_token"], "GET", f"Patient/{patients[0]}")
    out, err = capfd.readouterr()
    recorded = repr(ehr.authorize_log) + repr(ehr.token_log) + repr(ehr.issued) + out + err
    for secret in (code, app.verifier, token["access_token"], token["id_token"],
                   ehr.system_token):
        assert secret not in recorded


def test_stop_closes_the_port(fhir_server: FhirServer) -> None:
    ehr = SmartEhr(fhir_server).start()
    url = f"{ehr.iss}/.well-known/smart-configuration"
    assert requests.get(url, timeout=TIMEOUT).status_code == 200
    ehr.stop()
    ehr.stop()  # twice is harmless
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=TIMEOUT)

