"""The Synthea population of ``../shared/data/synthea-r4-population`` as patients with new sciatica.

About 300 real-shaped records nobody here wrote: SNOMED-coded problem lists that keep entries
``active`` for decades, resolved conditions with their abatement, long medication histories.
None has back pain. ``prepare`` moves every date of a record so that its last recorded day is
yesterday (ages move with it) and, unless told not to, adds a new "Lumbago with sciatica"
(ICD-10-CM M54.4x, as an EHR's problem list codes it) recorded ten days ago.

``labels`` reads the prepared record's coded data as a careful clinician would, with no help
from the service's knowledge pack: which conditions should change the advice for new sciatica
(a cancer history, a current pregnancy, osteoporosis at 50 or over, drug misuse,
immunosuppression, a recent acute mimic). The codes below are this reader's, checked by hand
against every condition and drug the population holds (``python -m tests.population --codes``
lists them); they are deliberately not the pack's value sets, so the suite measures the pack
rather than repeating it.

Used by ``tests/test_population.py`` (the suite) and ``bench/run.py`` (the population bench).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
POPULATION_DIR = ROOT.parent / "shared" / "data" / "synthea-r4-population"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
EPISODE_DAYS_AGO = 10

_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(T[0-9:.]+(?:Z|[+-]\d{2}:\d{2})?)?$")
# Elements whose dates say when something happened to the patient (the record's last day).
_EVENT_DATES = ("effectiveDateTime", "onsetDateTime", "recordedDate", "authoredOn",
                "performedDateTime", "issued", "abatementDateTime", "occurrenceDateTime")

# -- the reader's codes (SNOMED CT as Synthea codes them; ICD-10-CM as an EHR would) -----------
CANCER = {  # malignant neoplasms, whatever their status: a history of cancer counts for ever
    "126906006", "92691004", "109838007", "363406005", "93761005", "94260004", "254637007",
    "424132000", "314994000",  # not 162573006 Suspected lung cancer: not a diagnosis
}
OSTEOPOROSIS = {"64859006", "443165006"}
PREGNANCY = {"72892002", "77386006"}
DRUG_MISUSE = {"5602001", "6525002", "191816009"}  # opioid abuse, drug dependence, opioid dep.
OVERDOSE = "55680006"  # an overdose is drug misuse only when recent (Synthea leaves it active)
OVERDOSE_DAYS = 365
IMMUNOSUPPRESSANT_INGREDIENTS = ("methotrexate", "prednisone", "prednisolone", "tacrolimus",
                                 "cyclosporine", "azathioprine", "mycophenolate", "infliximab",
                                 "adalimumab", "etanercept", "rituximab", "dexamethasone",
                                 "methylprednisolone", "hydrocortisone", "leflunomide",
                                 # cytotoxic chemotherapy
                                 "docetaxel", "oxaliplatin", "fluorouracil", "paclitaxel",
                                 "carboplatin", "cisplatin", "cyclophosphamide")
IMMUNOSUPPRESSION = {"86406008", "161665007"}  # HIV, history of renal transplant
TRANSPLANT = "transplant"  # a solid-organ or marrow transplant procedure (by its display)
ACUTE_MIMICS = {  # count when recent (their onset within ACUTE_DAYS)
    "74400008": "appendicitis", "85189001": "appendicitis", "47693006": "appendicitis",
    "79586000": "ectopic pregnancy", "34801009": "ectopic pregnancy",
    "45816000": "pyelonephritis", "36689008": "pyelonephritis",
    "95570007": "kidney stone", "233985008": "aortic aneurysm",
}
APPENDECTOMY = {"80146002", "428251008", "6025007", "174041007"}
ACUTE_DAYS = 30
PREGNANCY_DAYS = 42 * 7
LABELS = ("cancer history", "current pregnancy", "osteoporosis at 50+", "drug misuse",
          "immunosuppression", "recent acute mimic")


@dataclass
class Patient:
    """One prepared record with its labels."""

    name: str
    patient_id: str
    bundle: dict[str, Any]
    age: int
    sex: str
    labels: set[str] = field(default_factory=set)


def files() -> list[Path]:
    """The population's patient bundles (the folder also holds two practitioner files)."""
    if not POPULATION_DIR.is_dir():
        return []
    return [p for p in sorted(POPULATION_DIR.glob("*.json"))
            if not p.name.startswith(("hospitalInformation", "practitionerInformation"))]


