"""``lbp-cds probe``: an EHR in a command, against the running service and a real FHIR server."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from werkzeug.serving import make_server

from lbp_cds import create_app
from lbp_cds.cli import build_parser
from lbp_cds.config import Settings
from lbp_cds.fixtures import Scenario, load_into_server, rebase
from lbp_cds.probe import REDACTED, probe, redact
from tests import test_integration_fhir as integration
from tests.fhir_server import FhirServer
from tests.test_integration_fhir import (
    KNOWLEDGE_DIR,
    SCENARIO_ROOT,
    ServiceProcess,
    discover,
    plain_scenarios,
)

#: The session's service process, shared with the integration suite.
cds_service = integration.cds_service

pytestmark = [pytest.mark.fhir_server]

MARKS = {"critical": "!!! CRITICAL", "warning": "!  WARNING", "info": "i  INFO"}


def run(argv: list[str]) -> tuple[int, str]:
    """Run ``probe`` in this process; return its exit code and what it printed."""
    out = io.StringIO()
    code = probe(build_parser().parse_args(["probe", *argv]), out)
    return code, out.getvalue()


def card_lines(text: str) -> list[str]:
    """The indicator and rule lines of printed cards."""
    return [line for line in text.splitlines()
            if line.startswith(tuple(MARKS.values())) or "[rule " in line]


def assert_cards_printed(text: str, sc: Scenario, service_id: str) -> None:
    """The summary line and one rule line per expected card."""
    expected = sc.expected_cards
    assert f"{service_id} ({sc.hook}): {len(expected)} card(s)" in text, text
    for rule, indicator in expected:
        assert f"[rule {rule}]" in text, f"{rule} missing:\n{text}"
        assert MARKS[indicator] in text, f"{indicator} missing:\n{text}"
    assert sum("[rule " in line for line in text.splitlines()) == len(expected), text


@pytest.fixture(scope="module")
def loaded(fhir_server: FhirServer) -> dict[str, Scenario]:
    """One patient-view and one order-select scenario, dated to today, on the session server."""
    chosen = {hook: plain_scenarios(hook)[0] for hook in ("patient-view", "order-select")}
    load_into_server(fhir_server.base_url, fhir_server.token, [s.id for s in chosen.values()],
                     root=SCENARIO_ROOT)
    return chosen


@pytest.fixture(scope="module")
def service_ids(cds_service: ServiceProcess) -> dict[str, str]:
    """Service ids by hook."""
    return {hook: entry["id"] for hook, entry in discover(cds_service).items()}


def test_probe_prints_the_expected_cards(fhir_server: FhirServer, cds_service: ServiceProcess,
                                         loaded: dict[str, Scenario],
                                         service_ids: dict[str, str]) -> None:
    """With prefetch and with the service fetching, the probe prints the scenario's cards."""
    sc = loaded["patient-view"]
    base = ["--fhir-server", fhir_server.base_url, f"--token={fhir_server.token}",
            "--patient", sc.patient_id, "--hook", "patient-view", "--service",
            cds_service.base_url]
    code, text = run(base)
    assert code == 0, text
    assert "HTTP 200 in " in text
    assert "prefetch: sent patient" in text and "left out" not in text
    assert_cards_printed(text, sc, service_ids["patient-view"])
    code, fetched = run([*base, "--no-prefetch"])
    assert code == 0, fetched
    assert "prefetch: none sent (--no-prefetch)" in fetched
    assert card_lines(fetched) == card_lines(text)


def test_probe_order_select_with_an_order_file(fhir_server: FhirServer,
                                               cds_service: ServiceProcess,
                                               loaded: dict[str, Scenario],
                                               service_ids: dict[str, str],
                                               tmp_path: Path) -> None:
    """``--order FILE`` puts the draft in draftOrders and selections."""
    sc = rebase(loaded["order-select"], datetime.now(timezone.utc))
    assert len(sc.draft_orders) == 1 or sc.selections, sc.id
    order = next(d for d in sc.draft_orders
                 if not sc.selections or f"{d['resourceType']}/{d['id']}" in sc.selections)
    path = tmp_path / "order.json"
    path.write_text(json.dumps(order))
    code, text = run(["--fhir-server", fhir_server.base_url, f"--token={fhir_server.token}",
                      "--patient", sc.patient_id, "--hook", "order-select", "--service",
                      cds_service.base_url, "--order", str(path), "--show-request"])
    assert code == 0, text
    request = json.loads(text[text.index("request:\n") + 9:text.index("\nHTTP 200")])
    assert request["context"]["selections"] == [f"ServiceRequest/{order['id']}"]
    assert request["context"]["draftOrders"]["entry"][0]["resource"]["id"] == order["id"]
    if len(sc.draft_orders) == 1:
        assert_cards_printed(text, sc, service_ids["order-select"])


