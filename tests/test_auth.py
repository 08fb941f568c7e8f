"""Tests of ``lbp_cds.auth``: the CDS client's JWT, with real keys, real signatures and a real
HTTP server for JWK Sets by URL.

Every refusal asserts its reason (the ``AuthenticationError`` message), so a token refused for
the wrong reason does not pass as a defended attack.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import logging
import os
import re
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from lbp_cds.auth import (
    JwtVerifier,
    MemoryReplayCache,
    TrustedClient,
    load_clients,
)
from lbp_cds.errors import AuthenticationError, ConfigError

SHARED_DATA = Path(
    os.environ.get("LBP_CDS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
SPEC_DIR = SHARED_DATA / "cds-hooks"
JWT_DIR = SHARED_DATA / "jwt"

NOW = 1_700_000_000.0
ISS = "https://ehr.example.org/"
AUD = "https://cds.example.org/cds-services/lbp"


# --------------------------------------------------------------------------- helpers


class FakeClock:
    """A settable clock shared by the verifier and the replay cache."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingSession(requests.Session):
    """A real ``requests.Session`` that records every request it is asked to make."""

    def __init__(self) -> None:
        super().__init__()
        self.trust_env = False  # no proxies from the environment for loopback tests
        self.calls: list[tuple[str, str]] = []

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((str(method), str(url)))
        return super().request(method, url, *args, **kwargs)


class StaticAdapter(requests.adapters.BaseAdapter):
    """A transport that answers every request with one fixed JSON body (no network)."""

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        response = requests.Response()
        response.status_code = 200
        response.headers["Content-Type"] = "application/json"
        response.raw = io.BytesIO(self.body)
        response.url = request.url or ""
        response.request = request
        return response

    def close(self) -> None:
        pass


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def segment(obj: Any) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def claims(now: float = NOW, **overrides: Any) -> dict[str, Any]:
    """Valid claims at ``now`` (plus an Epic-style ``sub``); ``None`` drops a claim."""
    base: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "iat": int(now) - 10,
        "exp": int(now) + 290,
        "jti": str(uuid.uuid4()),
        "sub": "epic-client-id",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(
    key: Any,
    payload: dict[str, Any],
    *,
    alg: str = "ES384",
    kid: str | None = "ec-1",
    typ: str | None = "JWT",
    **extra_header: Any,
) -> str:
    """A compact JWS built by hand, so every header field is under the test's control."""
    header: dict[str, Any] = {"alg": alg}
    if typ is not None:
        header["typ"] = typ
    if kid is not None:
        header["kid"] = kid
    header.update(extra_header)
    signing_input = f"{segment(header)}.{segment(payload)}"
    algorithm = jwt.PyJWS().get_algorithm_by_name(alg)
    signature = algorithm.sign(signing_input.encode(), algorithm.prepare_key(key))
    return f"{signing_input}.{b64url(signature)}"


def bearer(token: str) -> str:
    return f"Bearer {token}"


def public_jwk(private_key: Any, kid: str, alg: str) -> dict[str, Any]:
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    return {**jwk, "kid": kid, "use": "sig", "alg": alg}


def refused(verifier: JwtVerifier, header: str | None, reason: str, audience: str = AUD) -> None:
    with pytest.raises(AuthenticationError, match=reason) as info:
        verifier.verify(header, audience)
    assert info.value.status == 401
    assert info.value.__cause__ is None


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(scope="module")
def ec_key_2() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def jwks(ec_key: Any, rsa_key: Any) -> dict[str, Any]:
    return {"keys": [public_jwk(ec_key, "ec-1", "ES384"), public_jwk(rsa_key, "rsa-1", "RS384")]}


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture()
def session() -> Iterator[RecordingSession]:
    with RecordingSession() as s:
        yield s


@pytest.fixture()
def make_verifier(
    jwks: dict[str, Any], clock: FakeClock, session: RecordingSession
) -> Callable[..., JwtVerifier]:
    def build(clients: list[TrustedClient] | None = None, **options: Any) -> JwtVerifier:
        options.setdefault("clock", clock)
        options.setdefault("session", session)
        return JwtVerifier(
            clients if clients is not None else [TrustedClient(iss=ISS, jwks=jwks)],
            MemoryReplayCache(clock=options["clock"]),
            **options,
        )

    return build


@pytest.fixture()
def verifier(make_verifier: Callable[..., JwtVerifier]) -> JwtVerifier:
    return make_verifier()


# --------------------------------------------------------------------------- valid tokens


def test_valid_es384_token_passes(verifier: JwtVerifier, ec_key: Any) -> None:
    payload = claims(nbf=int(NOW) - 10)
    assert verifier.verify(bearer(sign(ec_key, payload)), AUD) == payload


def test_valid_rs384_token_passes(verifier: JwtVerifier, rsa_key: Any) -> None:
    payload = claims()
    assert verifier.verify(bearer(sign(rsa_key, payload, alg="RS384", kid="rsa-1")), AUD) == payload


def test_token_made_by_pyjwt_encode_passes(verifier: JwtVerifier, ec_key: Any) -> None:
    token = jwt.encode(claims(), ec_key, algorithm="ES384", headers={"kid": "ec-1"})
    assert verifier.verify(bearer(token), AUD)["iss"] == ISS


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_scheme_is_case_insensitive(verifier: JwtVerifier, ec_key: Any, scheme: str) -> None:
    verifier.verify(f"{scheme}  {sign(ec_key, claims())} ", AUD)


@pytest.mark.parametrize(
    ("aud", "audience"),
    [
        (AUD, AUD),
        ([AUD], AUD),
        (["https://other.example.org/x", AUD], AUD),
        (AUD + "/", AUD),
        (AUD, AUD + "/"),
    ],
)
def test_aud_string_or_list_trailing_slash_ignored(
    verifier: JwtVerifier, ec_key: Any, aud: Any, audience: str
) -> None:
    verifier.verify(bearer(sign(ec_key, claims(aud=aud))), audience)


def test_typ_is_case_insensitive(verifier: JwtVerifier, ec_key: Any) -> None:
    verifier.verify(bearer(sign(ec_key, claims(), typ="jwt")), AUD)


def test_unknown_claims_are_accepted(verifier: JwtVerifier, ec_key: Any) -> None:
    payload = claims(sub="client-id", fhirUser="Practitioner/1", extension={"x": [1, 2]})
    assert verifier.verify(bearer(sign(ec_key, payload)), AUD)["fhirUser"] == "Practitioner/1"


def test_times_within_leeway_pass(verifier: JwtVerifier, ec_key: Any) -> None:
    now = int(NOW)
    verifier.verify(bearer(sign(ec_key, claims(exp=now - 20, iat=now - 100))), AUD)
    verifier.verify(bearer(sign(ec_key, claims(iat=now + 20, nbf=now + 20))), AUD)


