"""lbp-cds benchmarks: medians, p95 and ratios, reproducible with one command (`make bench`).

Sections (all by default; choose with --only):
  core      patient-view with a ~100 KB prefetch and an EMPTY rule set: the service's own overhead,
            in-process (Flask test client) and over HTTP (gunicorn on loopback).
  rules     every rule of the real pack over a 1,000-resource record, in-process (engine only,
            and the whole request path).
  http      patient-view over HTTP, for the largest Synthea record here (1.04 MB, full prefetch) and
            a synthetic 1 MB prefetch: p50/p95 of one sequential client (wrk when installed, and
            python-requests), requests/s with
            4 concurrent clients, the ratio to orjson parse+dump of the same request.
  scaling   cost at 100, 1,000 and 10,000 resources (in-process), with the per-resource slope.
  rss       resident memory per gunicorn worker after the http section (RSS and PSS).
  fetch     the FHIR-fetch path against a real FHIR server (sekmet-fhir): overhead of the service
            over the slowest single query it makes.

Results are printed and written to bench/results/latest.json. Timings are wall-clock on this
machine; compare ratios across machines, not absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from records import NOW, record, patient_view_request  # noqa: E402

from lbp_cds import create_app  # noqa: E402
from lbp_cds.config import Settings  # noqa: E402

RESULTS: dict[str, Any] = {}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def timed(fn: Callable[[], Any], n: int, warmup: int = 5) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    return {"n": n, "p50_ms": round(statistics.median(samples), 3),
            "p95_ms": round(percentile(samples, 95), 3), "min_ms": round(min(samples), 3)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``lbp-cds serve --dev`` under gunicorn, on loopback."""

    def __init__(self, knowledge_dir: Path | None, workers: int = 2, threads: int = 4) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="lbp-bench-"))
        self.port = free_port()
        env = dict(os.environ, LBP_CDS_DATABASE_URL=f"sqlite:///{self.tmp}/bench.sqlite3",
                   LBP_CDS_LOG_LEVEL="WARNING")
        if knowledge_dir:
            env["LBP_CDS_KNOWLEDGE_DIR"] = str(knowledge_dir)
        exe = Path(sys.executable).with_name("lbp-cds")
        self.proc = subprocess.Popen(
            [str(exe), "serve", "--dev", "--port", str(self.port), "--workers", str(workers),
             "--threads", str(threads)], env=env, stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / "server.log", "w"), start_new_session=True)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if requests.get(self.base + "/readyz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError((self.tmp / "server.log").read_text()[-2000:])

    def worker_rss_mb(self) -> list[float]:
        out = subprocess.run(["ps", "-o", "pid=,rss=", "--ppid", str(self.proc.pid)],
                             capture_output=True, text=True).stdout
        return [round(int(line.split()[1]) / 1024, 1) for line in out.splitlines() if line]

    def worker_pss_mb(self) -> list[float]:
        """Proportional set size of each worker (Linux): pages shared with the master and the
        other worker, which RSS counts in full, are split between them."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)],
                             capture_output=True, text=True).stdout
        pss = []
        for pid in out.split():
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            kb = next(int(line.split()[1]) for line in rollup.splitlines()
                      if line.startswith("Pss:"))
            pss.append(round(kb / 1024, 1))
        return pss

    def worker_cpu_seconds(self) -> list[float]:
        """User + system CPU time of each worker so far (Linux /proc)."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)],
                             capture_output=True, text=True).stdout
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = []
        for pid in out.split():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu.append((int(fields[11]) + int(fields[12])) / ticks)
        return cpu

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)
        shutil.rmtree(self.tmp, ignore_errors=True)


def empty_rules_pack() -> Path:
    """A copy of the test mini pack with no rules: only the core path is left to measure."""
    tmp = Path(tempfile.mkdtemp(prefix="lbp-empty-pack-"))
    pack = tmp / "pack"
    shutil.copytree(ROOT / "tests" / "knowledge_mini", pack)
    for rules in pack.glob("*/rules.yaml"):
        rules.write_text("rules: []\n")
    for cards in pack.glob("*/cards.yaml"):
        cards.write_text("cards: {}\n")
    return pack


