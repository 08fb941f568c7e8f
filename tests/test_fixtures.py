"""Fixture patients: reading scenarios, moving their dates, and loading them into a FHIR server."""

from __future__ import annotations

import copy
import functools
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from hypothesis import given, settings
from hypothesis import strategies as st

from lbp_cds import cli, create_app, fixtures
from lbp_cds.config import Settings
from lbp_cds.fhir_data import template_type
from lbp_cds.fixtures import (
    FixtureError,
    Scenario,
    days_between,
    load_into_server,
    load_scenarios,
    rebase,
    shift_date_value,
    shift_dates,
    transaction_bundle,
)
from lbp_cds.probe import build_request, hook_context
from tests.fhir_server import FhirServer

NOW = datetime(2026, 3, 2, 10, 0, tzinfo=timezone.utc)


def _parse(value: str) -> datetime:
    """A FHIR date/dateTime as a datetime (partial dates at their first day; naive stays naive)."""
    if len(value) == 4:
        value += "-01-01"
    elif len(value) == 7:
        value += "-01"
    return datetime.fromisoformat(value)


@functools.cache
def _read_all() -> tuple[Scenario, ...]:
    return tuple(load_scenarios())


def _all_scenarios() -> list[Scenario]:
    scenarios = list(_read_all())
    assert scenarios, f"no scenario files in {fixtures.default_root() / 'scenarios'}"
    return scenarios


def _mini_scenario(tmp_path: Path, sid: str = "mini-case", **extra: Any) -> Path:
    folder = tmp_path / "scenarios"
    folder.mkdir(parents=True, exist_ok=True)
    text = f"""\
id: {sid}
title: A small case
now: "2026-03-02T10:00:00Z"
hook: order-select
patient: {{resourceType: Patient, id: {sid}-pt, gender: female, birthDate: 1980-07-15}}
resources:
  - resourceType: Condition
    id: {sid}-lbp
    subject: {{reference: Patient/{sid}-pt}}
    code: {{coding: [{{system: http://hl7.org/fhir/sid/icd-10-cm, code: M54.50}}]}}
    onsetDateTime: 2026-02-20
    recordedDate: "2026-02-21T09:15:00+01:00"
draft_orders:
  - resourceType: ServiceRequest
    id: {sid}-mri
    status: draft
    intent: order
    subject: {{reference: Patient/{sid}-pt}}
    code: {{coding: [{{system: http://loinc.org, code: 30679-5}}]}}
    authoredOn: "2026-03-02T09:55:00Z"
selections: ["ServiceRequest/{sid}-mri"]
expect: {{cards: [{{rule: LV, indicator: warning}}], notes: written for the fixture tests}}
"""
    path = folder / f"{sid}.yaml"
    path.write_text(text + "".join(f"{k}: {v}\n" for k, v in extra.items()))
    return path


# -- shift_dates -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "days", "expected"), [
    ("2026-03-02", 1, "2026-03-03"),
    ("2026-03-02", -2, "2026-02-28"),
    ("2024-02-28", 1, "2024-02-29"),
    ("2026-03-02T10:00:00Z", 30, "2026-04-01T10:00:00Z"),
    ("2026-03-02T10:00:00.123+05:30", -1, "2026-03-01T10:00:00.123+05:30"),
    ("2026-03-02T23:59:59-08:00", 1, "2026-03-03T23:59:59-08:00"),
    ("2026-03-02T10:00:00", 7, "2026-03-09T10:00:00"),
    ("2026-03", 40, "2026-04"),
    ("2026", 400, "2027"),
    ("not a date", 5, "not a date"),
    ("2026-13-40", 5, "2026-13-40"),
])
def test_shift_date_value_keeps_precision_and_zone(value: str, days: int, expected: str) -> None:
    """Only the calendar date moves; the time, fraction, zone and precision stay as written."""
    assert shift_date_value(value, days) == expected


@settings(max_examples=200, deadline=None)
@given(
    moment=st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2090, 12, 31)),
    offset_minutes=st.integers(min_value=-14 * 60, max_value=14 * 60).map(lambda m: m - m % 15),
    days=st.integers(min_value=-3000, max_value=3000),
    form=st.sampled_from(["date", "seconds", "millis", "z"]),
)
def test_shift_moves_by_exactly_n_days(moment: datetime, offset_minutes: int, days: int,
                                       form: str) -> None:
    """Whatever the form, the moved value is exactly ``days`` days from the original."""
    tz = timezone(timedelta(minutes=offset_minutes))
    aware = moment.replace(tzinfo=tz)
    value = {
        "date": aware.date().isoformat(),
        "seconds": aware.isoformat(timespec="seconds"),
        "millis": aware.isoformat(timespec="milliseconds"),
        "z": moment.replace(tzinfo=timezone.utc).isoformat(timespec="seconds").replace(
            "+00:00", "Z"),
    }[form]
    moved = shift_date_value(value, days)
    assert len(moved) == len(value)
    assert moved[10:] == value[10:], "time and zone must stay as written"
    assert _parse(moved) - _parse(value) == timedelta(days=days)


