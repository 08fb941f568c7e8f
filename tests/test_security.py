"""Security and resilience through a real server: ``lbp-cds serve`` (gunicorn) on 127.0.0.1.

* Authentication of every CDS endpoint (discovery, service, feedback) with ES384 and RS384
  client JWTs, and the attacks a CDS client's token can carry; each refusal is a 401 that names
  only the reason's category and the request id, while the server's log names the reason (so an
  attack refused for the wrong reason does not pass).
* The service refuses to start without trusted clients or without its public base URL.
* The specification's own signed example token (expired) is refused for its ``exp``.
* CORS for an allowlisted origin on success, errors and preflight; none for other origins.
* Body limits: size (Content-Length and chunked), JSON depth, media type, malformed JSON.
* Logs never hold a token, a patient identifier, a name or a birth date.

Open without a token, by design: ``/healthz``, ``/readyz``, ``/metrics``, ``/openapi.json`` and
``/questionnaires/lbp-intake``. They carry no patient data, but they are for the cluster (probes,
Prometheus scraping) and integrators: do not expose them publicly; ``/metrics`` in particular is
internal (the ingress should route only ``/cds-services`` to the outside).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import re
import signal
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from tests.builders import tls_files
from tests.service_server import (
    CdsClientKeys,
    ServerFactory,
    ServiceServer,
    feedback_body,
    free_port,
    lbp_cds_command,
    server_environment,
    stop_process_group,
    triage_request,
)

ROOT = Path(__file__).resolve().parents[1]
SPEC_DIR = ROOT.parent / "shared" / "data" / "cds-hooks"
UNAUTHORIZED = re.compile(r"Unauthorized: [^.]+\. The exact reason is in the "
                          r"service's log under X-Request-Id (\S+)\.")
ALLOWED_ORIGIN = "https://ehr.example.org"
OTHER_ORIGIN = "https://evil.example.net"
FHIR_JSON = "application/fhir+json"


# --------------------------------------------------------------------------- helpers


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def segment(obj: Any) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def log_records(server: ServiceServer) -> list[dict[str, Any]]:
    """The server's JSON log lines (gunicorn's own plain lines skipped)."""
    records = []
    for line in server.log_text().splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    return records


def records_of(server: ServiceServer, request_id: str) -> list[dict[str, Any]]:
    return [r for r in log_records(server) if r.get("request_id") == request_id]


def assert_operation_outcome(response: requests.Response) -> dict[str, Any]:
    assert response.headers["Content-Type"].startswith(FHIR_JSON), response.headers
    body = response.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"], body
    return body


def assert_bare_401(response: requests.Response) -> None:
    assert response.status_code == 401, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith(FHIR_JSON)
    body = response.json()
    assert body["resourceType"] == "OperationOutcome" and len(body["issue"]) == 1, body
    issue = body["issue"][0]
    assert {k: v for k, v in issue.items() if k != "diagnostics"} == {"severity": "error",
                                                                        "code": "login"}
    # The category only, and where the reason is: the log, under this response's request id.
    match = UNAUTHORIZED.fullmatch(issue["diagnostics"])
    assert match and match.group(1) == response.headers["X-Request-Id"], issue["diagnostics"]
    # RFC 6750 §3: a Bearer challenge, without error detail.
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="lbp-cds"'



@pytest.fixture(scope="module")
def client_keys(tmp_path_factory: pytest.TempPathFactory) -> CdsClientKeys:
    return CdsClientKeys(tmp_path_factory.mktemp("client-keys"))


@pytest.fixture(scope="module")
def auth_server(module_service_server: ServerFactory, client_keys: CdsClientKeys
                ) -> ServiceServer:
    """Authentication on (one trusted client), audience = the server's own URL, CORS for one
    origin."""
    return module_service_server(
        env={"LBP_CDS_PUBLIC_BASE_URL": "{base_url}",
             "LBP_CDS_CORS_ORIGINS": ALLOWED_ORIGIN},
        args=["--clients", str(client_keys.clients_file)])


@pytest.fixture(scope="module")
def issued_card(auth_server: ServiceServer, client_keys: CdsClientKeys) -> dict[str, Any]:
    """A card issued by the auth server (feedback needs one)."""
    path = "/cds-services/mini-triage"
    response = auth_server.post(path, json=triage_request(),
                                headers=client_keys.bearer(auth_server.url(path)))
    assert response.status_code == 200, response.text
    return dict(response.json()["cards"][0])


# The three authenticated endpoints: (method, path, the endpoint a wrong `aud` names instead).
ENDPOINTS = {
    "discovery": ("GET", "/cds-services", "/cds-services/mini-triage"),
    "service": ("POST", "/cds-services/mini-triage", "/cds-services"),
    "feedback": ("POST", "/cds-services/mini-triage/feedback", "/cds-services/mini-triage"),
}


def call(server: ServiceServer, endpoint: str, card: dict[str, Any],
         headers: dict[str, str] | None, request_id: str | None = None) -> requests.Response:
    method, path, _ = ENDPOINTS[endpoint]
    headers = dict(headers or {})
    if request_id:
        headers["X-Request-Id"] = request_id
    body = None
    if endpoint == "service":
        body = triage_request()
    elif endpoint == "feedback":
        body = feedback_body(card)
    return server.request(method, path, json=body, headers=headers)


# --------------------------------------------------------------------------- valid tokens


@pytest.mark.req("176", "177", "199", "200", "205")
@pytest.mark.parametrize("alg", ["ES384", "RS384"])
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_valid_token_passes(auth_server: ServiceServer, client_keys: CdsClientKeys,
                            issued_card: dict[str, Any], endpoint: str, alg: str) -> None:
    _, path, _ = ENDPOINTS[endpoint]
    response = call(auth_server, endpoint, issued_card,
                    client_keys.bearer(auth_server.url(path), alg))
    assert response.status_code == 200, response.text
    if endpoint == "discovery":
        assert {s["id"] for s in response.json()["services"]} >= {"mini-triage"}
    elif endpoint == "service":
        assert response.json()["cards"][0]["extension"]["org.lbp-cds.rule"]["ruleId"] == "FEV"
    else:
        assert response.json()["received"] == 1


def test_aud_as_a_list_naming_the_endpoint_passes(auth_server: ServiceServer,
                                                 client_keys: CdsClientKeys) -> None:
    aud = [auth_server.url("/cds-services/other"), auth_server.url("/cds-services")]
    response = auth_server.get("/cds-services", headers=client_keys.bearer(aud))
    assert response.status_code == 200


# --------------------------------------------------------------------------- attacks


class JwksServer:
    """An attacker's JWK Set on loopback; counts the requests it gets."""

    def __init__(self, jwks: dict[str, Any]) -> None:
        body = json.dumps(jwks).encode()
        self.hits: list[str] = []
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def attacker() -> Iterator[tuple[Any, JwksServer]]:
    """An attacker's EC P-384 key (kid ``ec-1``, like ours) and its JWK Set server."""
    key = ec.generate_private_key(ec.SECP384R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="ec-1", alg="ES384", use="sig")
    server = JwksServer({"keys": [jwk]})
    yield key, server
    server.close()