# --------------------------------------------------------------------------- header attacks


def test_algorithm_not_configured_is_refused(
    verifier: JwtVerifier, rsa_key: Any, make_verifier: Callable[..., JwtVerifier]
) -> None:
    refused(verifier, bearer(sign(rsa_key, claims(), alg="RS256", kid="rsa-1")), "alg is not")
    refused(verifier, bearer(sign(rsa_key, claims(), alg="PS384", kid="rsa-1")), "alg is not")
    p256 = ec.generate_private_key(ec.SECP256R1())
    refused(verifier, bearer(sign(p256, claims(), alg="ES256")), "alg is not")
    es384_only = make_verifier(algorithms=("ES384",))
    refused(es384_only, bearer(sign(rsa_key, claims(), alg="RS384", kid="rsa-1")), "alg is not")


def test_algorithm_that_does_not_fit_the_key_is_refused(
    verifier: JwtVerifier, rsa_key: Any
) -> None:
    # RS384 is allowed, but kid ec-1 is an EC key: the key decides, not the token.
    refused(verifier, bearer(sign(rsa_key, claims(), alg="RS384", kid="ec-1")), "does not fit")


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
@pytest.mark.parametrize("signature", ["", "c2lnbmF0dXJl"])
def test_alg_none_crafted_by_hand_is_refused(
    verifier: JwtVerifier, alg: str, signature: str
) -> None:
    token = f"{segment({'alg': alg, 'typ': 'JWT', 'kid': 'ec-1'})}.{segment(claims())}.{signature}"
    refused(verifier, bearer(token), "alg is not")


@pytest.mark.parametrize("alg", ["HS256", "HS384"])
@pytest.mark.parametrize("kid", ["rsa-1", "ec-1"])
def test_hmac_signed_with_public_key_bytes_is_refused(
    verifier: JwtVerifier, ec_key: Any, rsa_key: Any, jwks: dict[str, Any], alg: str, kid: str
) -> None:
    """Key confusion: HMAC with the public key (PEM or JWK JSON) as the shared secret."""
    public = (rsa_key if kid == "rsa-1" else ec_key).public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    jwk_json = json.dumps(next(k for k in jwks["keys"] if k["kid"] == kid)).encode()
    digest = hashlib.sha256 if alg == "HS256" else hashlib.sha384
    for secret in (pem, jwk_json):
        signing_input = f"{segment({'alg': alg, 'typ': 'JWT', 'kid': kid})}.{segment(claims())}"
        mac = hmac.new(secret, signing_input.encode(), digest).digest()
        refused(verifier, bearer(f"{signing_input}.{b64url(mac)}"), "alg is not")


def test_missing_or_empty_kid_is_refused(verifier: JwtVerifier, ec_key: Any) -> None:
    refused(verifier, bearer(sign(ec_key, claims(), kid=None)), "kid missing")
    refused(verifier, bearer(sign(ec_key, claims(), kid="")), "kid missing")


def test_unknown_kid_is_refused(verifier: JwtVerifier, ec_key: Any) -> None:
    refused(verifier, bearer(sign(ec_key, claims(), kid="nope")), "kid not in the JWK Set")


def test_key_of_another_kid_does_not_verify(verifier: JwtVerifier, ec_key_2: Any) -> None:
    refused(verifier, bearer(sign(ec_key_2, claims(), kid="ec-1")), "signature does not verify")


@pytest.mark.parametrize("typ", [None, "JOSE", "at+jwt", "application/json", ""])
def test_wrong_or_missing_typ_is_refused(
    verifier: JwtVerifier, ec_key: Any, typ: str | None
) -> None:
    refused(verifier, bearer(sign(ec_key, claims(), typ=typ)), "typ is not JWT")


def test_crit_header_is_refused(verifier: JwtVerifier, ec_key: Any) -> None:
    token = sign(ec_key, claims(), crit=["exp"], exp=1)
    refused(verifier, bearer(token), "well-formed|crit")


def test_tampered_signature_is_refused(verifier: JwtVerifier, ec_key: Any, rsa_key: Any) -> None:
    for key, alg, kid in ((ec_key, "ES384", "ec-1"), (rsa_key, "RS384", "rsa-1")):
        head, body, sig = sign(key, claims(), alg=alg, kid=kid).split(".")
        raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
        raw[len(raw) // 2] ^= 0x01
        refused(verifier, bearer(f"{head}.{body}.{b64url(bytes(raw))}"), "signature does not")
        refused(verifier, bearer(f"{head}.{body}."), "signature does not|cannot be verified")


def test_tampered_payload_is_refused(verifier: JwtVerifier, ec_key: Any) -> None:
    head, _, sig = sign(ec_key, claims()).split(".")
    forged = segment(claims(aud="https://cds.example.org/cds-services/other"))
    refused(verifier, bearer(f"{head}.{forged}.{sig}"), "signature does not verify")


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Token abc.def.ghi",
        "Bearer abc",
        "Bearer a.b",
        "Bearer a.b.c.d",
        "Bearer a..c",
        "Bearer ..",
        "Bearer a.b.c extra",
        "Bearer !!!.@@@.###",
        "Bearer eyJ=.eyJ=.sig",
        "Bearer " + "a" * 20_000 + ".b.c",
        "Bearer abc.def.ghi",
        "Bearer " + segment([1, 2]) + "." + segment({}) + ".c2ln",
        "Bearer " + segment({"alg": "ES384", "typ": "JWT", "kid": "ec-1"}) + ".bm90anNvbg.c2ln",
        "Bearer " + segment({"alg": "ES384", "typ": "JWT", "kid": "ec-1"}) + ".WzFd.c2ln",
        "Bearer " + b64url(b"{" * 5000) + "." + segment({}) + ".c2ln",
        "Bearer " + b64url(b"\xff\xfe") + "." + segment({}) + ".c2ln",
    ],
)
def test_malformed_authorization_headers_are_refused(
    verifier: JwtVerifier, header: str | None
) -> None:
    refused(verifier, header, ".")


def test_non_string_header_values_in_token_are_refused(verifier: JwtVerifier, ec_key: Any) -> None:
    token = sign(ec_key, claims(), kid=7)  # type: ignore[arg-type]
    refused(verifier, bearer(token), "well-formed|kid")
    refused(verifier, bearer(sign(ec_key, claims(), jku=["x"])), "jku")


# --------------------------------------------------------------------------- issuer, jku


def test_unknown_or_missing_iss_is_refused(verifier: JwtVerifier, ec_key: Any) -> None:
    refused(verifier, bearer(sign(ec_key, claims(iss="https://evil.example/"))), "not a trusted")
    refused(verifier, bearer(sign(ec_key, claims(iss=ISS.rstrip("/")))), "not a trusted")
    refused(verifier, bearer(sign(ec_key, claims(iss=None))), "iss claim missing")
    refused(verifier, bearer(sign(ec_key, claims(iss=["x"]))), "iss claim missing")


