"""Schema migrations (Alembic) on SQLite and on the real PostgreSQL: created or migrated on start.

The PostgreSQL cases run in a schema of their own (``search_path``) in the CI database, so they
can start from nothing without touching the tables other tests use.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    inspect,
    text,
)

from lbp_cds.cards import IssuedCard
from lbp_cds.store import MIGRATIONS, SCHEMA_REVISION, Store, alembic_config, metadata
from tests.conftest import postgres_schema

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=timezone.utc)
SCHEMA = "lbp_cds_migrations"


def release_010_metadata() -> MetaData:
    """The tables exactly as release 0.1.0 declared them (it ran ``create_all``, no Alembic)."""
    old = MetaData()
    Table("issued_cards", old,
          Column("card_uuid", String(64), primary_key=True),
          Column("service_id", String(128), nullable=False),
          Column("rule_id", String(64), nullable=False, index=True),
          Column("indicator", String(16), nullable=False),
          Column("hook_instance", String(128), nullable=False),
          Column("suggestion_uuids", Text, nullable=False, default=""),
          Column("issued_at", DateTime(timezone=True), nullable=False))
    Table("feedback", old,
          Column("id", Integer, primary_key=True, autoincrement=True),
          Column("dedupe_key", String(64), nullable=False, unique=True),
          Column("card_uuid", String(64), nullable=False, index=True),
          Column("outcome", String(16), nullable=False),
          Column("accepted_suggestions", Text, nullable=False, default=""),
          Column("override_system", String(256)),
          Column("override_code", String(128)),
          Column("override_display", String(256)),
          Column("has_comment", Boolean, nullable=False, default=False),
          Column("outcome_at", DateTime(timezone=True), nullable=False),
          Column("received_at", DateTime(timezone=True), nullable=False))
    Table("jwt_replay", old,
          Column("key_hash", String(64), primary_key=True),
          Column("expires_at", Float, nullable=False, index=True))
    return old


def _jti_hash(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()


def head() -> str:
    heads = ScriptDirectory(str(MIGRATIONS)).get_heads()
    assert len(heads) == 1, f"the migrations have branched: heads {heads}"
    assert heads[0] == SCHEMA_REVISION, "store.SCHEMA_REVISION must name the newest revision"
    return heads[0]


def differences(store: Store) -> list[object]:
    """What Alembic's autogenerate would still write: empty when the database matches
    ``store.metadata`` (tables, columns, types, nullability, indexes, unique constraints)."""
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_url(request, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store.sqlite3"
        return
    with postgres_schema(SCHEMA) as url:
        yield url


def card(rule: str = "LV-1") -> IssuedCard:
    return IssuedCard({"uuid": str(uuid.uuid4())}, rule, "warning", (str(uuid.uuid4()),))


def test_a_new_database_gets_the_newest_schema(empty_url):
    store = Store(empty_url)
    try:
        assert store.migrate() == head()
        assert differences(store) == []
        assert store.migrate() == head()  # a second start changes nothing
        assert differences(store) == []
    finally:
        store.engine.dispose()


def test_a_database_of_release_010_is_adopted_and_migrated_keeping_its_rows(empty_url):
    old = release_010_metadata()
    old_engine = create_engine(empty_url)
    old.create_all(old_engine)
    kept = card()
    with old_engine.begin() as conn:  # rows as release 0.1.0 wrote them
        conn.execute(old.tables["issued_cards"].insert(), [{
            "card_uuid": kept.card["uuid"], "service_id": "svc", "rule_id": "LV-1",
            "indicator": "warning", "hook_instance": "hook-1", "suggestion_uuids": "",
            "issued_at": T0}])
        conn.execute(old.tables["feedback"].insert(), [{
            "dedupe_key": "k1", "card_uuid": kept.card["uuid"], "outcome": "accepted",
            "accepted_suggestions": "", "has_comment": False, "outcome_at": T0,
            "received_at": T0}])
        conn.execute(old.tables["jwt_replay"].insert(), [{"key_hash": _jti_hash("iss|jti-1"),
                                                         "expires_at": 4e9}])
    old_engine.dispose()
    store = Store(empty_url)
    try:
        assert "alembic_version" not in inspect(store.engine).get_table_names()
        assert differences(store) != []  # the retention indexes and knowledge_digest are missing

        assert store.migrate() == head()

        assert differences(store) == []
        got = store.card(kept.card["uuid"])
        assert got is not None and got.rule_id == "LV-1"
        assert store.count("feedback") == 1
        assert store.claim("iss|jti-1", 4e9) is False  # the replay cache survived too
        indexes = {i["name"] for i in inspect(store.engine).get_indexes("issued_cards")}
        assert {"ix_issued_cards_rule_id", "ix_issued_cards_issued_at"} <= indexes
        (entry,) = store.feedback_report()
        assert (entry["issued"], entry["accepted"]) == (1, 1)
        assert store.feedback_report(knowledge="32ef") == []  # issued before digests were kept
    finally:
        store.engine.dispose()


def test_every_revision_downgrades_and_upgrades_again(empty_url):
    store = Store(empty_url)
    try:
        store.migrate()
        scripts = ScriptDirectory(str(MIGRATIONS))
        revisions = [r.revision for r in scripts.walk_revisions()]  # newest first
        assert revisions[0] == head() and len(revisions) >= 2
        with store.engine.connect() as conn:
            for target in revisions[1:] + ["base"]:
                command.downgrade(alembic_config(conn), target)
                conn.commit()
                now = MigrationContext.configure(conn).get_current_revision()
                assert now == (None if target == "base" else target)
        assert not {"issued_cards", "feedback", "jwt_replay"} & set(
            inspect(store.engine).get_table_names())
        assert store.migrate() == head()
        assert differences(store) == []
    finally:
        store.engine.dispose()


def test_a_release_runs_on_a_schema_a_newer_release_migrated(empty_url, caplog):
    """A rollback, or a rolling update's old pods: revisions only add, so the older release
    starts on the newer schema instead of failing on a revision it does not know."""
    store = Store(empty_url)
    try:
        store.migrate()
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'ffff-from-the-future'"))
        with caplog.at_level("WARNING", logger="lbp_cds.store"):
            assert store.migrate() == "ffff-from-the-future"
        assert "newer than this release" in caplog.text
        kept = card()
        store.record_issued("svc", "h", [kept], T0)
        assert store.card(kept.card["uuid"]) is not None
    finally:
        store.engine.dispose()


def test_a_process_that_finds_the_schema_current_does_not_load_alembic(tmp_path):
    url = f"sqlite:///{tmp_path}/store.sqlite3"
    Store(url).migrate()
    code = ("import sys; from lbp_cds.store import Store; print(Store(sys.argv[1]).migrate(), "
            "'alembic' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out == [head(), "False"]


STARTER = r"""
import sys, time
from alembic import command
from lbp_cds.store import Store
s = Store(sys.argv[1])
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all start migrating at one moment
print(s.migrate())
s.engine.dispose()
"""


def test_replicas_starting_together_migrate_once(empty_url):
    """Four processes migrate one empty database at the same moment: all start, none fails."""
    start_at = str(time.time() + 3)
    procs = [subprocess.Popen([sys.executable, "-c", STARTER, empty_url, start_at],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err[-2000:]
        assert out.strip() == head()
    store = Store(empty_url)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
        assert differences(store) == []
    finally:
        store.engine.dispose()


def test_revision_0004_marks_earlier_cards_shown_and_takes_an_older_replicas_rows(empty_url):
    """Cards issued before 0004 were all shown; a replica of the previous release, which
    inserts without the column during a rolling update, records shown cards too."""
    store = Store(empty_url)
    try:
        with store.engine.connect() as conn:
            command.upgrade(alembic_config(conn), "0003")
            conn.commit()
        before, during = card(), card()
        columns = ("card_uuid, service_id, rule_id, indicator, hook_instance, "
                   "suggestion_uuids, issued_at, knowledge_digest")
        insert_0003 = text(f"INSERT INTO issued_cards ({columns}) VALUES "
                           "(:u, 'svc', 'LV-1', 'warning', 'h', '', :t, NULL)")
        with store.engine.begin() as conn:
            conn.execute(insert_0003, {"u": before.card["uuid"], "t": T0})
        assert store.migrate() == head() == SCHEMA_REVISION
        assert differences(store) == []
        with store.engine.begin() as conn:  # the older release's INSERT, unchanged
            conn.execute(insert_0003, {"u": during.card["uuid"], "t": T0})
        hidden = card("CES-1")
        store.record_issued("svc", "h2", [], T0, silent=[hidden])
        got = {c.card["uuid"]: store.card(c.card["uuid"]) for c in (before, during, hidden)}
        assert [g.silent for g in got.values() if g] == [False, False, True]
        (row,) = [r for r in store.burden() if r["ruleId"] == "LV-1"]
        assert (row["shown"], row["silent"]) == (2, 0)
    finally:
        store.engine.dispose()