def unsigned(keys: CdsClientKeys, aud: str, alg: str) -> str:
    header = {"alg": alg, "typ": "JWT", "kid": "ec-1"}
    return f"{segment(header)}.{segment(keys.claims(aud))}."


def hmac_with_public_key(keys: CdsClientKeys, aud: str, alg: str, key: Any, kid: str) -> str:
    """The key-confusion attack: HS* keyed with the client's *public* key (PEM)."""
    secret = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    header = {"alg": alg, "typ": "JWT", "kid": kid}
    signing_input = f"{segment(header)}.{segment(keys.claims(aud))}"
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384}[alg]
    return f"{signing_input}.{b64url(hmac.new(secret, signing_input.encode(), digest).digest())}"


# name -> (Authorization header for (keys, aud of the endpoint, aud of another endpoint,
#          attacker), the reason the server logs).
ATTACKS: dict[str, tuple[Callable[..., str | None], str]] = {
    "missing token": (lambda k, aud, other, atk: None, "no Authorization header"),
    "Basic instead of Bearer": (lambda k, aud, other, atk: "Basic dXNlcjpwYXNzd29yZA==",
                                "Authorization header is not 'Bearer <token>'"),
    "garbage token": (lambda k, aud, other, atk: "Bearer not-a-jwt",
                      "token is not a compact JWS"),
    "expired": (lambda k, aud, other, atk: "Bearer " + k.token(
        aud, iat=int(dt.datetime.now().timestamp()) - 900,
        exp=int(dt.datetime.now().timestamp()) - 600), "token expired (exp)"),
    "iat in the future": (lambda k, aud, other, atk: "Bearer " + k.token(
        aud, iat=int(dt.datetime.now().timestamp()) + 600,
        exp=int(dt.datetime.now().timestamp()) + 900), "token issued in the future (iat)"),
    "lifetime of a day": (lambda k, aud, other, atk: "Bearer " + k.token(
        aud, exp=int(dt.datetime.now().timestamp()) + 86_400),
        "token lifetime (exp - iat) too long"),
    "wrong aud (another endpoint)": (lambda k, aud, other, atk: "Bearer " + k.token(other),
                                     "aud does not name this endpoint"),
    "wrong aud (another host)": (lambda k, aud, other, atk: "Bearer " + k.token(
        aud.replace("127.0.0.1", "cds.attacker.example")), "aud does not name this endpoint"),
    "wrong iss": (lambda k, aud, other, atk: "Bearer " + k.token(
        aud, iss="https://untrusted.example/"), "iss is not a trusted client"),
    "no jti": (lambda k, aud, other, atk: "Bearer " + k.token(aud, jti=None),
               "jti claim missing or not a string"),
    "alg none": (lambda k, aud, other, atk: "Bearer " + unsigned(k, aud, "none"),
                 "header alg is not an allowed algorithm"),
    "alg NONE": (lambda k, aud, other, atk: "Bearer " + unsigned(k, aud, "NONE"),
                 "header alg is not an allowed algorithm"),
    "HS256 keyed with the RSA public key": (
        lambda k, aud, other, atk: "Bearer " + hmac_with_public_key(
            k, aud, "HS256", k.rsa_key, "rsa-1"), "header alg is not an allowed algorithm"),
    "HS384 keyed with the EC public key": (
        lambda k, aud, other, atk: "Bearer " + hmac_with_public_key(
            k, aud, "HS384", k.ec_key, "ec-1"), "header alg is not an allowed algorithm"),
    "signed by another key (same kid)": (
        lambda k, aud, other, atk: "Bearer " + k.token(aud, key=atk[0]),
        "signature does not verify"),
    "unknown kid": (lambda k, aud, other, atk: "Bearer " + k.token(
        aud, headers={"kid": "ec-2"}), "kid not in the JWK Set of this iss"),
    "ES384 header on the RSA key": (lambda k, aud, other, atk: "Bearer " + k.token(
        aud, headers={"kid": "rsa-1"}), "header alg does not fit the key"),
    "untrusted jku (attacker's JWKS)": (
        lambda k, aud, other, atk: "Bearer " + k.token(
            aud, key=atk[0], headers={"jku": atk[1].url}),
        "jku is not the allowlisted JWK Set URL of this iss"),
}