def test_key_of_another_trusted_client_is_not_accepted(
    make_verifier: Callable[..., JwtVerifier], jwks: dict[str, Any], ec_key_2: Any
) -> None:
    """Client B's key cannot sign a token that claims to come from client A."""
    other = {"keys": [public_jwk(ec_key_2, "b-1", "ES384")]}
    verifier = make_verifier(
        [TrustedClient(iss=ISS, jwks=jwks), TrustedClient(iss="https://b.example/", jwks=other)]
    )
    verifier.verify(bearer(sign(ec_key_2, claims(iss="https://b.example/"), kid="b-1")), AUD)
    refused(verifier, bearer(sign(ec_key_2, claims(), kid="b-1")), "kid not in the JWK Set")


def test_jku_for_client_with_static_keys_is_refused_without_fetching(
    verifier: JwtVerifier, ec_key: Any, session: RecordingSession
) -> None:
    token = sign(ec_key, claims(), jku="http://127.0.0.1:9/evil-jwks.json")
    refused(verifier, bearer(token), "jku is not")
    assert session.calls == []


# --------------------------------------------------------------------------- claims


def test_wrong_or_missing_aud_is_refused(verifier: JwtVerifier, ec_key: Any) -> None:
    for aud in (
        "https://cds.example.org/cds-services/other",
        "https://cds.example.org/cds-services",
        AUD + "//",
        AUD.upper(),
        "http://cds.example.org/cds-services/lbp",
        ["https://cds.example.org/cds-services"],
        [],
        [AUD, 3],
        7,
        None,
    ):
        refused(verifier, bearer(sign(ec_key, claims(aud=aud))), "aud does not")


def test_expired_token_is_refused(verifier: JwtVerifier, ec_key: Any) -> None:
    now = int(NOW)
    refused(verifier, bearer(sign(ec_key, claims(exp=now - 31, iat=now - 300))), "expired")


def test_future_nbf_is_refused(verifier: JwtVerifier, ec_key: Any) -> None:
    refused(verifier, bearer(sign(ec_key, claims(nbf=int(NOW) + 60))), "not yet valid")


def test_future_iat_is_refused(verifier: JwtVerifier, ec_key: Any) -> None:
    now = int(NOW)
    refused(verifier, bearer(sign(ec_key, claims(iat=now + 60, exp=now + 300))), "future")


def test_lifetime_too_long_is_refused(
    verifier: JwtVerifier, ec_key: Any, make_verifier: Callable[..., JwtVerifier]
) -> None:
    now = int(NOW)
    too_long = claims(iat=now - 10, exp=now - 10 + 3601)
    refused(verifier, bearer(sign(ec_key, too_long)), "lifetime")
    refused(verifier, bearer(sign(ec_key, claims(iat=now, exp=now - 5))), "exp is before iat")
    short = make_verifier(max_lifetime_seconds=300)
    refused(short, bearer(sign(ec_key, claims(iat=now, exp=now + 301))), "lifetime")
    short.verify(bearer(sign(ec_key, claims(iat=now, exp=now + 300))), AUD)


@pytest.mark.parametrize("name", ["exp", "iat"])
@pytest.mark.parametrize("value", [None, "1700000000", True, [1], 10**400])
def test_missing_or_non_numeric_time_claims_are_refused(
    verifier: JwtVerifier, ec_key: Any, name: str, value: Any
) -> None:
    payload = claims()
    if value is None:
        del payload[name]
    else:
        payload[name] = value
    refused(verifier, bearer(sign(ec_key, payload)), f"{name} claim")


@pytest.mark.parametrize(
    ("constant", "reason"),
    [
        ("NaN", "well-formed"),
        ("Infinity", "well-formed"),
        ("-Infinity", "well-formed"),
        ("1e400", "exp claim is not a finite number"),
    ],
)
def test_nan_and_infinity_in_claims_are_refused(
    verifier: JwtVerifier, ec_key: Any, constant: str, reason: str
) -> None:
    header = segment({"alg": "ES384", "typ": "JWT", "kid": "ec-1"})
    raw = json.dumps(claims()).replace('"exp": ' + str(int(NOW) + 290), '"exp": ' + constant)
    assert constant in raw
    signing_input = f"{header}.{b64url(raw.encode())}"
    algorithm = jwt.PyJWS().get_algorithm_by_name("ES384")
    sig = b64url(algorithm.sign(signing_input.encode(), ec_key))
    refused(verifier, bearer(f"{signing_input}.{sig}"), reason)


@pytest.mark.parametrize("jti", [None, "", 42, ["a"], "x" * 257])
def test_missing_or_bad_jti_is_refused(verifier: JwtVerifier, ec_key: Any, jti: Any) -> None:
    payload = claims(jti=jti) if jti is not None else claims(jti=None)
    refused(verifier, bearer(sign(ec_key, payload)), "jti claim")


def test_replayed_jti_is_refused(verifier: JwtVerifier, ec_key: Any, rsa_key: Any) -> None:
    payload = claims(jti="once")
    verifier.verify(bearer(sign(ec_key, payload)), AUD)
    refused(verifier, bearer(sign(ec_key, payload)), "replay")
    # A fresh signature over the same jti (another key of the client) is still a replay.
    refused(verifier, bearer(sign(rsa_key, payload, alg="RS384", kid="rsa-1")), "replay")


def test_replay_key_is_per_issuer(
    make_verifier: Callable[..., JwtVerifier], jwks: dict[str, Any], ec_key: Any
) -> None:
    verifier = make_verifier(
        [TrustedClient(iss=ISS, jwks=jwks), TrustedClient(iss="https://b.example/", jwks=jwks)]
    )
    verifier.verify(bearer(sign(ec_key, claims(jti="same"))), AUD)
    verifier.verify(bearer(sign(ec_key, claims(jti="same", iss="https://b.example/"))), AUD)


def test_rejected_token_does_not_use_up_its_jti(verifier: JwtVerifier, ec_key: Any) -> None:
    refused(verifier, bearer(sign(ec_key, claims(jti="j1", aud="https://x/"))), "aud")
    verifier.verify(bearer(sign(ec_key, claims(jti="j1"))), AUD)


def test_tenant_allowlist(
    make_verifier: Callable[..., JwtVerifier], jwks: dict[str, Any], ec_key: Any
) -> None:
    verifier = make_verifier([TrustedClient(iss=ISS, jwks=jwks, tenants=frozenset({"t-1", "t-2"}))])
    verifier.verify(bearer(sign(ec_key, claims(tenant="t-2"))), AUD)
    refused(verifier, bearer(sign(ec_key, claims(tenant="t-3"))), "tenant")
    refused(verifier, bearer(sign(ec_key, claims(tenant="t"))), "tenant")  # no substring match
    refused(verifier, bearer(sign(ec_key, claims())), "tenant")
    refused(verifier, bearer(sign(ec_key, claims(tenant=["t-1"]))), "tenant")


