"""A second FHIR R4 server for the test suite: Medplum's FHIR router over its in-memory store.

``tests/medplum_server/server.mjs`` puts ``@medplum/fhir-router`` (pinned in
``tests/medplum_server/package.json`` and its lock file) behind ``node:http``. It is installed
with ``npm ci`` into ``.cache/medplum-server/node_modules`` once and reused while the hash of the
package files matches; the script is copied next to ``node_modules`` (Node resolves ES module
imports from the script's own folder) and started on a free loopback port with a random token.

Fixture (register with ``pytest_plugins = [..., "tests.medplum_server"]`` in ``conftest.py``):

``medplum_server``
    One server for the whole session: ``base_url`` (``http://127.0.0.1:PORT/fhir``), ``token``
    and ``stop()``, like :class:`tests.fhir_server.FhirServer`; ``reset()`` empties its store
    (searches scan every stored resource: keep the store small, see ``server.mjs``). An install
    or start failure fails the test with the end of the log; it never skips.

Needs ``node`` (20 or later; on 20 the script runs with ``--experimental-websocket``) and ``npm``
on the PATH, and the npm registry (or a cache) for the first install.
Timings of the last install and start are written to ``.cache/medplum-server/timings.json``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.fhir_server import free_port, log_tail

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIR = Path(__file__).resolve().parent / "medplum_server"
PACKAGE_FILES = ("package.json", "package-lock.json")
SCRIPT = "server.mjs"
CACHE_DIR = PROJECT_ROOT / ".cache" / "medplum-server"
MARKER_FILE = CACHE_DIR / ".lbp-cds-npm-installed"
INSTALL_LOG = CACHE_DIR / "npm-install.log"
TIMINGS_FILE = CACHE_DIR / "timings.json"

INSTALL_TIMEOUT_S = 600.0
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
FHIR_JSON = "application/fhir+json"


class MedplumSetupError(RuntimeError):
    """Installing or starting the Medplum test server failed; the message ends with its log."""


@dataclass
class MedplumServer:
    """A running ``server.mjs``.

    Attributes:
        base_url: The FHIR base, ``http://127.0.0.1:PORT/fhir`` (no trailing slash).
        token: The bearer token it accepts (every request but ``/metadata`` needs it).
        log_path: Its stdout and stderr.
        process: The ``node`` process.
        start_seconds: From spawning ``node`` to the first answer of ``/metadata``.
    """

    base_url: str
    token: str
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    start_seconds: float = 0.0

    def stop(self) -> None:
        """SIGTERM the server, SIGKILL after a timeout, and reap it."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_S)

    def reset(self) -> None:
        """Empty the store (``POST /admin/reset``, not FHIR: the script's own route)."""
        response = requests.post(self.base_url.removesuffix("/fhir") + "/admin/reset", timeout=30,
                                 headers={"Authorization": f"Bearer {self.token}"})
        response.raise_for_status()

    def url(self, path: str) -> str:
        """An absolute URL on the server (``Patient/x`` or an absolute URL as it is)."""
        return path if "://" in path else f"{self.base_url}/{path.lstrip('/')}"

    def read_json(self, path: str) -> dict[str, Any]:
        """GET a path (or URL) with the token and return the JSON body; raise on an error."""
        response = requests.get(self.url(path), timeout=30, headers={
            "Accept": FHIR_JSON, "Authorization": f"Bearer {self.token}"})
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body


# ------------------------------------------------------------------------------ install and start


def package_hash(source: Path = SOURCE_DIR) -> str:
    """The sha256 of the package files (what ``node_modules`` depends on)."""
    digest = hashlib.sha256()
    for name in PACKAGE_FILES:
        digest.update(name.encode() + b"\0" + (source / name).read_bytes() + b"\0")
    return digest.hexdigest()


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise MedplumSetupError(f"`{name}` is not on the PATH (Node 20+ and npm are needed)")
    return path


def _log_excerpt(log: Path) -> str:
    """The start and the end of an install log (npm puts the error first, then its usage)."""
    text = log.read_text(errors="replace") if log.is_file() else f"<no log at {log}>"
    return text if len(text) <= 4000 else f"{text[:1500]}\n[...]\n{text[-2500:]}"


def _run_logged(cmd: Sequence[str], cwd: Path, log: Path, timeout: float) -> None:
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        try:
            result = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise MedplumSetupError(
                f"`{' '.join(cmd)}` took more than {timeout:.0f} s\n{_log_excerpt(log)}"
            ) from None
    if result.returncode != 0:
        raise MedplumSetupError(
            f"`{' '.join(cmd)}` exited with {result.returncode}\n{_log_excerpt(log)}")


def _record_timing(**values: Any) -> None:
    try:
        timings = json.loads(TIMINGS_FILE.read_text())
    except (OSError, ValueError):
        timings = {}
    timings.update(values)
    TIMINGS_FILE.write_text(json.dumps(timings, indent=2) + "\n")


