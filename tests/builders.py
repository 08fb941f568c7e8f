"""Plain FHIR R4 resources for unit tests (valid R4; the scenario suite uses realistic records)."""

from __future__ import annotations

from typing import Any

ICD = "http://hl7.org/fhir/sid/icd-10-cm"
SCT = "http://snomed.info/sct"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CPT = "http://www.ama-assn.org/go/cpt"
PID = "p1"


def patient(gender: str = "male", birth: str = "1970-01-01", pid: str = PID) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "gender": gender, "birthDate": birth}


def condition(code: str, system: str = ICD, onset: str | None = "2026-02-20", rid: str = "c1",
              clinical: str | None = "active", verification: str | None = None,
              display: str | None = None, recorded: str | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"resourceType": "Condition", "id": rid,
                         "subject": {"reference": f"Patient/{PID}"},
                         "code": {"coding": [{"system": system, "code": code}]}}
    if display:
        c["code"]["coding"][0]["display"] = display
    if clinical:
        c["clinicalStatus"] = {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
            "code": clinical}]}
    if verification:
        c["verificationStatus"] = {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
            "code": verification}]}
    if onset:
        c["onsetDateTime"] = onset
    if recorded:
        c["recordedDate"] = recorded
    return c


def observation(code: str, value: float | None = None, unit: str = "Cel",
                when: str = "2026-03-01T10:00:00Z", rid: str = "o1", system: str = LOINC,
                status: str = "final", **extra: Any) -> dict[str, Any]:
    o: dict[str, Any] = {"resourceType": "Observation", "id": rid, "status": status,
                         "subject": {"reference": f"Patient/{PID}"},
                         "code": {"coding": [{"system": system, "code": code}]},
                         "effectiveDateTime": when}
    if value is not None:
        o["valueQuantity"] = {"value": value, "unit": unit,
                              "system": "http://unitsofmeasure.org", "code": unit}
    o.update(extra)
    return o


def medication(code: str, authored: str = "2025-10-01", rid: str = "m1", status: str = "active",
               supply_days: int | None = None, repeats: int | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {"resourceType": "MedicationRequest", "id": rid, "status": status,
                         "intent": "order", "subject": {"reference": f"Patient/{PID}"},
                         "medicationCodeableConcept": {"coding": [{"system": RXNORM,
                                                                   "code": code}]},
                         "authoredOn": authored}
    if supply_days is not None:
        m["dispenseRequest"] = {"expectedSupplyDuration": {
            "value": supply_days, "unit": "days", "system": "http://unitsofmeasure.org",
            "code": "d"}}
        if repeats is not None:
            m["dispenseRequest"]["numberOfRepeatsAllowed"] = repeats
    return m


def questionnaire_response(answers: dict[str, Any], authored: str = "2026-03-01T09:00:00Z",
                           rid: str = "qr1") -> dict[str, Any]:
    items = []
    for link_id, value in answers.items():
        values = value if isinstance(value, list) else [value]
        out = []
        for v in values:
            if isinstance(v, bool):
                out.append({"valueBoolean": v})
            elif isinstance(v, int):
                out.append({"valueInteger": v})
            elif isinstance(v, str) and len(v) == 10 and v[4] == "-":
                out.append({"valueDate": v})
            else:
                out.append({"valueCoding": {"code": v}})
        items.append({"linkId": link_id, "answer": out})
    return {"resourceType": "QuestionnaireResponse", "id": rid, "status": "completed",
            "questionnaire": "https://lbp-cds.example.org/fhir/Questionnaire/lbp-intake",
            "subject": {"reference": f"Patient/{PID}"}, "authored": authored, "item": items}


def imaging_order(code: str = "30679-5", system: str = LOINC, rid: str = "sr1",
                  text: str | None = None) -> dict[str, Any]:
    sr: dict[str, Any] = {"resourceType": "ServiceRequest", "id": rid, "status": "draft",
                          "intent": "order", "subject": {"reference": f"Patient/{PID}"},
                          "code": {"coding": [{"system": system, "code": code}]},
                          "authoredOn": "2026-03-02"}
    if text:
        sr["code"] = {"text": text}
    return sr


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset",
            "entry": [{"resource": r} for r in resources]}


def hook_request(hook: str = "patient-view", prefetch: dict[str, Any] | None = None,
                 drafts: list[dict[str, Any]] | None = None,
                 selections: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    context: dict[str, Any] = {"userId": "Practitioner/example", "patientId": PID}
    if hook in ("order-select", "order-sign"):
        context["draftOrders"] = {"resourceType": "Bundle", "type": "collection",
                                  "entry": [{"resource": d} for d in drafts or []]}
    if hook == "order-select":
        context["selections"] = selections if selections is not None else [
            f"{d['resourceType']}/{d['id']}" for d in drafts or []]
    req: dict[str, Any] = {"hook": hook, "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
                           "context": context}
    if prefetch is not None:
        req["prefetch"] = prefetch
    req.update(extra)
    return req