def test_tenant_not_checked_without_allowlist(verifier: JwtVerifier, ec_key: Any) -> None:
    verifier.verify(bearer(sign(ec_key, claims(tenant="anything"))), AUD)


def test_empty_audience_is_a_caller_bug(verifier: JwtVerifier, ec_key: Any) -> None:
    with pytest.raises(ValueError):
        verifier.verify(bearer(sign(ec_key, claims())), "")


# --------------------------------------------------------------------------- logging


def test_logs_name_reason_and_iss_but_never_the_token(
    verifier: JwtVerifier, ec_key: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="lbp_cds.auth")
    tokens = [
        sign(ec_key, claims(aud="https://x.example/")),
        sign(ec_key, claims(), kid="secret-kid-value"),
        sign(ec_key, claims(), jku="https://evil.example/jwks"),
        sign(ec_key, claims(iss="https://evil.example/\nFAKE LOG LINE")),
        sign(ec_key, claims()),
    ]
    head, body, sig = tokens[0].split(".")
    tokens.append(f"{head}.{body}.{sig[::-1]}")
    for token in tokens:
        try:
            verifier.verify(bearer(token), AUD)
        except AuthenticationError as exc:
            for part in token.split("."):
                assert part not in str(exc)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "JWT rejected: aud does not name this endpoint" in text
    assert repr(ISS) in text
    assert "\nFAKE LOG LINE" not in text
    for word in ("secret-kid-value", "evil.example/jwks"):
        assert word not in text
    for token in tokens:
        for part in token.split("."):
            assert part not in text


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "algorithms",
    [("ES384", "none"), ("HS256",), ("RS384", "hs512"), ("ES384", "XYZ"), (), "ES384"],
)
def test_constructor_refuses_bad_algorithm_lists(
    make_verifier: Callable[..., JwtVerifier], algorithms: Any
) -> None:
    with pytest.raises(ConfigError):
        make_verifier(algorithms=algorithms)


def test_constructor_refuses_bad_clients(
    make_verifier: Callable[..., JwtVerifier], jwks: dict[str, Any], ec_key: Any
) -> None:
    bad_lists: list[list[TrustedClient]] = [
        [TrustedClient(iss=ISS, jwks=jwks), TrustedClient(iss=ISS, jwks=jwks)],
        [TrustedClient(iss=ISS)],
        [TrustedClient(iss=ISS, jwks=jwks, jwks_url="https://ehr.example.org/jwks")],
        [TrustedClient(iss=ISS, jwks_url="http://ehr.example.org/jwks")],
        [TrustedClient(iss=ISS, jwks_url="ftp://ehr.example.org/jwks")],
        [TrustedClient(iss=ISS, jwks=jwks, tenants="t-1")],  # type: ignore[arg-type]
        [TrustedClient(iss=ISS, jwks=jwks, tenants=frozenset())],
        [TrustedClient(iss="", jwks=jwks)],
        [TrustedClient(iss=ISS, jwks={"keys": []})],
        [TrustedClient(iss=ISS, jwks={})],
        [TrustedClient(iss=ISS, jwks={"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]})],
        [TrustedClient(iss=ISS, jwks={"keys": [{**jwks["keys"][0], "d": "AAAA"}]})],
        [TrustedClient(iss=ISS, jwks={"keys": [jwks["keys"][0], jwks["keys"][0]]})],
        [TrustedClient(iss=ISS, jwks={"keys": [{**jwks["keys"][0], "x": "AAAA"}]})],
        [TrustedClient(iss=ISS, jwks={"keys": [{**jwks["keys"][0], "alg": "RS384"}]})],
        [TrustedClient(iss=ISS, jwks_file=Path("/nonexistent/jwks.json"))],
    ]
    for clients in bad_lists:
        with pytest.raises(ConfigError):
            make_verifier(clients)
    short_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ConfigError, match="2048"):
        make_verifier(
            [TrustedClient(iss=ISS, jwks={"keys": [public_jwk(short_rsa, "r", "RS384")]})]
        )
    with pytest.raises(ConfigError, match="no key can verify"):
        make_verifier(
            [TrustedClient(iss=ISS, jwks={"keys": [jwks["keys"][1]]})], algorithms=("ES384",)
        )
    for name in ("leeway_seconds", "max_lifetime_seconds", "fetch_timeout_seconds"):
        with pytest.raises(ConfigError, match=name):
            make_verifier(**{name: -1})


def test_http_jwks_url_allowed_on_loopback_only(make_verifier: Callable[..., JwtVerifier]) -> None:
    for url in ("http://127.0.0.1:8080/jwks", "http://localhost/jwks", "http://[::1]/jwks"):
        make_verifier([TrustedClient(iss=ISS, jwks_url=url)])


def test_load_clients_reads_all_key_sources(tmp_path: Path, jwks: dict[str, Any]) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "ehr.json").write_text(json.dumps(jwks))
    config = tmp_path / "clients.yaml"
    config.write_text(
        "clients:\n"
        "  - iss: https://ehr.example.org/\n"
        "    jwks_file: keys/ehr.json\n"
        "    tenant: '0123'\n"
        "  - iss: https://other.example.org\n"
        "    jwks_url: https://other.example.org/jwks.json\n"
        "    tenant: [a, b]\n"
        "  - iss: https://third.example.org\n"
        f"    jwks: {json.dumps(jwks)}\n"
    )
    first, second, third = load_clients(config)
    assert first == TrustedClient(
        iss="https://ehr.example.org/",
        jwks_file=(tmp_path / "keys" / "ehr.json").resolve(),
        tenants=frozenset({"0123"}),
    )
    assert second.jwks_url == "https://other.example.org/jwks.json"
    assert second.tenants == frozenset({"a", "b"})
    assert third.jwks == jwks and third.tenants is None
    JwtVerifier([first, second, third], MemoryReplayCache())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("clients: [", "not valid YAML"),
        ("- iss: x", "one key 'clients'"),
        ("clients: []", "non-empty list"),
        ("clients:\n  - iss: https://a/\n", "exactly one key source"),
        ("clients:\n  - iss: https://a/\n    jwks_file: missing.json\n", "cannot read jwks_file"),
        ("clients:\n  - iss: https://a/\n    jwks_file: bad.json\n", "not JSON"),
        ("clients:\n  - iss: https://a/\n    jwks: {}\n", "'keys' list"),
        ("clients:\n  - iss: https://a/\n    jwks: {keys: []}\n", "no keys"),
        (
            "clients:\n  - {iss: 'https://a/', jwks_url: 'https://a/j'}\n"
            "  - {iss: 'https://a/', jwks_url: 'https://a/k'}\n",
            "duplicate iss",
        ),
        ("clients:\n  - {iss: 'https://a/', jwks_uri: 'https://a/j'}\n", "unknown field"),
        ("clients:\n  - {iss: 'https://a/', jwks_url: 'https://a/j', tenant: 123}\n", "tenant"),
        ("clients:\n  - {jwks_url: 'https://a/j'}\n", "'iss'"),
        ("clients:\n  - {iss: 'https://a/', jwks_url: 'http://a/j'}\n", "https"),
    ],
)
def test_load_clients_errors(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    config = tmp_path / "clients.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_clients(config)


def test_load_clients_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_clients(tmp_path / "absent.yaml")


def test_memory_replay_cache_purges_expired_keys() -> None:
    clock = FakeClock()
    cache = MemoryReplayCache(clock=clock)
    assert cache.claim("a", NOW + 10)
    assert not cache.claim("a", NOW + 10)
    assert cache.claim("b", NOW + 100)
    clock.advance(11)
    assert cache.claim("c", NOW + 50)
    assert len(cache) == 2  # "a" purged
    assert cache.claim("a", NOW + 60)


def test_memory_replay_cache_is_thread_safe() -> None:
    cache = MemoryReplayCache()
    expires = time.time() + 60
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: cache.claim("k", expires), range(200)))
    assert results.count(True) == 1