def _shift(text: str, days: int) -> str:
    m = _DATE.match(text)
    if not m:
        return text
    moved = date(int(m[1]), int(m[2]), int(m[3])) + timedelta(days=days)
    return moved.isoformat() + (m[4] or "")


def _walk(node: Any, days: int) -> Any:
    if isinstance(node, dict):
        return {k: _walk(v, days) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk(v, days) for v in node]
    if isinstance(node, str) and len(node) >= 10 and node[4:5] == "-":
        return _shift(node, days)
    return node


def _event_days(resource: dict[str, Any]) -> list[date]:
    out = []
    for key in _EVENT_DATES:
        value = resource.get(key)
        if isinstance(value, str) and _DATE.match(value):
            out.append(date.fromisoformat(value[:10]))
    for key in ("performedPeriod", "period", "effectivePeriod"):
        value = resource.get(key)
        if isinstance(value, dict):
            for end in ("start", "end"):
                if isinstance(value.get(end), str) and _DATE.match(value[end]):
                    out.append(date.fromisoformat(value[end][:10]))
    return out


def _codes(resource: dict[str, Any], element: str = "code") -> list[tuple[str, str, str]]:
    concept = resource.get(element) or {}
    return [(c.get("system", ""), c.get("code", ""), c.get("display", ""))
            for c in concept.get("coding", []) if isinstance(c, dict)]


def prepare(path: Path, now: datetime, episode: bool = True) -> Patient:
    """A population record, dated so that its last day is yesterday, with or without new sciatica.

    Args:
        path: one bundle of the population.
        now: the moment of the hook call.
        episode: add "Lumbago with sciatica" recorded ``EPISODE_DAYS_AGO`` days ago.
    """
    bundle = json.loads(path.read_text())
    last = max(d for e in bundle["entry"] for d in _event_days(e["resource"]))
    days = ((now - timedelta(days=1)).date() - last).days
    bundle = _walk(bundle, days)
    patient_entry = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    patient = patient_entry["resource"]
    if episode:
        side = int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % 2
        code, display = (("M54.41", "Lumbago with sciatica, right side") if side else
                         ("M54.42", "Lumbago with sciatica, left side"))
        onset = (now - timedelta(days=EPISODE_DAYS_AGO)).isoformat(timespec="seconds")
        bundle["entry"].append({"fullUrl": "urn:uuid:lbp-episode-" + patient["id"], "resource": {
            "resourceType": "Condition", "id": "lbp-episode-" + patient["id"][:40],
            "clinicalStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                "code": "active"}]},
            "verificationStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                "code": "confirmed"}]},
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                "code": "problem-list-item"}]}],
            "code": {"coding": [{"system": ICD10CM, "code": code, "display": display}],
                     "text": display},
            "subject": {"reference": patient_entry["fullUrl"]},
            "onsetDateTime": onset, "recordedDate": onset}})
    birth = date.fromisoformat(patient["birthDate"])
    today = now.date()
    age = today.year - birth.year - ((today.month, today.day) < (birth.month, birth.day))
    out = Patient(path.name, patient["id"], bundle, age, patient.get("gender", ""))
    out.labels = labels(bundle, now, age, out.sex)
    return out


def _when(resource: dict[str, Any], *keys: str) -> datetime | None:
    for key in keys:
        value = resource.get(key)
        if isinstance(value, dict):
            value = value.get("start")
        if isinstance(value, str):
            return datetime.fromisoformat(value.replace("Z", "+00:00")) if "T" in value else \
                datetime.fromisoformat(value).replace(tzinfo=timezone.utc)
    return None


