"""The dev launcher (dev mode only): try the intake app as an EHR would launch it.

``/smart/dev`` lists the patients of a loopback FHIR server (``make fhir`` writes its URL and
token to ``.cache/fhir.env``, which is read by default), shows the cards this service gives for
one, and launches the intake app from a card's smart link, or for the patient alone. The EHR is
``devehr.SmartEhr`` (authlib's authorization server and a FHIR gateway) started on a loopback port
of this process, in front of that FHIR server: the app goes through the same SMART launch, PKCE
and token exchange as with a real EHR. The blueprint is registered only in dev mode.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import requests
from flask import Blueprint, Response, current_app, request

from lbp_cds import smart
from lbp_cds.api import runtime
from lbp_cds.probe import build_request, hook_context
from lbp_cds.smart import _is_loopback, redirect, redirect_uri

log = logging.getLogger(__name__)

bp = Blueprint("smart_dev", __name__, url_prefix="/smart/dev")

ENV_FILE = Path(".cache") / "fhir.env"
_lock = threading.Lock()
_ehrs: dict[tuple[str, str], Any] = {}  # (FHIR URL, token) -> a started SmartEhr


def _fhir_env() -> tuple[str, str]:
    """``make fhir``'s URL and token, from ``.cache/fhir.env`` in the working folder."""
    try:
        text = ENV_FILE.read_text(encoding="utf-8")
    except OSError:
        return "", ""
    found = dict(line.removeprefix("export ").split("=", 1) for line in text.splitlines()
                 if "=" in line)
    return found.get("FHIR", ""), found.get("TOKEN", "")


def ehr_for(fhir: str, token: str) -> Any:
    """The stand-in EHR in front of ``fhir`` (started once per FHIR server and process)."""
    from lbp_cds.devehr import FhirBackend, SmartEhr  # authlib, only when used

    with _lock:
        ehr = _ehrs.get((fhir, token))
        if ehr is None:
            ehr = SmartEhr(FhirBackend(fhir.rstrip("/"), token or None)).start()
            _ehrs[(fhir, token)] = ehr
        ehr.register_client(runtime().settings.smart_client_id, [redirect_uri()])
        return ehr


def _page(status: int = 200, **context: Any) -> Response:
    """The launcher page; its forms end, through /smart/launch, at the stand-in EHR's port."""
    response = smart.page("dev.html", status, title="Dev launcher: the intake app as an EHR "
                          "launches it", **context)
    return smart.security_headers(response, form_action="'self' http://127.0.0.1:*")


@bp.get("")
def launcher() -> Response:
    """The launcher: FHIR server, its patients, and for one patient the cards and launches."""
    default_fhir, default_token = _fhir_env()
    fhir = request.args.get("fhir", default_fhir).strip()
    token = request.args.get("token", default_token).strip()
    chosen = request.args.get("patient", "").strip()
    context: dict[str, Any] = {"fhir": fhir, "token": token, "chosen": chosen,
                               "patients": [], "cards": None, "error": None}
    if not fhir:
        context["error"] = ("No FHIR server yet: run `make fhir` in another shell (it writes "
                            ".cache/fhir.env), then reload; or give a loopback FHIR URL.")
        return _page(**context)
    if not _is_loopback(fhir):
        context["error"] = "The dev launcher works with a loopback FHIR server only."
        return _page(400, **context)
    try:
        context["patients"] = _patients(fhir, token)
    except (requests.RequestException, ValueError) as exc:
        context["error"] = f"The FHIR server {fhir} could not be read ({type(exc).__name__})."
        return _page(502, **context)
    if chosen:
        ehr = ehr_for(fhir, token)
        try:
            context["cards"] = _cards(ehr, chosen)
        except CardsError as exc:
            context["error"] = str(exc)
    return _page(**context)


def _patients(fhir: str, token: str) -> list[dict[str, str]]:
    session = requests.Session()
    session.trust_env = False
    headers = {"Accept": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    resp = session.get(f"{fhir.rstrip('/')}/Patient", params={"_count": "200"},
                       headers=headers, timeout=5)
    resp.raise_for_status()
    out = []
    for entry in resp.json().get("entry") or []:
        patient = entry.get("resource") or {}
        names = patient.get("name") or [{}]
        name = names[0].get("text") or " ".join(
            [*(names[0].get("given") or []), names[0].get("family") or ""]).strip()
        out.append({"id": str(patient.get("id", "")), "name": name or "(no name)",
                    "sex": str(patient.get("gender", "")),
                    "birth_date": str(patient.get("birthDate", ""))})
    return sorted(out, key=lambda p: p["id"])


class CardsError(Exception):
    """The service did not give cards (the launcher shows why)."""


def _cards(ehr: Any, patient: str) -> list[dict[str, Any]]:
    """patient-view for ``patient``, as the EHR would call it (fhirServer = the gateway)."""
    body = build_request("patient-view", hook_context("patient-view", patient),
                         fhir_server=ehr.iss, token=ehr.system_token)
    service = next(s for s in runtime().knowledge.services if s.hook == "patient-view")
    answer = current_app.test_client().post(f"/cds-services/{service.id}", json=body)
    doc = answer.get_json(silent=True) or {}
    if answer.status_code != 200:
        issue = (doc.get("issue") or [{}])[0]
        raise CardsError(f"patient-view answered HTTP {answer.status_code}: "
                         f"{issue.get('diagnostics', '')}")
    cards = []
    for card in doc.get("cards") or []:
        smart_links = [link for link in card.get("links") or [] if link.get("type") == "smart"]
        cards.append({"summary": card.get("summary"), "indicator": card.get("indicator"),
                      "rule": ((card.get("extension") or {}).get("org.lbp-cds.rule") or {})
                      .get("ruleId"),
                      "app_context": smart_links[0].get("appContext") if smart_links else None})
    return cards


@bp.post("/launch")
def launch() -> Response:
    """Play the EHR: create the launch context, open the app's launch URL with iss + launch."""
    fhir = request.form.get("fhir", "").strip()
    token = request.form.get("token", "").strip()
    patient = request.form.get("patient", "").strip()
    if not (fhir and patient and _is_loopback(fhir)):
        return _page(400, fhir=fhir, token=token, chosen=patient, patients=[], cards=None,
                     error="Choose a patient of a loopback FHIR server first.")
    ehr = ehr_for(fhir, token)
    app_context = request.form.get("appContext") or json.dumps({"patient": patient})
    launch_id = ehr.new_launch(patient, app_context=app_context)
    base = request.script_root.rstrip("/")
    return redirect(f"{base}/smart/launch?" + urlencode({"iss": ehr.iss, "launch": launch_id}),
                    303)