# --------------------------------------------------------------------------- JWK Set by URL


class JwksState:
    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": []}
        self.status = 200
        self.delay = 0.0
        self.body: bytes | None = None
        self.location: str | None = None
        self.hits = 0
        self.lock = threading.Lock()


class JwksHandler(BaseHTTPRequestHandler):
    server: Any

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        state: JwksState = self.server.state
        with state.lock:
            state.hits += 1
        if state.delay:
            time.sleep(state.delay)
        body = state.body if state.body is not None else json.dumps(state.jwks).encode()
        try:
            self.send_response(state.status)
            if state.location:
                self.send_header("Location", state.location)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up (timeout test)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class JwksServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


@pytest.fixture()
def jwks_server(jwks: dict[str, Any]) -> Iterator[tuple[JwksState, str]]:
    server = JwksServer(("127.0.0.1", 0), JwksHandler)
    server.state = JwksState()  # type: ignore[attr-defined]
    server.state.jwks = jwks  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield server.state, f"http://127.0.0.1:{port}/jwks.json"  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


URL_ISS = "https://url-client.example.org"


@pytest.fixture()
def url_verifier(
    make_verifier: Callable[..., JwtVerifier], jwks_server: tuple[JwksState, str]
) -> JwtVerifier:
    _, url = jwks_server
    return make_verifier([TrustedClient(iss=URL_ISS, jwks_url=url)], fetch_timeout_seconds=0.5)


def url_token(
    key: Any, kid: str = "ec-1", alg: str = "ES384", now: float = NOW, **header: Any
) -> str:
    return bearer(sign(key, claims(now, iss=URL_ISS), kid=kid, alg=alg, **header))


def test_jwks_url_is_fetched_once_and_cached(
    url_verifier: JwtVerifier, jwks_server: tuple[JwksState, str], ec_key: Any, rsa_key: Any,
    session: RecordingSession,
) -> None:
    state, url = jwks_server
    url_verifier.verify(url_token(ec_key), AUD)
    url_verifier.verify(url_token(ec_key, jku=url), AUD)
    url_verifier.verify(url_token(rsa_key, kid="rsa-1", alg="RS384"), AUD)
    assert state.hits == 1
    assert session.calls == [("GET", url)]


@pytest.mark.parametrize(
    "jku", ["https://evil.example/jwks.json", "{url}/", "{url}?x=1", "{upper}", "{url}#frag"]
)
def test_jku_not_allowlisted_is_refused_without_fetching(
    url_verifier: JwtVerifier, jwks_server: tuple[JwksState, str], ec_key: Any,
    session: RecordingSession, jku: str,
) -> None:
    state, url = jwks_server
    jku = jku.format(url=url, upper=url.replace("jwks", "JWKS"))
    refused(url_verifier, url_token(ec_key, jku=jku), "jku is not")
    assert session.calls == []
    assert state.hits == 0


def test_flood_of_unknown_kids_fetches_at_most_once_per_interval(
    url_verifier: JwtVerifier, jwks_server: tuple[JwksState, str], ec_key: Any,
    ec_key_2: Any, clock: FakeClock,
) -> None:
    state, _ = jwks_server
    url_verifier.verify(url_token(ec_key), AUD)
    assert state.hits == 1
    for i in range(50):
        refused(url_verifier, url_token(ec_key, kid=f"unknown-{i}"), "kid not in the JWK Set")
    assert state.hits == 1

    # The client rotates in a new key: it is picked up once the interval has passed.
    state.jwks = {"keys": [*state.jwks["keys"], public_jwk(ec_key_2, "ec-2", "ES384")]}
    refused(url_verifier, url_token(ec_key_2, kid="ec-2"), "kid not in the JWK Set")
    assert state.hits == 1
    clock.advance(61)
    url_verifier.verify(url_token(ec_key_2, kid="ec-2"), AUD)
    assert state.hits == 2
    for i in range(20):
        refused(url_verifier, url_token(ec_key, kid=f"again-{i}"), "kid not in the JWK Set")
    assert state.hits == 2


def test_first_request_with_unknown_kid_fetches_once(
    url_verifier: JwtVerifier, jwks_server: tuple[JwksState, str], ec_key: Any
) -> None:
    state, _ = jwks_server
    for i in range(10):
        refused(url_verifier, url_token(ec_key, kid=f"unknown-{i}"), "kid not in the JWK Set")
    assert state.hits == 1
    url_verifier.verify(url_token(ec_key), AUD)  # the set fetched then is used
    assert state.hits == 1


def test_concurrent_unknown_kids_fetch_once(
    url_verifier: JwtVerifier, jwks_server: tuple[JwksState, str], ec_key: Any
) -> None:
    state, _ = jwks_server
    state.delay = 0.1
    tokens = [url_token(ec_key, kid=f"unknown-{i}") for i in range(16)]

    def attempt(token: str) -> str:
        try:
            url_verifier.verify(token, AUD)
        except AuthenticationError as exc:
            return exc.message
        return "accepted"

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(attempt, tokens))
    assert set(outcomes) == {"kid not in the JWK Set of this iss"}
    assert state.hits == 1