def labels(bundle: dict[str, Any], now: datetime, age: int, sex: str) -> set[str]:
    """The conditions of a prepared record that should change the advice for new sciatica."""
    out: set[str] = set()
    resources = [e["resource"] for e in bundle["entry"]]
    conditions = [r for r in resources if r["resourceType"] == "Condition"]
    procedures = [r for r in resources if r["resourceType"] == "Procedure"]
    appendix_out = any(code in APPENDECTOMY for r in conditions + procedures
                       for _s, code, _d in _codes(r))
    for c in conditions:
        codes = {code for system, code, _d in _codes(c) if system == SNOMED}
        abated = c.get("abatementDateTime") is not None
        status = ((c.get("clinicalStatus") or {}).get("coding") or [{}])[0].get("code")
        current = status in ("active", "recurrence", "relapse") and not abated
        onset = _when(c, "onsetDateTime", "recordedDate")
        recent = onset is not None and now - onset <= timedelta(days=ACUTE_DAYS)
        if codes & CANCER:
            out.add("cancer history")
        if codes & OSTEOPOROSIS and age >= 50:
            out.add("osteoporosis at 50+")
        if codes & PREGNANCY and current and onset is not None and \
                now - onset <= timedelta(days=PREGNANCY_DAYS):
            out.add("current pregnancy")
        if codes & DRUG_MISUSE and current:
            out.add("drug misuse")
        if OVERDOSE in codes and onset is not None and \
                now - onset <= timedelta(days=OVERDOSE_DAYS):
            out.add("drug misuse")
        if codes & IMMUNOSUPPRESSION and current:
            out.add("immunosuppression")
        for code in codes & set(ACUTE_MIMICS):
            if ACUTE_MIMICS[code] == "appendicitis" and appendix_out:
                continue
            if recent and current:
                out.add("recent acute mimic")
    if any(TRANSPLANT in d.lower() for p in procedures for _s, _c, d in _codes(p)):
        out.add("immunosuppression")  # a transplant recipient takes immunosuppressants for life
    for mr in resources:
        if mr["resourceType"] != "MedicationRequest" or mr.get("status") != "active":
            continue
        text = " ".join(d.lower() for _s, _c, d in _codes(mr, "medicationCodeableConcept"))
        if any(name in text for name in IMMUNOSUPPRESSANT_INGREDIENTS) and \
                "topical" not in text and "inhal" not in text and "cream" not in text:
            out.add("immunosuppression")
    return out


def codes_report() -> str:
    """Every condition and active drug of the population with how many patients have it."""
    conds: Counter[tuple[str, str]] = Counter()
    drugs: Counter[str] = Counter()
    for path in files():
        bundle = json.loads(path.read_text())
        seen: set[tuple[str, str]] = set()
        for e in bundle["entry"]:
            r = e["resource"]
            if r["resourceType"] == "Condition":
                seen.update((code, d) for _s, code, d in _codes(r))
            elif r["resourceType"] == "MedicationRequest" and r.get("status") == "active":
                drugs.update(d for _s, _c, d in _codes(r, "medicationCodeableConcept"))
        conds.update(seen)
    lines = [f"{n:4} {code:>18} {display}" for (code, display), n in conds.most_common()]
    lines += ["", "active MedicationRequests:"]
    lines += [f"{n:4} {display}" for display, n in drugs.most_common()]
    return "\n".join(lines)


def export(folder: Path, now: datetime | None = None) -> int:
    """Write every prepared record (new sciatica ten days ago) as ``folder/<name>.json``, for
    ``lbp-cds simulate folder``; returns how many."""
    folder.mkdir(parents=True, exist_ok=True)
    when = now or datetime.now(timezone.utc).replace(microsecond=0)
    paths = files()
    for path in paths:
        (folder / path.name).write_text(json.dumps(prepare(path, when).bundle))
    return len(paths)


if __name__ == "__main__":
    if "--codes" in sys.argv:
        print(codes_report())
    elif "--export" in sys.argv and sys.argv.index("--export") + 1 < len(sys.argv):
        target = Path(sys.argv[sys.argv.index("--export") + 1])
        print(f"wrote {export(target)} prepared Synthea records to {target}")
    else:
        print("usage: python -m tests.population --codes | --export DIR", file=sys.stderr)
        sys.exit(2)