def test_shift_dates_walks_known_keys_only() -> None:
    """Date-bearing keys move at any depth; other strings, numbers and the input stay unchanged."""
    resource = {
        "resourceType": "QuestionnaireResponse",
        "id": "2026-03-02",  # an id that looks like a date is not a date
        "authored": "2026-03-02T10:00:00Z",
        "meta": {"tag": [{"code": "2026-03-02"}]},
        "extension": [{"url": "x", "valueDateTime": "2026-02-01"}],
        "item": [{"linkId": "lbp-onset-date", "answer": [{"valueDate": "2026-02-20"}]},
                 {"linkId": "n", "answer": [{"valueInteger": 3}]}],
        "effectivePeriod": {"start": "2026-01-01T08:00:00+01:00", "end": "2026-01-02"},
    }
    original = copy.deepcopy(resource)
    moved = shift_dates(resource, 10)
    assert resource == original, "the argument must not be modified"
    assert moved["id"] == "2026-03-02"
    assert moved["meta"] == original["meta"]
    assert moved["authored"] == "2026-03-12T10:00:00Z"
    assert moved["extension"][0]["valueDateTime"] == "2026-02-11"
    assert moved["item"][0]["answer"][0]["valueDate"] == "2026-03-02"
    assert moved["item"][1]["answer"][0]["valueInteger"] == 3
    assert moved["effectivePeriod"] == {"start": "2026-01-11T08:00:00+01:00", "end": "2026-01-12"}


def test_days_between_rounds_to_the_nearest_day() -> None:
    """A datetime target rounds to whole days; a date target keeps the case's time of day."""
    assert days_between(NOW, NOW + timedelta(days=3, hours=11)) == 3
    assert days_between(NOW, NOW + timedelta(days=3, hours=13)) == 4
    assert days_between(NOW, NOW - timedelta(days=3, hours=13)) == -4
    assert days_between(NOW, date(2026, 3, 12)) == 10


# -- reading and rebasing --------------------------------------------------------------------------
def test_read_keeps_dates_as_strings_and_rebase_moves_everything(tmp_path: Path) -> None:
    """Unquoted YAML dates stay FHIR strings; rebasing moves record, drafts and clock together."""
    _mini_scenario(tmp_path)
    (sc,) = load_scenarios(root=tmp_path)
    assert sc.patient["birthDate"] == "1980-07-15"
    assert sc.resources[0]["onsetDateTime"] == "2026-02-20"
    assert sc.expected_cards == [("LV", "warning")] and sc.expected_status == 200
    moved = rebase(sc, date(2026, 11, 22))
    days = (date(2026, 11, 22) - date(2026, 3, 2)).days
    assert moved.now == NOW + timedelta(days=days)
    assert moved.patient["birthDate"] == (date(1980, 7, 15) + timedelta(days=days)).isoformat()
    assert moved.resources[0]["onsetDateTime"] == "2026-11-12"
    assert moved.resources[0]["recordedDate"] == "2026-11-13T09:15:00+01:00"
    assert moved.draft_orders[0]["authoredOn"] == "2026-11-22T09:55:00Z"
    assert moved.selections == sc.selections
    assert sc.resources[0]["onsetDateTime"] == "2026-02-20", "the original is unchanged"


def test_malformed_scenarios_are_refused_with_the_file_name(tmp_path: Path) -> None:
    """A scenario whose id differs from its file, or without a zoned clock, is named."""
    path = _mini_scenario(tmp_path, "case-a")
    path.rename(path.with_name("case-b.yaml"))
    with pytest.raises(FixtureError, match=r"case-b\.yaml: id 'case-a' differs"):
        load_scenarios(root=tmp_path)
    with pytest.raises(FixtureError, match="no scenario nope"):
        load_scenarios(["nope"], root=tmp_path)
    bad = tmp_path / "scenarios" / "case-b.yaml"
    bad.write_text(bad.read_text().replace("id: case-a", "id: case-b")
                   .replace('"2026-03-02T10:00:00Z"', '"2026-03-02T10:00:00"'))
    with pytest.raises(FixtureError, match="now must be"):
        load_scenarios(root=tmp_path)