@pytest.mark.req("176", "177", "195", "201", "203")
@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_attack_is_refused_with_a_bare_401(
        auth_server: ServiceServer, client_keys: CdsClientKeys, issued_card: dict[str, Any],
        attacker: tuple[Any, JwksServer], endpoint: str, attack: str) -> None:
    build, reason = ATTACKS[attack]
    _, path, other_path = ENDPOINTS[endpoint]
    authorization = build(client_keys, auth_server.url(path), auth_server.url(other_path),
                          attacker)
    headers = {"Authorization": authorization} if authorization else {}
    request_id = uuid.uuid4().hex
    response = call(auth_server, endpoint, issued_card, headers, request_id)
    assert_bare_401(response)
    reasons = [r.get("reason") for r in records_of(auth_server, request_id)
               if r.get("msg") == "client authentication failed"]
    assert reasons == [reason]
    assert attacker[1].hits == []  # an untrusted jku is never fetched


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_replayed_jti_is_refused(auth_server: ServiceServer, client_keys: CdsClientKeys,
                                 issued_card: dict[str, Any], endpoint: str) -> None:
    _, path, _ = ENDPOINTS[endpoint]
    headers = client_keys.bearer(auth_server.url(path))
    assert call(auth_server, endpoint, issued_card, headers).status_code == 200
    request_id = uuid.uuid4().hex
    assert_bare_401(call(auth_server, endpoint, issued_card, headers, request_id))
    assert [r.get("reason") for r in records_of(auth_server, request_id)
            if r.get("msg") == "client authentication failed"] == ["jti already used (replay)"]


def test_same_jti_with_another_audience_is_a_replay(auth_server: ServiceServer,
                                                    client_keys: CdsClientKeys) -> None:
    """Replay protection is by (iss, jti), not by token bytes: a second token reusing the jti
    for another endpoint is refused too."""
    jti = str(uuid.uuid4())
    first = client_keys.bearer(auth_server.url("/cds-services"), jti=jti)
    assert auth_server.get("/cds-services", headers=first).status_code == 200
    path = "/cds-services/mini-triage"
    second = client_keys.bearer(auth_server.url(path), "RS384", jti=jti)
    assert_bare_401(auth_server.post(path, json=triage_request(), headers=second))


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json",
                                  "/questionnaires/lbp-intake"])
def test_operational_endpoints_are_open(auth_server: ServiceServer, path: str) -> None:
    """Open by design (probes, scraping, integrators); not to be exposed publicly."""
    assert auth_server.get(path).status_code == 200


@pytest.mark.parametrize("path", ["/cds-services/no-such-service",
                                  "/cds-services/no-such-service/feedback"])
