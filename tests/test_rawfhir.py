"""The split hook body (``rawfhir``): prefetch resources kept as JSON text until a rule needs them.

The split is an optimisation only: whatever it returns must mean what ``parse_json`` returns, a
body it cannot split must get exactly the ordinary parser's answer, and every scenario must give
the same cards whether its prefetch was split or parsed in full.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbp_cds import create_app, hooks, rawfhir
from lbp_cds.api import evaluate
from lbp_cds.config import Settings
from lbp_cds.errors import JsonTooDeep, PreconditionFailed, RequestError
from lbp_cds.fhir_data import load_record, parse_datetime
from lbp_cds.fixtures import hook_request, read_scenario

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = sorted((ROOT / "fixtures" / "scenarios").glob("*.yaml"))
PID = "p1"


def observation(oid: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5",
                                 "display": "Body temperature"}]},
            "subject": {"reference": f"Patient/{PID}"},
            "effectiveDateTime": "2026-03-01T10:00:00Z",
            "valueQuantity": {"value": 39.2, "unit": "Cel", "code": "Cel"}, **extra}


def body_with(entries: list[Any], **bundle: Any) -> bytes:
    return orjson.dumps({
        "hook": "patient-view", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "context": {"userId": "Practitioner/1", "patientId": PID},
        "prefetch": {"patient": {"resourceType": "Patient", "id": PID},
                     "observations": {"resourceType": "Bundle", "type": "searchset",
                                      "entry": entries, **bundle},
                     "conditions": None}})


def same_meaning(split: Any, ordinary: Any) -> None:
    """Assert that a split document means what the fully parsed one means.

    A prefetch Bundle the split made lazy keeps its type, total, link and, per entry, the
    resource and its search mode; every other value must be exactly the parsed one.
    """
    if not isinstance(ordinary, dict) or not isinstance(ordinary.get("prefetch"), dict):
        assert split == ordinary
        return
    assert {k: v for k, v in split.items() if k != "prefetch"} == \
        {k: v for k, v in ordinary.items() if k != "prefetch"}
    assert split["prefetch"].keys() == ordinary["prefetch"].keys()
    for key, value in split["prefetch"].items():
        want = ordinary["prefetch"][key]
        entries = value.get("entry") if isinstance(value, dict) else None
        if not (isinstance(entries, list) and entries
                and all(type(e) is rawfhir.LazyResource for e in entries)):
            assert value == want
            continue
        assert {k: v for k, v in value.items() if k != "entry"} == \
            {k: want[k] for k in ("resourceType", "type", "total", "link")
             if want.get(k) is not None}
        assert [e.decode() for e in entries] == [e["resource"] for e in want["entry"]]
        assert [e.search_mode for e in entries] == [
            e["search"].get("mode") if isinstance(e.get("search"), dict) else None
            for e in want["entry"]]


def test_bundle_entries_are_lazy_with_their_heads_decoded() -> None:
    obs = observation("o1", component=[{"code": {"coding": [
        {"system": "http://loinc.org", "code": "8480-6"}]}}])
    doc = hooks.parse_hook_body(body_with([{"resource": obs, "search": {"mode": "match"}}],
                                          total=1))
    bundle = doc["prefetch"]["observations"]
    assert bundle["total"] == 1 and bundle["type"] == "searchset"
    (entry,) = bundle["entry"]
    assert type(entry) is rawfhir.LazyResource
    assert entry.resourceType == "Observation" and entry.id == "o1"
    assert entry.search_mode == "match"
    assert entry.patient_reference() == f"Patient/{PID}"
    assert entry.codings("Observation") == [("http://loinc.org", "8310-5"),
                                            ("http://loinc.org", "8480-6")]
    assert entry.first_date("Observation", parse_datetime) == datetime(2026, 3, 1, 10,
                                                                       tzinfo=timezone.utc)
    # The first date path that parses wins (effectiveDateTime, then ... issued).
    (late,) = hooks.parse_hook_body(body_with([{"resource": observation(
        "o2", effectiveDateTime="garbage", issued="2026-03-02")}]))["prefetch"][
        "observations"]["entry"]
    assert late.first_date("Observation", parse_datetime) == datetime(2026, 3, 2,
                                                                      tzinfo=timezone.utc)
    assert entry.decode() == obs
    # Patient is not a Bundle: parsed in full; null stays null.
    assert doc["prefetch"]["patient"] == {"resourceType": "Patient", "id": PID}
    assert doc["prefetch"]["conditions"] is None
    assert "lbp-cds:" not in repr(entry) and "39.2" not in repr(entry)  # no content in repr


def test_a_resource_cannot_set_the_fields_the_split_sets() -> None:
    obs = observation("o1", **{"lbp-cds:raw": 5, "lbp-cds:key": "x", "lbp-cds:mode": "outcome"})
    (entry,) = hooks.parse_hook_body(body_with([{"resource": obs}]))["prefetch"][
        "observations"]["entry"]
    assert entry.search_mode is None and entry.key == "observations"
    assert entry.decode() == obs


@pytest.mark.parametrize("entries", [
    [{"resource": 5}],                                   # a resource that is not an object
    [{"fullUrl": "urn:x"}],                              # an entry without a resource
    [{"resource": observation("o1", code={"coding": {"code": "x"}})}],  # coding not an array
    [{"resource": observation("o1", subject="Patient/p1")}],           # reference not an object
    # Heads are typed as FHIR types them: a value of another JSON type is read the ordinary way.
    [{"resource": observation("o1", code={"coding": [{"system": 7, "code": "8310-5"}]})}],
    [{"resource": observation("o1", effectiveDateTime=20260301)}],
    [{"resource": observation("o1", subject={"reference": ["Patient/p1"]})}],
    [{"resource": observation("o1", effectivePeriod={"start": 5})}],
])
def test_odd_entries_take_the_ordinary_path(entries: list[Any]) -> None:
    body = body_with(entries)
    doc = hooks.parse_hook_body(body)
    assert doc == hooks.parse_json(body, opaque=frozenset({"prefetch"}))


@pytest.mark.parametrize("body, error, message", [
    # Invalid UTF-8 inside a resource: msgspec does not check it while skipping; we do.
    (body_with([{"resource": {"resourceType": "Observation", "note": "X"}}]).replace(
        b'"X"', b'"\xff\xfe"'), RequestError, "Body is not valid JSON"),
    (body_with([{"resource": {"resourceType": "Observation", "note": "X"}}]).replace(
        b'"X"', b'"\xed\xa0\x80"'), RequestError, "Body is not valid JSON"),  # a UTF-8 surrogate
    (body_with([{"resource": {"resourceType": "Observation", "x": "X"}}]).replace(
        b'"X"', b"[" * 1100 + b"]" * 1100), JsonTooDeep, "nests deeper"),
    (body_with([{"resource": {"resourceType": "Observation", "x": "X"}}]).replace(
        b'"X"', b"[1,]"), RequestError, "Body is not valid JSON"),
    (b'{"hook": "patient-view", "prefetch": {"a": {"resourceType": "Bundle", "entry": [}}}',
     RequestError, "Body is not valid JSON"),
    (b"[1, 2]", RequestError, "must be"),  # not an object: the schema's words, as before
])
def test_bad_bodies_get_the_ordinary_answer(body: bytes, error: type[Exception],
                                            message: str) -> None:
    with pytest.raises(error) as split:
        hooks.parse_request(hooks.parse_hook_body(body))
    with pytest.raises(error) as ordinary:
        hooks.parse_request(hooks.parse_json(body, opaque=frozenset({"prefetch"})))
    assert str(split.value) == str(ordinary.value)
    assert message in str(split.value)


def test_a_number_beyond_a_double_is_a_400_naming_the_resource() -> None:
    body = body_with([{"resource": observation("o1")},
                      {"resource": observation("o2", valueQuantity={"value": 1},
                                               note=[{"text": "X"}])}]).replace(b'"X"', b"1e400")
    doc = hooks.parse_hook_body(body)  # the split does not look inside the note
    lazy = doc["prefetch"]["observations"]["entry"][1]
    with pytest.raises(RequestError) as exc:
        lazy.decode()
    assert exc.value.status == 400
    assert "prefetch.observations.entry[1].resource" in str(exc.value)
    assert exc.value.issues[0].location == "prefetch.observations.entry[1].resource"
    with pytest.raises(RequestError):  # the ordinary parser refuses the body as a whole
        hooks.parse_json(body)


def test_max_depth_is_checked_outside_the_prefetch() -> None:
    doc = json.loads(body_with([{"resource": observation("o1")}]))
    doc["extension"] = {"a": {"b": {"c": {"d": 1}}}}
    body = orjson.dumps(doc)
    with pytest.raises(JsonTooDeep):
        hooks.parse_hook_body(body, max_depth=4)
    assert hooks.parse_hook_body(body, max_depth=5)["extension"]["a"]["b"]["c"]["d"] == 1
    with pytest.raises(ValueError):
        hooks.parse_hook_body(body, max_depth=0)


# -- properties -------------------------------------------------------------------------------
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**60, 2**60),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=12)
coding = st.fixed_dictionaries({"system": st.sampled_from(["http://loinc.org", "s"]),
                                "code": st.text(max_size=6)},
                               optional={"display": st.text(max_size=6)})
resource = st.fixed_dictionaries(
    {"resourceType": st.sampled_from(["Observation", "Condition", "Patient", "Bundle"])},
    optional={"id": st.text(max_size=5),
              "code": st.one_of(st.fixed_dictionaries({"coding": st.lists(coding, max_size=2)}),
                                json_value),
              "subject": st.one_of(st.fixed_dictionaries({"reference": st.text(max_size=12)}),
                                   json_value),
              "effectiveDateTime": st.one_of(st.text(max_size=12), json_value),
              "effectivePeriod": st.one_of(st.fixed_dictionaries({"start": st.text(max_size=12)}),
                                           json_value),
              "valueQuantity": json_value, "extra": json_value})
entry = st.fixed_dictionaries({}, optional={
    "resource": st.one_of(resource, json_value),
    "search": st.one_of(st.fixed_dictionaries({"mode": st.sampled_from(["match", "include",
                                                                        "outcome"])}),
                        json_value),
    "fullUrl": st.text(max_size=5)})
prefetch_value = st.one_of(
    st.none(), resource,
    st.fixed_dictionaries({"resourceType": st.just("Bundle")},
                          optional={"entry": st.one_of(st.lists(entry, max_size=4), json_value),
                                    "total": json_value, "type": json_value,
                                    "link": json_value}))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(prefetch=st.one_of(st.dictionaries(st.text(max_size=6), prefetch_value, max_size=3),
                          json_value),
       other=st.dictionaries(st.sampled_from(["hook", "context", "extension"]), json_value,
                             max_size=2))
def test_split_means_what_parse_json_means(prefetch: Any, other: dict[str, Any]) -> None:
    body = orjson.dumps({**other, "prefetch": prefetch})
    ordinary = hooks.parse_json(body, opaque=frozenset({"prefetch"}))
    split = hooks.parse_hook_body(body)
    same_meaning(split, ordinary)


# The record's lookups (codes, and date windows found by bisection) are the same split or parsed,
# and the window keeps exactly the resources dated on or after its start, or undated.
DATES = ["2026-03-01T10:00:00Z", "2026-03-01T11:00:00+02:00", "2026-03-01", "2026-02", "2025",
         "2026-03-01T09:00:00", "not a date", "2026-13-01", ""]
series_obs = st.builds(
    lambda code, when, period, issued: {k: v for k, v in {
        "resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{PID}"}, "effectiveDateTime": when,
        "effectivePeriod": {"start": period} if period else None, "issued": issued}.items()
        if v is not None},
    st.sampled_from(["8310-5", "8867-4", "29463-7"]), st.one_of(st.none(), st.sampled_from(DATES)),
    st.one_of(st.none(), st.sampled_from(DATES)), st.one_of(st.none(), st.sampled_from(DATES)))


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(observations=st.lists(series_obs, max_size=25),
       since=st.lists(st.one_of(st.none(), st.sampled_from([
           "2025-06-01T00:00:00Z", "2026-02-28T23:00:00Z", "2026-03-01T08:00:00Z",
           "2026-03-01T09:00:00Z", "2026-03-01T10:00:00Z", "2026-04-01T00:00:00Z"])),
           min_size=1, max_size=4))
def test_record_lookups_are_the_same_split_or_parsed(observations: list[dict[str, Any]],
                                                     since: list[str | None]) -> None:
    from lbp_cds.fhir_data import PatientRecord, parse_datetime
    from lbp_cds.knowledge import ValueSet

    for i, obs in enumerate(observations):
        obs["id"] = f"o{i}"
    body = body_with([{"resource": o} for o in observations])
    vs = ValueSet("t", "urn:t", "t", {"http://loinc.org": frozenset({"8310-5", "29463-7"})}, {},
                  {}, {})
    records = []
    for doc in (hooks.parse_hook_body(body), hooks.parse_json(body, opaque=frozenset({"prefetch"}))):
        entries = doc["prefetch"]["observations"]["entry"]
        items = [e if type(e) is rawfhir.LazyResource else e["resource"] for e in entries]
        records.append(PatientRecord(PID, {"Observation": items}))
    split, parsed = records
    n = len(observations)
    assert [split.raw_date("Observation", p) for p in range(n)] == \
        [parsed.raw_date("Observation", p) for p in range(n)]
    for text in since:
        start = parse_datetime(text) if text else None
        got = [p for p, _raw in split.coded_raw("Observation", vs, start)]
        assert got == [p for p, _raw in parsed.coded_raw("Observation", vs, start)]
        wanted = [p for p, o in enumerate(observations)
                  if o["code"]["coding"][0]["code"] in ("8310-5", "29463-7")
                  and (start is None or (when := parsed.raw_date("Observation", p)) is None
                       or when >= start)]
        assert got == wanted


# -- the same cards either way ----------------------------------------------------------------
@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("rawfhir")
    app = create_app(Settings(dev=True, database_url=f"sqlite:///{tmp}/r.sqlite3"))
    yield app
    app.extensions["lbp_cds"].store.engine.dispose()


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_cards_are_the_same_split_or_parsed(app: Any, path: Path) -> None:
    rt = app.extensions["lbp_cds"]
    scenario = read_scenario(path)
    service = next(s for s in rt.knowledge.services if s.hook == scenario.hook)
    body = orjson.dumps(hook_request(scenario, service.prefetch))

    def cards(doc: Any) -> list[tuple[str, str, str, str]]:
        try:
            req = hooks.parse_request(doc)
            record = load_record(req, service, None, rt.policy, rt.knowledge.code_universe)
        except (RequestError, PreconditionFailed) as exc:
            return [("error", str(exc), "", "")]
        now: datetime = scenario.now
        with app.test_request_context():
            issued = evaluate(rt, service, req, record, now)
        return [(c.rule_id, c.indicator, c.card["summary"], c.card.get("detail", ""))
                for c in issued]

    split = hooks.parse_hook_body(body)
    lazy = [e for v in (split.get("prefetch") or {}).values() if isinstance(v, dict)
            for e in v.get("entry") or [] if type(e) is rawfhir.LazyResource]
    assert lazy or not any(isinstance(v, dict) and v.get("entry")
                           for v in (split.get("prefetch") or {}).values())
    assert cards(split) == cards(hooks.parse_json(body, opaque=frozenset({"prefetch"})))
