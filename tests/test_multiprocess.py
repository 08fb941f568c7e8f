"""Two ``lbp-cds serve`` processes (gunicorn, 2 workers each) on ONE PostgreSQL database.

Cards are issued through both; feedback for every card is then posted concurrently to both,
with repeats: every feedback row is stored exactly once, nothing is lost. The JWT replay cache is
in the database too: a ``jti`` accepted by one server is refused by the other, even in a token
made for the other server's own URL.

The database is ``LBP_CDS_TEST_POSTGRES_URL`` (``make test`` sets it). The servers work in a
schema of their own (``search_path``), dropped and re-created first, so that other suites using
the same database (``tests/test_store.py`` drops the public tables) cannot interfere.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import postgres_schema
from tests.service_server import (
    CdsClientKeys,
    ServerFactory,
    ServiceServer,
    triage_request,
)

pytestmark = pytest.mark.postgres

SCHEMA = "lbp_cds_multiprocess"
CARDS_PER_SERVER = 8
REPEATS = 3


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    """The test database, with ``search_path`` set to a fresh schema (tables dropped)."""
    with postgres_schema(SCHEMA) as url:
        yield url


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> CdsClientKeys:
    return CdsClientKeys(tmp_path_factory.mktemp("client-keys"))


@pytest.fixture(scope="module")
def servers(module_service_server: ServerFactory, database_url: str, keys: CdsClientKeys
            ) -> tuple[ServiceServer, ServiceServer]:
    """Two servers, each with its own public URL (so its own JWT audience), one database."""
    env = {"LBP_CDS_DATABASE_URL": database_url, "LBP_CDS_PUBLIC_BASE_URL": "{base_url}"}
    args = ["--clients", str(keys.clients_file), "--workers", "2", "--threads", "4"]
    first = module_service_server(env=env, args=args)
    second = module_service_server(env=env, args=args)
    assert first.base_url != second.base_url
    return first, second


def query(database_url: str, sql: str) -> list[Any]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql)).all())
    finally:
        engine.dispose()


def issue_card(server: ServiceServer, keys: CdsClientKeys) -> dict[str, Any]:
    path = "/cds-services/mini-triage"
    response = server.post(path, json=triage_request(f"p-{uuid.uuid4().hex[:8]}"),
                           headers=keys.bearer(server.url(path)))
    assert response.status_code == 200, response.text
    cards = response.json()["cards"]
    assert len(cards) == 1
    return dict(cards[0])


def test_concurrent_feedback_on_two_servers_is_stored_exactly_once(
        servers: tuple[ServiceServer, ServiceServer], keys: CdsClientKeys,
        database_url: str) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        cards = list(pool.map(lambda s: issue_card(s, keys),
                              [s for s in servers for _ in range(CARDS_PER_SERVER)]))
    n = len(cards)
    assert len({c["uuid"] for c in cards}) == n
    assert query(database_url, "SELECT count(*) FROM issued_cards")[0][0] == n

    # Two distinct feedback items per card (two override timestamps), each posted REPEATS times
    # to each server, all at once and in a shuffled order.
    jobs = []
    for card in cards:
        for stamp in ("2026-03-02T10:05:31Z", "2026-03-02T11:00:00Z"):
            body = {"feedback": [{"card": card["uuid"], "outcome": "overridden",
                                  "overrideReason": {"reason": {
                                      "system": "http://example.org/reasons",
                                      "code": "not-relevant", "display": "Not relevant"}},
                                  "outcomeTimestamp": stamp}]}
            jobs += [(server, body) for server in servers for _ in range(REPEATS)]
    order = sorted(range(len(jobs)), key=lambda i: uuid.uuid4().hex)
    jobs = [jobs[i] for i in order]

    def post(job: tuple[ServiceServer, dict[str, Any]]) -> tuple[int, dict[str, Any]]:
        server, body = job
        path = "/cds-services/mini-triage/feedback"
        response = server.post(path, json=body, headers=keys.bearer(server.url(path)))
        return response.status_code, response.json()

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(post, jobs))
    assert [status for status, _ in results] == [200] * len(jobs), results
    stored = sum(body["stored"] for _, body in results)
    duplicates = sum(body["duplicates"] for _, body in results)
    assert stored == 2 * n  # each distinct item stored by exactly one request
    assert duplicates == len(jobs) - 2 * n
    # In the database: two rows per card, no more, none lost.
    assert query(database_url, "SELECT count(*) FROM feedback")[0][0] == 2 * n
    per_card = dict(query(database_url,
                          "SELECT card_uuid, count(*) FROM feedback GROUP BY card_uuid"))
    assert per_card == {c["uuid"]: 2 for c in cards}
    assert query(database_url,
                 "SELECT count(DISTINCT dedupe_key) FROM feedback")[0][0] == 2 * n
    # Both servers really served: each issued and stored through its own processes.
    for server in servers:
        records = [json.loads(line) for line in server.log_text().splitlines()
                   if line.startswith("{")]
        assert Counter(r.get("msg") for r in records)["feedback stored"] == 2 * n * REPEATS
        assert server.log_text().count("Booting worker") >= 2


def test_jti_accepted_by_one_server_is_refused_by_the_other(
        servers: tuple[ServiceServer, ServiceServer], keys: CdsClientKeys) -> None:
    first, second = servers
    jti = str(uuid.uuid4())
    path = "/cds-services"
    # Each token is valid for its own server (aud = that server's URL); they share the jti.
    to_first = keys.bearer(first.url(path), jti=jti)
    to_second = keys.bearer(second.url(path), "RS384", jti=jti)
    assert first.get(path, headers=to_first).status_code == 200
    request_id = uuid.uuid4().hex
    refused = second.get(path, headers=to_second | {"X-Request-Id": request_id})
    assert refused.status_code == 401
    reasons = [json.loads(line).get("reason") for line in second.log_text().splitlines()
               if request_id in line and "client authentication failed" in line]
    assert reasons == ["jti already used (replay)"]
    # The control: the same kind of token with a fresh jti passes on the second server.
    assert second.get(path, headers=keys.bearer(second.url(path), "RS384")).status_code == 200


def test_one_jti_raced_on_both_servers_is_accepted_once(
        servers: tuple[ServiceServer, ServiceServer], keys: CdsClientKeys) -> None:
    jti = str(uuid.uuid4())
    path = "/cds-services"
    calls = [(server, keys.bearer(server.url(path), jti=jti)) for server in servers
             for _ in range(6)]
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        statuses = list(pool.map(lambda c: c[0].get(path, headers=c[1]).status_code, calls))
    assert sorted(statuses) == [200] + [401] * (len(calls) - 1)