def test_scenario_root_is_found() -> None:
    """From a checkout the scenarios come from ``<repo>/fixtures``."""
    assert fixtures.default_root() == Path(__file__).resolve().parents[1] / "fixtures"


# -- transaction bundles ---------------------------------------------------------------------------
def test_transaction_bundles_are_valid_fhir() -> None:
    """Every scenario, dated to today, gives a valid R4 transaction of valid resources."""
    problems: list[str] = []
    for sc in _all_scenarios():
        dated = rebase(sc, datetime.now(timezone.utc))
        bundle = transaction_bundle(dated)
        assert [e["request"] for e in bundle["entry"]] == [
            {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"} for r in dated.record()]
        assert not {d["id"] for d in dated.draft_orders} & {
            e["resource"]["id"] for e in bundle["entry"]
            if e["resource"]["resourceType"] == "ServiceRequest"}, "drafts are not loaded"
        try:
            Bundle.model_validate(bundle)
        except ValueError as exc:
            problems.append(f"{sc.id}: Bundle: {exc}")
        for res in [*dated.record(), *dated.draft_orders]:
            try:
                get_fhir_model_class(res["resourceType"]).model_validate(res)
            except (ValueError, KeyError) as exc:
                problems.append(f"{sc.id}: {res['resourceType']}/{res['id']}: {exc}")
    assert not problems, "\n".join(problems)


def test_scenarios_sharing_an_id_share_the_resource() -> None:
    """Loaded together, no scenario may overwrite another's resource with other content."""
    assert fixtures.id_collisions(_all_scenarios()) == {}


def test_clashing_ids_are_refused_before_loading(tmp_path: Path) -> None:
    """Two cases with different content under one id: nothing is sent, both cases are named."""
    _mini_scenario(tmp_path, "case-a")
    _mini_scenario(tmp_path, "case-b")
    same = load_scenarios(root=tmp_path)
    assert fixtures.id_collisions(same) == {}, "different ids, no clash"
    path = tmp_path / "scenarios" / "case-b.yaml"
    path.write_text(path.read_text().replace("id: case-b-lbp", "id: case-a-lbp"))
    assert fixtures.id_collisions(load_scenarios(root=tmp_path)) == {
        "Condition/case-a-lbp": ["case-a", "case-b"]}
    with pytest.raises(FixtureError, match=r"Condition/case-a-lbp in case-a, case-b"):
        load_into_server("http://127.0.0.1:9/fhir", None, root=tmp_path)


# -- loading into a real FHIR server ---------------------------------------------------------------
def _stored(server: FhirServer, scenarios: list[Scenario]) -> dict[str, dict[str, Any]]:
    """What the server holds for the scenarios' resources, by ``Type/id``, without ``meta``."""
    out: dict[str, dict[str, Any]] = {}
    by_type: dict[str, list[str]] = {}
    for sc in scenarios:
        for res in sc.record():
            by_type.setdefault(res["resourceType"], []).append(res["id"])
    for rtype, ids in by_type.items():
        for start in range(0, len(ids), 50):
            found, _ = server.search_all(rtype, _id=",".join(ids[start:start + 50]))
            for res in found:
                out[f"{rtype}/{res['id']}"] = {k: v for k, v in res.items() if k != "meta"}
    return out


def _type_totals(server: FhirServer, types: set[str]) -> dict[str, int]:
    return {t: int(server.read_json(t, _summary="count")["total"]) for t in sorted(types)}


@pytest.mark.fhir_server
def test_loading_twice_is_idempotent(fhir_server: FhirServer) -> None:
    """PUT by id: a second load stores nothing new and leaves the same content."""
    scenarios = _all_scenarios()
    types = {r["resourceType"] for sc in scenarios for r in sc.record()}
    now = datetime.now(timezone.utc)
    first = load_into_server(fhir_server.base_url, fhir_server.token, now=now)
    totals = _type_totals(fhir_server, types)
    content = _stored(fhir_server, [rebase(sc, now) for sc in scenarios])
    second = load_into_server(fhir_server.base_url, fhir_server.token, now=now)
    assert second == first
    assert [sid for sid, _ in first] == [sc.id for sc in scenarios]
    assert [n for _, n in first] == [len(sc.record()) for sc in scenarios]
    unique = {f"{r['resourceType']}/{r['id']}" for sc in scenarios for r in sc.record()}
    assert set(content) == unique, "every resource is stored"
    assert _type_totals(fhir_server, types) == totals
    assert _stored(fhir_server, [rebase(sc, now) for sc in scenarios]) == content


@pytest.mark.fhir_server
def test_loaded_dates_follow_today(fhir_server: FhirServer, tmp_path: Path) -> None:
    """By default the case is dated so that its ``now`` is today."""
    _mini_scenario(tmp_path, "mini-dated")
    load_into_server(fhir_server.base_url, fhir_server.token, root=tmp_path)
    stored = fhir_server.read_json("Condition/mini-dated-lbp")
    days = (datetime.now(timezone.utc).date() - date(2026, 3, 2)).days
    moved = date(2026, 2, 20) + timedelta(days=days)
    assert stored["onsetDateTime"] in {(moved + timedelta(days=d)).isoformat() for d in (0, 1)}


@pytest.mark.fhir_server
def test_refusal_carries_the_operation_outcome(fhir_server: FhirServer, tmp_path: Path) -> None:
    """A bad token or an invalid resource fails with the server's words, naming the scenario."""
    _mini_scenario(tmp_path, "mini-refused")
    with pytest.raises(FixtureError, match=r"mini-refused: .*HTTP 401.*login") as info:
        load_into_server(fhir_server.base_url, "wrong-token", root=tmp_path)
    assert info.value.status == 401
    path = tmp_path / "scenarios" / "mini-refused.yaml"
    path.write_text(path.read_text().replace("gender: female", "gender: female, colour: blue"))
    with pytest.raises(FixtureError, match=r"HTTP 400.*colour") as info:
        load_into_server(fhir_server.base_url, fhir_server.token, root=tmp_path)
    assert info.value.outcome["resourceType"] == "OperationOutcome"


@pytest.mark.fhir_server
def test_cli_fixtures_load(fhir_server: FhirServer, capsys: pytest.CaptureFixture[str]) -> None:
    """``lbp-cds fixtures load --fhir-server URL --token T --only ID`` loads and says so."""
    sc = _all_scenarios()[0]
    code = cli.main(["fixtures", "load", "--fhir-server", fhir_server.base_url,
                     f"--token={fhir_server.token}", "--only", sc.id])
    assert code == 0
    assert capsys.readouterr().out.strip() == (
        f"loaded {sc.id}: patient {sc.patient_id}, {len(sc.record())} resources")
    assert fhir_server.read_json(f"Patient/{sc.patient_id}")["id"] == sc.patient_id


# -- rebasing keeps each case's answer -------------------------------------------------------------
def _prefetch_from_record(sc: Scenario, entry: dict[str, Any]) -> dict[str, Any]:
    """What an EHR holding exactly the scenario's record sends (unavailable keys left out)."""
    out: dict[str, Any] = {}
    for key, template in (entry.get("prefetch") or {}).items():
        if key in sc.unavailable:
            continue
        rtype = template_type(template)
        out[key] = sc.patient if rtype == "Patient" else {
            "resourceType": "Bundle", "type": "searchset",
            "entry": [{"resource": r} for r in sc.resources if r["resourceType"] == rtype]}
    return out


@pytest.mark.slow
def test_rebased_scenarios_keep_their_answer(tmp_path: Path) -> None:
    """Dated to another day and hour (leap day, turn of the day), every case answers the same.

    The integration suite dates the cases to the real clock; this shows the answer does not
    depend on the day or the hour it runs (whole-day shifts round to within 12 hours).
    """
    clock = {"now": NOW}
    app = create_app(Settings(dev=True, database_url=f"sqlite:///{tmp_path}/x.sqlite3"),
                     clock=lambda: clock["now"])
    client = app.test_client()
    services = {s["hook"]: s for s in (client.get("/cds-services").json or {})["services"]}
    wrong = []
    for now in (datetime(2028, 2, 29, 23, 59, tzinfo=timezone.utc),
                datetime(2027, 3, 1, 0, 1, tzinfo=timezone.utc),
                datetime(2026, 12, 31, 16, 30, tzinfo=timezone.utc)):
        clock["now"] = now
        for sc in _all_scenarios():
            dated, entry = rebase(sc, now), services[sc.hook]
            body = build_request(sc.hook, hook_context(sc.hook, dated.patient_id,
                                                       dated.draft_orders,
                                                       dated.selections or None),
                                 prefetch=_prefetch_from_record(dated, entry))
            resp = client.post(f"/cds-services/{entry['id']}", json=body)
            cards = sorted((c["extension"]["org.lbp-cds.rule"]["ruleId"], c["indicator"])
                           for c in (resp.json or {}).get("cards", []))
            if (resp.status_code, cards) != (sc.expected_status, sorted(sc.expected_cards)):
                wrong.append(f"{sc.id} at {now:%Y-%m-%d %H:%M}: {resp.status_code} {cards}")
    app.extensions["lbp_cds"].store.engine.dispose()
    assert not wrong, "\n".join(wrong)