def test_fetch_error_refuses_and_keeps_old_cache(
    url_verifier: JwtVerifier, jwks_server: tuple[JwksState, str], ec_key: Any, clock: FakeClock
) -> None:
    state, _ = jwks_server
    state.status = 500
    refused(url_verifier, url_token(ec_key), "could not be fetched")
    refused(url_verifier, url_token(ec_key), "kid not in the JWK Set")  # rate-limited, no fetch
    assert state.hits == 1

    clock.advance(61)
    state.status = 200
    url_verifier.verify(url_token(ec_key), AUD)
    assert state.hits == 2

    clock.advance(61)
    state.status = 503
    refused(url_verifier, url_token(ec_key, kid="new-kid"), "could not be fetched")
    assert state.hits == 3
    url_verifier.verify(url_token(ec_key), AUD)  # old cache still serves the known kid
    assert state.hits == 3


@pytest.mark.parametrize(
    ("body", "status", "location"),
    [
        (b"not json", 200, None),
        (b"[]", 200, None),
        (b'{"keys": "x"}', 200, None),
        (b'{"keys": [{"kty": "oct", "kid": "ec-1", "k": "c2VjcmV0"}]}', 200, None),
        (b"{}", 302, "https://evil.example/jwks.json"),
        (b"{" * 100_000, 200, None),
        (b" " * 300_000, 200, None),
    ],
)
def test_unusable_jwks_responses_are_refused(
    url_verifier: JwtVerifier, jwks_server: tuple[JwksState, str], ec_key: Any,
    session: RecordingSession, body: bytes, status: int, location: str | None,
) -> None:
    state, url = jwks_server
    state.body, state.status, state.location = body, status, location
    refused(url_verifier, url_token(ec_key), "could not be fetched")
    assert session.calls == [("GET", url)]  # no redirect followed


def test_fetched_keys_with_private_material_or_duplicates_are_skipped(
    url_verifier: JwtVerifier, jwks_server: tuple[JwksState, str], ec_key: Any, rsa_key: Any,
    jwks: dict[str, Any],
) -> None:
    state, _ = jwks_server
    ec_jwk, rsa_jwk = jwks["keys"]
    state.jwks = {"keys": [{**ec_jwk, "d": "AAAA"}, rsa_jwk, rsa_jwk, {"kty": "EC"}, "x"]}
    refused(url_verifier, url_token(ec_key), "could not be fetched")  # nothing usable
    state.jwks = {"keys": [{**ec_jwk, "d": "AAAA"}, rsa_jwk]}
    url_verifier._remote[URL_ISS].last_attempt = None  # allow an immediate refetch
    url_verifier.verify(url_token(rsa_key, kid="rsa-1", alg="RS384"), AUD)
    refused(url_verifier, url_token(ec_key), "kid not in the JWK Set")


def test_fetch_timeout_refuses_quickly(
    url_verifier: JwtVerifier, jwks_server: tuple[JwksState, str], ec_key: Any
) -> None:
    state, _ = jwks_server
    state.delay = 1.5
    started = time.monotonic()
    refused(url_verifier, url_token(ec_key), "could not be fetched")
    assert time.monotonic() - started < 1.2


def test_withdrawn_key_stops_working_after_max_age(
    make_verifier: Callable[..., JwtVerifier], jwks_server: tuple[JwksState, str],
    ec_key: Any, rsa_key: Any, clock: FakeClock, jwks: dict[str, Any],
) -> None:
    state, url = jwks_server
    verifier = make_verifier([TrustedClient(iss=URL_ISS, jwks_url=url)], jwks_max_age_seconds=300)
    verifier.verify(url_token(ec_key, now=clock.now), AUD)
    state.jwks = {"keys": [jwks["keys"][1]]}  # ec-1 withdrawn
    clock.advance(100)
    verifier.verify(url_token(ec_key, now=clock.now), AUD)  # still fresh: no fetch
    assert state.hits == 1

    clock.advance(201)
    state.status = 500
    # The refresh failed: the cached set stays in use.
    verifier.verify(url_token(ec_key, now=clock.now), AUD)
    assert state.hits == 2

    clock.advance(61)
    state.status = 200
    refused(verifier, url_token(ec_key, now=clock.now), "kid not in the JWK Set")
    assert state.hits == 3
    verifier.verify(url_token(rsa_key, kid="rsa-1", alg="RS384", now=clock.now), AUD)


# --------------------------------------------------------------------------- shared data


def spec_token() -> str:
    text = (SPEC_DIR / "cds-hooks-2.0.1-specification.md").read_text(encoding="utf-8")
    match = re.search(r"^Authorization: Bearer (\S+)$", text, re.MULTILINE)
    assert match, "the spec's example Authorization line was not found"
    return match.group(1)


def spec_json(n: int) -> dict[str, Any]:
    return json.loads((SPEC_DIR / "spec-examples" / f"spec-2.0.1-example-{n}.json").read_text())


@pytest.fixture()
def spec_verifier_factory(
    session: RecordingSession,
) -> Callable[..., JwtVerifier]:
    """A verifier trusting the spec's example client; its jku is served from the spec's JWKS."""
    header = spec_json(21)
    session.mount(header["jku"], StaticAdapter(json.dumps(spec_json(23)).encode()))

    def build(**options: Any) -> JwtVerifier:
        clock = options.setdefault("clock", time.time)
        client = TrustedClient(
            iss=spec_json(22)["iss"],
            jwks_url=header["jku"],
            tenants=frozenset({spec_json(22)["tenant"]}),
        )
        return JwtVerifier([client], MemoryReplayCache(clock=clock), session=session, **options)

    return build


SPEC_AUD = "https://cds.example.org/cds-services/some-service"


@pytest.mark.shared
def test_spec_example_token_is_refused_as_expired(
    spec_verifier_factory: Callable[..., JwtVerifier], session: RecordingSession
) -> None:
    token = spec_token()
    assert jwt.get_unverified_header(token) == spec_json(21)
    # Refused for its exp: every check before it (header, iss, jku, key, signature) passed.
    refused(spec_verifier_factory(), bearer(token), r"token expired \(exp\)")
    assert session.calls == [("GET", spec_json(21)["jku"])]


@pytest.mark.shared
def test_spec_example_token_is_accepted_inside_its_validity_window(
    spec_verifier_factory: Callable[..., JwtVerifier],
) -> None:
    payload = spec_json(22)
    inside = FakeClock(payload["iat"] + 3600)
    # The example's lifetime is about 3.5 years: refused with our one-hour limit ...
    refused(spec_verifier_factory(clock=inside), bearer(spec_token()), "lifetime")
    # ... and accepted when the limit allows it.
    verifier = spec_verifier_factory(clock=inside, max_lifetime_seconds=10**9)
    assert verifier.verify(bearer(spec_token()), SPEC_AUD) == payload
    refused(verifier, bearer(spec_token()), "replay", audience=SPEC_AUD)
    other = spec_verifier_factory(clock=inside, max_lifetime_seconds=10**9)
    discovery = "https://cds.example.org/cds-services"
    refused(other, bearer(spec_token()), "aud does not", audience=discovery)