def sized_request(target_bytes: int, prefetch: dict[str, str]) -> tuple[dict[str, Any], int]:
    """The smallest synthetic request whose JSON is at least ``target_bytes`` (bisection)."""
    low, high = 1, 20
    while len(orjson.dumps(patient_view_request(record(high), prefetch))) < target_bytes:
        low, high = high, high * 2
    while low < high:
        mid = (low + high) // 2
        if len(orjson.dumps(patient_view_request(record(mid), prefetch))) < target_bytes:
            low = mid + 1
        else:
            high = mid
    return patient_view_request(record(high), prefetch), high


def in_process(app: Any, service: str, body: bytes) -> Callable[[], Any]:
    client = app.test_client()

    def call() -> None:
        resp = client.post(f"/cds-services/{service}", data=body,
                           content_type="application/json")
        assert resp.status_code == 200, resp.data[:500]

    return call


def over_http(base: str, service: str, body: bytes) -> Callable[[], Any]:
    session = requests.Session()

    def call() -> None:
        resp = session.post(f"{base}/cds-services/{service}", data=body,
                            headers={"Content-Type": "application/json"})
        assert resp.status_code == 200, resp.text[:500]

    return call


def bench_core(n: int) -> None:
    pack = empty_rules_pack()
    with tempfile.TemporaryDirectory() as tmp:
        from lbp_cds.serve import tune_gc

        app = create_app(Settings(dev=True, database_url=f"sqlite:///{tmp}/c.sqlite3",
                                  knowledge_dir=str(pack)), clock=lambda: NOW)
        tune_gc()
        service = next(s for s in app.extensions["lbp_cds"].knowledge.services
                       if s.hook == "patient-view")
        req, count = sized_request(100_000, dict(service.prefetch))
        body = orjson.dumps(req)
        result = {"prefetch_bytes": len(body), "resources": count,
                  "in_process": timed(in_process(app, service.id, body), n)}
        server = Server(pack)
        try:
            result["http"] = timed(over_http(server.base, service.id, body), n)
        finally:
            server.stop()
    RESULTS["core"] = result
    print(f"core (empty rule set, {len(body) / 1000:.0f} KB prefetch, {count} resources): "
          f"in-process p50 {result['in_process']['p50_ms']} ms p95 "
          f"{result['in_process']['p95_ms']} ms; HTTP p50 {result['http']['p50_ms']} ms p95 "
          f"{result['http']['p95_ms']} ms")


def real_app(tmp: str) -> Any:
    """The real pack, configured as a gunicorn worker is (garbage-collection tuning included)."""
    from lbp_cds.serve import tune_gc

    app = create_app(Settings(dev=True, database_url=f"sqlite:///{tmp}/r.sqlite3"),
                     clock=lambda: NOW)
    tune_gc()
    return app


def bench_rules(n: int) -> None:
    from lbp_cds.fhir_data import record_from_resources

    with tempfile.TemporaryDirectory() as tmp:
        app = real_app(tmp)
        rt = app.extensions["lbp_cds"]
        service = next(s for s in rt.knowledge.services if s.hook == "patient-view")
        resources = record(1000)

        def engine_only() -> None:
            rec = record_from_resources(resources[0]["id"], resources)
            rt.engine.evaluate(service, rec, NOW, [])

        body = orjson.dumps(patient_view_request(resources, dict(service.prefetch)))
        result = {"resources": 1000, "rules": len(rt.knowledge.rules),
                  "engine": timed(engine_only, n),
                  "request": timed(in_process(app, service.id, body), n)}
    RESULTS["rules"] = result
    print(f"rules ({result['rules']} rules, 1,000 resources): engine p50 "
          f"{result['engine']['p50_ms']} ms p95 {result['engine']['p95_ms']} ms; whole request "
          f"in-process p50 {result['request']['p50_ms']} ms p95 {result['request']['p95_ms']} ms")


