"""Deterministic synthetic patient records of a chosen size, shaped like EHR data.

Each record has a patient, a back-pain Condition, background Conditions, vital signs and lab
series (with units, reference ranges and interpretation), medications, procedures and one intake
QuestionnaireResponse; the mix scales with N so that cost can be measured at 100, 1,000 and
10,000 resources.
"""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

NOW = datetime(2026, 3, 2, 10, 0, tzinfo=timezone.utc)
PID = "bench-patient"
VITALS = [("8310-5", "Body temperature", 36.4, 37.4, "Cel"),
          ("8867-4", "Heart rate", 60, 95, "/min"),
          ("8480-6", "Systolic blood pressure", 105, 145, "mm[Hg]"),
          ("29463-7", "Body weight", 70, 74, "kg")]
LABS = [("6690-2", "Leukocytes [#/volume] in Blood by Automated count", 4.0, 11.0, "10*3/uL"),
        ("1988-5", "C reactive protein [Mass/volume] in Serum or Plasma", 0.0, 10.0, "mg/L"),
        ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", 0.6, 1.2, "mg/dL"),
        ("718-7", "Hemoglobin [Mass/volume] in Blood", 13.0, 17.0, "g/dL")]
BACKGROUND = [("I10", "Essential (primary) hypertension"),
              ("E11.9", "Type 2 diabetes mellitus without complications"),
              ("E78.5", "Hyperlipidemia, unspecified"), ("J45.909", "Asthma, uncomplicated")]
MEDS = [("314076", "lisinopril 10 MG Oral Tablet"), ("860975", "metformin 500 MG Oral Tablet"),
        ("617310", "atorvastatin 20 MG Oral Tablet")]


def _ref() -> dict[str, str]:
    return {"reference": f"Patient/{PID}"}


def record(n: int, seed: int = 7) -> list[dict[str, Any]]:
    """A record of about ``n`` resources (Patient included)."""
    rnd = random.Random(seed)
    out: list[dict[str, Any]] = [{
        "resourceType": "Patient", "id": PID, "gender": "male", "birthDate": "1971-05-04",
        "name": [{"family": "Bench", "given": ["Marker"]}]}]
    out.append({
        "resourceType": "Condition", "id": "lbp", "subject": _ref(),
        "clinicalStatus": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
            "code": "active"}]},
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M54.41",
                             "display": "Lumbago with sciatica, right side"}]},
        "onsetDateTime": (NOW - timedelta(days=10)).date().isoformat()})
    for code, display in BACKGROUND:
        out.append({
            "resourceType": "Condition", "id": f"bg-{code}", "subject": _ref(),
            "clinicalStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                "code": "active"}]},
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": code,
                                 "display": display}]},
            "onsetDateTime": "2015-06-01"})
    for code, display in MEDS:
        out.append({
            "resourceType": "MedicationRequest", "id": f"med-{code}", "status": "active",
            "intent": "order", "subject": _ref(), "authoredOn": "2025-01-10",
            "medicationCodeableConcept": {"coding": [{
                "system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": code,
                "display": display}]}})
    i = 0
    series = VITALS + LABS
    while len(out) < n:
        code, display, low, high, unit = series[i % len(series)]
        when = NOW - timedelta(days=(i // len(series)) * 3 + rnd.random())
        value = round(rnd.uniform(low, high), 1)
        obs: dict[str, Any] = {
            "resourceType": "Observation", "id": f"obs-{i}", "status": "final",
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "vital-signs" if (code, display, low, high, unit) in VITALS
                else "laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": code,
                                 "display": display}]},
            "subject": _ref(), "effectiveDateTime": when.isoformat(),
            "valueQuantity": {"value": value, "unit": unit,
                              "system": "http://unitsofmeasure.org", "code": unit},
            "referenceRange": [{"low": {"value": low, "unit": unit},
                                "high": {"value": high, "unit": unit}}],
            "interpretation": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                "code": "N"}]}]}
        out.append(obs)
        i += 1
    return out[:n]


def patient_view_request(resources: list[dict[str, Any]], prefetch_keys: dict[str, str]
                         ) -> dict[str, Any]:
    """A patient-view request whose prefetch holds the record, grouped by the templates' types."""
    from lbp_cds.fhir_data import template_type

    prefetch: dict[str, Any] = {}
    for key, template in prefetch_keys.items():
        rtype = template_type(template)
        items = [r for r in resources if r["resourceType"] == rtype]
        if rtype == "Patient":
            prefetch[key] = items[0] if items else None
        else:
            prefetch[key] = {"resourceType": "Bundle", "type": "searchset",
                             "total": len(items), "entry": [{"resource": r} for r in items]}
    return {"hook": "patient-view", "hookInstance": str(uuid.UUID(int=42)),
            "context": {"userId": "Practitioner/bench", "patientId": PID},
            "prefetch": prefetch}
