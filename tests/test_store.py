"""The store on SQLite and on the real PostgreSQL (CI: 127.0.0.1:5432, database test)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import text

from lbp_cds.cards import IssuedCard
from lbp_cds.hooks import Feedback
from lbp_cds.store import Store, metadata
from tests.conftest import postgres_url

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=timezone.utc)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request, tmp_path: Path):
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path}/s.sqlite3")
    else:
        s = Store(postgres_url())
        _reset(s)
    s.migrate()
    yield s
    s.engine.dispose()


def _reset(s: Store) -> None:
    with s.engine.begin() as conn:
        for table in [*(t.name for t in reversed(metadata.sorted_tables)), "alembic_version"]:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))


def issued(rule: str = "LV-1") -> IssuedCard:
    card = {"uuid": str(uuid.uuid4()), "summary": "s", "indicator": "warning",
            "source": {"label": "x"}}
    return IssuedCard(card, rule, "warning", (str(uuid.uuid4()),))


def test_issued_cards_round_trip(store):
    c = issued()
    store.record_issued("lbp-imaging-order-sign", "hook-1", [c], T0)
    got = store.card(c.card["uuid"])
    assert got is not None
    assert (got.rule_id, got.indicator, got.service_id) == ("LV-1", "warning",
                                                            "lbp-imaging-order-sign")
    assert got.suggestion_uuids == c.suggestion_uuids
    assert store.card("nope") is None


def test_feedback_is_idempotent_and_reported(store):
    c = issued()
    store.record_issued("svc", "hook-1", [c], T0)
    fb = Feedback(c.card["uuid"], "overridden", (), {"system": "s", "code": "red-flag",
                                                     "display": "Red flag present"},
                  "free text", T0)
    assert store.record_feedback([fb, fb]) == (1, 1)
    assert store.record_feedback([fb]) == (0, 1)
    (entry,) = store.feedback_report()
    assert entry["overridden"] == 1 and entry["reasons"] == {"Red flag present": 1}
    assert entry["override_rate"] == 1.0


def test_replay_cache_refuses_a_second_use_and_forgets_expired_keys(store):
    far = 4_000_000_000.0
    assert store.claim("iss|jti-1", far) is True
    assert store.claim("iss|jti-1", far) is False
    assert store.claim("iss|jti-2", far) is True
    assert store.claim("iss|old", 1.0) is True
    assert store.claim("iss|old", 1.0) is True  # expired: it may be claimed again


def test_no_patient_data_in_the_schema():
    from lbp_cds.store import metadata

    columns = {c.name for t in metadata.tables.values() for c in t.columns}
    for forbidden in ("patient", "patient_id", "name", "token", "comment", "user_comment"):
        assert forbidden not in columns


WORKER = r"""
import sys, uuid
from datetime import datetime, timedelta, timezone
from lbp_cds.store import Store, metadata
from lbp_cds.hooks import Feedback
url, prefix, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
cards = [line.strip() for line in sys.stdin if line.strip()]
s = Store(url); s.migrate()
t = datetime(2026, 3, 2, 10, 0, tzinfo=timezone.utc)
for card in cards:
    for i in range(n):
        s.record_feedback([Feedback(card, "overridden", (), None, None, t)])  # same every time
    s.record_feedback([Feedback(card, "overridden", (), None, prefix, t)])   # one per process
claimed = sum(s.claim(f"iss|{c}", 4e9) for c in cards)
print(claimed)
"""


@pytest.mark.postgres
def test_two_processes_on_one_database_lose_and_duplicate_nothing():
    s = Store(postgres_url())
    _reset(s)
    s.migrate()
    cards = [issued() for _ in range(20)]
    s.record_issued("svc", "h", cards, T0)
    ids = "\n".join(c.card["uuid"] for c in cards)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, postgres_url(), name, "5"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    outs = [p.communicate(ids, timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    # Each jti is claimed by exactly one of the two processes.
    assert sum(int(o) for o in outs) == 20
    # One shared row per card, plus one row per process per card: 3 x 20.
    assert s.count("feedback") == 60
    s.engine.dispose()


def test_purge_deletes_only_what_is_older_than_the_cut_off(store):
    old, recent = issued(), issued()
    store.record_issued("svc", "h", [old], T0 - timedelta(days=400))
    store.record_issued("svc", "h", [recent], T0)
    for c, when in ((old, T0 - timedelta(days=400)), (recent, T0)):
        store.record_feedback([Feedback(c.card["uuid"], "accepted", (), None, None, when)], when)
    cut = T0 - timedelta(days=365)
    assert store.purge(cut, dry_run=True) == {"issued_cards": 1, "feedback": 1,
                                              "jwt_replay": 0, "smart_sessions": 0}
    assert store.count("issued_cards") == 2
    assert store.purge(cut) == {"issued_cards": 1, "feedback": 1, "jwt_replay": 0,
                                "smart_sessions": 0}
    assert store.card(old.card["uuid"]) is None
    assert store.card(recent.card["uuid"]) is not None
    (entry,) = store.feedback_report()
    assert (entry["issued"], entry["accepted"]) == (1, 1)


def test_the_feedback_report_reads_one_knowledge_version(store):
    before, after = "a" * 64, "b" * 64
    old_card, new_card, untraced = issued("LV-1"), issued("LV-1"), issued("LV-2")
    store.record_issued("svc", "h", [untraced], T0 - timedelta(days=9))
    store.record_issued("svc", "h", [old_card], T0 - timedelta(days=5), knowledge_digest=before)
    store.record_issued("svc", "h", [new_card], T0, knowledge_digest=after)
    assert store.knowledge_versions() == [
        {"digest": None, "cards": 1, "first_issued": T0 - timedelta(days=9),
         "last_issued": T0 - timedelta(days=9)},
        {"digest": before, "cards": 1, "first_issued": T0 - timedelta(days=5),
         "last_issued": T0 - timedelta(days=5)},
        {"digest": after, "cards": 1, "first_issued": T0, "last_issued": T0}]
    for c, outcome in ((old_card, "overridden"), (new_card, "accepted")):
        store.record_feedback([Feedback(c.card["uuid"], outcome, (), None, None, T0)])
    (entry,) = store.feedback_report(knowledge="aaaa")
    assert (entry["rule"], entry["issued"], entry["overridden"], entry["accepted"]) == (
        "LV-1", 1, 1, 0)
    (entry,) = store.feedback_report(knowledge=after)
    assert (entry["issued"], entry["accepted"]) == (1, 1)
    assert {e["rule"]: e["issued"] for e in store.feedback_report()} == {"LV-1": 2, "LV-2": 1}
    assert store.feedback_report(knowledge="a%") == []  # LIKE wildcards are not wildcards