def ensure_installed(cache: Path = CACHE_DIR, source: Path = SOURCE_DIR) -> float:
    """Install the pinned packages into ``cache/node_modules`` unless already there.

    ``npm ci`` installs exactly the lock file (``--ignore-scripts``: the packages have no install
    scripts to run). The marker holds the hash of the package files; a lock file serialises
    concurrent sessions; a half-done or outdated install is removed first.

    Args:
        cache: Where the packages go.
        source: Where ``package.json`` and ``package-lock.json`` are.

    Returns:
        The seconds this call took (0-ish when the cache was reused).

    Raises:
        MedplumSetupError: ``npm`` is missing or fails; the message ends with its log.
    """
    started = time.perf_counter()
    wanted = package_hash(source)
    cache.mkdir(parents=True, exist_ok=True)
    marker = cache / MARKER_FILE.name
    with open(cache.parent / f"{cache.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (marker.is_file() and marker.read_text().strip() == wanted
                and (cache / "node_modules" / "@medplum" / "fhir-router").is_dir()):
            return time.perf_counter() - started
        npm = _tool("npm")
        marker.unlink(missing_ok=True)
        shutil.rmtree(cache / "node_modules", ignore_errors=True)
        for name in PACKAGE_FILES:
            shutil.copyfile(source / name, cache / name)
        log = cache / INSTALL_LOG.name
        log.write_text(f"npm ci of {source} into {cache}\n")
        _run_logged([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund",
                     "--loglevel=error"], cache, log, INSTALL_TIMEOUT_S)
        if not (cache / "node_modules" / "@medplum" / "fhir-router").is_dir():
            raise MedplumSetupError(
                f"npm ci installed no @medplum/fhir-router\n{_log_excerpt(log)}")
        marker.write_text(wanted + "\n")
        seconds = time.perf_counter() - started
        _record_timing(npm_ci_seconds=round(seconds, 2), npm_ci_at=time.time())
        return seconds


def node_command(node: str) -> list[str]:
    """``node`` with the flags this Node version needs (``--experimental-websocket`` on 20/21)."""
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30,
                             check=False).stdout.strip()
    try:
        major = int(version.lstrip("v").split(".")[0])
    except ValueError:
        raise MedplumSetupError(f"`{node} --version` said {version!r}") from None
    if major < 20:
        raise MedplumSetupError(f"Node {version} is too old for @medplum/fhir-router (20+)")
    return [node, "--experimental-websocket"] if major < 22 else [node]


def _wait_until_up(server: MedplumServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with requests.Session() as http:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise MedplumSetupError(f"node exited with {server.process.returncode} before "
                                        f"answering\n{log_tail(server.log_path)}")
            try:
                response = http.get(f"{server.base_url}/metadata", timeout=2,
                                    headers={"Accept": FHIR_JSON})
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}"
            except requests.RequestException as exc:
                last = type(exc).__name__
            time.sleep(0.05)
    raise MedplumSetupError(f"{server.base_url}/metadata did not answer within {timeout:.0f} s "
                            f"({last})\n{log_tail(server.log_path)}")


def start_server(workdir: Path, cache: Path = CACHE_DIR, source: Path = SOURCE_DIR,
                 attempts: int = 3) -> MedplumServer:
    """Start ``server.mjs`` on a free loopback port with a random token and wait for it.

    Args:
        workdir: A fresh folder for the log (also the server's working directory).
        cache: The installed packages (:func:`ensure_installed`).
        source: Where ``server.mjs`` is; it is copied into ``cache``.
        attempts: How many ports to try when the chosen one was taken in the meantime.

    Returns:
        The running server.

    Raises:
        MedplumSetupError: It did not answer; the message ends with its log.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    command = node_command(_tool("node"))
    script = cache / SCRIPT
    shutil.copyfile(source / SCRIPT, script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDPLUM_")}
    env["NODE_ENV"] = "production"
    error: MedplumSetupError | None = None
    for attempt in range(1, attempts + 1):
        port = free_port()
        token = secrets.token_urlsafe(24)
        log_path = workdir / f"medplum-{attempt}.log"
        started = time.perf_counter()
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [*command, str(script), "--port", str(port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir,
                env=env | {"MEDPLUM_TEST_TOKEN": token})
        server = MedplumServer(f"http://127.0.0.1:{port}/fhir", token, log_path, process)
        try:
            _wait_until_up(server, START_TIMEOUT_S)
        except MedplumSetupError as exc:
            server.stop()
            error = exc
            if "eaddrinuse" not in log_tail(log_path).lower():
                break
        else:
            server.start_seconds = time.perf_counter() - started
            _record_timing(start_seconds=round(server.start_seconds, 2))
            return server
    assert error is not None
    raise error


# -------------------------------------------------------------------------------- fixture


@pytest.fixture(scope="session")
def medplum_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MedplumServer]:
    """One Medplum in-memory FHIR server for the session (empty at start); fail, never skip.

    Yields:
        The running server; it is stopped at the end of the session.
    """
    try:
        install_seconds = ensure_installed()
        server = start_server(tmp_path_factory.mktemp("medplum"))
    except MedplumSetupError as exc:
        message = f"could not install or start the Medplum test server: {exc}"
    else:
        _record_timing(last_session_install_check_seconds=round(install_seconds, 2))
        try:
            yield server
        finally:
            with contextlib.suppress(Exception):
                server.stop()
        return
    pytest.fail(message, pytrace=False)  # outside `except`: no chained traceback