def synthea_request() -> tuple[dict[str, Any], str] | None:
    """The Synthea patient of ../shared whose prefetch is largest, as a full patient-view request.

    Synthea's bundles are mostly encounters, claims and explanations of benefit, which no
    template asks for: the prefetch of the largest is about 0.2 MB.
    """
    from lbp_cds.cli import request_from_bundle

    shared = ROOT.parent / "shared" / "data" / "synthea-r4"
    best: tuple[int, dict[str, Any], str] | None = None
    for path in sorted(shared.glob("*.json")) if shared.is_dir() else []:
        req = request_from_bundle(json.loads(path.read_text()), "patient-view")
        size = len(orjson.dumps(req))
        # Synthea refers by urn:uuid; left so, the service would drop every resource as naming
        # another patient and the benchmark would time an empty record.
        assert b'"urn:uuid:' not in orjson.dumps(req["prefetch"]), path.name
        if best is None or size > best[0]:
            best = (size, req, f"Synthea {path.name.split('_')[0]} {path.name.split('_')[1]}")
    return (best[1], best[2]) if best else None


def clean_orjson_p50(body: bytes, n: int) -> float:
    """orjson parse + dump of ``body`` in a fresh interpreter with garbage collection off: the
    strictest baseline (in this process, with the application's heap, orjson is slower)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        f.write(body)
        f.flush()
        code = ("import gc, orjson, statistics, sys, time\n"
                "body = open(sys.argv[1], 'rb').read()\ngc.disable()\nsamples = []\n"
                f"for _ in range({n}):\n"
                "    t = time.perf_counter(); orjson.dumps(orjson.loads(body))\n"
                "    samples.append((time.perf_counter() - t) * 1000)\n"
                "print(statistics.median(samples))\n")
        out = subprocess.run([sys.executable, "-c", code, f.name], capture_output=True,
                             text=True, check=True).stdout
    return round(float(out), 3)


WRK_SCRIPT = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("{body}", "rb")
wrk.body = f:read("*all")
f:close()
done = function(summary, latency, requests)
  io.write(string.format("\\nLATENCY %.3f %.3f %d\\n", latency:percentile(50) / 1000,
                         latency:percentile(95) / 1000, summary.requests))
end
"""


def http_run(server: Server, service_id: str, body: bytes, n: int, clients: int,
             duration: float) -> dict[str, Any]:
    baseline = timed(lambda: orjson.dumps(orjson.loads(body)), max(n, 50))
    clean = clean_orjson_p50(body, max(n, 50))
    single = timed(over_http(server.base, service_id, body), n)
    result: dict[str, Any] = {}

    def worker(stop_at: float) -> int:
        call = over_http(server.base, service_id, body)
        done = 0
        while time.perf_counter() < stop_at:
            call()
            done += 1
        return done

    client = "python requests"
    if shutil.which("wrk"):
        # wrk (C) loads the machine less than Python clients would: the service gets the cores.
        client = "wrk"
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "body.json").write_bytes(body)
            script = Path(tmp) / "post.lua"
            script.write_text(WRK_SCRIPT.replace("{body}", f"{tmp}/body.json"))
            url = f"{server.base}/cds-services/{service_id}"
            # One client, sequential calls: the latency of the service with a client that
            # costs next to nothing (python-requests spends 1-2 ms of the 2 cores per call).
            out = subprocess.run(["wrk", "-t1", "-c1", f"-d{max(3, int(duration / 2))}s", "-s",
                                  str(script), url], capture_output=True, text=True,
                                 check=True).stdout
            p50, p95, count = out.split("LATENCY", 1)[1].split()[:3]
            result["single_client_wrk"] = {"n": int(count), "p50_ms": float(p50),
                                           "p95_ms": float(p95)}
            subprocess.run(["wrk", "-t2", f"-c{clients}", "-d3s", "-s", str(script), url],
                           capture_output=True, check=True)
            cpu_before = server.worker_cpu_seconds()
            out = subprocess.run(["wrk", "-t2", f"-c{clients}", f"-d{int(duration)}s",
                                  "--latency", "-s", str(script), url], capture_output=True,
                                 text=True, check=True).stdout
            cpu_used = [a - b for a, b in zip(server.worker_cpu_seconds(), cpu_before,
                                              strict=True)]
        import re

        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore
        done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore
        # CPU per call is steadier than calls per second on a shared machine, and the share of
        # each worker shows when the clients' keep-alive connections all landed on one worker.
        worker_cpu = {"cpu_ms_per_call": round(sum(cpu_used) / done * 1000, 2),
                      "cpu_share_per_worker": [round(c / sum(cpu_used), 2) for c in cpu_used]}
        if "Non-2xx" in out:
            raise RuntimeError(out)
    else:
        stop_at = time.perf_counter() + duration
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            total = sum(pool.map(worker, [stop_at] * clients))
        rps = total / (time.perf_counter() - started)
        worker_cpu = {}
    latency = result.get("single_client_wrk", single)
    return {"prefetch_bytes": len(body), "single_client": single, **result,
            "latency_client": "wrk" if "single_client_wrk" in result else "python requests",
            "orjson_parse_dump": baseline,
            "ratio_p50_to_orjson": round(latency["p50_ms"] / baseline["p50_ms"], 1),
            "orjson_parse_dump_clean_process_p50_ms": clean,
            "ratio_p50_to_orjson_clean_process": round(latency["p50_ms"] / clean, 1),
            "concurrent_clients": clients, "load_client": client,
            "requests_per_second": round(rps, 1), **worker_cpu}


