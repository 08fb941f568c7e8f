"""Where the service may fetch FHIR (``lbp_cds.egress``), through the app and unit by unit.

No test here sends a packet anywhere but loopback. Host names are mapped to the addresses a test
needs by an injected resolver (the app's ``resolver``), and the autouse guard ``loopback_only``
fails the test if anything asks the system resolver for a name or connects a socket to an
address that is not loopback. Refusals happen before any connection, and the guard proves it.
The FHIR servers that answer are small HTTP servers on 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask
from jwt.algorithms import ECAlgorithm

from lbp_cds import create_app
from lbp_cds.config import Settings
from lbp_cds.egress import (
    EgressRule,
    address_kind,
    approve,
    parse_base,
)
from lbp_cds.errors import FhirServerRefused
from tests.builders import tls_files
from tests.conftest import MINI
from tests.service_server import triage_request

ISS = "https://ehr.test.example/"
PUBLIC = "https://cds.test.example"
SERVICE = "/cds-services/mini-triage"
HOSPITAL = "fhir.hospital.example"  # never resolved by the system: the tests map it


# --------------------------------------------------------------------------- the guard


def _is_literal(host: object) -> bool:
    try:
        ipaddress.ip_address(str(host).split("%", 1)[0])
        return True
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Fail the test on a connection to anything but loopback or a system name lookup."""
    attempts: list[Any] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def allowed(address: Any) -> bool:
        if not isinstance(address, tuple):
            return True  # a Unix socket path
        host = str(address[0]).split("%", 1)[0]
        return _is_literal(host) and ipaddress.ip_address(host).is_loopback

    def connect(self: socket.socket, address: Any) -> Any:
        if not allowed(address):
            attempts.append(("connect", address))
            raise AssertionError(f"a test tried to connect to {address}")
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> Any:
        if not allowed(address):
            attempts.append(("connect", address))
            raise AssertionError(f"a test tried to connect to {address}")
        return real_connect_ex(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not _is_literal(host):
            attempts.append(("resolve", host))
            raise AssertionError(f"a test asked the system resolver for {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts
    assert attempts == [], f"network outside loopback was attempted: {attempts}"


class Resolver:
    """A ``socket.getaddrinfo`` stand-in: host name -> addresses (in order); records calls.

    ``then`` gives the answers of later calls (a DNS-rebinding attacker's second answer).
    """

    def __init__(self, names: dict[str, list[str]] | None = None,
                 then: dict[str, list[str]] | None = None) -> None:
        self.names = names or {}
        self.then = then
        self.calls: list[str] = []

    def __call__(self, host: str, port: Any, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        self.calls.append(host)
        table = self.then if self.then is not None and len(self.calls) > 1 else self.names
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out: list[tuple[Any, ...]] = []
        for address in table[host]:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sockaddr = (address, int(port or 0), 0, 0) if ":" in address else (address,
                                                                               int(port or 0))
            out.append((family, socket.SOCK_STREAM, 6, "", sockaddr))
        return out


# --------------------------------------------------------------------------- a FHIR server


class Fhir:
    """A FHIR server on 127.0.0.1 for the mini pack's patient p1; records (path, Host,
    Authorization) of every request. ``answer`` overrides the answer by path prefix."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []
        self.answer: dict[str, tuple[int, dict[str, str], Any]] = {}
        fhir = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                fhir.seen.append((self.path, self.headers.get("Host", ""),
                                  self.headers.get("Authorization", "")))
                status, headers, doc = fhir.route(self.path)
                body = json.dumps(doc).encode()
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/fhir+json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/fhir"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def route(self, path: str) -> tuple[int, dict[str, str], Any]:
        for prefix, answer in sorted(self.answer.items(), key=lambda a: -len(a[0])):
            if path.startswith(prefix):
                return answer
        full = triage_request()["prefetch"]
        for key, kind in (("conditions", "Condition"), ("observations", "Observation"),
                          ("medications", "MedicationRequest"),
                          ("questionnaireResponses", "QuestionnaireResponse")):
            if path.startswith(f"/fhir/{kind}"):
                return 200, {}, full[key]
        if path.startswith("/fhir/Patient/p1"):
            return 200, {}, full["patient"]
        return 404, {}, {"resourceType": "OperationOutcome", "issue": []}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fhir() -> Iterator[Fhir]:
    server = Fhir()
    yield server
    server.close()


# --------------------------------------------------------------------------- apps


class Client:
    """A trusted CDS client: an ES384 key, and the clients file entry the test gives it."""

    def __init__(self, folder: Path) -> None:
        self.key = ec.generate_private_key(ec.SECP384R1())
        jwk = json.loads(ECAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid="k1", alg="ES384", use="sig")
        self.folder = folder
        (folder / "jwks.json").write_text(json.dumps({"keys": [jwk]}))

    def clients_file(self, **entry: Any) -> Path:
        path = self.folder / f"clients-{uuid.uuid4().hex[:8]}.yaml"
        path.write_text(yaml.safe_dump(
            {"clients": [{"iss": ISS, "jwks_file": "jwks.json", **entry}]}))
        return path

    def headers(self, path: str = SERVICE) -> dict[str, str]:
        now = int(time.time())
        token = jwt.encode({"iss": ISS, "aud": PUBLIC + path, "iat": now, "exp": now + 300,
                            "jti": str(uuid.uuid4())}, self.key, algorithm="ES384",
                           headers={"kid": "k1", "typ": "JWT"})
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def cds_client(tmp_path: Path) -> Client:
    return Client(tmp_path)


AppFactory = Callable[..., Flask]


@pytest.fixture
def make(tmp_path: Path, cds_client: Client) -> Iterator[AppFactory]:
    """``make(resolver, **client_entry)``: an app with authentication on, trusting
    ``cds_client`` with that entry; ``make(resolver, dev=True)``: a dev-mode app."""
    apps: list[Flask] = []

    def build(resolver: Resolver | None = None, dev: bool = False, **entry: Any) -> Flask:
        db = tmp_path / f"store-{len(apps)}.sqlite3"
        if dev:
            settings = Settings(dev=True, database_url=f"sqlite:///{db}", knowledge_dir=str(MINI),
                                fhir_connect_timeout_seconds=1, fhir_deadline_seconds=3)
        else:
            settings = Settings(database_url=f"sqlite:///{db}", knowledge_dir=str(MINI),
                                clients_file=str(cds_client.clients_file(**entry)),
                                public_base_url=PUBLIC, fhir_connect_timeout_seconds=1,
                                fhir_deadline_seconds=3)
        app = create_app(settings, resolver=resolver or Resolver())
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["lbp_cds"].store.engine.dispose()


TOKEN = "fhir-access-token-123"
AUTHORIZATION = {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 300,
                 "scope": "patient/*.read", "subject": "lbp-cds", "patient": "p1"}


def call(app: Flask, client: Client | None, fhir_server: str, *,
         prefetch_keys: list[str] | None = None, token: bool = True,
         **extra: Any) -> Any:
    """POST a mini-triage call that must fetch what is not in ``prefetch_keys`` (default:
    only the Patient is prefetched)."""
    body = triage_request(prefetch_keys=["patient"] if prefetch_keys is None else prefetch_keys,
                          fhirServer=fhir_server, **extra)
    if token:
        body["fhirAuthorization"] = AUTHORIZATION
    headers = client.headers() if client is not None else {}
    return app.test_client().post(SERVICE, json=body, headers=headers)


def refused(response: Any, *words: str) -> str:
    assert response.status_code == 400, (response.status_code, response.get_data(as_text=True))
    issue = response.json["issue"][0]
    assert issue["code"] == "forbidden" and issue["expression"] == ["fhirServer"], issue
    for word in words:
        assert word in issue["diagnostics"], issue["diagnostics"]
    return str(issue["diagnostics"])


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("address", "kind"), [
    ("169.254.169.254", "link-local"),   # the cloud metadata service
    ("10.1.2.3", "private"),
    ("192.168.1.10", "private"),
    ("172.16.0.1", "private"),
    ("fc00::1", "private"),              # fc00::/7, unique local
    ("fd12:3456::1", "private"),
    ("fe80::1", "link-local"),
    ("::ffff:10.0.0.1", "private"),      # IPv4-mapped IPv6
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("127.0.0.1", "loopback"),
    ("::1", "loopback"),
    ("100.64.0.1", "shared"),
    ("240.0.0.1", "reserved"),
])
def test_forbidden_address_as_literal_and_as_a_resolved_name_is_refused_before_connecting(
        make: AppFactory, cds_client: Client, address: str, kind: str) -> None:
    literal_host = f"[{address}]" if ":" in address else address
    literal = f"http://{literal_host}:8080/fhir"
    named = f"https://{HOSPITAL}/r4"
    resolver = Resolver({HOSPITAL: [address]})
    app = make(resolver, fhir_servers=[literal, named])
    refused(call(app, cds_client, literal), f"a {kind} address", "nothing was fetched")
    assert resolver.calls == []  # a literal is never resolved
    refused(call(app, cds_client, named), HOSPITAL, address, f"a {kind} address")
    assert resolver.calls == [HOSPITAL]


def test_a_name_with_one_forbidden_address_among_public_ones_is_refused(
        make: AppFactory, cds_client: Client) -> None:
    resolver = Resolver({HOSPITAL: ["93.184.216.34", "2606:2800:220:1::1", "10.0.0.7"]})
    app = make(resolver, fhir_servers=[f"https://{HOSPITAL}/r4"])
    refused(call(app, cds_client, f"https://{HOSPITAL}/r4"), "10.0.0.7", "private")


@pytest.mark.parametrize("fhir_server", [
    "https://other.example/fhir",             # another host
    f"http://{HOSPITAL}/r4",                   # another scheme
    f"https://{HOSPITAL}:8443/r4",             # another port
    f"https://{HOSPITAL}/r4-evil",             # not a whole path segment
    f"https://{HOSPITAL}/",                    # above the listed path
    f"https://{HOSPITAL}.evil.example/r4",     # a suffix of the host
])
def test_fhir_server_outside_the_clients_list_is_400_before_anything(
        make: AppFactory, cds_client: Client, fhir: Fhir, fhir_server: str) -> None:
    resolver = Resolver({HOSPITAL: ["127.0.0.1"]})
    app = make(resolver, fhir_servers=[f"https://{HOSPITAL}/r4"], allow_private=True)
    text = refused(call(app, cds_client, fhir_server), "is not one of the FHIR servers",
                   f"https://{HOSPITAL}:443/r4")
    assert TOKEN not in text
    # Refused even when nothing needs fetching (everything prefetched): the same answer always.
    refused(call(app, cds_client, fhir_server, prefetch_keys=list(triage_request()["prefetch"])))
    assert resolver.calls == [] and fhir.seen == []


def test_client_without_fhir_servers_may_not_name_any(make: AppFactory, cds_client: Client,
                                                      fhir: Fhir) -> None:
    app = make(Resolver())
    refused(call(app, cds_client, fhir.url), "fhir_servers in the clients file: none")
    assert fhir.seen == []


def test_redirect_to_a_private_address_is_not_followed(
        make: AppFactory, cds_client: Client, fhir: Fhir) -> None:
    fhir.answer["/fhir/Condition"] = (302, {"Location": "http://10.0.0.1/fhir/Condition"}, {})
    app = make(Resolver(), fhir_servers=[fhir.url], allow_private=True)
    response = call(app, cds_client, fhir.url)
    assert response.status_code == 412, response.get_data(as_text=True)
    issue = response.json["issue"][0]
    assert issue["expression"] == ["prefetch.conditions"]
    assert "HTTP 302" in issue["diagnostics"] and "not followed" in issue["diagnostics"]
    assert [p for p, _, _ in fhir.seen if p.startswith("/fhir/Condition")]  # asked once


def test_next_links_away_from_the_approved_server_are_not_fetched(
        make: AppFactory, cds_client: Client, fhir: Fhir) -> None:
    """A FHIR server's next link, and a next link in the EHR's own prefetch, that point at a
    private address: neither is fetched (and the token never leaves)."""
    full = triage_request()["prefetch"]
    page = dict(full["conditions"], link=[{"relation": "next",
                                           "url": "http://10.0.0.1/fhir/Condition?page=2"}])
    fhir.answer["/fhir/Condition"] = (200, {}, page)
    prefetched = dict(full["observations"], link=[{"relation": "next",
                                                   "url": "http://169.254.169.254/latest"}])
    app = make(Resolver(), fhir_servers=[fhir.url], allow_private=True)
    body = triage_request(prefetch_keys=["patient"], fhirServer=fhir.url,
                          fhirAuthorization=AUTHORIZATION)
    body["prefetch"]["observations"] = prefetched
    response = app.test_client().post(SERVICE, json=body, headers=cds_client.headers())
    assert response.status_code == 412, response.get_data(as_text=True)
    assert "next link pointed away" in response.json["issue"][0]["diagnostics"]


# --------------------------------------------------------------------------- allowed


def test_loopback_with_explicit_allowance_is_fetched_with_the_token(
        make: AppFactory, cds_client: Client, fhir: Fhir) -> None:
    app = make(Resolver(), fhir_servers=[fhir.url], allow_private=True)
    response = call(app, cds_client, fhir.url)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert [c["summary"] for c in response.json["cards"]]  # the fever came by fetch
    assert {auth for _, _, auth in fhir.seen} == {f"Bearer {TOKEN}"}


def test_loopback_without_allowance_is_refused(make: AppFactory, cds_client: Client,
                                               fhir: Fhir) -> None:
    app = make(Resolver(), fhir_servers=[fhir.url])
    refused(call(app, cds_client, fhir.url), "loopback", "allow_private: true")
    assert fhir.seen == []


def test_a_name_is_connected_at_its_checked_address_keeping_the_name(
        make: AppFactory, cds_client: Client, fhir: Fhir) -> None:
    """A host name the test maps to 127.0.0.1: allowed only with allow_private, and then the
    connection goes to the checked address (the system resolver is never asked: the guard)
    while the Host header keeps the name."""
    named = f"http://{HOSPITAL}:{fhir.port}/fhir"
    resolver = Resolver({HOSPITAL: ["127.0.0.1"]})
    refused(call(make(resolver, fhir_servers=[named]), cds_client, named), "loopback")
    assert fhir.seen == []
    app = make(resolver, fhir_servers=[named], allow_private=True)
    response = call(app, cds_client, named)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert fhir.seen and {host for _, host, _ in fhir.seen} == {f"{HOSPITAL}:{fhir.port}"}


def test_dns_rebinding_gets_no_second_answer(make: AppFactory, fhir: Fhir) -> None:
    """The name is resolved once per call and that address is the one connected: an attacker's
    second answer (10.0.0.1) is never asked for, though four keys are fetched in parallel."""
    named = f"http://{HOSPITAL}:{fhir.port}/fhir"
    resolver = Resolver({HOSPITAL: ["127.0.0.1"]}, then={HOSPITAL: ["10.0.0.1"]})
    app = make(resolver, dev=True)
    response = call(app, None, named)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert resolver.calls == [HOSPITAL]
    assert len(fhir.seen) >= 4
    # The next call resolves again, gets the private address, and is refused before connecting.
    seen = len(fhir.seen)
    refused(call(app, None, named), "10.0.0.1", "private")
    assert len(fhir.seen) == seen


def test_dev_mode_allows_loopback_and_refuses_the_rest(make: AppFactory, fhir: Fhir) -> None:
    resolver = Resolver({HOSPITAL: ["192.168.0.5"]})
    app = make(resolver, dev=True)
    assert call(app, None, fhir.url).status_code == 200
    refused(call(app, None, "http://169.254.169.254/latest"), "link-local")
    refused(call(app, None, "http://10.0.0.1/fhir"), "private")
    refused(call(app, None, f"https://{HOSPITAL}/fhir"), "192.168.0.5")
    refused(call(app, None, "http://user:pw@127.0.0.1/fhir"), "user info")


def test_a_name_that_does_not_resolve_is_an_unreachable_server(make: AppFactory) -> None:
    app = make(Resolver(), dev=True)
    response = call(app, None, f"https://{HOSPITAL}/fhir")
    assert response.status_code == 412
    assert "could not be resolved" in response.json["issue"][0]["diagnostics"]


# --------------------------------------------------------------------------- units


def test_prefix_match_is_on_scheme_host_port_and_whole_segments() -> None:
    rule = EgressRule.for_client(ISS, ["https://EHR.example.org/fhir/r4/"], False)
    for ok in ("https://ehr.example.org/fhir/r4", "https://ehr.example.org:443/fhir/r4/",
               "https://ehr.example.org/fhir/r4/tenant-1", "https://ehr.example.org./fhir/r4"):
        rule.check_url(ok)
    for bad in ("https://ehr.example.org/fhir/r4b", "https://ehr.example.org/fhir",
                "http://ehr.example.org/fhir/r4", "https://ehr.example.org:8443/fhir/r4",
                "https://ehr.example.org/fhir/r4/../../admin",
                "https://ehr.example.org/fhir/r4/%2e%2e/x",
                "https://x@ehr.example.org/fhir/r4", "ftp://ehr.example.org/fhir/r4",
                "https://ehr.example.org.evil.example/fhir/r4"):
        with pytest.raises(FhirServerRefused):
            rule.check_url(bad)


def test_address_kinds() -> None:
    assert address_kind("93.184.216.34") == "public"
    assert address_kind("2606:2800:220:1::1") == "public"
    assert address_kind("::ffff:93.184.216.34") == "public"
    assert address_kind("2002:a00:1::") == "private"       # 6to4 of 10.0.0.1
    assert address_kind("64:ff9b::a9fe:a9fe") == "link-local"  # NAT64 of 169.254.169.254
    assert address_kind("fe80::1%eth0") == "link-local"


def test_approve_pins_the_first_address_and_limits_paths() -> None:
    rule = EgressRule.for_client(ISS, [f"https://{HOSPITAL}/r4", "https://other.example/"], False)
    approved = approve(f"https://{HOSPITAL}/r4/", rule,
                       Resolver({HOSPITAL: ["93.184.216.34", "93.184.216.35"]}))
    assert approved.address == "93.184.216.34"
    approved.check(f"https://{HOSPITAL}/r4/Condition?patient=p1")
    for bad in (f"https://{HOSPITAL}/admin", "https://other.example/r4",
                f"http://{HOSPITAL}/r4/Condition"):
        with pytest.raises(ValueError):
            approved.check(bad)
    assert parse_base("https://a.example").path == ""


def test_the_guard_catches_a_stray_connection(loopback_only: list[Any]) -> None:
    """The guard is what makes the refusals above proofs: it does see a connection attempt."""
    with pytest.raises(AssertionError, match="connect to"):
        socket.create_connection(("10.0.0.1", 80), timeout=0.1)
    with pytest.raises(AssertionError, match="system resolver"):
        socket.getaddrinfo(HOSPITAL, 443)
    assert [kind for kind, _ in loopback_only] == ["connect", "resolve"]
    loopback_only.clear()


@pytest.mark.parametrize(("token", "says"), [
    (False, "no access token was sent (the request has no fhirAuthorization)"),
    (True, "it refused the access token of fhirAuthorization"),
])
def test_fhir_server_answering_401_is_a_412_saying_whether_a_token_was_sent(
        make: AppFactory, fhir: Fhir, token: bool, says: str) -> None:
    fhir.answer["/fhir/"] = (401, {}, {"resourceType": "OperationOutcome", "issue": []})
    response = call(make(Resolver(), dev=True), None, fhir.url, token=token)
    assert response.status_code == 412, response.get_data(as_text=True)
    issues = response.json["issue"]
    assert {i["expression"][0] for i in issues} == {"prefetch.conditions"}
    assert all(i["code"] == "security" and says in i["diagnostics"] for i in issues), issues


# --------------------------------------------------------------------------- https, pinned


def test_https_to_a_pinned_address_checks_the_certificate_against_the_name(
        tmp_path: Path, fhir: Fhir) -> None:
    """TLS to a name mapped to 127.0.0.1: the socket goes to the checked address, SNI and the
    certificate check use the name; a certificate for another name is refused."""
    import ssl

    from lbp_cds.fhir_data import FetchPolicy, FhirFetcher

    ca_file, cert_file, key_file = tls_files(tmp_path, HOSPITAL)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    names: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)  # type: ignore[assignment]
    fhir.httpd.socket = context.wrap_socket(fhir.httpd.socket, server_side=True)
    policy = FetchPolicy(connect_timeout=2, read_timeout=2, deadline=4)
    rule = EgressRule(None, frozenset({"loopback"}), "test")
    urls = {"patient": ("Patient/p1", "Patient")}

    def fetch(host: str) -> Any:
        fetcher = FhirFetcher(None, policy, resolver=Resolver({host: ["127.0.0.1"]}))
        fetcher.session.verify = str(ca_file)
        base = f"https://{host}:{fhir.port}/fhir"
        approved = fetcher.approve(base, rule)
        try:
            return fetcher.fetch_all(base, None, urls, time.monotonic() + 4, approved)["patient"]
        finally:
            fetcher.session.close()
            fetcher.executor.shutdown()

    resources, status = fetch(HOSPITAL)
    assert status.state == "fetched" and resources and resources[0]["id"] == "p1"
    assert names[-1] == HOSPITAL and fhir.seen[-1][1] == f"{HOSPITAL}:{fhir.port}"
    seen = len(fhir.seen)
    resources, status = fetch("other.hospital.example")  # same address, wrong certificate
    assert resources is None and "could not be reached" in status.reason
    assert len(fhir.seen) == seen
