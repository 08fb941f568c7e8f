"""``Store.burden`` and ``lbp-cds burden`` on SQLite and the real PostgreSQL (issue 17)."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from lbp_cds.cards import IssuedCard
from lbp_cds.cli import main
from lbp_cds.hooks import Feedback
from lbp_cds.store import Store
from tests.conftest import postgres_schema

# Wednesday 4 March 2026 and Monday 9 March 2026 (weeks of Monday 2 and Monday 9 March).
WED = datetime(2026, 3, 4, 23, 30, tzinfo=timezone.utc)
MON = datetime(2026, 3, 9, 0, 5, tzinfo=timezone.utc)
OLD, NEW = "a" * 64, "b" * 64
KEYS = ("ruleId", "knowledgeDigest", "week", "indicator", "shown", "silent", "accepted",
        "overridden", "overrideReasons", "acceptRate", "overrideRate")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store.sqlite3"
        return
    with postgres_schema("lbp_cds_burden") as pg:
        yield pg


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    s = Store(url)
    s.migrate()
    yield s
    s.engine.dispose()


def card(rule: str, indicator: str = "warning") -> IssuedCard:
    return IssuedCard({"uuid": str(uuid.uuid4())}, rule, indicator, (str(uuid.uuid4()),))


def fb(c: IssuedCard, outcome: str, code: str | None = None, at: datetime = MON) -> Feedback:
    reason = {"system": "https://lbp-cds.example.org/override", "code": code,
              "display": f"display of {code}"} if code else None
    accepted = c.suggestion_uuids if outcome == "accepted" else ()
    return Feedback(c.card["uuid"], outcome, accepted, reason, None, at)


def fill(store: Store) -> dict[str, IssuedCard]:
    """Two weeks, two knowledge digests, shown and silent cards, feedback sent twice."""
    a, b, c, d = card("LV-1"), card("LV-1"), card("LV-1"), card("LV-1")
    store.record_issued("svc", "h1", [a, b, c], WED, knowledge_digest=OLD,
                        silent=[card("CES-1", "critical")])
    store.record_issued("svc", "h2", [d], MON, knowledge_digest=NEW,
                        silent=[card("CES-1", "critical"), card("CES-1", "critical")])
    store.record_issued("svc", "h3", [], MON, knowledge_digest=NEW, silent=[card("FX-1")])
    store.record_feedback([fb(a, "accepted"), fb(b, "overridden", "not-relevant"),
                           fb(c, "overridden"), fb(d, "overridden", "not-relevant")])
    # A client re-sends feedback with another timestamp: still one override of that card.
    store.record_feedback([fb(b, "overridden", "not-relevant", MON + timedelta(hours=1))])
    return {"a": a, "b": b, "c": c, "d": d}


def test_burden_counts_per_rule_digest_week_and_indicator(store):
    fill(store)
    rows = store.burden()
    assert all(tuple(r) == KEYS for r in rows)
    assert rows == [
        {"ruleId": "CES-1", "knowledgeDigest": OLD, "week": "2026-03-02", "indicator": "critical",
         "shown": 0, "silent": 1, "accepted": 0, "overridden": 0, "overrideReasons": {},
         "acceptRate": None, "overrideRate": None},
        {"ruleId": "CES-1", "knowledgeDigest": NEW, "week": "2026-03-09", "indicator": "critical",
         "shown": 0, "silent": 2, "accepted": 0, "overridden": 0, "overrideReasons": {},
         "acceptRate": None, "overrideRate": None},
        {"ruleId": "FX-1", "knowledgeDigest": NEW, "week": "2026-03-09", "indicator": "warning",
         "shown": 0, "silent": 1, "accepted": 0, "overridden": 0, "overrideReasons": {},
         "acceptRate": None, "overrideRate": None},
        {"ruleId": "LV-1", "knowledgeDigest": OLD, "week": "2026-03-02", "indicator": "warning",
         "shown": 3, "silent": 0, "accepted": 1, "overridden": 2,
         "overrideReasons": {"(no coded reason)": 1, "not-relevant": 1},
         "acceptRate": 0.3333, "overrideRate": 0.6667},
        {"ruleId": "LV-1", "knowledgeDigest": NEW, "week": "2026-03-09", "indicator": "warning",
         "shown": 1, "silent": 0, "accepted": 0, "overridden": 1,
         "overrideReasons": {"not-relevant": 1}, "acceptRate": 0.0, "overrideRate": 1.0},
    ]
    json.dumps(rows)  # JSON as it is: no datetimes, no tuples


def test_burden_since_a_date_and_cards_kept_before_digests(store):
    fill(store)
    assert {r["week"] for r in store.burden(MON)} == {"2026-03-09"}
    assert store.burden(MON + timedelta(days=7)) == []
    store.record_issued("svc", "h4", [card("LV-1")], MON + timedelta(days=6))  # Sunday, no digest
    (row,) = store.burden(MON + timedelta(days=1))
    assert (row["knowledgeDigest"], row["week"], row["shown"]) == (None, "2026-03-09", 1)


# -- the command ----------------------------------------------------------------------------------
@pytest.fixture
def filled(url: str, monkeypatch, tmp_path: Path) -> str:
    s = Store(url)
    s.migrate()
    fill(s)
    s.engine.dispose()
    monkeypatch.setenv("LBP_CDS_DATABASE_URL", url)
    monkeypatch.chdir(tmp_path)
    return url


def test_burden_command_prints_json_and_says_which_database(filled, capsys):
    assert main(["burden", "--json"]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert len(rows) == 5 and all(tuple(r) == KEYS for r in rows)
    assert "store: " in err and "(8 issued cards; 8 counted, in 5 rows)" in err
    if filled.startswith("sqlite"):
        assert str(Path(filled.removeprefix("sqlite:///")).absolute()) in err
    else:
        assert "postgresql" in err and "lbp_cds_burden" in err


def test_burden_command_prints_a_table(filled, capsys):
    assert main(["burden", "--since", "2026-03-09"]) == 0
    out, err = capsys.readouterr()
    assert "since 2026-03-09" in err and "in 3 rows" in err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["week", "rule", "knowledge", "indicator"]
    lv = next(line for line in lines if "LV-1" in line)
    assert lv.split()[:10] == ["2026-03-09", "LV-1", "b" * 12, "warning", "1", "0", "0", "1",
                               "0.0%", "100.0%"]
    assert "not-relevant (1)" in lv
    assert "-" in next(line for line in lines if "FX-1" in line).split()  # no rate of 0 shown


def test_burden_command_refuses_a_missing_sqlite_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LBP_CDS_DATABASE_URL", "sqlite:///nowhere.sqlite3")
    monkeypatch.chdir(tmp_path)
    assert main(["burden"]) == 1
    err = capsys.readouterr().err
    assert f"no store at {tmp_path / 'nowhere.sqlite3'}" in err
    assert not (tmp_path / "nowhere.sqlite3").exists()


def test_burden_html_without_the_report_module_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lbp_cds.report", None)  # as if not installed
    monkeypatch.setenv("LBP_CDS_DATABASE_URL", "sqlite:///nowhere.sqlite3")
    monkeypatch.chdir(tmp_path)
    assert main(["burden", "--html", "out.html"]) == 2
    assert ("the HTML report needs lbp_cds.report (not installed)"
            in capsys.readouterr().err)
    assert not (tmp_path / "out.html").exists()


def test_burden_html_hands_the_rows_and_what_was_read_to_the_report(filled, tmp_path,
                                                                    monkeypatch, capsys):
    seen: dict[str, Any] = {}

    def burden_html(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
        seen.update(rows=rows, meta=meta)
        return "<html>report</html>"

    module = types.ModuleType("lbp_cds.report")
    module.__spec__ = importlib.machinery.ModuleSpec("lbp_cds.report", None)
    module.burden_html = burden_html  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lbp_cds.report", module)
    assert main(["burden", "--since", "2026-03-01", "--html", "r.html", "--json"]) == 0
    out, err = capsys.readouterr()
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == "<html>report</html>"
    assert seen["rows"] == json.loads(out)
    meta = seen["meta"]
    assert set(meta) == {"database", "rows", "since", "generated"}
    assert meta["rows"] == 5 and meta["since"] == "2026-03-01"
    assert meta["database"] in err
    assert datetime.fromisoformat(meta["generated"]).tzinfo is not None
