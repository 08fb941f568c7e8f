"""Plain FHIR R4 resources for unit tests (valid R4; the scenario suite uses realistic records)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from lbp_cds.fixtures import Scenario

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


# -- records as real clients bend them (for the lenient-reading tests) ----------------------------
SCENARIO_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "scenarios"
REAL_PACK = Path(__file__).resolve().parents[1] / "cds_services"
MR_CATEGORY = {"coding": [{
    "system": "http://terminology.hl7.org/CodeSystem/medicationrequest-category",
    "code": "outpatient", "display": "Outpatient"}]}


def dstu2_condition(c: dict[str, Any]) -> dict[str, Any]:
    """An R4 Condition as a DSTU2 server writes it."""
    old = copy.deepcopy(c)
    old["patient"] = old.pop("subject")
    for name in ("clinicalStatus", "verificationStatus"):
        if name in old:
            old[name] = old[name]["coding"][0]["code"]
    if "recordedDate" in old:
        old["dateRecorded"] = old.pop("recordedDate")[:10]
    if isinstance(old.get("category"), list):
        old["category"] = old["category"][0]
    return old


def sandbox_order(mr: dict[str, Any]) -> dict[str, Any]:
    """A MedicationRequest as the CDS Hooks Sandbox sends it: category as one object."""
    return {**copy.deepcopy(mr), "category": MR_CATEGORY}


def scenario_body(name: str, bend: Callable[[Scenario], Scenario] = lambda s: s,
                  now: datetime | None = None) -> tuple[str, dict[str, Any], datetime]:
    """(service id, hook request, now) for a scenario of fixtures/scenarios, bent as a client
    would bend it; moved to ``now`` when given."""
    from lbp_cds import knowledge as knowledge_pack
    from lbp_cds.fixtures import hook_request as scenario_request
    from lbp_cds.fixtures import read_scenario, rebase

    sc = read_scenario(SCENARIO_DIR / f"{name}.yaml")
    if now is not None:
        sc = rebase(sc, now)
    sc = bend(sc)
    service = next(s for s in knowledge_pack.load(REAL_PACK).services if s.hook == sc.hook)
    return service.id, scenario_request(sc, service.prefetch), sc.now


def dstu2_record(sc: Scenario) -> Scenario:
    return replace(sc, resources=[dstu2_condition(r) if r["resourceType"] == "Condition" else r
                                  for r in sc.resources])


def sandbox_draft(sc: Scenario) -> Scenario:
    return replace(sc, draft_orders=[sandbox_order(d) for d in sc.draft_orders])


def sandbox_record_opioid(sc: Scenario) -> Scenario:
    """The opioid case at patient-view: the oxycodone order is an active record
    MedicationRequest written today, shaped as the Sandbox writes it."""
    [draft] = sc.draft_orders
    active = {**sandbox_order(draft), "status": "active", "id": "opi-01-oxy-active"}
    return replace(sc, hook="patient-view", draft_orders=[], resources=[*sc.resources, active])


def unreadable_aneurysm(sc: Scenario) -> Scenario:
    """The aneurysm Condition cannot be read even leniently (a modifier extension that is not
    one); the others are DSTU2-shaped."""
    out = []
    for r in dstu2_record(sc).resources:
        if r["resourceType"] == "Condition" and r["code"]["coding"][0]["code"].startswith("I71"):
            r = {**r, "modifierExtension": "not an extension"}
        out.append(r)
    return replace(sc, resources=out)


def stranger_observation(sc: Scenario) -> Scenario:
    """A server that ignored the patient parameter: another patient's fever comes along."""
    other = observation("8310-5", 39.4, rid="someone-elses-temp",
                        when=sc.now.isoformat().replace("+00:00", "Z"))
    other["subject"] = {"reference": "Patient/someone-else"}
    return replace(sc, resources=[*sc.resources, other])


def tls_files(folder: Path, host: str) -> tuple[Path, Path, Path]:
    """A test CA, and a certificate for ``host`` it signed: (ca.pem, leaf.pem, leaf.key)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lbp-cds test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "leaf.pem", folder / "leaf.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_file, cert_file, key_file