def test_show_request_never_prints_the_token(fhir_server: FhirServer,
                                             cds_service: ServiceProcess,
                                             loaded: dict[str, Scenario]) -> None:
    """The console script, with --show-request and --show-response: the token is redacted."""
    sc = loaded["patient-view"]
    script = Path(sys.executable).with_name("lbp-cds")
    result = subprocess.run(
        [str(script), "probe", "--fhir-server", fhir_server.base_url,
         f"--token={fhir_server.token}", "--patient", sc.patient_id, "--hook", "patient-view",
         "--service", cds_service.base_url, "--no-prefetch", "--show-request",
         "--show-response"],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert str(fhir_server.token) not in result.stdout + result.stderr
    assert f'"access_token": "{REDACTED}"' in result.stdout
    assert '"token_type": "Bearer"' in result.stdout
    assert "response (HTTP 200):" in result.stdout
    assert redact({"fhirAuthorization": {"access_token": "x"}}) == {
        "fhirAuthorization": {"access_token": REDACTED}}


def test_probe_in_process(fhir_server: FhirServer, loaded: dict[str, Scenario],
                          service_ids: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --service the probe builds the service in its own process (same cards)."""
    if KNOWLEDGE_DIR is None:
        monkeypatch.delenv("LBP_CDS_KNOWLEDGE_DIR", raising=False)
    else:
        monkeypatch.setenv("LBP_CDS_KNOWLEDGE_DIR", str(KNOWLEDGE_DIR))
    sc = loaded["patient-view"]
    code, text = run(["--fhir-server", fhir_server.base_url, f"--token={fhir_server.token}",
                      "--patient", sc.patient_id, "--hook", "patient-view"])
    assert code == 0, text
    assert "in-process (development mode)" in text
    assert_cards_printed(text, sc, service_ids["patient-view"])


def test_probe_of_an_unknown_patient_prints_the_outcome(fhir_server: FhirServer,
                                                        cds_service: ServiceProcess) -> None:
    """The FHIR server has no such patient: the key is left out, the service answers 412, exit 1."""
    code, text = run(["--fhir-server", fhir_server.base_url, f"--token={fhir_server.token}",
                      "--patient", "nobody-here", "--hook", "patient-view", "--service",
                      cds_service.base_url])
    assert code == 1
    assert "prefetch: left out patient (HTTP 404" in text
    assert "HTTP 412" in text and "prefetch.patient" in text


def test_order_hook_without_order_is_a_usage_error(fhir_server: FhirServer,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """An order hook needs --order."""
    code, _ = run(["--fhir-server", fhir_server.base_url, "--patient", "x", "--hook",
                   "order-sign", "--service", "http://127.0.0.1:9"])
    assert code == 2
    assert "order-sign needs --order FILE" in capsys.readouterr().err


def test_unreachable_service_exits_1(fhir_server: FhirServer) -> None:
    """Nothing listens at --service: said plainly, exit 1."""
    code, text = run(["--fhir-server", fhir_server.base_url, "--patient", "x", "--hook",
                      "patient-view", "--service", "http://127.0.0.1:9"])
    assert code == 1
    assert "cannot reach the service at http://127.0.0.1:9" in text


@pytest.fixture
def authenticated_service(tmp_path: Path) -> Iterator[str]:
    """A service that requires client JWTs (not dev mode), served by werkzeug in a thread."""
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    jwk = json.loads(ECAlgorithm.to_jwk(key))
    jwk.update(kid="k1", alg="ES384", use="sig")
    clients = tmp_path / "clients.yaml"
    clients.write_text(json.dumps({"clients": [{"iss": "https://ehr.example.org",
                                                "jwks": {"keys": [jwk]}}]}))
    app = create_app(Settings(dev=False, clients_file=str(clients),
                              public_base_url="https://cds.example.org",
                              database_url=f"sqlite:///{tmp_path}/auth.sqlite3",
                              knowledge_dir=str(KNOWLEDGE_DIR) if KNOWLEDGE_DIR else ""))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
        app.extensions["lbp_cds"].store.engine.dispose()


def test_service_requiring_auth_gets_a_plain_401(fhir_server: FhirServer,
                                                 authenticated_service: str) -> None:
    """A service that wants a client JWT refuses the probe; the probe says why, exit 1."""
    code, text = run(["--fhir-server", fhir_server.base_url, "--patient", "x", "--hook",
                      "patient-view", "--service", authenticated_service])
    assert code == 1
    assert "HTTP 401 Unauthorized" in text
    assert "requires a signed JWT" in text and "sends no credentials" in text