def test_unknown_service_is_401_without_a_token_and_404_with_one(
        auth_server: ServiceServer, client_keys: CdsClientKeys, path: str) -> None:
    """An anonymous caller does not learn which service ids exist."""
    assert_bare_401(auth_server.post(path, json=triage_request()))
    response = auth_server.post(path, json=triage_request(),
                                headers=client_keys.bearer(auth_server.url(path)))
    assert response.status_code == 404
    assert_operation_outcome(response)


def test_401_names_the_category_and_the_request_id(auth_server: ServiceServer,
                                                   client_keys: CdsClientKeys) -> None:
    path = "/cds-services/mini-triage"
    now = int(time.time())
    expired = client_keys.bearer(auth_server.url(path), iat=now - 900, exp=now - 600)
    response = auth_server.post(path, json=triage_request(),
                                headers={**expired, "X-Request-Id": "trace-401-a"})
    assert_bare_401(response)
    text = response.json()["issue"][0]["diagnostics"]
    assert "token expired" in text and "X-Request-Id trace-401-a" in text
    assert expired["Authorization"].split()[1] not in text
    assert [r.get("reason") for r in records_of(auth_server, "trace-401-a")
            if r.get("msg") == "client authentication failed"] == ["token expired (exp)"]


# --------------------------------------------------------------------------- refusing to start


