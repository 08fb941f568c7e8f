"""Run ``lbp-cds serve`` (gunicorn) as a real server process on 127.0.0.1 for tests.

``service_server(env=..., args=...)`` (function scope) and ``module_service_server(...)``
(module scope) start a server on a free loopback port and stop it, with all its workers, when
the test (module) ends. The server starts in a fresh process group (``start_new_session``) and is
stopped with ``killpg``: SIGTERM first, SIGKILL if it does not exit in time.

Values in ``env`` and ``args`` may use ``{port}`` and ``{base_url}``: they are filled in with the
port chosen for the server, so ``LBP_CDS_PUBLIC_BASE_URL="{base_url}"`` gives a server its own
URL as the JWT audience.

Defaults: the mini knowledge pack (``tests/knowledge_mini``), a fresh SQLite store in the
server's work folder, ``--workers 1 --threads 4``; no ``LBP_CDS_*`` variable and no proxy setting
of the test's own environment leaks into the server unless passed in ``env``. Everything the
server writes to stderr (its JSON log lines and gunicorn's) is kept in ``server.log_path``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "tests" / "knowledge_mini"
START_TIMEOUT_S = 30.0
# gunicorn's quick shutdown (SIGINT) can wait for a worker thread still blocked on a client
# connection (seen after oversized bodies); tests do not wait longer than this for it.
STOP_TIMEOUT_S = 5.0
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY",
               "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


class ServerStartError(RuntimeError):
    """The server did not come up; the message ends with its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def lbp_cds_command() -> list[str]:
    """The ``lbp-cds`` console script of the interpreter running the tests."""
    script = Path(sys.executable).with_name("lbp-cds")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from lbp_cds.cli import main; sys.exit(main())"]


def server_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test environment without ``LBP_CDS_*``, proxy and Prometheus settings, plus ``extra``.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LBP_CDS_") and k not in _PROXY_VARS
           and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(extra or {})
    return env


def http_session() -> requests.Session:
    """A session that talks to loopback directly (no proxy from the environment)."""
    session = requests.Session()
    session.trust_env = False
    return session


@dataclass
class ServiceServer:
    """One running ``lbp-cds serve``."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    workdir: Path
    env: dict[str, str]
    args: list[str]
    session: requests.Session = field(default_factory=http_session)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        return self.session.request(method, self.url(path), **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def log_text(self) -> str:
        """Everything the server wrote to stderr and stdout so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGINT, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the server and every worker (its process group); idempotent.

        SIGINT is gunicorn's quick shutdown (tests need no graceful drain); pass
        ``signal.SIGTERM`` for the graceful one. After ``timeout`` seconds the group is killed.
        """
        self.session.close()
        stop_process_group(self.process, sig, timeout)


def stop_process_group(process: subprocess.Popen[bytes], sig: int = signal.SIGINT,
                       timeout: float = STOP_TIMEOUT_S) -> None:
    """Signal the process group of ``process``, SIGKILL it if it lingers, and reap it."""
    try:
        pgid = os.getpgid(process.pid)
    except ProcessLookupError:
        pgid = None
    if pgid is not None and pgid == process.pid:  # our own group, made by start_new_session
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:  # stuck: with PYTHONFAULTHANDLER set, SIGABRT dumps every thread to the log
                os.killpg(pgid, signal.SIGABRT)
                process.wait(timeout=2)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:  # workers that outlived the master, or a master that ignored the signal
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    elif process.poll() is None:
        process.kill()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # pragma: no cover - a zombie we cannot reap
        pass


def _fill(value: str, port: int) -> str:
    return value.replace("{port}", str(port)).replace("{base_url}", f"http://127.0.0.1:{port}")


def start_service(workdir: Path, env: Mapping[str, str] | None = None,
                  args: Sequence[str] = (), *, wait_path: str = "/healthz",
                  attempts: int = 3, timeout: float = START_TIMEOUT_S) -> ServiceServer:
    """Start ``lbp-cds serve --host 127.0.0.1 --port <free> [args]`` and wait until it answers.

    Args:
        workdir: a folder for the store, the log and the server's cwd (created if needed).
        env: ``LBP_CDS_*`` settings and other variables; ``{port}``/``{base_url}`` filled in.
        args: extra ``serve`` arguments (``--dev``, ``--clients FILE``, ``--workers 2`` ...).
        wait_path: the path polled until it answers 200.
        attempts: ports tried when the chosen one was taken meanwhile.
        timeout: seconds to wait for the server to answer.

    Returns:
        The running server.

    Raises:
        ServerStartError: the server exited or did not answer in time.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    error: ServerStartError | None = None
    for attempt in range(1, attempts + 1):
        port = free_port()
        values = {"LBP_CDS_KNOWLEDGE_DIR": str(MINI),
                  "LBP_CDS_DATABASE_URL": f"sqlite:///{workdir}/store.sqlite3",
                  "LBP_CDS_LOG_LEVEL": "INFO", "PYTHONFAULTHANDLER": "1"}
        values.update({k: _fill(v, port) for k, v in (env or {}).items()})
        full_env = server_environment(values)
        filled = [_fill(a, port) for a in args]
        if "--workers" not in filled:
            filled += ["--workers", "1"]
        cmd = [*lbp_cds_command(), "serve", "--host", "127.0.0.1", "--port", str(port), *filled]
        log_path = workdir / f"server-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, cwd=workdir, env=full_env,
                                       start_new_session=True)
        server = ServiceServer(port, process, log_path, workdir, full_env, filled)
        try:
            _wait_until_up(server, wait_path, timeout)
            return server
        except ServerStartError as exc:
            server.stop()
            error = exc
            if "address already in use" not in server.log_text().lower():
                break
    assert error is not None
    raise error


