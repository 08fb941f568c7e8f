"""The intake app's pieces that need no browser: scopes, PKCE, sessions, the allowlist entry."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from lbp_cds import smart
from lbp_cds.auth import load_clients
from lbp_cds.config import Settings
from lbp_cds.errors import ConfigError

V2 = {"capabilities": ["launch-ehr", "permission-v2", "permission-v1"],
      "scopes_supported": ["patient/*.rs", "patient/*.read"]}


def test_v2_scopes_by_default_and_v1_only_when_the_server_offers_only_v1():
    assert smart.scopes_for(V2, standalone=False).split() == [
        "launch", "openid", "fhirUser", "patient/Patient.rs", "patient/Condition.rs",
        "patient/Observation.rs", "patient/MedicationRequest.rs", "patient/Procedure.rs",
        "patient/QuestionnaireResponse.rs", "patient/QuestionnaireResponse.cu"]
    assert smart.scopes_for({}, standalone=False) == smart.scopes_for(V2, standalone=False)
    v1 = smart.scopes_for({"capabilities": ["launch-ehr", "permission-v1"]}, standalone=True)
    assert v1.split()[0] == "launch/patient"
    assert "patient/QuestionnaireResponse.write" in v1 and ".rs" not in v1
    listed = smart.scopes_for({"scopes_supported": ["patient/Observation.read",
                                                    "patient/QuestionnaireResponse.write"]},
                              standalone=False)
    assert "patient/Condition.read" in listed.split()


@pytest.mark.parametrize(("scope", "writes"), [
    ("patient/QuestionnaireResponse.cu", True),
    ("patient/QuestionnaireResponse.c", True),
    ("patient/QuestionnaireResponse.cruds", True),
    ("patient/*.cruds", True),
    ("patient/QuestionnaireResponse.write", True),
    ("user/QuestionnaireResponse.*", True),
    ("patient/QuestionnaireResponse.rs", False),
    ("patient/QuestionnaireResponse.read", False),
    ("patient/Observation.cu", False),
    ("system/QuestionnaireResponse.cu", False),
    ("patient/QuestionnaireResponse.uc", False),  # not a valid v2 permission string
    ("", False),
])
def test_a_grant_allows_saving_only_with_create_on_questionnaire_response(scope, writes):
    assert smart.can_write(f"launch openid {scope}") is writes


def test_pkce_is_s256_of_a_long_random_verifier():
    verifier, challenge = smart.pkce_pair()
    assert 43 <= len(verifier) <= 128  # RFC 7636 4.1
    digest = hashlib.sha256(verifier.encode()).digest()
    assert challenge == base64.urlsafe_b64encode(digest).decode().rstrip("=")
    assert smart.pkce_pair()[0] != verifier


def test_a_session_opens_only_with_its_own_secret():
    s = smart.new_session()
    check, box = smart._box(s.secret, s.sid)
    sealed = box.encrypt(b"0" * 12, b'{"token": "abc"}', s.sid.encode())
    other = smart.new_session()
    other_check, other_box = smart._box(other.secret, s.sid)
    assert check != other_check
    with pytest.raises(Exception):  # noqa: B017 - cryptography's InvalidTag
        other_box.decrypt(b"0" * 12, sealed, s.sid.encode())
    # Moved to another session id, the same row does not open either (the id is bound in).
    with pytest.raises(Exception):  # noqa: B017
        box.decrypt(b"0" * 12, sealed, b"another-session")
    assert box.decrypt(b"0" * 12, sealed, s.sid.encode()) == b'{"token": "abc"}'


def test_app_context_is_read_only_when_it_is_a_json_object():
    assert smart.app_context('{"rule":"CC-1","patient":"p1"}') == {"rule": "CC-1",
                                                                   "patient": "p1"}
    assert smart.app_context("CC-1") == {}
    assert smart.app_context('["CC-1"]') == {}
    assert smart.app_context(None) == {}


def write_clients(tmp_path: Path, smart_entry: object) -> Path:
    import json

    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    jwk = json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP384R1()).public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1"}]}))
    path = tmp_path / "clients.yaml"
    lines = ["clients:", "  - iss: https://ehr.example.org", "    jwks_file: jwks.json"]
    if smart_entry is not None:
        lines.append(f"    smart: {smart_entry}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_clients_file_gives_each_ehr_its_smart_client_id_and_iss(tmp_path):
    (client,) = load_clients(write_clients(
        tmp_path, "{client_id: lbp-intake, iss: [https://fhir.example.org/r4/, "
                  "https://fhir2.example.org]}"))
    assert client.smart_client_id == "lbp-intake"
    assert client.smart_iss == ("https://fhir.example.org/r4", "https://fhir2.example.org")
    (plain,) = load_clients(write_clients(tmp_path, None))
    assert plain.smart_client_id is None and plain.smart_iss == ()


@pytest.mark.parametrize("entry", ["{client_id: x}", "{iss: https://a.example}",
                                   "{client_id: x, iss: ftp://a.example}",
                                   "{client_id: x, iss: https://a.example, secret: s}",
                                   "lbp-intake"])
def test_a_bad_smart_entry_stops_the_start_with_its_reason(tmp_path, entry):
    with pytest.raises(ConfigError, match="smart"):
        load_clients(write_clients(tmp_path, entry))


def test_cookie_settings_are_checked():
    with pytest.raises(ConfigError, match="SAMESITE"):
        Settings.from_env({}, smart_cookie_samesite="lax")
    with pytest.raises(ConfigError, match="Secure cookie"):
        Settings.from_env({}, dev=True, smart_cookie_samesite="None")
    with pytest.raises(ConfigError, match="FRAME_ANCESTORS"):
        Settings.from_env({}, smart_frame_ancestors="*")
    ok = Settings.from_env({}, smart_frame_ancestors="https://ehr.example.org",
                           smart_cookie_samesite="None")
    assert ok.smart_cookie_samesite == "None"