def run_serve(env: dict[str, str], args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``lbp-cds serve`` expecting it to exit by itself (killed after 30 s)."""
    cmd = [*lbp_cds_command(), "serve", "--host", "127.0.0.1", "--port", str(free_port()),
           "--workers", "1", *args]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=server_environment(env), cwd=cwd, start_new_session=True)
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        stop_process_group(process)  # type: ignore[arg-type]
        out, err = process.communicate()
        pytest.fail(f"lbp-cds serve did not refuse to start:\n{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, process.returncode, out, err)


def test_refuses_to_start_without_clients(tmp_path: Path) -> None:
    result = run_serve({"LBP_CDS_PUBLIC_BASE_URL": "http://127.0.0.1:1",
                        "LBP_CDS_DATABASE_URL": f"sqlite:///{tmp_path}/s.sqlite3"}, [], tmp_path)
    assert result.returncode != 0
    assert "no trusted CDS clients" in result.stderr
    assert "LBP_CDS_CLIENTS_FILE" in result.stderr and "--dev" in result.stderr


def test_refuses_to_start_without_public_base_url(tmp_path: Path,
                                                  client_keys: CdsClientKeys) -> None:
    result = run_serve({"LBP_CDS_DATABASE_URL": f"sqlite:///{tmp_path}/s.sqlite3"},
                       ["--clients", str(client_keys.clients_file)], tmp_path)
    assert result.returncode != 0
    assert "LBP_CDS_PUBLIC_BASE_URL is required" in result.stderr


def test_refuses_to_start_with_a_private_key_in_the_jwks(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key))  # private: has "d"
    jwk.update(kid="k1")
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    (tmp_path / "clients.yaml").write_text(
        "clients:\n  - iss: https://ehr.example.org/\n    jwks_file: jwks.json\n")
    result = run_serve({"LBP_CDS_PUBLIC_BASE_URL": "http://127.0.0.1:1",
                        "LBP_CDS_DATABASE_URL": f"sqlite:///{tmp_path}/s.sqlite3"},
                       ["--clients", str(tmp_path / "clients.yaml")], tmp_path)
    assert result.returncode != 0
    assert "private key material" in result.stderr


# --------------------------------------------------------------------------- the spec's token


class TlsInterceptingProxy:
    """An HTTP proxy on loopback that answers ``CONNECT host:443`` itself, with a certificate
    for ``host`` from a test CA: the server under test "fetches" an https JWK Set URL without
    any network. Records each CONNECT target and each request path."""

    def __init__(self, folder: Path, host: str, routes: dict[str, bytes]) -> None:
        self.connects: list[str] = []
        self.requests: list[str] = []
        self.ca_file = folder / "ca.pem"
        context = self._tls_context(folder, host)
        connects, seen = self.connects, self.requests

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_CONNECT(self) -> None:  # noqa: N802
                connects.append(self.path)
                if self.path != f"{host}:443":
                    self.send_error(403)
                    return
                self.send_response(200, "Connection established")
                self.end_headers()
                tls = context.wrap_socket(self.connection, server_side=True)
                self.connection = tls
                self.rfile = tls.makefile("rb")
                self.wfile = tls.makefile("wb", buffering=0)
                self.handle_one_request()
                self.close_connection = True

            def do_GET(self) -> None:  # noqa: N802
                seen.append(self.path)
                body = routes.get(self.path)
                self.send_response(200 if body is not None else 404)
                body = body if body is not None else b"{}"
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _tls_context(self, folder: Path, host: str) -> ssl.SSLContext:
        ca_file, cert_file, key_file = tls_files(folder, host)
        assert ca_file == self.ca_file
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        return context

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def spec_token() -> str:
    text = (SPEC_DIR / "cds-hooks-2.0.1-specification.md").read_text(encoding="utf-8")
    match = re.search(r"^Authorization: Bearer (\S+)$", text, re.MULTILINE)
    assert match, "the spec's example Authorization line was not found"
    return match.group(1)


def spec_json(n: int) -> dict[str, Any]:
    return dict(json.loads(
        (SPEC_DIR / "spec-examples" / f"spec-2.0.1-example-{n}.json").read_text()))


@pytest.mark.shared
def test_spec_example_token_is_refused_as_expired(service_server: ServerFactory,
                                                  tmp_path: Path) -> None:
    """The specification's signed example JWT: a client trusting its iss and jku, whose JWK Set
    the server really fetches (through a loopback TLS-intercepting proxy), so header, iss, jku,
    key and signature all pass, and the token is refused for what is wrong with it: its exp
    (2015-01-29)."""
    header, payload, jwks = spec_json(21), spec_json(22), spec_json(23)
    token = spec_token()
    assert jwt.get_unverified_header(token) == header
    jku = header["jku"]
    host = jku.split("/")[2]
    proxy = TlsInterceptingProxy(tmp_path, host, {"/" + jku.split("/", 3)[3]:
                                                  json.dumps(jwks).encode()})
    try:
        (tmp_path / "clients.yaml").write_text(
            f"clients:\n  - iss: {payload['iss']}\n    jwks_url: {jku}\n"
            f"    tenant: '{payload['tenant']}'\n")
        server = service_server(
            env={"LBP_CDS_PUBLIC_BASE_URL": "{base_url}", "HTTPS_PROXY": proxy.url,
                 "REQUESTS_CA_BUNDLE": str(proxy.ca_file), "NO_PROXY": "127.0.0.1,localhost"},
            args=["--clients", str(tmp_path / "clients.yaml")])
        for method, path in (("POST", "/cds-services/mini-triage"), ("GET", "/cds-services")):
            request_id = uuid.uuid4().hex
            response = server.request(method, path, headers={
                "Authorization": f"Bearer {token}", "X-Request-Id": request_id},
                json=triage_request() if method == "POST" else None)
            assert_bare_401(response)
            assert [r.get("reason") for r in records_of(server, request_id)
                    if r.get("msg") == "client authentication failed"] == ["token expired (exp)"]
        # The JWK Set was fetched through the proxy (once: it is cached).
        assert proxy.connects == [f"{host}:443"] and proxy.requests == ["/jwk_uri"]
    finally:
        proxy.close()


# --------------------------------------------------------------------------- CORS


def preflight(server: ServiceServer, path: str, origin: str, method: str = "POST"
              ) -> requests.Response:
    return server.request("OPTIONS", path, headers={
        "Origin": origin, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type"})


def cors_cases(server: ServiceServer, keys: CdsClientKeys, origin: str
               ) -> dict[str, requests.Response]:
    """One response of each kind, all sent with ``Origin: origin``."""
    o = {"Origin": origin}
    service = "/cds-services/mini-triage"
    return {
        "200 discovery": server.get("/cds-services",
                                    headers=o | keys.bearer(server.url("/cds-services"))),
        "200 service": server.post(service, json=triage_request(),
                                   headers=o | keys.bearer(server.url(service))),
        "400 bad body": server.post(service, json={"hook": "patient-view"},
                                    headers=o | keys.bearer(server.url(service))),
        "401 no token": server.get("/cds-services", headers=o),
        "404 unknown service": server.post("/cds-services/nope", json={}, headers=o | keys.bearer(
            server.url("/cds-services/nope"))),
        "415 text/plain": server.post(service, data="hello", headers=o | {
            "Content-Type": "text/plain"} | keys.bearer(server.url(service))),
        "preflight service": preflight(server, service, origin),
        "preflight feedback": preflight(server, service + "/feedback", origin),
        "preflight discovery": preflight(server, "/cds-services", origin, "GET"),
    }


@pytest.mark.req("208")
def test_cors_allowlisted_origin_gets_headers_everywhere(auth_server: ServiceServer,
                                                         client_keys: CdsClientKeys) -> None:
    responses = cors_cases(auth_server, client_keys, ALLOWED_ORIGIN)
    for name, response in responses.items():
        expected = int(name.split()[0]) if name[0].isdigit() else 200
        assert response.status_code == expected, (name, response.status_code, response.text)
        assert response.headers.get("Access-Control-Allow-Origin") == ALLOWED_ORIGIN, name
        # flask-cors sends no `Vary: Origin` for a single allowed origin; harmless, as no
        # response may be cached (`Cache-Control: no-store`).
        assert response.headers.get("Cache-Control") == "no-store", name
        if name.startswith("preflight"):
            allowed_headers = response.headers["Access-Control-Allow-Headers"].lower()
            assert "authorization" in allowed_headers and "content-type" in allowed_headers
            assert {"GET", "POST"} <= set(
                response.headers["Access-Control-Allow-Methods"].replace(" ", "").split(","))
        else:
            assert "X-Request-Id" in response.headers["Access-Control-Expose-Headers"]
    assert "Access-Control-Allow-Credentials" not in responses["200 service"].headers


@pytest.mark.parametrize("origin", [OTHER_ORIGIN, "null", ALLOWED_ORIGIN + ".evil.example",
                                    "http://ehr.example.org"])
def test_cors_other_origins_get_no_headers(auth_server: ServiceServer,
                                           client_keys: CdsClientKeys, origin: str) -> None:
    for name, response in cors_cases(auth_server, client_keys, origin).items():
        assert response.status_code != 500, name
        assert not [h for h in response.headers if h.lower().startswith("access-control-")], \
            (name, dict(response.headers))


# --------------------------------------------------------------------------- limits

# Small, so that what an over-limit body leaves unread stays under the 64 KiB gunicorn drains
# after answering: beyond that it closes the connection with data unread, and the client may see
# a connection reset instead of the 413 (see test_huge_body_is_refused_or_cut_off).
MAX_BODY = 16_384
MAX_DEPTH = 16


@pytest.fixture(scope="module")
def limits_server(module_service_server: ServerFactory) -> ServiceServer:
    return module_service_server(env={"LBP_CDS_MAX_BODY_BYTES": str(MAX_BODY),
                                      "LBP_CDS_MAX_JSON_DEPTH": str(MAX_DEPTH)},
                                 args=["--dev", "--workers", "2"])


LIMIT_PATHS = ["/cds-services/mini-triage", "/cds-services/mini-triage/feedback"]


def nested(depth: int) -> str:
    """JSON text whose nesting depth is ``depth`` (``[[...]]``)."""
    return "[" * depth + "]" * depth


def big_request() -> bytes:
    body = triage_request()
    body["extension"] = {"org.example.padding": "x" * (MAX_BODY + 1000)}
    return json.dumps(body).encode()


def chunks(data: bytes, size: int = 8192) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


@pytest.mark.parametrize("path", LIMIT_PATHS)
def test_body_over_the_limit_is_413(limits_server: ServiceServer, path: str) -> None:
    response = limits_server.post(path, data=big_request(),
                                  headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert_operation_outcome(response)


@pytest.mark.parametrize("path", LIMIT_PATHS)
def test_chunked_body_over_the_limit_is_413(limits_server: ServiceServer, path: str) -> None:
    response = limits_server.post(path, data=chunks(big_request()),
                                  headers={"Content-Type": "application/json"})
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in response.request.headers
    assert response.status_code == 413
    assert_operation_outcome(response)


@pytest.mark.parametrize("chunked", [False, True])
def test_huge_body_is_refused_or_cut_off(limits_server: ServiceServer, chunked: bool) -> None:
    """8 MB: the service answers 413 without reading it all; gunicorn then closes the
    connection with data unread, so the client sees the 413 or a reset, never anything else;
    the server stays up. (An ingress body limit in front gives clients a clean 413.)"""
    data = b'{"hook": "' + b"x" * 8_000_000 + b'"}'
    try:
        response = limits_server.post("/cds-services/mini-triage",
                                      data=chunks(data, 65_536) if chunked else data,
                                      headers={"Content-Type": "application/json"})
    except requests.ConnectionError:
        pass
    else:
        assert response.status_code == 413
        assert_operation_outcome(response)
    assert limits_server.get("/healthz").status_code == 200


def test_chunked_body_within_the_limit_is_served(limits_server: ServiceServer) -> None:
    data = json.dumps(triage_request()).encode()
    response = limits_server.post("/cds-services/mini-triage", data=chunks(data, 256),
                                  headers={"Content-Type": "application/json"})
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert response.status_code == 200, response.text
    assert response.json()["cards"]


def test_depth_at_the_limit_is_served_one_more_is_400(limits_server: ServiceServer) -> None:
    def with_extension(depth: int) -> dict[str, Any]:
        # root object (1) > extension (2) > ... : `depth` levels in all
        value: Any = {"leaf": True}
        for _ in range(depth - 2):
            value = {"n": value}
        return triage_request(extension=value)

    ok = limits_server.post("/cds-services/mini-triage", json=with_extension(MAX_DEPTH))
    assert ok.status_code == 200, ok.text
    deep = limits_server.post("/cds-services/mini-triage", json=with_extension(MAX_DEPTH + 1))
    assert deep.status_code == 400
    assert assert_operation_outcome(deep)["issue"][0]["code"] == "too-costly"


@pytest.mark.parametrize("path", LIMIT_PATHS)
@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1_000, 5_000])
def test_deep_nesting_is_400(limits_server: ServiceServer, path: str, depth: int) -> None:
    response = limits_server.post(path, data=nested(depth),
                                  headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert assert_operation_outcome(response)["issue"][0]["code"] == "too-costly"


@pytest.mark.parametrize("path", LIMIT_PATHS)
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "application/xml", "multipart/form-data; boundary=x",
                                          None])
def test_non_json_media_type_is_415(limits_server: ServiceServer, path: str,
                                    content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = limits_server.post(path, data=json.dumps(triage_request()).encode(),
                                  headers=headers)
    assert response.status_code == 415
    assert_operation_outcome(response)


@pytest.mark.parametrize("path", LIMIT_PATHS)
@pytest.mark.parametrize("body", [
    b"", b"{", b'{"hook": }', b'{"a": 1,}', b"{'hook': 'patient-view'}", b"NaN",
    b'{"a": NaN}', b'{"a": Infinity}', b'\xef\xbb\xbf{"hook": "patient-view"}',
    b'{"hook": "\xff\xfe"}', b'{"hook": "\\ud800"}', b"[]", b"null", b'"patient-view"',
    b"1e999999", b'{"a": 1}{"b": 2}', b"\x00",
], ids=lambda b: repr(b)[:30])
def test_malformed_json_is_400(limits_server: ServiceServer, path: str, body: bytes) -> None:
    response = limits_server.post(path, data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, (response.status_code, response.text)
    assert_operation_outcome(response)


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8",
                                          "application/fhir+json", "APPLICATION/JSON"])
def test_json_media_type_variants_are_accepted(limits_server: ServiceServer,
                                               content_type: str) -> None:
    response = limits_server.post("/cds-services/mini-triage",
                                  data=json.dumps(triage_request()).encode(),
                                  headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text


def test_limits_never_produced_a_server_error(limits_server: ServiceServer) -> None:
    """Runs after the limit tests of this module (file order): no 5xx, no unexpected error."""
    records = log_records(limits_server)
    assert [r for r in records if r.get("level") in ("error", "critical")] == []
    assert [r for r in records if isinstance(r.get("status"), int) and r["status"] >= 500] == []
    assert "Traceback" not in limits_server.log_text()


# --------------------------------------------------------------------------- logs


class EchoingFhirServer:
    """A FHIR server that answers every GET with HTTP 500 and an OperationOutcome quoting the
    request line and the Authorization header (what a careless server might do)."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                hits.append(self.path)
                body = json.dumps({"resourceType": "OperationOutcome", "issue": [{
                    "severity": "error", "code": "exception",
                    "diagnostics": f"{self.path} {self.headers.get('Authorization')}"}]}).encode()
                self.send_response(500)
                self.send_header("Content-Type", FHIR_JSON)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_logs_hold_no_token_patient_identifier_or_name(service_server: ServerFactory,
                                                       client_keys: CdsClientKeys) -> None:
    """A whole scenario with authentication on and FHIR fetches that fail (fhirServer on a
    loopback port that refuses connections, then one answering 500), invalid requests and
    refused tokens, at log level DEBUG; then the server's whole stderr is searched."""
    patient_id = "zq7-quixote-4417"
    given, family = "Quixotica", "Featherstonehaugh"
    birth_date = "1931-07-19"
    access_token = "fhir-at-9f8e7d6c5b4a-" + uuid.uuid4().hex
    comment = f"{given} {family} declined, see chart"
    refused = free_port()  # nothing listens there
    failing = EchoingFhirServer()
    # The client may send us to both loopback FHIR servers (and only there).
    keys = CdsClientKeys(client_keys.jwks_file.parent / "with-fhir", client_fields={
        "fhir_servers": [f"http://127.0.0.1:{refused}/fhir", failing.url],
        "allow_private": True})
    client_keys = keys
    server = service_server(
        env={"LBP_CDS_PUBLIC_BASE_URL": "{base_url}", "LBP_CDS_LOG_LEVEL": "DEBUG",
             "LBP_CDS_FHIR_CONNECT_TIMEOUT_SECONDS": "1"},
        args=["--clients", str(keys.clients_file)])
    fhir = {"fhirServer": f"http://127.0.0.1:{refused}/fhir",
            "fhirAuthorization": {"access_token": access_token, "token_type": "Bearer",
                                  "expires_in": 300, "scope": "patient/*.read",
                                  "subject": "lbp-cds", "patient": patient_id}}
    person = {"name": [{"family": family, "given": [given]}], "birthDate": birth_date}
    service = "/cds-services/mini-triage"
    jwts: list[str] = []

    def bearer(path: str, **kwargs: Any) -> dict[str, str]:
        token = client_keys.token(server.url(path), **kwargs)
        jwts.append(token)
        return {"Authorization": f"Bearer {token}"}

    # 1. Required keys prefetched, the others fetched: the fetch fails, cards still come.
    first = server.post(service, headers=bearer(service), json=triage_request(
        patient_id, prefetch_keys=["patient", "conditions"], patient_extra=person, **fhir))
    assert first.status_code == 200, first.text
    # 1b. The same against a FHIR server that answers 500, echoing what it was sent.
    try:
        echoed = server.post(service, headers=bearer(service), json=triage_request(
            patient_id, prefetch_keys=["patient", "conditions"], patient_extra=person,
            **(fhir | {"fhirServer": failing.url})))
    finally:
        failing.close()
    assert echoed.status_code == 200, echoed.text
    assert failing.hits and all(patient_id in hit for hit in failing.hits)  # it was asked
    # 2. Nothing prefetched: required data cannot be fetched -> 412.
    second = server.post(service, headers=bearer(service), json=triage_request(
        patient_id, prefetch_keys=[], patient_extra=person, **fhir))
    assert second.status_code == 412, second.text
    # 3. Fever data prefetched in full: a card, then feedback with a comment naming the patient.
    third = server.post(service, headers=bearer(service),
                        json=triage_request(patient_id, patient_extra=person, **fhir))
    card = third.json()["cards"][0]
    body = feedback_body(card)
    body["feedback"][0]["overrideReason"] = {"userComment": comment}
    feedback = server.post(service + "/feedback", json=body,
                           headers=bearer(service + "/feedback"))
    assert feedback.status_code == 200, feedback.text
    # 4. Invalid requests carrying the identifiers: a reference as patientId, bad prefetch.
    invalid = triage_request(patient_id, patient_extra=person, **fhir)
    invalid["context"]["patientId"] = f"Patient/{patient_id}"
    assert server.post(service, json=invalid, headers=bearer(service)).status_code == 400
    invalid = triage_request(patient_id, patient_extra=person, **fhir)
    invalid["prefetch"]["patient"]["birthDate"] = {"value": birth_date}
    assert server.post(service, json=invalid, headers=bearer(service)).status_code in (200, 400)
    invalid = triage_request(patient_id, patient_extra=person, **fhir)
    invalid["fhirAuthorization"]["expires_in"] = access_token
    assert server.post(service, json=invalid, headers=bearer(service)).status_code == 400
    # 5. Refused tokens: a replay, an expired one, one naming the patient in claims.
    replayed = bearer(service)
    assert server.post(service, json=triage_request(patient_id), headers=replayed
                       ).status_code == 200
    assert server.post(service, json=triage_request(patient_id), headers=replayed
                       ).status_code == 401
    now = int(dt.datetime.now().timestamp())
    assert server.post(service, json=triage_request(patient_id), headers=bearer(
        service, iat=now - 900, exp=now - 600, sub=patient_id)).status_code == 401
    assert server.get("/cds-services", headers=bearer(service, patient=patient_id)
                      ).status_code == 401
    assert server.get("/metrics").status_code == 200
    metrics = server.get("/metrics").text
    # Graceful stop, so that the log is complete (shutdown lines included) when searched.
    started = time.monotonic()
    server.stop(signal.SIGTERM, timeout=30)
    assert server.process.returncode == 0, server.log_text()[-3000:]
    assert time.monotonic() - started < 25  # within gunicorn's graceful timeout (20 s)

    log = server.log_text()
    # The scenario did reach the code paths that log.
    records = log_records(server)
    messages = {r.get("msg") for r in records}
    assert {"cards issued", "prefetch key unavailable", "feedback stored", "request refused",
            "client authentication failed"} <= messages, messages
    assert any(r.get("msg") == "prefetch key unavailable" and r.get("key") == "observations"
               for r in records)
    secrets = [patient_id, given, family, birth_date, access_token, comment,
               f"Patient/{patient_id}"]
    for token in jwts:
        secrets += [token, *token.split(".")]
    for secret in secrets:
        assert secret not in log, f"{secret[:40]!r} is in the server's log"
    # Nor in the metrics, which are scraped by others.
    assert not [s for s in secrets if s in metrics]