def _wait_until_up(server: ServiceServer, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not server.running():
            raise ServerStartError(f"lbp-cds serve exited with {server.process.returncode} "
                                   f"before answering\n{server.log_text()[-4000:]}")
        try:
            response = server.get(path, timeout=2)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.1)
    raise ServerStartError(f"lbp-cds serve did not answer {path} within {timeout:.0f} s "
                           f"({last})\n{server.log_text()[-4000:]}")


ServerFactory = Callable[..., ServiceServer]


class _Pool:
    """Starts servers in numbered sub-folders of one work folder; stops them all at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers: list[ServiceServer] = []

    def start(self, env: Mapping[str, str] | None = None, args: Sequence[str] = (),
              **kwargs: Any) -> ServiceServer:
        folder = self.workdir / f"server-{len(self.servers) + 1}"
        server = start_service(folder, env, args, **kwargs)
        self.servers.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def service_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start ``lbp-cds serve`` processes for one test: ``service_server(env={...}, args=[...])``.
    """
    pool = _Pool(tmp_path / "servers")
    try:
        yield pool.start
    finally:
        pool.stop_all()


@pytest.fixture(scope="module")
def module_service_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Like ``service_server``, for servers shared by the tests of a module."""
    pool = _Pool(tmp_path_factory.mktemp("servers"))
    try:
        yield pool.start
    finally:
        pool.stop_all()


# ------------------------------------------------------------------ a CDS client and its keys


class CdsClientKeys:
    """A CDS client for tests: an EC P-384 key (kid ``ec-1``, ES384) and an RSA key (kid
    ``rsa-1``, RS384), their public JWK Set in a file, and a clients YAML trusting them.

    Args:
        folder: where ``jwks.json`` and ``clients.yaml`` are written.
        iss: the client's ``iss``.
        extra_clients: more entries for the clients YAML (``{"iss": ..., "jwks_url": ...}``).
        client_fields: more fields of this client's entry (``fhir_servers``, ``allow_private``).
    """

    def __init__(self, folder: Path, iss: str = "https://ehr.test.example/",
                 extra_clients: Sequence[Mapping[str, Any]] = (),
                 client_fields: Mapping[str, Any] | None = None) -> None:
        import json

        import yaml
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from jwt.algorithms import ECAlgorithm, RSAAlgorithm

        folder.mkdir(parents=True, exist_ok=True)
        self.iss = iss
        self.ec_key = ec.generate_private_key(ec.SECP384R1())
        self.rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ec_jwk = json.loads(ECAlgorithm.to_jwk(self.ec_key.public_key()))
        rsa_jwk = json.loads(RSAAlgorithm.to_jwk(self.rsa_key.public_key()))
        ec_jwk.update(kid="ec-1", alg="ES384", use="sig")
        rsa_jwk.update(kid="rsa-1", alg="RS384", use="sig")
        self.jwks = {"keys": [ec_jwk, rsa_jwk]}
        self.jwks_file = folder / "jwks.json"
        self.jwks_file.write_text(json.dumps(self.jwks), encoding="utf-8")
        self.clients_file = folder / "clients.yaml"
        entries = [{"iss": iss, "jwks_file": self.jwks_file.name, **dict(client_fields or {})},
                   *map(dict, extra_clients)]
        self.clients_file.write_text(yaml.safe_dump({"clients": entries}), encoding="utf-8")

    def claims(self, aud: str | list[str], **overrides: Any) -> dict[str, Any]:
        """Valid claims for ``aud`` now; an override of ``None`` drops the claim."""
        import uuid

        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.iss, "aud": aud, "iat": now, "exp": now + 300,
                                  "jti": str(uuid.uuid4())}
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, aud: str | list[str], alg: str = "ES384", *,
              headers: Mapping[str, Any] | None = None, key: Any = None,
              **overrides: Any) -> str:
        """A signed JWT (ES384 with ``ec-1`` or RS384 with ``rsa-1`` unless told otherwise)."""
        import jwt

        if key is None:
            key = self.ec_key if alg.startswith("ES") else self.rsa_key
        header = {"typ": "JWT", "kid": "ec-1" if alg.startswith("ES") else "rsa-1"}
        header.update(headers or {})
        return jwt.encode(self.claims(aud, **overrides), key, algorithm=alg, headers=header)

    def bearer(self, aud: str | list[str], alg: str = "ES384", **kwargs: Any) -> dict[str, str]:
        """An ``Authorization`` header with a fresh token for ``aud``."""
        return {"Authorization": f"Bearer {self.token(aud, alg, **kwargs)}"}


# ------------------------------------------------------------------ hook requests for the mini pack


def triage_request(patient_id: str = "p1", *, fever: bool = True,
                   prefetch_keys: Sequence[str] | None = None,
                   patient_extra: Mapping[str, Any] | None = None,
                   **extra: Any) -> dict[str, Any]:
    """A patient-view request for ``mini-triage``: back pain (M54.41) and, with ``fever``, a
    temperature of 38.6 Cel yesterday, which gives a FEV card (dates relative to the real clock,
    as a server under test runs on it).

    Args:
        patient_id: ``context.patientId`` and the subject of every resource.
        fever: add the temperature observation.
        prefetch_keys: the keys to prefetch (default all five); the others are left out, so the
            service fetches them from ``fhirServer``.
        patient_extra: fields added to the Patient resource (name, birthDate ...).
        **extra: top-level request fields (``fhirServer``, ``fhirAuthorization`` ...).
    """
    import uuid
    from datetime import datetime, timedelta, timezone

    now = datetime.now(timezone.utc)
    subject = {"reference": f"Patient/{patient_id}"}
    patient = {"resourceType": "Patient", "id": patient_id, "gender": "female",
               "birthDate": "1970-01-01", **dict(patient_extra or {})}
    condition = {"resourceType": "Condition", "id": "c1", "subject": subject,
                 "clinicalStatus": {"coding": [{
                     "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                     "code": "active"}]},
                 "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm",
                                      "code": "M54.41"}]},
                 "onsetDateTime": (now - timedelta(days=10)).strftime("%Y-%m-%d")}
    observations = []
    if fever:
        observations.append({
            "resourceType": "Observation", "id": "o1", "status": "final", "subject": subject,
            "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]},
            "effectiveDateTime": (now - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "valueQuantity": {"value": 38.6, "unit": "Cel", "system": "http://unitsofmeasure.org",
                              "code": "Cel"}})

    def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "searchset",
                "entry": [{"resource": r} for r in resources]}

    prefetch = {"patient": patient, "conditions": bundle(condition),
                "observations": bundle(*observations), "medications": bundle(),
                "questionnaireResponses": bundle()}
    if prefetch_keys is not None:
        prefetch = {k: v for k, v in prefetch.items() if k in prefetch_keys}
    request: dict[str, Any] = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
                               "context": {"userId": "Practitioner/example",
                                           "patientId": patient_id},
                               "prefetch": prefetch}
    request.update(extra)
    return request


def feedback_body(card: Mapping[str, Any], outcome: str = "overridden",
                  timestamp: str = "2026-03-02T10:05:31Z") -> dict[str, Any]:
    """A feedback body about one issued card."""
    item: dict[str, Any] = {"card": card["uuid"], "outcome": outcome,
                            "outcomeTimestamp": timestamp}
    if outcome == "accepted":
        item["acceptedSuggestions"] = [{"id": s["uuid"]} for s in card.get("suggestions", [])
                                       if "uuid" in s][:1]
    else:
        reasons = card.get("overrideReasons") or []
        item["overrideReason"] = ({"reason": reasons[0]} if reasons
                                  else {"userComment": "not relevant"})
    return {"feedback": [item]}