def bench_http(n: int, clients: int, duration: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        app = real_app(tmp)
        service = next(s for s in app.extensions["lbp_cds"].knowledge.services
                       if s.hook == "patient-view")
    cases: list[tuple[str, dict[str, Any], str]] = []
    req, count = sized_request(1_000_000, dict(service.prefetch))
    cases.append(("http", req, f"synthetic record of {count} resources"))
    synthea = synthea_request()
    if synthea:
        cases.append(("http_synthea", synthea[0], synthea[1]))
    server = Server(None)
    try:
        for key, req, what in cases:
            body = orjson.dumps(req)
            result = http_run(server, service.id, body, n, clients, duration)
            result["record"] = what
            RESULTS[key] = result
            single = result.get("single_client_wrk", result["single_client"])
            slow = result["single_client"]
            print(f"{key} ({what}, {len(body) / 1e6:.2f} MB prefetch): p50 {single['p50_ms']} "
                  f"ms p95 {single['p95_ms']} ms ({result['latency_client']}; with python "
                  f"requests as the client p50 {slow['p50_ms']} ms p95 {slow['p95_ms']} ms); "
                  f"orjson parse+dump p50 "
                  f"{result['orjson_parse_dump']['p50_ms']} ms (ratio "
                  f"{result['ratio_p50_to_orjson']}x; in a clean process with GC off "
                  f"{result['orjson_parse_dump_clean_process_p50_ms']} ms, ratio "
                  f"{result['ratio_p50_to_orjson_clean_process']}x); {clients} clients: "
                  f"{result['requests_per_second']} req/s "
                  f"({result.get('cpu_ms_per_call', '?')} ms of worker CPU per call, shares "
                  f"{result.get('cpu_share_per_worker', '?')})")
        rss = server.worker_rss_mb()
        pss = server.worker_pss_mb()
    finally:
        server.stop()
    RESULTS["rss"] = {"worker_rss_mb": rss, "worker_pss_mb": pss}
    print(f"worker RSS after the http runs: {rss} MB (PSS, shared pages split: {pss} MB)")


def bench_scaling(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        app = real_app(tmp)
        service = next(s for s in app.extensions["lbp_cds"].knowledge.services
                       if s.hook == "patient-view")
        rows = []
        for size in (100, 1000, 10000):
            body = orjson.dumps(patient_view_request(record(size), dict(service.prefetch)))
            t = timed(in_process(app, service.id, body), n if size < 10000 else max(5, n // 4))
            rows.append({"resources": size, "bytes": len(body), **t})
    slope_small = (rows[1]["p50_ms"] - rows[0]["p50_ms"]) / 900
    slope_large = (rows[2]["p50_ms"] - rows[1]["p50_ms"]) / 9000
    RESULTS["scaling"] = {"rows": rows, "ms_per_resource_100_to_1000": round(slope_small, 5),
                          "ms_per_resource_1000_to_10000": round(slope_large, 5),
                          "slope_ratio": round(slope_large / slope_small, 2)
                          if slope_small > 0 else None}
    for row in rows:
        print(f"scaling {row['resources']:>6} resources ({row['bytes'] / 1e6:.2f} MB): p50 "
              f"{row['p50_ms']} ms p95 {row['p95_ms']} ms")
    print(f"scaling slope {slope_small * 1000:.1f} µs/resource (100→1k), "
          f"{slope_large * 1000:.1f} µs/resource (1k→10k): ratio "
          f"{RESULTS['scaling']['slope_ratio']} (1.0 = linear)")


def bench_fetch(n: int) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.fhir_server import start_standalone  # type: ignore[attr-defined]

    fhir = start_standalone()
    try:
        resources = record(1000)
        fhir.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in resources]})
        with tempfile.TemporaryDirectory() as tmp:
            app = real_app(tmp)
            service = next(s for s in app.extensions["lbp_cds"].knowledge.services
                           if s.hook == "patient-view")
            rt_policy = app.extensions["lbp_cds"].policy
            session = requests.Session()
            headers = {"Authorization": f"Bearer {fhir.token}"}

            def slowest_query() -> float:
                worst = 0.0
                for template in service.prefetch.values():
                    url = template.replace("{{context.patientId}}", resources[0]["id"])
                    if "?" in url:  # the page size the service itself asks for
                        url += f"&_count={rt_policy.page_size}"
                    t = time.perf_counter()
                    nxt: str | None = f"{fhir.base_url}/{url}"
                    while nxt:
                        doc = session.get(nxt, headers=headers).json()
                        nxt = next((ln["url"] for ln in doc.get("link", [])
                                    if ln.get("relation") == "next"), None)
                    worst = max(worst, (time.perf_counter() - t) * 1000)
                return worst

            slowest = statistics.median(slowest_query() for _ in range(max(3, n // 10)))
            body = orjson.dumps({
                "hook": "patient-view", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
                "fhirServer": fhir.base_url,
                "fhirAuthorization": {"access_token": fhir.token, "token_type": "Bearer",
                                      "expires_in": 300, "scope": "patient/*.read",
                                      "subject": "bench", "patient": resources[0]["id"]},
                "context": {"userId": "Practitioner/bench", "patientId": resources[0]["id"]}})
            whole = timed(in_process(app, service.id, body), max(5, n // 10), warmup=1)
    finally:
        fhir.stop()
    RESULTS["fetch"] = {"resources": 1000, "slowest_single_query_ms": round(slowest, 1),
                        "hook_call_with_fetch": whole,
                        "overhead_ms": round(whole["p50_ms"] - slowest, 1),
                        "ratio_to_slowest_query": round(whole["p50_ms"] / slowest, 2)}
    print(f"fetch (1,000 resources on sekmet, no prefetch): hook call p50 {whole['p50_ms']} ms; "
          f"slowest single query (all pages) {slowest:.1f} ms; overhead "
          f"{RESULTS['fetch']['overhead_ms']} ms ({RESULTS['fetch']['ratio_to_slowest_query']}x)")


def bench_population(clients: int, duration: float) -> None:
    """Every record of the Synthea population (``tests/population.py``: new sciatica, dates moved)
    as a full-prefetch patient-view over HTTP: latency per call over all records (not only the
    largest), and calls per second with ``clients`` concurrent clients cycling through them.

    The clients are python-requests threads on the same two cores (wrk cannot vary the body
    per call), so the rate understates the service; worker CPU per call does not depend on it.
    """
    sys.path.insert(0, str(ROOT))
    from datetime import datetime, timezone

    from tests import population  # type: ignore[import-not-found]

    from lbp_cds.cli import request_from_bundle

    now = datetime.now(timezone.utc)
    bodies = [orjson.dumps(request_from_bundle(population.prepare(p, now).bundle,
                                               "patient-view"))
              for p in population.files()]
    if not bodies:
        print("population: ../shared/data/synthea-r4-population not found; skipped")
        return
    server = Server(None)
    try:
        url = f"{server.base}/cds-services/lbp-triage"
        headers = {"Content-Type": "application/json"}
        session = requests.Session()
        for body in bodies[:20]:  # warm-up
            session.post(url, data=body, headers=headers)
        samples = []
        cpu_before = server.worker_cpu_seconds()
        for body in bodies:
            t = time.perf_counter()
            resp = session.post(url, data=body, headers=headers)
            samples.append((time.perf_counter() - t) * 1000)
            assert resp.status_code == 200, resp.text[:300]
        single_cpu = sum(server.worker_cpu_seconds()) - sum(cpu_before)

        def client(offset: int, stop_at: float) -> int:
            http = requests.Session()
            done = 0
            while time.perf_counter() < stop_at:
                body = bodies[(offset + done) % len(bodies)]
                assert http.post(url, data=body, headers=headers).status_code == 200
                done += 1
            return done

        cpu_before = server.worker_cpu_seconds()
        started = time.perf_counter()
        stop_at = started + duration
        with ThreadPoolExecutor(clients) as pool:
            total = sum(pool.map(client, [i * len(bodies) // clients for i in range(clients)],
                                 [stop_at] * clients))
        elapsed = time.perf_counter() - started
        cpu_used = sum(server.worker_cpu_seconds()) - sum(cpu_before)
    finally:
        server.stop()
    sizes = sorted(len(b) for b in bodies)
    RESULTS["population"] = {
        "records": len(bodies), "prefetch_bytes_p50": sizes[len(sizes) // 2],
        "prefetch_bytes_max": sizes[-1],
        "single_client": {"p50_ms": round(statistics.median(samples), 2),
                          "p95_ms": round(percentile(samples, 95), 2),
                          "max_ms": round(max(samples), 2),
                          "cpu_ms_per_call": round(single_cpu / len(bodies) * 1000, 2)},
        "concurrent_clients": clients, "calls": total,
        "requests_per_second": round(total / elapsed, 1),
        "cpu_ms_per_call": round(cpu_used / total * 1000, 2)}
    r = RESULTS["population"]
    print(f"population ({r['records']} Synthea records with new sciatica, prefetch p50 "
          f"{r['prefetch_bytes_p50'] / 1e3:.0f} kB, max {r['prefetch_bytes_max'] / 1e3:.0f} kB): "
          f"one client p50 {r['single_client']['p50_ms']} ms p95 "
          f"{r['single_client']['p95_ms']} ms max {r['single_client']['max_ms']} ms "
          f"({r['single_client']['cpu_ms_per_call']} ms worker CPU per call); {clients} clients: "
          f"{r['requests_per_second']} calls/s ({r['cpu_ms_per_call']} ms worker CPU per call)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append",
                        choices=["core", "rules", "http", "population", "scaling", "fetch"])
    parser.add_argument("-n", type=int, default=200, help="samples per measurement")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds of the concurrent run")
    args = parser.parse_args()
    sections = args.only or ["core", "rules", "http", "population", "scaling", "fetch"]
    RESULTS["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    if "core" in sections:
        bench_core(args.n)
    if "rules" in sections:
        bench_rules(args.n)
    if "http" in sections:
        bench_http(args.n, args.clients, args.duration)
    if "population" in sections:
        bench_population(args.clients, args.duration)
    if "scaling" in sections:
        bench_scaling(max(10, args.n // 4))
    if "fetch" in sections:
        bench_fetch(args.n)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(RESULTS, indent=2))
    print(f"written {out / 'latest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