@pytest.mark.shared
def test_spec_example_token_with_static_keys_is_refused_for_its_jku(
    session: RecordingSession,
) -> None:
    client = TrustedClient(iss=spec_json(22)["iss"], jwks=spec_json(23))
    verifier = JwtVerifier([client], MemoryReplayCache(), session=session)
    refused(verifier, bearer(spec_token()), "jku is not")
    assert session.calls == []


@pytest.mark.shared
def test_spec_private_key_signs_tokens_we_accept(
    spec_verifier_factory: Callable[..., JwtVerifier],
) -> None:
    private = ECAlgorithm.from_jwk(spec_json(24))
    payload = claims(iss=spec_json(22)["iss"], aud=SPEC_AUD, tenant=spec_json(22)["tenant"])
    payload["iat"], payload["exp"] = int(time.time()) - 5, int(time.time()) + 295
    token = sign(private, payload, kid="example-kid", jku=spec_json(21)["jku"])
    assert spec_verifier_factory().verify(bearer(token), SPEC_AUD) == payload


SANDBOX_ISS = "https://sandbox.cds-hooks.org"


@pytest.mark.shared
def test_sandbox_jwks_loads_and_sandbox_token_verifies(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    sandbox_jwks = JWT_DIR / "cds-hooks-sandbox-jwks.json"
    (tmp_path / "keys" / "sandbox.json").write_bytes(sandbox_jwks.read_bytes())
    config = tmp_path / "clients.yaml"
    config.write_text(
        f"clients:\n  - iss: {SANDBOX_ISS}\n    jwks_file: keys/sandbox.json\n"
        f"  - iss: https://shared.example\n    jwks_file: {sandbox_jwks}\n"
    )
    verifier = JwtVerifier(load_clients(config), MemoryReplayCache())
    kid = json.loads((JWT_DIR / "cds-hooks-sandbox-jwks.json").read_text())["keys"][0]["kid"]
    private = serialization.load_pem_private_key(
        (JWT_DIR / "cds-hooks-sandbox-ec-private-key.pem").read_bytes(), password=None
    )
    now = int(time.time())
    payload = {
        "iss": SANDBOX_ISS,
        "aud": AUD,
        "iat": now,
        "exp": now + 300,
        "jti": str(uuid.uuid4()),
    }
    token = jwt.encode(payload, private, algorithm="ES384", headers={"kid": kid, "typ": "JWT"})
    assert verifier.verify(bearer(token), AUD) == payload


@pytest.mark.shared
def test_sandbox_keypair_file_is_refused_as_a_jwks_file(tmp_path: Path) -> None:
    config = tmp_path / "clients.yaml"
    config.write_text(
        f"clients:\n  - iss: {SANDBOX_ISS}\n"
        f"    jwks_file: {JWT_DIR / 'cds-hooks-sandbox-jwk-keypair.json'}\n"
    )
    with pytest.raises(ConfigError, match="private key material"):
        JwtVerifier(load_clients(config), MemoryReplayCache())


# --------------------------------------------------------------------------- property test

#: A key made at import for the property test (hypothesis cannot use function-scoped fixtures).
_PROPERTY_KEY = ec.generate_private_key(ec.SECP384R1())
_PROPERTY_JWKS = {"keys": [public_jwk(_PROPERTY_KEY, "ec-1", "ES384")]}

_json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_plausible_headers = st.fixed_dictionaries(
    {
        "alg": st.sampled_from(["ES384", "RS384"]),
        "typ": st.sampled_from(["JWT", "jwt"]),
        "kid": st.sampled_from(["ec-1", "rsa-1"]),
    },
    optional={"jku": st.text(max_size=30), "x": _json_values},
)
_plausible_payloads = st.fixed_dictionaries(
    {
        "iss": st.just(ISS) | _json_values,
        "aud": st.just(AUD) | st.just([AUD]) | _json_values,
        "exp": st.integers(int(NOW) - 100, int(NOW) + 4000) | _json_values,
        "iat": st.integers(int(NOW) - 4000, int(NOW) + 100) | _json_values,
    },
    optional={
        "jti": st.text(max_size=300) | _json_values,
        "nbf": st.integers(int(NOW) - 100, int(NOW) + 100) | _json_values,
        "tenant": _json_values,
    },
)
_segments = st.from_regex(r"[A-Za-z0-9_\-=]{0,40}", fullmatch=True)


def _signed(header: dict[str, Any], payload: Any) -> str:
    signing_input = f"{segment(header)}.{segment(payload)}"
    algorithm = jwt.PyJWS().get_algorithm_by_name("ES384")
    return f"Bearer {signing_input}.{b64url(algorithm.sign(signing_input.encode(), _PROPERTY_KEY))}"


_headers = st.one_of(
    st.text(),
    st.builds(lambda s: "Bearer " + s, st.text()),
    st.builds(lambda a, b, c: f"Bearer {a}.{b}.{c}", _segments, _segments, _segments),
    st.builds(
        lambda h, p, s: f"Bearer {segment(h)}.{segment(p)}.{b64url(s)}",
        _plausible_headers | _json_values,
        _plausible_payloads | _json_values,
        st.binary(max_size=130),
    ),
    st.builds(_signed, _plausible_headers, _plausible_payloads | _json_values),
    st.builds(
        _signed,
        st.fixed_dictionaries(
            {"alg": st.just("ES384"), "typ": st.just("JWT"), "kid": st.just("ec-1")},
            optional={"crit": _json_values, "b64": _json_values, "cty": _json_values},
        ),
        _plausible_payloads,
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=_headers)
def test_arbitrary_headers_raise_only_authentication_error(header: str) -> None:
    verifier = JwtVerifier(
        [TrustedClient(iss=ISS, jwks=_PROPERTY_JWKS)], MemoryReplayCache(), clock=FakeClock()
    )
    try:
        verifier.verify(header, AUD)
    except AuthenticationError:
        return
    # Only a correctly signed, in-date token for AUD with a jti can pass.
    assert header.startswith("Bearer ")


# --------------------------------------------------------------------------- jku allowlist

SANDBOX_JKU = "https://sandbox.cds-hooks.org/.well-known/jwks.json"


def sandbox_token(aud: str = AUD, **header: Any) -> str:
    """A token shaped exactly as the HL7 CDS Hooks sandbox signs it: header alg ES384, typ JWT,
    kid and jku; claims iss, aud, exp, iat, jti; signed with its published private key."""
    private = serialization.load_pem_private_key(
        (JWT_DIR / "cds-hooks-sandbox-ec-private-key.pem").read_bytes(), password=None)
    kid = json.loads((JWT_DIR / "cds-hooks-sandbox-jwks.json").read_text())["keys"][0]["kid"]
    now = int(time.time())
    payload = {"iss": SANDBOX_ISS, "aud": aud, "exp": now + 300, "iat": now,
               "jti": str(uuid.uuid4())}
    headers = {"alg": "ES384", "typ": "JWT", "kid": kid, "jku": SANDBOX_JKU, **header}
    return jwt.encode(payload, private, algorithm="ES384", headers=headers)


def readme_sandbox_clients(folder: Path) -> Path:
    """The sandbox's entry of the clients file the README recommends (read from README.md, so
    the two cannot drift), with the sandbox's published JWK Set where the entry expects it."""
    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("For the HL7 CDS Hooks Sandbox"):]
    start = section.index("```yaml") + len("```yaml")
    block = section[start:section.index("```", start)]
    entries = yaml.safe_load(textwrap.dedent(block))["clients"]
    entry = next(e for e in entries if e["iss"] == SANDBOX_ISS)
    assert entry["jku"] == SANDBOX_JKU
    target = folder / entry["jwks_file"]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes((JWT_DIR / "cds-hooks-sandbox-jwks.json").read_bytes())
    config = folder / "clients.yaml"
    config.write_text(yaml.safe_dump({"clients": [entry]}))
    return config


@pytest.mark.shared
def test_sandbox_shaped_token_passes_with_pinned_keys_and_its_listed_jku_offline(
    tmp_path: Path, session: RecordingSession
) -> None:
    verifier = JwtVerifier(load_clients(readme_sandbox_clients(tmp_path)), MemoryReplayCache(),
                           session=session)
    token = sandbox_token()
    assert jwt.get_unverified_header(token) == {
        "alg": "ES384", "typ": "JWT", "kid": "44823f3d-0b01-4a6c-a80e-b9d3e8a7226f",
        "jku": SANDBOX_JKU}
    claims = verifier.verify(bearer(token), AUD)
    assert claims["iss"] == SANDBOX_ISS
    assert session.calls == []  # the pinned keys: nothing was fetched
    # Another jku, even on the sandbox's own host, is refused and never fetched.
    for jku in ("https://sandbox.cds-hooks.org/jwks.json", SANDBOX_JKU + "?",
                "http://127.0.0.1:9/"):
        refused(verifier, bearer(sandbox_token(jku=jku)), "jku is not")
    assert session.calls == []
    # The listed jku does not bypass the signature: another key under the sandbox's kid fails.
    forged_key = ec.generate_private_key(ec.SECP384R1())
    now = int(time.time())
    forged = jwt.encode({"iss": SANDBOX_ISS, "aud": AUD, "exp": now + 300, "iat": now,
                         "jti": str(uuid.uuid4())}, forged_key, algorithm="ES384",
                        headers=jwt.get_unverified_header(token))
    refused(verifier, bearer(forged), "signature does not verify")


def test_listed_jku_of_a_fetching_client_fetches_only_its_jwks_url(
    make_verifier: Callable[..., JwtVerifier], jwks_server: tuple[JwksState, str], ec_key: Any,
    session: RecordingSession,
) -> None:
    """A client with jwks_url may also list the jku its tokens name: the keys still come from
    jwks_url, the only URL ever fetched."""
    state, url = jwks_server
    named = "https://url-client.example.org/.well-known/jwks.json"
    verifier = make_verifier([TrustedClient(iss=URL_ISS, jwks_url=url, jku=frozenset({named}))])
    verifier.verify(url_token(ec_key, jku=named), AUD)
    verifier.verify(url_token(ec_key, jku=url), AUD)
    refused(verifier, url_token(ec_key, jku="https://url-client.example.org/other"), "jku is not")
    assert session.calls == [("GET", url)] and state.hits == 1


def test_load_clients_reads_jku_fhir_servers_and_allow_private(tmp_path: Path,
                                                               jwks: dict[str, Any]) -> None:
    config = tmp_path / "clients.yaml"
    config.write_text(
        "clients:\n"
        "  - iss: https://ehr.example.org/\n"
        f"    jwks: {json.dumps(jwks)}\n"
        "    jku: [https://ehr.example.org/jwks.json, https://ehr.example.org/jwks2.json]\n"
        "    fhir_servers: https://ehr.example.org/fhir\n"
        "    allow_private: true\n"
        "  - iss: https://other.example.org/\n"
        f"    jwks: {json.dumps(jwks)}\n"
    )
    first, second = load_clients(config)
    assert first.jku == {"https://ehr.example.org/jwks.json", "https://ehr.example.org/jwks2.json"}
    assert first.fhir_servers == ("https://ehr.example.org/fhir",) and first.allow_private
    assert second.jku == frozenset() and second.fhir_servers == () and not second.allow_private
    JwtVerifier([first, second], MemoryReplayCache())


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("jku: 12", "'jku' must be a URL"),
        ("jku: [not a url]", "absolute http"),
        ("fhir_servers: [ftp://ehr.example.org/fhir]", "fhir_servers: only http and https"),
        ("fhir_servers: [https://u:p@ehr.example.org/fhir]", "user info"),
        ("fhir_servers: [https://ehr.example.org/fhir/../x]", "segments"),
        ("allow_private: 'yes'", "allow_private"),
    ],
)
def test_load_clients_refuses_bad_jku_and_fhir_servers(tmp_path: Path, jwks: dict[str, Any],
                                                       entry: str, message: str) -> None:
    config = tmp_path / "clients.yaml"
    config.write_text(f"clients:\n  - iss: https://a/\n    jwks: {json.dumps(jwks)}\n    {entry}\n")
    with pytest.raises(ConfigError, match=message):
        load_clients(config)


@pytest.mark.parametrize(
    ("build", "category"),
    [
        (lambda key: None, "no bearer token"),
        (lambda key: bearer(sign(key, claims(), typ="JOSE")), "token header not acceptable"),
        (lambda key: bearer(sign(key, claims(iss="https://evil.example/"))), "not trusted"),
        (lambda key: bearer(sign(key, claims(), jku="https://evil.example/j")), "not trusted"),
        (lambda key: bearer(sign(key, claims(exp=int(NOW) - 100))), "expired"),
        (lambda key: bearer(sign(key, claims(aud="https://x.example/"))), "aud is not"),
        (lambda key: bearer(sign(key, claims(jti=None))), "a claim is missing"),
    ],
)
def test_every_refusal_has_a_category_for_the_caller(
    verifier: JwtVerifier, ec_key: Any, build: Callable[[Any], str | None], category: str
) -> None:
    with pytest.raises(AuthenticationError) as info:
        verifier.verify(build(ec_key), AUD)
    assert category in info.value.category
    body = info.value.operation_outcome("rid-1")["issue"][0]["diagnostics"]
    assert body.startswith("Unauthorized: ") and "X-Request-Id rid-1" in body
    assert info.value.message not in body or info.value.message == info.value.category
