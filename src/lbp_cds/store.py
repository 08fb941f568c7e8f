"""Issued cards, feedback and the JWT replay cache (SQLAlchemy Core).

SQLite file by default; any SQLAlchemy URL (PostgreSQL for several replicas). The schema is
created or migrated on start (``Store.migrate``, Alembic revisions in ``lbp_cds/migrations``);
revisions are additive so that older replicas keep working while a newer one starts. Nothing
here identifies a patient: cards are kept by uuid, rule, indicator, service and hookInstance;
feedback by card uuid, outcome, suggestion uuids and the coded override reason. A clinician's
free-text override comment may name the patient, so it is not stored (only whether there was
one).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    func,
    insert,
    select,
    false,
    text,
    true,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.pool import StaticPool

from lbp_cds.cards import IssuedCard
from lbp_cds.hooks import Feedback

log = logging.getLogger(__name__)
metadata = MetaData()
MIGRATIONS = Path(__file__).with_name("migrations")
# The newest revision in migrations/versions (tests/test_migrations.py checks they agree). A
# process that finds the database at it needs no Alembic: 0.2 s and 10 MB per gunicorn worker.
SCHEMA_REVISION = "0005"

issued_cards = Table(
    "issued_cards", metadata,
    Column("card_uuid", String(64), primary_key=True),
    Column("service_id", String(128), nullable=False),
    Column("rule_id", String(64), nullable=False, index=True),
    Column("indicator", String(16), nullable=False),
    Column("hook_instance", String(128), nullable=False),
    Column("suggestion_uuids", Text, nullable=False, default=""),
    Column("issued_at", DateTime(timezone=True), nullable=False, index=True),
    # The knowledge pack's SHA-256 (Knowledge.digest); NULL for cards issued before revision 0003.
    Column("knowledge_digest", String(64)),
    # A card of a rule run silently (revision 0004): recorded, never shown; no feedback on it.
    Column("silent", Boolean, nullable=False, default=False, server_default=false()),
)

feedback = Table(
    "feedback", metadata,
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
    Column("received_at", DateTime(timezone=True), nullable=False, index=True),
)

jwt_replay = Table(
    "jwt_replay", metadata,
    Column("key_hash", String(64), primary_key=True),
    Column("expires_at", Float, nullable=False, index=True),
)

# The SMART intake app's sessions (revision 0005): ``payload`` is encrypted with a key only the
# browser's cookie gives (``smart.SessionBox``); ``secret_hash`` checks the cookie.
smart_sessions = Table(
    "smart_sessions", metadata,
    Column("sid", String(32), primary_key=True),
    Column("secret_hash", String(64), nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("expires_at", Float, nullable=False, index=True),
)


@dataclass(frozen=True)
class StoredCard:
    """What the store knows of an issued card."""

    card_uuid: str
    service_id: str
    rule_id: str
    indicator: str
    suggestion_uuids: tuple[str, ...]
    silent: bool = False


class Store:
    """The service's persistent state.

    Args:
        url: a SQLAlchemy database URL.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict[str, Any] = {"future": True, "pool_pre_ping": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            if url in ("sqlite://", "sqlite:///:memory:"):
                kwargs["poolclass"] = StaticPool
        self.engine: Engine = create_engine(url, **kwargs)
        self._last_purge = 0.0
        self._last_session_purge = 0.0

    def migrate(self) -> str:
        """Create the schema, or bring it to the newest revision (safe from several processes).

        A database made by release 0.1.0, before migrations, is adopted as it is (revision
        0001) and then migrated. A database already migrated by a newer release is left as it
        is: revisions only add, so this release still runs on it (a rolling update's old pods,
        a rollback).

        Returns:
            The revision the database is at now.
        """
        if self._revision() == SCHEMA_REVISION:
            return SCHEMA_REVISION
        alembic_log = logging.getLogger("alembic")
        if alembic_log.level == logging.NOTSET:
            # At INFO Alembic logs its plugin set-up (on import) and its context on every run
            # (a dozen lines at each start); our one line below says what happened. A level
            # set on purpose (logging configuration, a debugging session) is left alone.
            alembic_log.setLevel(logging.WARNING)
        from alembic import command
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory
        from alembic.util import CommandError

        scripts = ScriptDirectory(str(MIGRATIONS))

        with self._migration_lock(), self.engine.connect() as conn:
            if self.engine.dialect.name == "sqlite":
                # Under the lock: changing the journal mode fails, without waiting, while
                # another process migrates.
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
                conn.commit()
            if self.engine.dialect.name == "postgresql":
                # Replicas starting together take turns; the lock ends with the transaction,
                # which also holds the migration (PostgreSQL's DDL is transactional).
                conn.execute(text("SELECT pg_advisory_xact_lock(4242001)"))
            current = MigrationContext.configure(conn).get_current_revision()
            if current is not None:
                try:
                    scripts.get_revision(current)
                except CommandError:
                    log.warning("database schema is newer than this release: running on it",
                                extra={"revision": current,
                                       "release_head": scripts.get_current_head()})
                    conn.rollback()
                    return current
            command.upgrade(alembic_config(conn), "head")
            conn.commit()
            revision = str(MigrationContext.configure(conn).get_current_revision())
            log.info("store schema migrated", extra={"from_revision": current or "none",
                                                     "to_revision": revision})
            return revision

    def _revision(self) -> str | None:
        """The database's schema revision, read without Alembic; None if it has none yet."""
        try:
            with self.engine.connect() as conn:
                return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except DBAPIError:
            return None  # no version table yet (or no database: Alembic will say which)

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[None]:
        """Serialise migrations of one SQLite file across processes (PostgreSQL locks itself)."""
        database = self.engine.url.database
        if self.engine.dialect.name != "sqlite" or not database or database == ":memory:":
            yield
            return
        import fcntl

        with open(f"{database}.migrate-lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def ping(self) -> bool:
        """Tell whether the database answers."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 - readiness reports any failure as not ready
            return False

    # -- issued cards ---------------------------------------------------------------------------
    def record_issued(self, service_id: str, hook_instance: str, cards: Iterable[IssuedCard],
                      now: datetime | None = None, knowledge_digest: str | None = None,
                      silent: Iterable[IssuedCard] = ()) -> None:
        """Keep a row per issued card (no patient data), with the knowledge pack's digest.

        Args:
            cards: the cards shown.
            silent: the cards of rules run silently (recorded with ``silent`` true).
        """
        when = now or datetime.now(timezone.utc)
        rows = [{
            "card_uuid": c.card["uuid"], "service_id": service_id, "rule_id": c.rule_id,
            "indicator": c.indicator, "hook_instance": hook_instance,
            "suggestion_uuids": ",".join(c.suggestion_uuids), "issued_at": when,
            "knowledge_digest": knowledge_digest, "silent": hidden,
        } for group, hidden in ((cards, False), (silent, True)) for c in group]
        if rows:
            with self.engine.begin() as conn:
                conn.execute(insert(issued_cards), rows)

    def card(self, card_uuid: str) -> StoredCard | None:
        """Look up an issued card by uuid."""
        with self.engine.connect() as conn:
            row = conn.execute(select(issued_cards).where(
                issued_cards.c.card_uuid == card_uuid)).mappings().first()
        if row is None:
            return None
        return StoredCard(row["card_uuid"], row["service_id"], row["rule_id"], row["indicator"],
                          tuple(s for s in row["suggestion_uuids"].split(",") if s),
                          bool(row["silent"]))

    # -- feedback -------------------------------------------------------------------------------
    def record_feedback(self, items: Iterable[Feedback], now: datetime | None = None
                        ) -> tuple[int, int]:
        """Store feedback idempotently.

        Returns:
            (new rows, duplicates ignored).
        """
        when = now or datetime.now(timezone.utc)
        new = dup = 0
        for item in items:
            reason = item.override_reason or {}
            row = {
                "dedupe_key": _dedupe_key(item),
                "card_uuid": item.card,
                "outcome": item.outcome,
                "accepted_suggestions": ",".join(item.accepted_suggestions),
                "override_system": reason.get("system"),
                "override_code": reason.get("code"),
                "override_display": reason.get("display"),
                "has_comment": bool(item.override_comment),
                "outcome_at": item.outcome_timestamp,
                "received_at": when,
            }
            try:
                with self.engine.begin() as conn:
                    conn.execute(insert(feedback), [row])
                new += 1
            except IntegrityError:
                dup += 1
        return new, dup

    def feedback_report(self, knowledge: str | None = None) -> list[dict[str, Any]]:
        """Acceptance and override rates per rule, with override reasons (shown cards only:
        the cards of rules run silently were never seen, ``burden`` counts them).

        Args:
            knowledge: only cards issued by the knowledge pack whose digest starts so.
        """
        where = (issued_cards.c.knowledge_digest.startswith(knowledge, autoescape=True)
                 if knowledge else true()) & (issued_cards.c.silent == false())
        with self.engine.connect() as conn:
            issued: dict[str, int] = dict(conn.execute(
                select(issued_cards.c.rule_id, func.count()).where(where)
                .group_by(issued_cards.c.rule_id)
            ).all())
            rows = conn.execute(
                select(issued_cards.c.rule_id, feedback.c.outcome, feedback.c.override_code,
                       feedback.c.override_display, feedback.c.card_uuid)
                .join(feedback, feedback.c.card_uuid == issued_cards.c.card_uuid).where(where)
            ).all()
        report: dict[str, dict[str, Any]] = {}
        for rule_id, count in issued.items():
            report[rule_id] = {"rule": rule_id, "issued": count, "accepted": 0,
                               "overridden": 0, "reasons": {}}
        seen: dict[tuple[str, str], str] = {}
        for rule_id, outcome, code, display, card_uuid in rows:
            # A card counts once per outcome however often the client re-sent its feedback.
            if (card_uuid, outcome) in seen:
                continue
            seen[(card_uuid, outcome)] = outcome
            entry = report[rule_id]
            entry[outcome] += 1
            if outcome == "overridden":
                label = display or code or "no coded reason"
                entry["reasons"][label] = entry["reasons"].get(label, 0) + 1
        for entry in report.values():
            n = entry["issued"]
            entry["acceptance_rate"] = round(entry["accepted"] / n, 3) if n else 0.0
            entry["override_rate"] = round(entry["overridden"] / n, 3) if n else 0.0
        return sorted(report.values(), key=lambda e: e["rule"])

    def burden(self, since: datetime | None = None) -> list[dict[str, Any]]:
        """The alert burden: per rule, knowledge digest, ISO week and indicator, the cards shown
        and silent, and of the shown ones how many were accepted and overridden (by reason).

        A card counts in the week it was issued (weeks start on Monday, UTC); a card counts once
        as accepted and once as overridden however often its feedback was sent. Rates are of
        the cards shown (None when none was shown).

        Args:
            since: only cards issued at or after this time.

        Returns:
            Rows ``{"ruleId", "knowledgeDigest", "week", "indicator", "shown", "silent",
            "accepted", "overridden", "overrideReasons": {code: n}, "acceptRate",
            "overrideRate"}`` sorted by rule, week, digest and indicator; ``week`` is the ISO
            date of the Monday, ``knowledgeDigest`` None for cards issued before revision 0003.
        """
        where = issued_cards.c.issued_at >= since if since is not None else true()
        key_cols = (issued_cards.c.rule_id, issued_cards.c.knowledge_digest,
                    issued_cards.c.indicator, issued_cards.c.issued_at)
        rows: dict[tuple[str, str | None, str, str], dict[str, Any]] = {}
        key_of: dict[str, tuple[str, str | None, str, str]] = {}

        def entry(rule: str, digest: str | None, indicator: str, at: datetime
                  ) -> tuple[tuple[str, str | None, str, str], dict[str, Any]]:
            day = _utc(at).date()
            week = (day - timedelta(days=day.weekday())).isoformat()
            key = (rule, digest, week, indicator)
            if key not in rows:
                rows[key] = {"ruleId": rule, "knowledgeDigest": digest, "week": week,
                             "indicator": indicator, "shown": 0, "silent": 0, "accepted": 0,
                             "overridden": 0, "overrideReasons": {}}
            return key, rows[key]

        with self.engine.connect() as conn:
            for card_uuid, silent, *cols in conn.execute(
                    select(issued_cards.c.card_uuid, issued_cards.c.silent, *key_cols)
                    .where(where)):
                key, row = entry(*cols)
                row["silent" if silent else "shown"] += 1
                if not silent:
                    key_of[card_uuid] = key
            outcomes = conn.execute(
                select(feedback.c.card_uuid, feedback.c.outcome, feedback.c.override_code)
                .join(issued_cards, feedback.c.card_uuid == issued_cards.c.card_uuid)
                .where(where & (issued_cards.c.silent == false()))
                .order_by(feedback.c.id)).all()
        seen: set[tuple[str, str]] = set()
        for card_uuid, outcome, code in outcomes:
            if (card_uuid, outcome) in seen or card_uuid not in key_of:
                continue
            seen.add((card_uuid, outcome))
            row = rows[key_of[card_uuid]]
            if outcome == "accepted":
                row["accepted"] += 1
            elif outcome == "overridden":
                row["overridden"] += 1
                label = code or "(no coded reason)"
                row["overrideReasons"][label] = row["overrideReasons"].get(label, 0) + 1
        for row in rows.values():
            n = row["shown"]
            row["acceptRate"] = round(row["accepted"] / n, 4) if n else None
            row["overrideRate"] = round(row["overridden"] / n, 4) if n else None
            row["overrideReasons"] = dict(sorted(row["overrideReasons"].items()))
        return [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[2], k[1] or "", k[3]))]

    def knowledge_versions(self) -> list[dict[str, Any]]:
        """The knowledge packs cards were issued by: digest, cards, first and last issue time.

        Cards issued before revision 0003 kept no digest: they appear with ``digest`` None.
        """
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(issued_cards.c.knowledge_digest, func.count(),
                       func.min(issued_cards.c.issued_at), func.max(issued_cards.c.issued_at))
                .group_by(issued_cards.c.knowledge_digest)
            ).all()
        versions = [{"digest": digest, "cards": int(count), "first_issued": _utc(first),
                     "last_issued": _utc(last)} for digest, count, first, last in rows]
        return sorted(versions, key=lambda v: v["first_issued"])

    # -- retention ------------------------------------------------------------------------------
    def purge(self, before: datetime, dry_run: bool = False) -> dict[str, int]:
        """Delete issued cards and feedback older than ``before``, and expired JWT ids.

        Cards go by ``issued_at``, feedback by ``received_at`` (both indexed, revision 0002).
        Feedback on a card that is gone no longer counts in ``feedback_report``: purge cards and
        feedback with one cut-off.

        Returns:
            Rows deleted (or, with ``dry_run``, that would be) per table.
        """
        wheres = {
            "issued_cards": issued_cards.c.issued_at < before,
            "feedback": feedback.c.received_at < before,
            "jwt_replay": jwt_replay.c.expires_at < time.time(),
            "smart_sessions": smart_sessions.c.expires_at < time.time(),
        }
        counts: dict[str, int] = {}
        with self.engine.begin() as conn:
            for name, where in wheres.items():
                table = metadata.tables[name]
                if dry_run:
                    counts[name] = int(conn.execute(
                        select(func.count()).select_from(table).where(where)).scalar_one())
                else:
                    counts[name] = int(conn.execute(delete(table).where(where)).rowcount)
        return counts

    def count(self, table: str) -> int:
        """Rows in a table (tests, readiness)."""
        tbl = metadata.tables[table]
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(tbl)).scalar_one())

    # -- SMART intake sessions ------------------------------------------------------------------
    def session_put(self, sid: str, secret_hash: str, payload: bytes, expires_at: float) -> None:
        """Create or replace a SMART session row (expired rows go on the way, at most once a
        minute)."""
        now = time.time()
        with self.engine.begin() as conn:
            if now - self._last_session_purge > 60:
                self._last_session_purge = now
                conn.execute(delete(smart_sessions).where(smart_sessions.c.expires_at < now))
            updated = conn.execute(
                smart_sessions.update().where(
                    (smart_sessions.c.sid == sid) & (smart_sessions.c.secret_hash == secret_hash))
                .values(payload=payload, expires_at=expires_at))
            if not updated.rowcount:
                conn.execute(insert(smart_sessions), [{
                    "sid": sid, "secret_hash": secret_hash, "payload": payload,
                    "expires_at": expires_at}])

    def session_get(self, sid: str) -> tuple[str, bytes] | None:
        """(secret_hash, payload) of a live SMART session, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(smart_sessions.c.secret_hash, smart_sessions.c.payload)
                               .where((smart_sessions.c.sid == sid)
                                      & (smart_sessions.c.expires_at >= time.time()))).first()
        return (str(row[0]), bytes(row[1])) if row else None

    def session_delete(self, sid: str) -> None:
        """Forget a SMART session."""
        with self.engine.begin() as conn:
            conn.execute(delete(smart_sessions).where(smart_sessions.c.sid == sid))

    # -- JWT replay cache -----------------------------------------------------------------------
    def claim(self, key: str, expires_at: float) -> bool:
        """Remember a JWT id until it expires; False if it was seen before (a replay)."""
        now = time.time()
        if now - self._last_purge > 60:
            self._last_purge = now
            with self.engine.begin() as conn:
                conn.execute(delete(jwt_replay).where(jwt_replay.c.expires_at < now))
        digest = hashlib.sha256(key.encode()).hexdigest()
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(jwt_replay), [{"key_hash": digest,
                                                    "expires_at": expires_at}])
            return True
        except IntegrityError:
            with self.engine.begin() as conn:
                stale = conn.execute(delete(jwt_replay).where(
                    (jwt_replay.c.key_hash == digest) & (jwt_replay.c.expires_at < now)))
            if stale.rowcount:
                return self.claim(key, expires_at)
            return False


def alembic_config(conn: Any) -> Any:
    """Alembic's configuration for migrating over ``conn`` (no ini file, no URL)."""
    from alembic.config import Config

    config = Config(attributes={"connection": conn})
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def _utc(value: datetime) -> datetime:
    """A stored time as an aware UTC datetime (SQLite gives it back without its zone)."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def _dedupe_key(item: Feedback) -> str:
    doc = {
        "card": item.card, "outcome": item.outcome,
        "accepted": sorted(item.accepted_suggestions),
        "reason": item.override_reason, "comment": item.override_comment,
        "at": item.outcome_timestamp.isoformat(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def store_label(store: Store) -> str:
    """Which database a command read, for the operator: the SQLite file or the URL, no password."""
    url = store.engine.url
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return str(Path(url.database).expanduser().absolute())
    return str(url.render_as_string(hide_password=True))
