"""A real FHIR R4 server (sekmet-fhir) for the test suite.

The server runs as a subprocess from its own virtual environment (``.cache/sekmet-venv`` under the
project root): sekmet pins ``fhir.resources>=8,<9`` and brings FastAPI/uvicorn, none of which
belong in the project's own environment.  The virtual environment is created once and reused
while its marker file names the pinned version below.

Fixtures (register with ``pytest_plugins = ["tests.fhir_server"]`` in ``tests/conftest.py``):

``fhir_server``
    One server for the whole session: bearer auth with a random token, simulator off, relative
    references, empty store.  Tests load what they need; load Synthea bundles through
    :func:`prepare_transaction` so that loading the same patient twice is harmless.
``fhir_server_factory``
    Starts further servers with settings merged over the defaults, e.g.
    ``fhir_server_factory({"server_behaviour": {"absolute_references": True}})``.  Every server it
    starts is stopped at the end of the session.

What sekmet 0.1.1 does (read from its source and checked against the running server):

* Paging: 20 entries a page by default (``sekmet.fhir.search.DEFAULT_COUNT``, not a setting);
  ``_count`` sets it per request and is silently clamped to 1000.  ``next``/``last`` links are
  absolute, carry ``_count`` and ``_offset``, and repeat only the parameters it understood.
* ``server_behaviour.absolute_references: true`` rewrites every relative literal reference in
  response bodies to ``{base_url}/Type/id``.  ``fullUrl`` is always absolute.
* ``server_auth.types``: any of ``none``, ``basic`` (``users: {name: password}``), ``bearer``
  (``tokens: [...]``) and ``smart`` (client_credentials at ``{root}/auth/token`` for
  ``smart_clients``; HS256 access tokens living ``token_lifetime`` seconds).  A missing header, an
  unknown static token, a bad Basic password, an expired or malformed SMART token all answer
  **401** with ``WWW-Authenticate`` and an OperationOutcome (issue code ``login``, or ``expired``
  for an expired SMART token).  A SMART token whose scopes do not cover the request answers 403.
  ``GET /metadata`` never needs credentials.
* Errors: read of a missing resource 404 (``not-found``); unknown resource type 404
  (``not-supported``); an unknown search parameter is *ignored* with 200 and an OperationOutcome
  entry (``search.mode = "outcome"``, severity ``warning``) unless the request says
  ``Prefer: handling=strict``, which turns it into 400.  A malformed date value or a non-integer
  ``_count`` is 400 either way; a GET on the base URL (system search) is 400.
* Transactions are atomic (400/404/409 OperationOutcome, everything rolled back) and validate
  every resource against the R4B models (strict by default, ``validation.inbound``).
* POST entries get new server ids: a Synthea bundle loaded as it is keeps none of its ids.
  Conditional references (``Practitioner?identifier=...``) in a transaction are resolved before
  any entry runs, so they only find resources stored by an earlier request.
* A reference search accepts ``patient=id``, ``patient=Patient/id`` and the absolute URL.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import secrets
import shutil
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
import yaml

#: The sekmet-fhir release the tests run against.  Bump deliberately: its behaviour is asserted.
SEKMET_VERSION = "0.1.1"
SEKMET_REQUIREMENT = f"sekmet-fhir=={SEKMET_VERSION}"

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VENV_DIR = PROJECT_ROOT / ".cache" / "sekmet-venv"
MARKER_FILE = VENV_DIR / ".lbp-cds-sekmet-installed"
INSTALL_LOG = PROJECT_ROOT / ".cache" / "sekmet-install.log"

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
INSTALL_TIMEOUT_S = 900.0
REQUEST_TIMEOUT_S = 60.0
LOG_TAIL_CHARS = 4000
FHIR_JSON = "application/fhir+json"

#: Environment variables sekmet reads to override its settings file; never inherited.
_SEKMET_ENV_OVERRIDES = (
    "SEKMET_CONFIG",
    "SEKMET_BASE_URL",
    "SEKMET_PORT",
    "SEKMET_DB",
    "SEKMET_PUBLIC_URL",
)

ServerFactory = Callable[..., "FhirServer"]


class FhirServerError(RuntimeError):
    """A FHIR interaction answered with an error status.

    Attributes:
        status: The HTTP status code.
        outcome: The OperationOutcome (or other JSON body) the server sent, if any.
    """

    def __init__(self, message: str, status: int, outcome: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.outcome = outcome


class SekmetSetupError(RuntimeError):
    """Installing or starting sekmet failed; the message carries the tail of its log."""


# -------------------------------------------------------------------------------- helpers


def log_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """Return the end of a log file, for failure messages.

    Args:
        path: The log file.
        chars: How many characters from its end to return.

    Returns:
        The last ``chars`` characters, or a note that the file is missing.
    """
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log at {path}: {exc}>"
    return text[-chars:] if len(text) > chars else text


def free_port() -> int:
    """Ask the kernel for a free TCP port on 127.0.0.1.

    Returns:
        A port number that was free a moment ago (another process may still take it first).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def outcome_text(body: Any) -> str:
    """Summarise an OperationOutcome's issues as one line.

    Args:
        body: A decoded JSON body, normally an OperationOutcome.

    Returns:
        ``"severity/code: diagnostics; ..."`` for each issue, or the body itself as JSON otherwise.
    """
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        return "; ".join(
            f"{i.get('severity')}/{i.get('code')}: {i.get('diagnostics', '')}"
            for i in body.get("issue", [])
        )
    return json.dumps(body)[:2000]


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Merge nested mappings; values in ``overrides`` win, dictionaries are merged key by key.

    Args:
        base: The defaults.
        overrides: The values to lay over them.

    Returns:
        A new dictionary; neither argument is modified.
    """
    merged: dict[str, Any] = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def prepare_transaction(bundle: Mapping[str, Any]) -> dict[str, Any]:
    """Make a Synthea transaction bundle keep its ids and load idempotently.

    Synthea's R4 bundles load into sekmet as they are, but every entry is ``POST Type`` with a
    ``urn:uuid`` fullUrl, so the server assigns new ids: the patient id in the file is then unknown
    to the server, and loading the same bundle twice (as several tests on one session server will)
    duplicates the patient, its shared Organizations and Practitioners.  This turns each such entry
    into ``PUT Type/<resource.id>``; sekmet still rewrites the ``urn:uuid`` references to
    ``Type/id`` because the fullUrl stays.  Entries with ``ifNoneExist`` (conditional creates, as in
    newer Synthea exports) and entries without a resource id are left as they are.

    Args:
        bundle: A FHIR ``transaction`` Bundle.

    Returns:
        A new Bundle; the argument is not modified.
    """
    out: dict[str, Any] = copy.deepcopy(dict(bundle))
    for entry in out.get("entry", []) or []:
        request = entry.get("request") or {}
        resource = entry.get("resource") or {}
        rtype, rid = resource.get("resourceType"), resource.get("id")
        if (
            request.get("method", "").upper() == "POST"
            and not request.get("ifNoneExist")
            and rtype
            and rid
            and request.get("url", "").strip("/") == rtype
        ):
            entry["request"] = {"method": "PUT", "url": f"{rtype}/{rid}"}
    return out


def bundle_patient_id(bundle: Mapping[str, Any]) -> str:
    """Return the id of the (first) Patient resource in a bundle.

    Args:
        bundle: A Bundle with a Patient entry.

    Returns:
        The Patient's ``id``.

    Raises:
        ValueError: When the bundle has no Patient with an id.
    """
    for entry in bundle.get("entry", []) or []:
        resource = entry.get("resource") or {}
        if resource.get("resourceType") == "Patient" and resource.get("id"):
            return str(resource["id"])
    raise ValueError("bundle has no Patient with an id")


# ------------------------------------------------------------------------ the server handle


@dataclass
class FhirServer:
    """A running sekmet server and a small authenticated client for it.

    Attributes:
        base_url: The FHIR base, e.g. ``http://127.0.0.1:PORT/fhir`` (no trailing slash).
        token: The static bearer token it accepts, or ``None`` when it runs without bearer auth.
        log_path: File receiving the server's stdout and stderr.
        settings: The settings it was started with (as written to its YAML file).
        settings_path: The YAML file itself.
        process: The server's process.
    """

    base_url: str
    token: str | None
    log_path: Path
    settings: dict[str, Any]
    settings_path: Path
    process: subprocess.Popen[bytes]
    _http: requests.Session = field(default_factory=requests.Session, repr=False)

    @property
    def root_url(self) -> str:
        """The server root (``base_url`` without ``/fhir``), where ``/auth/token`` lives."""
        return self.base_url[: -len("/fhir")] if self.base_url.endswith("/fhir") else self.base_url

    def headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Build request headers: FHIR JSON, the bearer token when there is one, then ``extra``.

        Args:
            extra: Headers to add or override (e.g. ``{"Prefer": "handling=strict"}``).

        Returns:
            The header dictionary.
        """
        h = {"Accept": FHIR_JSON}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        h.update(extra or {})
        return h

    def url(self, path_or_url: str) -> str:
        """Resolve a path relative to the FHIR base; absolute URLs pass through.

        Args:
            path_or_url: ``"Patient/123"``, ``"/Condition"`` or a full URL such as a ``next`` link.

        Returns:
            An absolute URL.
        """
        if path_or_url.startswith(("http://", "https://")):
            return path_or_url
        return f"{self.base_url}/{path_or_url.lstrip('/')}"

    def get(
        self,
        path_or_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        **params: str | int | Sequence[str],
    ) -> requests.Response:
        """GET with the bearer token; the response is returned whatever its status.

        Args:
            path_or_url: A path under the FHIR base or an absolute URL.
            headers: Extra headers; ``{"Authorization": ...}`` replaces the token.
            **params: Query parameters; a sequence value repeats the parameter (``date=[...]``).
                Names that are not identifiers go through a dict:
                ``**{"clinical-status": "active"}``.

        Returns:
            The :class:`requests.Response`.
        """
        return self._get(path_or_url, params, headers)

    def read_json(self, path_or_url: str, **params: str | int | Sequence[str]) -> dict[str, Any]:
        """GET and decode a successful JSON answer.

        Args:
            path_or_url: A path under the FHIR base or an absolute URL.
            **params: Query parameters, as for :meth:`get`.

        Returns:
            The decoded body.

        Raises:
            FhirServerError: On any status of 400 or more.
        """
        return self._checked(self._get(path_or_url, params), f"GET {path_or_url}")

    def search_all(
        self, path: str, **params: str | int | Sequence[str]
    ) -> tuple[list[dict[str, Any]], int]:
        """Run a search and follow ``next`` links to the end.

        Args:
            path: ``"Observation"`` and the like.
            **params: Search parameters, as for :meth:`get`.

        Returns:
            The ``search.mode == "match"`` resources of every page, and the number of pages read.

        Raises:
            FhirServerError: When a page answers with an error status.
            AssertionError: When paging does not end within 10,000 pages.
        """
        resources: list[dict[str, Any]] = []
        url: str | None = path
        query: Mapping[str, str | int | Sequence[str]] = params
        pages = 0
        while url:
            pages += 1
            assert pages <= 10_000, f"paging through {path} did not end"
            page = self._checked(self._get(url, query), f"GET {url}")
            resources += [
                e["resource"]
                for e in page.get("entry", [])
                if e.get("search", {}).get("mode", "match") == "match"
            ]
            url = next(
                (link["url"] for link in page.get("link", []) if link.get("relation") == "next"),
                None,
            )
            query = {}  # the next link carries the whole query
        return resources, pages

    def transaction(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        """POST a transaction (or batch) Bundle to the base URL.

        Args:
            bundle: The Bundle.

        Returns:
            The ``transaction-response`` Bundle.

        Raises:
            FhirServerError: With the OperationOutcome's text when the server refuses it.
        """
        response = self._http.post(
            self.base_url,
            data=json.dumps(bundle),
            headers=self.headers({"Content-Type": FHIR_JSON}),
            timeout=REQUEST_TIMEOUT_S,
        )
        return self._checked(response, "transaction")

    def put(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        """Create or update a resource at ``Type/id``.

        Args:
            resource: A resource with ``resourceType`` and ``id``.

        Returns:
            The stored resource as the server returns it (with ``meta.versionId``).

        Raises:
            FhirServerError: When the server refuses it.
            ValueError: When the resource has no type or id.
        """
        rtype, rid = resource.get("resourceType"), resource.get("id")
        if not rtype or not rid:
            raise ValueError("put() needs a resource with resourceType and id")
        response = self._http.put(
            self.url(f"{rtype}/{rid}"),
            data=json.dumps(resource),
            headers=self.headers({"Content-Type": FHIR_JSON}),
            timeout=REQUEST_TIMEOUT_S,
        )
        return self._checked(response, f"PUT {rtype}/{rid}")

    def load_bundle_file(self, path: Path, *, keep_ids: bool = True) -> dict[str, Any]:
        """Load a transaction bundle from a JSON file.

        Args:
            path: The file, e.g. one of ``shared/data/synthea-r4/*.json``.
            keep_ids: Pass it through :func:`prepare_transaction` first (stable ids, idempotent).

        Returns:
            The ``transaction-response`` Bundle.

        Raises:
            FhirServerError: When the server refuses it.
        """
        bundle = json.loads(path.read_text())
        return self.transaction(prepare_transaction(bundle) if keep_ids else bundle)

    def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL after a timeout.  Safe to call twice."""
        self._http.close()
        stop_process(self.process)

    def _get(
        self,
        path_or_url: str,
        params: Mapping[str, str | int | Sequence[str]],
        headers: Mapping[str, str] | None = None,
    ) -> requests.Response:
        return self._http.get(
            self.url(path_or_url),
            params=dict(params) or None,
            headers=self.headers(headers),
            timeout=REQUEST_TIMEOUT_S,
        )

    @staticmethod
    def _checked(response: requests.Response, what: str) -> dict[str, Any]:
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text[:2000]
        if response.status_code >= 400:
            raise FhirServerError(
                f"{what} -> HTTP {response.status_code}: {outcome_text(body)}",
                response.status_code,
                body,
            )
        if not isinstance(body, dict):
            raise FhirServerError(
                f"{what} -> HTTP {response.status_code} without a JSON object",
                response.status_code,
                body,
            )
        return body


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Terminate a server process (SIGTERM, then SIGKILL) and reap it.

    Args:
        process: The process started by :func:`start_server`.
    """
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)


# ------------------------------------------------------------------------------ install and start


def venv_python(venv: Path = VENV_DIR) -> Path:
    """Return the interpreter of a virtual environment.

    Args:
        venv: The environment's directory.

    Returns:
        Its ``bin/python``.
    """
    return venv / "bin" / "python"


def sekmet_executable(venv: Path = VENV_DIR) -> Path:
    """Return the ``sekmet`` console script of a virtual environment.

    Args:
        venv: The environment's directory.

    Returns:
        Its ``bin/sekmet``.
    """
    return venv / "bin" / "sekmet"


def _run_logged(cmd: Sequence[str], log: Path, timeout: float) -> None:
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        try:
            result = subprocess.run(
                cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise SekmetSetupError(
                f"`{' '.join(cmd)}` took more than {timeout:.0f} s\n{log_tail(log)}"
            ) from None
    if result.returncode != 0:
        raise SekmetSetupError(
            f"`{' '.join(cmd)}` exited with {result.returncode}\n{log_tail(log)}"
        )


def ensure_sekmet_venv(venv: Path = VENV_DIR, requirement: str = SEKMET_REQUIREMENT) -> Path:
    """Create the sekmet virtual environment once and reuse it while its marker matches.

    The environment is built with the interpreter running the tests (so with the same Python as
    the project) by ``python -m venv``, then ``pip install <requirement>``.  A lock file serialises
    concurrent test sessions.  A half-built or outdated environment is removed and rebuilt.

    Args:
        venv: Where the environment lives.
        requirement: The pinned pip requirement, e.g. ``sekmet-fhir==0.1.1``.

    Returns:
        The path of the ``sekmet`` executable.

    Raises:
        SekmetSetupError: When ``venv`` or ``pip`` fails; the message ends with the install log.
    """
    marker = venv / MARKER_FILE.name
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (
            marker.is_file()
            and marker.read_text().strip() == requirement
            and sekmet_executable(venv).exists()
        ):
            return sekmet_executable(venv)
        if venv.exists():
            shutil.rmtree(venv)
        log = venv.parent / INSTALL_LOG.name
        log.write_text(f"installing {requirement} into {venv}\n")
        _run_logged([sys.executable, "-m", "venv", str(venv)], log, INSTALL_TIMEOUT_S)
        _run_logged(
            [
                str(venv_python(venv)),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                requirement,
            ],
            log,
            INSTALL_TIMEOUT_S,
        )
        if not sekmet_executable(venv).exists():
            raise SekmetSetupError(f"{requirement} installed no `sekmet` script\n{log_tail(log)}")
        marker.write_text(requirement + "\n")
        return sekmet_executable(venv)


def default_settings(port: int, data_dir: Path, token: str) -> dict[str, Any]:
    """Return the settings of a plain test server.

    Args:
        port: The port it listens on (127.0.0.1 only).
        data_dir: A fresh directory for its SQLite store.
        token: The static bearer token it accepts.

    Returns:
        Settings as sekmet's YAML file takes them.
    """
    return {
        "base_url": f"http://127.0.0.1:{port}/fhir",
        "host": "127.0.0.1",
        "port": port,
        "data_dir": str(data_dir),
        "own_private_key_path": str(data_dir / "keys" / "sekmet_private.pem"),
        "server_auth": {"types": ["bearer"], "tokens": [token]},
        "simulator": {"enabled": False},  # otherwise it acts on orders by itself
        "log_inbound": False,
    }


def _wait_until_up(
    process: subprocess.Popen[bytes], base_url: str, log_path: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    with requests.Session() as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SekmetSetupError(
                    f"sekmet exited with {process.returncode} before answering\n"
                    + log_tail(log_path)
                )
            try:
                response = http.get(
                    f"{base_url}/metadata", headers={"Accept": FHIR_JSON}, timeout=2
                )
                if response.status_code == 200:
                    return
                last_error = f"HTTP {response.status_code}"
            except requests.RequestException as exc:
                last_error = type(exc).__name__
            time.sleep(0.1)
    raise SekmetSetupError(
        f"sekmet did not answer {base_url}/metadata within {timeout:.0f} s ({last_error})\n"
        + log_tail(log_path)
    )


def start_server(
    sekmet: Path,
    workdir: Path,
    overrides: Mapping[str, Any] | None = None,
    *,
    attempts: int = 3,
) -> FhirServer:
    """Write a settings file and start ``sekmet serve`` on a free loopback port.

    Args:
        sekmet: The ``sekmet`` executable.
        workdir: A fresh directory for the settings, store and log (also the server's cwd).
        overrides: Settings laid over :func:`default_settings` (nested keys merge).  ``port`` and
            ``base_url`` are chosen here and cannot be overridden.
        attempts: How many ports to try when the chosen one was taken in the meantime.

    Returns:
        The running server.

    Raises:
        SekmetSetupError: When it does not come up; the message ends with its log.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in _SEKMET_ENV_OVERRIDES}
    error: SekmetSetupError | None = None
    for attempt in range(1, attempts + 1):
        port = free_port()
        settings = deep_merge(
            default_settings(port, workdir / "data", secrets.token_urlsafe(24)), overrides or {}
        )
        settings.update(port=port, base_url=f"http://127.0.0.1:{port}/fhir", host="127.0.0.1")
        settings_path = workdir / f"settings-{attempt}.yaml"
        settings_path.write_text(yaml.safe_dump(settings, sort_keys=False))
        log_path = workdir / f"sekmet-{attempt}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [str(sekmet), "serve", "-c", str(settings_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=workdir,
                env=env,
            )
        auth = settings.get("server_auth") or {}
        tokens = auth.get("tokens") or []
        token = tokens[0] if "bearer" in (auth.get("types") or []) and tokens else None
        server = FhirServer(settings["base_url"], token, log_path, settings, settings_path, process)
        try:
            _wait_until_up(process, server.base_url, log_path, START_TIMEOUT_S)
            return server
        except SekmetSetupError as exc:
            server.stop()
            error = exc
            if "address already in use" not in log_tail(log_path).lower():
                break
    assert error is not None
    raise error


# -------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def sekmet_executable_path() -> Path:
    """Install (or reuse) the pinned sekmet and return its executable; fail, never skip.

    Returns:
        The ``sekmet`` console script.
    """
    try:
        return ensure_sekmet_venv()
    except SekmetSetupError as exc:
        message = f"could not install {SEKMET_REQUIREMENT}: {exc}"
    pytest.fail(message, pytrace=False)  # outside `except`: no chained traceback


@pytest.fixture(scope="session")
def fhir_server_factory(
    sekmet_executable_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerFactory]:
    """Start extra sekmet servers with their own settings; all are stopped at the session's end.

    Call it as ``fhir_server_factory(overrides=None, name="sekmet")``; ``overrides`` is merged over
    the defaults (bearer token, simulator off, fresh store), e.g.
    ``{"server_behaviour": {"absolute_references": True}}`` or
    ``{"server_auth": {"types": ["none"]}}``.

    Args:
        sekmet_executable_path: The installed executable.
        tmp_path_factory: pytest's session temporary directories.

    Yields:
        The starter; it returns a running :class:`FhirServer` or fails the test with its log.
    """
    started: list[FhirServer] = []

    def start(overrides: Mapping[str, Any] | None = None, name: str = "sekmet") -> FhirServer:
        workdir = tmp_path_factory.mktemp(name)
        try:
            server = start_server(sekmet_executable_path, workdir, overrides)
        except SekmetSetupError as exc:
            message = f"could not start sekmet ({SEKMET_REQUIREMENT}) in {workdir}: {exc}"
        else:
            started.append(server)
            return server
        pytest.fail(message, pytrace=False)  # outside `except`: no chained traceback

    yield start
    for server in reversed(started):
        with contextlib.suppress(Exception):
            server.stop()


@pytest.fixture(scope="session")
def fhir_server(fhir_server_factory: ServerFactory) -> FhirServer:
    """One sekmet FHIR R4 server for the whole session (bearer token, empty store at start).

    Args:
        fhir_server_factory: The starter (it also stops the server at the end of the session).

    Returns:
        The running server.
    """
    return fhir_server_factory(None, name="sekmet-session")


def start_standalone(overrides: Mapping[str, Any] | None = None) -> FhirServer:
    """Start a sekmet server outside pytest (benchmarks, trying the sandbox suite locally).

    The caller stops it with ``server.stop()``.
    """
    import tempfile

    return start_server(ensure_sekmet_venv(), Path(tempfile.mkdtemp(prefix="sekmet-")),
                        overrides)


# ------------------------------------------------------------------- `make fhir`: for people

#: Where ``make fhir`` writes the URL and token of the server it started, for ``. .cache/fhir.env``.
ENV_FILE = PROJECT_ROOT / ".cache" / "fhir.env"


def main(argv: Sequence[str] | None = None) -> int:
    """``make fhir``: start the tests' FHIR server on loopback, load the fixtures, wait.

    Prints the base URL and the bearer token (and writes them to ``.cache/fhir.env`` as
    ``FHIR`` and ``TOKEN``); Ctrl-C stops the server and deletes its store.
    """
    import argparse
    import tempfile

    from lbp_cds.fixtures import load_into_server

    parser = argparse.ArgumentParser(
        prog="make fhir", description="Start the tests' FHIR R4 server (sekmet-fhir) on "
        "127.0.0.1 with the fixture patients loaded, dated today; Ctrl-C stops it.")
    parser.add_argument("--only", action="append", metavar="SCENARIO",
                        help="load only this scenario (repeatable; default: all)")
    parser.add_argument("--empty", action="store_true", help="load no fixtures")
    args = parser.parse_args(argv)
    for ending in (signal.SIGTERM, signal.SIGHUP):  # stop the server too, not only on Ctrl-C
        signal.signal(ending, lambda signum, frame: sys.exit(0))
    print(f"installing {SEKMET_REQUIREMENT} into {VENV_DIR} (once) ...", flush=True)
    sekmet = ensure_sekmet_venv()
    with tempfile.TemporaryDirectory(prefix="lbp-cds-fhir-") as workdir:
        server = start_server(sekmet, Path(workdir))
        try:
            if not args.empty:
                loaded = load_into_server(server.base_url, server.token, args.only)
                print(f"loaded {len(loaded)} fixture patients (`lbp-cds fixtures list` shows "
                      "their ids)")
            ENV_FILE.parent.mkdir(parents=True, exist_ok=True)
            ENV_FILE.write_text(f"export FHIR={server.base_url}\nexport TOKEN={server.token}\n")
            print(f"FHIR server (sekmet {SEKMET_VERSION}, loopback only, store in {workdir})")
            print(f"  FHIR={server.base_url}")
            print(f"  TOKEN={server.token}")
            print(f"In another shell: . {ENV_FILE.relative_to(PROJECT_ROOT)}   "
                  "(sets $FHIR and $TOKEN). Ctrl-C stops the server.", flush=True)
            server.process.wait()
            print(f"the FHIR server stopped by itself:\n{log_tail(server.log_path)}",
                  file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0
        finally:
            server.stop()
            with contextlib.suppress(OSError):
                if ENV_FILE.read_text().startswith(f"export FHIR={server.base_url}\n"):
                    ENV_FILE.unlink()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
