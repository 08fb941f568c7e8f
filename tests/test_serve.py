"""Production serving: gunicorn with several workers, metrics across them, graceful shutdown."""

from __future__ import annotations

import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.service_server import ServerFactory, triage_request


def test_metrics_add_up_across_workers(service_server: ServerFactory) -> None:
    server = service_server(args=["--dev", "--workers", "2", "--threads", "2"])
    session = requests.Session()

    def call(_i: int) -> int:
        return session.post(server.url("/cds-services/mini-triage"),
                            json=triage_request(), timeout=30).status_code

    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(call, range(40)))
    assert statuses == [200] * 40
    for _ in range(10):  # whichever worker answers /metrics, it counts every worker's cards
        text = requests.get(server.url("/metrics"), timeout=10).text
        match = re.search(r'lbp_cds_cards_total\{indicator="warning",rule="FEV",'
                          r'service="mini-triage"\} (\d+(?:\.\d+)?)', text)
        assert match and float(match.group(1)) == 40.0, "every worker's cards are counted"
    assert "lbp_cds_request_seconds_bucket" in text
    assert 'lbp_cds_requests_total{endpoint="cds.call_service",hook="patient-view",' in text


def test_sigterm_lets_the_request_in_flight_finish(service_server: ServerFactory) -> None:
    """A hook call waiting on a slow FHIR server is answered before the worker exits."""
    import socket

    slow = socket.socket()
    slow.bind(("127.0.0.1", 0))
    slow.listen(8)  # accepts connections, never answers: the fetch waits for its deadline
    port = slow.getsockname()[1]
    server = service_server(env={"LBP_CDS_FHIR_DEADLINE_SECONDS": "2",
                                 "LBP_CDS_GRACEFUL_TIMEOUT_SECONDS": "10"},
                            args=["--dev", "--workers", "1"])
    body = triage_request(prefetch_keys=["patient", "conditions"],
                          fhirServer=f"http://127.0.0.1:{port}/fhir")
    result: dict[str, object] = {}

    def call() -> None:
        resp = requests.post(server.url("/cds-services/mini-triage"), json=body, timeout=30)
        result["status"], result["json"] = resp.status_code, resp.json()

    worker = threading.Thread(target=call)
    worker.start()
    time.sleep(0.5)  # the request is now waiting on the FHIR server
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    worker.join(timeout=30)
    assert result.get("status") == 200, result
    # The observations could not be fetched in time: no fever card, and the conservative-care
    # card says that fever was not checked instead of claiming there is none.
    cards = result["json"]["cards"]  # type: ignore[index]
    assert [c["extension"]["org.lbp-cds.rule"]["ruleId"] for c in cards] == ["CC"]
    assert "Could not be checked" in cards[0]["detail"] and "temperature" in cards[0]["detail"]
    server.process.wait(timeout=20)
    assert time.monotonic() - started < 15
    assert server.process.returncode == 0
    slow.close()


def test_keep_alive_is_off_by_default_and_can_be_set(service_server: ServerFactory) -> None:
    """With keep-alive off, every call is a new connection that any idle worker may accept: a
    few clients' connections cannot all stay pinned to one worker (bench/run.py saw 4 wrk
    connections on one of 2 workers, and half the throughput, with keep-alive on)."""
    default = service_server(args=["--dev", "--workers", "2", "--threads", "2"])
    resp = requests.post(default.url("/cds-services/mini-triage"), json=triage_request(),
                         timeout=30)
    assert resp.status_code == 200 and resp.headers.get("Connection", "").lower() == "close"
    kept = service_server(env={"LBP_CDS_KEEPALIVE_SECONDS": "5"},
                          args=["--dev", "--workers", "1", "--threads", "2"])
    resp = requests.post(kept.url("/cds-services/mini-triage"), json=triage_request(),
                         timeout=30)
    assert resp.status_code == 200 and resp.headers.get("Connection", "").lower() != "close"


def test_workers_serve_large_bodies_without_faulting_in_fresh_memory(
        service_server: ServerFactory) -> None:
    """glibc is told to keep large buffers in the heap (``serve.tune_malloc``). By default,
    concurrent megabyte bodies in one worker are served from fresh mmaps and a heap that is
    trimmed back after each: hundreds of pages of kernel-zeroed memory faulted in per call."""
    import json
    from pathlib import Path

    server = service_server(args=["--dev", "--workers", "1", "--threads", "4"])
    request = triage_request()
    observations = request["prefetch"]["observations"]["entry"]
    for i in range(3200):  # a megabyte of old temperatures, as in bench/run.py
        old = json.loads(json.dumps(observations[0]))
        old["resource"].update(id=f"old-{i}", effectiveDateTime=f"20{10 + i % 10}-01-01")
        observations.append(old)
    body = json.dumps(request).encode()
    assert len(body) > 1_000_000

    def call(_i: int) -> None:
        resp = requests.post(server.url("/cds-services/mini-triage"), data=body, timeout=30,
                             headers={"Content-Type": "application/json"})
        assert resp.status_code == 200, resp.text[:300]

    (worker,) = [int(p) for p in Path(f"/proc/{server.process.pid}/task").glob("*/children")
                 for p in p.read_text().split()]

    def minor_faults() -> int:
        fields = Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[7])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(call, range(8)))
        before = minor_faults()
        list(pool.map(call, range(40)))
    per_call = (minor_faults() - before) / 40
    assert per_call < 60, f"{per_call} minor page faults per call"


def test_records_as_real_clients_send_them_are_read_under_gunicorn(
        service_server: ServerFactory) -> None:
    """The real knowledge pack under ``lbp-cds serve``: a DSTU2 server's aneurysm record gives
    the critical aneurysm card, the CDS Hooks Sandbox's opioid order (category as one object)
    its drug card, and another patient's Observation mixed into the prefetch is left out and
    named on the card; the JSON log says how many, never what."""
    from datetime import datetime, timezone

    from tests.builders import (
        REAL_PACK,
        dstu2_record,
        sandbox_draft,
        sandbox_record_opioid,
        scenario_body,
        stranger_observation,
    )

    server = service_server(env={"LBP_CDS_KNOWLEDGE_DIR": str(REAL_PACK)}, args=["--dev"])
    today = datetime.now(timezone.utc)
    cases = [("aaa-known-aneurysm-hypotension", dstu2_record, "AAA-1", "critical"),
             ("opi-oxycodone-chronic-sciatica", sandbox_draft, "OPI-1", "warning"),
             ("opi-oxycodone-chronic-sciatica", sandbox_record_opioid, "OPI-1", "warning"),
             ("cc-startback-high", stranger_observation, "CC-1", "info")]
    with requests.Session() as http:
        for name, bend, rule, indicator in cases:
            service_id, body, _now = scenario_body(name, bend, now=today)
            resp = http.post(server.url(f"/cds-services/{service_id}"), json=body, timeout=30)
            assert resp.status_code == 200, (name, resp.text[:500])
            cards = {c["extension"]["org.lbp-cds.rule"]["ruleId"]: c
                     for c in resp.json()["cards"]}
            assert cards.get(rule, {}).get("indicator") == indicator, (name, sorted(cards))
            assert "CC-1" not in cards or rule == "CC-1"
            if name == "cc-startback-high":
                assert "1 Observation named another patient and was left out" in \
                    cards["CC-1"]["detail"]
    log = server.log_text()
    assert '"dropped": {"Observation": 1}' in log
    assert "someone-else" not in log and "Lawson" not in log
