"""The red-flag intake as a SMART App Launch 2.0 app, launched from a card.

A card that could not check red flags because nobody asked (``Not checked: ...``) carries a CDS
Hooks Link of type ``smart`` to ``/smart/launch``. The EHR opens it with ``iss`` (its FHIR base
URL) and ``launch``; a patient portal opens it with ``iss`` alone (standalone patient launch).

Flow (https://hl7.org/fhir/smart-app-launch/STU2/app-launch.html):

1. ``GET /smart/launch?iss=&launch=``: ``iss`` must be on the allowlist (a client's ``smart.iss``
   in the clients file; in dev mode a loopback URL); ``{iss}/.well-known/smart-configuration``
   is read; the browser goes to the authorization endpoint with PKCE S256, ``state`` and ``aud``.
2. ``GET /smart/callback?code=&state=``: ``state`` must be the one this browser's session holds;
   the code and the PKCE verifier are exchanged at the token endpoint (a public client: no
   secret); the id_token, when sent, is verified against the EHR's JWKS.
3. ``GET /smart/s/<sid>/intake``: the record is read with the access token (Patient, Condition,
   Observation, earlier intakes) to hide what does not apply and to prefill what the record
   answers, naming the source; the questions of the card's rule (``appContext``) come first.
4. ``POST /smart/s/<sid>/intake``: CSRF-checked; the answers are kept in the session first, then
   POSTed as a QuestionnaireResponse with an identifier made when the form was first shown; a
   retry after an attempt whose answer was lost first looks that identifier up, so the answers
   are not stored twice. Refused, expired or down: the page says so, keeps every
   answer and offers the retry.

Sessions are server-side (``smart_sessions``, revision 0005): the browser holds only a random
secret in an HttpOnly cookie, whose hash finds the row and from which the key that encrypts the
row is derived. Tokens never reach the page, the log or, readable, the database; every gunicorn
worker and replica sees the same session. Each launch has its own session (``sid`` in the URL,
one cookie each), so two patients open in two tabs cannot mix.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit, parse_qsl

import jwt
import requests
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flask import Blueprint, Response, request
from flask import redirect as _redirect

from lbp_cds import egress, intake, pages
from lbp_cds.api import runtime
from lbp_cds.egress import DEV_KINDS, PRIVATE_KINDS, EgressRule
from lbp_cds.errors import FhirServerRefused

log = logging.getLogger(__name__)

bp = Blueprint("smart", __name__, url_prefix="/smart", static_folder="static/smart",
               static_url_path="/static")

#: The scopes the app asks for (SMART v2), and their v1 forms for servers that offer only v1.
#: MedicationRequest and Procedure only prefill (long-term steroids, a recent spinal injection):
#: an EHR that does not grant them leaves those questions to be answered, and the page says so.
SCOPES_V2 = ("openid", "fhirUser", "patient/Patient.rs", "patient/Condition.rs",
             "patient/Observation.rs", "patient/MedicationRequest.rs", "patient/Procedure.rs",
             "patient/QuestionnaireResponse.rs", "patient/QuestionnaireResponse.cu")
SCOPES_V1 = ("openid", "fhirUser", "patient/Patient.read", "patient/Condition.read",
             "patient/Observation.read", "patient/MedicationRequest.read",
             "patient/Procedure.read", "patient/QuestionnaireResponse.read",
             "patient/QuestionnaireResponse.write")
#: Who may be a QuestionnaireResponse's author (R4).
AUTHOR_TYPES = ("Practitioner/", "PractitionerRole/", "Patient/", "RelatedPerson/")
COOKIE = "lbp-smart-"
SID = re.compile(r"^[A-Za-z0-9_-]{16}$")
IDENTIFIER = re.compile(r"^urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
#: Seconds for one call to the EHR (discovery, token, JWKS, save); reads use the fetch policy.
EHR_TIMEOUT = (3.0, 10.0)
MAX_EHR_BYTES = 1 << 20
FHIR_JSON = "application/fhir+json"


class LaunchError(Exception):
    """A step of the launch failed: the page says ``message`` with ``status``.

    Args:
        message: what happened and what to do, for the user (no token, no patient data).
        status: the HTTP status of the page.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


# ----------------------------------------------------------------------------------- sessions
@dataclass
class Session:
    """One launch's server-side state; ``data`` is stored encrypted."""

    sid: str
    secret: bytes
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def cookie_name(self) -> str:
        return cookie_name(self.sid)


def cookie_name(sid: str) -> str:
    """The session cookie's name: ``__Secure-`` outside dev (the browser then refuses it over
    plain http and from any other site's script)."""
    prefix = "" if runtime().settings.dev else "__Secure-"
    return f"{prefix}{COOKIE}{sid}"


def _box(secret: bytes, sid: str) -> tuple[str, AESGCM]:
    """The row's lookup check and cipher, both derived from the cookie's secret."""
    check = hashlib.sha256(b"lbp-cds smart session id|" + secret).hexdigest()
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=sid.encode(),
               info=b"lbp-cds smart session key").derive(secret)
    return check, AESGCM(key)


def new_session() -> Session:
    """A fresh session (not stored until ``save_session``)."""
    return Session(secrets.token_urlsafe(12), secrets.token_bytes(32))


def save_session(s: Session) -> None:
    """Encrypt and store the session; it lives ``smart_session_minutes`` from now."""
    check, box = _box(s.secret, s.sid)
    nonce = secrets.token_bytes(12)
    payload = nonce + box.encrypt(nonce, json.dumps(s.data).encode(), s.sid.encode())
    minutes = runtime().settings.smart_session_minutes
    runtime().store.session_put(s.sid, check, payload, time.time() + 60 * minutes)


def load_session(sid: str) -> Session | None:
    """The session whose cookie this browser sent, or None (no cookie, wrong cookie, expired)."""
    if not SID.match(sid):
        return None
    raw = request.cookies.get(cookie_name(sid), "")
    try:
        secret = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    except ValueError:
        return None
    if len(secret) != 32:
        return None
    row = runtime().store.session_get(sid)
    if row is None:
        return None
    check, box = _box(secret, sid)
    if not hmac.compare_digest(row[0], check):
        return None
    try:
        data = json.loads(box.decrypt(row[1][:12], row[1][12:], sid.encode()))
    except Exception:  # noqa: BLE001 - a row this secret cannot open is no session of ours
        return None
    return Session(sid, secret, data)


def set_cookie(response: Response, s: Session) -> None:
    settings = runtime().settings
    response.set_cookie(
        s.cookie_name, base64.urlsafe_b64encode(s.secret).decode().rstrip("="),
        max_age=60 * settings.smart_session_minutes, path="/smart", httponly=True,
        secure=not settings.dev, samesite=settings.smart_cookie_samesite)


# ------------------------------------------------------------------------------- the EHR side
@dataclass(frozen=True)
class Ehr:
    """An EHR allowed to launch the app: its ``iss``, our client id there, where we may connect."""

    iss: str
    client_id: str
    kinds: frozenset[str]

    def rule(self, base: str | None = None) -> EgressRule:
        """The egress rule of a call: under ``base`` (the FHIR server), or anywhere (the
        authorization server's endpoints, which its own configuration names) — addresses are
        checked either way."""
        servers = (egress.parse_base(base),) if base else None
        return EgressRule(servers, self.kinds, f"the EHR {self.iss}")


def find_ehr(iss: str) -> Ehr:
    """The EHR behind ``iss``, from the clients file (or a loopback ``iss`` in dev mode).

    Raises:
        LaunchError: ``iss`` is missing, malformed or not allowed.
    """
    rt = runtime()
    if not iss:
        raise LaunchError("This app opens from the EHR (or a patient portal), which tells it "
                          "which FHIR server to use (the iss parameter is missing).")
    wanted = iss.rstrip("/")
    try:
        egress.parse_base(wanted)
    except ValueError as exc:
        raise LaunchError(f"The launch named a FHIR server this app cannot use ({exc}).") \
            from None
    for client in rt.clients:
        if client.smart_client_id and wanted in client.smart_iss:
            kinds = PRIVATE_KINDS if client.allow_private else frozenset()
            return Ehr(wanted, client.smart_client_id, kinds)
    if rt.settings.dev and _is_loopback(wanted):
        return Ehr(wanted, rt.settings.smart_client_id, DEV_KINDS)
    raise LaunchError(
        "This EHR is not registered to launch the intake app: its FHIR server "
        f"{wanted!r} is not on the allowlist (smart.iss in the clients file). Nothing was "
        "read or sent.", 403)


def _is_loopback(url: str) -> bool:
    """The URL names localhost or a loopback address (egress's kinds: ::ffff:127.0.0.1 too)."""
    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or egress.address_kind(host) == "loopback"
    except ValueError:
        return False


def ehr_call(ehr: Ehr, method: str, url: str, *, base: str | None = None,
             token: str | None = None, data: dict[str, str] | None = None,
             body: bytes | None = None, headers: dict[str, str] | None = None,
             ) -> requests.Response:
    """One HTTP call to the EHR through the egress checks (no redirects, bounded body).

    Raises:
        LaunchError: the URL or its address is refused (nothing sent), or the call failed.
        requests.RequestException: the EHR could not be reached (the caller words it).
    """
    rt = runtime()
    fetcher = rt.fetcher
    assert fetcher is not None  # create_app always builds one
    try:
        approved = fetcher.approve(url if base is None else base, ehr.rule(base))
        approved.check(url)
    except (FhirServerRefused, egress.Unresolvable, ValueError) as exc:
        raise LaunchError(f"The EHR's address was refused ({exc}); nothing was sent.", 502) \
            from None
    all_headers = {"Accept": "application/json"}
    all_headers.update(headers or {})
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    prepared = fetcher.session.prepare_request(requests.Request(
        method, url, headers=all_headers, data=data if body is None else body))
    prepared.lbp_egress = approved  # type: ignore[attr-defined]  # read by PinnedAdapter
    resp = fetcher.session.send(prepared, timeout=EHR_TIMEOUT, allow_redirects=False,
                                proxies={}, stream=True)
    content = resp.raw.read(MAX_EHR_BYTES + 1, decode_content=True)
    resp.close()
    if len(content) > MAX_EHR_BYTES:
        raise LaunchError("The EHR sent an answer larger than this app accepts.", 502)
    resp._content = content  # noqa: SLF001 - the body read under our limit
    return resp


def _json(resp: requests.Response, what: str) -> dict[str, Any]:
    try:
        doc = resp.json()
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise LaunchError(f"The EHR's {what} is not JSON (HTTP {resp.status_code}).", 502)
    return doc


def discover(ehr: Ehr) -> dict[str, Any]:
    """The EHR's ``.well-known/smart-configuration``, checked for what this app needs.

    Raises:
        LaunchError: unreachable, not JSON, or no authorization code flow with PKCE S256.
    """
    url = f"{ehr.iss}/.well-known/smart-configuration"
    try:
        resp = ehr_call(ehr, "GET", url)
    except requests.RequestException as exc:
        raise LaunchError(f"The EHR's SMART configuration could not be read "
                          f"({type(exc).__name__}). Try again in a moment.", 502) from None
    if resp.status_code != 200:
        raise LaunchError(f"The EHR's SMART configuration could not be read (HTTP "
                          f"{resp.status_code}).", 502)
    config = _json(resp, "SMART configuration")
    for key in ("authorization_endpoint", "token_endpoint"):
        value = config.get(key)
        if not isinstance(value, str) or urlsplit(value).scheme not in ("https", "http"):
            raise LaunchError(f"The EHR's SMART configuration has no usable {key}.", 502)
    methods = config.get("code_challenge_methods_supported")
    if isinstance(methods, list) and "S256" not in methods:
        # SMART 2.0: servers SHALL support S256; an app SHALL NOT fall back to `plain`.
        raise LaunchError("The EHR does not offer PKCE with S256, which this app requires.", 502)
    return config


def scopes_for(config: dict[str, Any], standalone: bool) -> str:
    """The scopes to ask: SMART v2 unless the server offers only v1 (``permission-v1`` without
    ``permission-v2``, or only ``.read``/``.write`` scopes listed)."""
    capabilities = config.get("capabilities") or []
    listed = config.get("scopes_supported") or []
    v1 = "permission-v2" not in capabilities and (
        "permission-v1" in capabilities
        or (any(str(s).endswith((".read", ".write")) for s in listed)
            and not any(re.search(r"\.c?r?u?d?s?$", str(s)) and not str(s).endswith(
                (".read", ".write", ".*")) for s in listed)))
    launch = "launch/patient" if standalone else "launch"
    return " ".join((launch, *(SCOPES_V1 if v1 else SCOPES_V2)))


def can_write(scope: str) -> bool:
    """The granted scopes allow creating a QuestionnaireResponse (v2 ``c``, or v1 ``write``)."""
    for s in scope.split():
        context, _, rest = s.partition("/")
        rtype, _, perms = rest.partition(".")
        perms = perms.split("?", 1)[0]
        if context not in ("patient", "user") or rtype not in ("QuestionnaireResponse", "*"):
            continue
        if perms in ("write", "*") or (perms and "c" in perms and re.fullmatch(r"c?r?u?d?s?",
                                                                                perms)):
            return True
    return False


def pkce_pair() -> tuple[str, str]:
    """(verifier, S256 challenge), RFC 7636."""
    verifier = secrets.token_urlsafe(64)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _with_query(url: str, params: dict[str, str]) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def redirect_uri() -> str:
    base = runtime().settings.public_base_url or request.host_url
    return f"{base.rstrip('/')}/smart/callback"


def app_context(raw: Any) -> dict[str, Any]:
    """The card's ``appContext`` (JSON text this service put on the link); {} otherwise."""
    if not isinstance(raw, str):
        return {}
    try:
        doc = json.loads(raw)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


# -------------------------------------------------------------------------------------- pages
def page(template: str, status: int = 200, **context: Any) -> Response:
    """An HTML page of the app, with its security headers."""
    context.setdefault("static", f"{_prefix()}/smart/static")
    context.setdefault("patient", None)
    html = pages.render(f"smart/{template}", **context)
    return Response(html, status, content_type="text/html; charset=utf-8")


def redirect(location: str, status: int) -> Response:
    """``flask.redirect`` typed as the app's own Response class."""
    response: Response = _redirect(location, status)  # type: ignore[assignment]
    return response


def _prefix() -> str:
    return request.script_root.rstrip("/")


def error_page(message: str, status: int, title: str = "The intake app could not continue"
               ) -> Response:
    return page("message.html", status, title=title, message=message)


@bp.after_request
def _headers(response: Response) -> Response:
    return security_headers(response)


def security_headers(response: Response, form_action: str = "'self'") -> Response:
    """The app's pages' headers: a strict CSP (no inline script or style), no Referer, no cache.

    Args:
        response: the page.
        form_action: where the page's forms may go, redirects included (Chromium applies
            ``form-action`` to them): the dev launcher's end at its stand-in EHR's port.
    """
    ancestors = runtime().settings.smart_frame_ancestors.strip() or "'none'"
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src 'self'; form-action {form_action}; base-uri 'none'; "
        f"frame-ancestors {ancestors}")
    response.headers["X-Content-Type-Options"] = "nosniff"
    # The callback URL carries the authorization code: no page of the app passes a Referer on.
    response.headers["Referrer-Policy"] = "no-referrer"
    if not request.path.startswith("/smart/static/"):
        response.headers["Cache-Control"] = "no-store"
    return response


@bp.errorhandler(LaunchError)
def _launch_error(exc: LaunchError) -> Response:
    log.info("smart launch refused", extra={"status": exc.status, "error": exc.message})
    return error_page(exc.message, exc.status)


# ------------------------------------------------------------------------------------- routes
@bp.get("/launch")
def launch() -> Response:
    """EHR launch (``iss`` + ``launch``) or standalone patient launch (``iss`` alone)."""
    iss = request.args.get("iss", "")
    launch_id = request.args.get("launch", "")
    ehr = find_ehr(iss)
    config = discover(ehr)
    verifier, challenge = pkce_pair()
    s = new_session()
    state = f"{s.sid}.{secrets.token_urlsafe(24)}"
    standalone = not launch_id
    scope = scopes_for(config, standalone)
    s.data = {"stage": "authorizing", "iss": ehr.iss, "state": state, "verifier": verifier,
              "token_endpoint": config["token_endpoint"], "jwks_uri": config.get("jwks_uri"),
              "issuer": config.get("issuer"), "standalone": standalone,
              "redirect_uri": redirect_uri()}
    save_session(s)
    params = {"response_type": "code", "client_id": ehr.client_id,
              "redirect_uri": s.data["redirect_uri"], "scope": scope, "state": state,
              "aud": ehr.iss, "code_challenge": challenge, "code_challenge_method": "S256"}
    if launch_id:
        params["launch"] = launch_id
    response = redirect(_with_query(config["authorization_endpoint"], params), 302)
    set_cookie(response, s)
    log.info("smart launch", extra={"standalone": standalone, "sid": s.sid})
    return response


def _ehr_of(s: Session) -> Ehr:
    """The session's EHR, from the allowlist as it is now (an EHR taken off it stops here)."""
    return find_ehr(s.data["iss"])


@bp.get("/callback")
def callback() -> Response:
    """The authorization server's redirect: check ``state``, exchange the code (PKCE)."""
    state = request.args.get("state", "")
    sid = state.split(".", 1)[0]
    s = load_session(sid) if "." in state else None
    expected = (s.data.get("state") if s else None) or ""
    if s is None or not expected or not hmac.compare_digest(expected, state):
        raise LaunchError("This sign-in answer does not belong to a launch started in this "
                          "browser (wrong or missing state). Nothing was read or saved: open "
                          "the app again from the EHR.")
    if s.data.get("stage") != "authorizing":
        raise LaunchError("This sign-in answer was already used. Open the app again from the "
                          "EHR.")
    if "error" in request.args:
        s.data["stage"] = "failed"
        save_session(s)
        described = request.args.get("error_description", "")[:300]
        raise LaunchError(f"The EHR did not authorise the app ({request.args['error'][:80]}"
                          + (f": {described}" if described else "") + ").", 403)
    code = request.args.get("code", "")
    if not code:
        raise LaunchError("The EHR's answer has no authorization code.")
    ehr = _ehr_of(s)
    form = {"grant_type": "authorization_code", "code": code,
            "redirect_uri": s.data["redirect_uri"], "client_id": ehr.client_id,
            "code_verifier": s.data["verifier"]}
    s.data["stage"] = "exchanging"  # the code is single-use: a reload must not replay it
    save_session(s)
    try:
        resp = ehr_call(ehr, "POST", s.data["token_endpoint"], data=form,
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    except requests.RequestException as exc:
        raise LaunchError(f"The EHR's token endpoint could not be reached "
                          f"({type(exc).__name__}). Open the app again from the EHR.", 502) \
            from None
    doc = _json(resp, "token answer")
    if resp.status_code != 200 or "access_token" not in doc:
        error = str(doc.get("error", f"HTTP {resp.status_code}"))[:80]
        raise LaunchError(f"The EHR refused to give the app access ({error}). Open the app "
                          "again from the EHR.", 403)
    token = doc["access_token"]
    patient = doc.get("patient")
    scope = str(doc.get("scope", ""))
    if str(doc.get("token_type", "")).lower() != "bearer" or not isinstance(token, str):
        raise LaunchError("The EHR's token answer is not a bearer token.", 502)
    if not isinstance(patient, str) or not patient:
        raise LaunchError("The EHR did not say which patient this is (no patient in the "
                          "launch context). Open the app from the patient's chart.", 403)
    context = app_context(doc.get("appContext"))
    if context.get("patient") and context["patient"] != patient:
        raise LaunchError("The card this app was opened from is for another patient than the "
                          "one the EHR signed the app in for. Nothing was read or saved: open "
                          "the app again from this patient's card.", 403)
    if not can_write(scope):
        raise LaunchError("The EHR did not allow the app to save answers to the record "
                          "(no QuestionnaireResponse write scope was granted).", 403)
    fhir_user = _fhir_user(ehr, s, doc)
    expires_in = doc.get("expires_in")
    s.data.update({
        "stage": "ready", "token": token, "patient": patient, "scope": scope,
        "expires_at": time.time() + float(expires_in) if isinstance(expires_in, int | float)
        else None,
        "fhir_user": fhir_user, "rule": context.get("rule") if isinstance(
            context.get("rule"), str) else None,
        "banner": bool(doc.get("need_patient_banner", True)),
        "csrf": secrets.token_urlsafe(32),
    })
    s.data.pop("verifier", None)
    _restore_draft(s)
    save_session(s)
    log.info("smart launch authorised", extra={"sid": s.sid, "scope": scope})
    return redirect(f"{_prefix()}/smart/s/{s.sid}/intake", 303)


def _fhir_user(ehr: Ehr, s: Session, doc: dict[str, Any]) -> str | None:
    """The signed-in user (``fhirUser`` of a verified id_token), as a relative reference."""
    id_token = doc.get("id_token")
    if not isinstance(id_token, str) or not s.data.get("jwks_uri"):
        return None
    try:
        resp = ehr_call(ehr, "GET", s.data["jwks_uri"])
        keys = jwt.PyJWKSet.from_dict(_json(resp, "key set"))
        kid = jwt.get_unverified_header(id_token).get("kid")
        key = next((k for k in keys.keys if kid is None or k.key_id == kid), None)
        if key is None:
            raise LaunchError("The EHR's id_token names a key its key set does not hold.", 502)
        claims = jwt.decode(id_token, key.key, algorithms=["RS256", "RS384", "ES256", "ES384"],
                            audience=ehr.client_id, issuer=s.data.get("issuer") or ehr.iss,
                            leeway=60)
    except (requests.RequestException, jwt.PyJWTError) as exc:
        raise LaunchError(f"The EHR's id_token could not be verified ({type(exc).__name__}). "
                          "Open the app again from the EHR.", 502) from None
    user = claims.get("fhirUser")
    if not isinstance(user, str):
        return None
    # fhirUser is an absolute URL on the FHIR server, or relative: keep Type/id.
    parts = user.rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else None


def _restore_draft(s: Session) -> None:
    """Answers an earlier session of this browser kept for the same patient and EHR (a save
    refused because the sign-in expired) come back into this one."""
    prefix = cookie_name("")
    for name in request.cookies:
        if not name.startswith(prefix) or name == s.cookie_name:
            continue
        old = load_session(name[len(prefix):])
        if old is None or not (old.data.get("draft") or {}).get("values"):
            continue  # nothing was answered there
        if old.data.get("iss") == s.data["iss"] and old.data.get("patient") == s.data["patient"]:
            s.data["draft"] = old.data["draft"]
            s.data["restored"] = True
            old.data.pop("draft")
            save_session(old)
            return


def _ready(sid: str) -> Session:
    s = load_session(sid)
    if s is None or s.data.get("stage") not in ("ready", "saved"):
        raise LaunchError("This intake session has ended (or was opened in another browser). "
                          "Open the app again from the EHR; answers not yet saved in this "
                          "browser come back.", 401)
    return s


def _read_record(s: Session) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Patient, Conditions, Observations, medication orders, procedures and earlier intakes, with
    what could not be read.

    Raises:
        LaunchError: the patient itself cannot be read (401 expired, 403 not covered, 404).
    """
    rt = runtime()
    ehr = _ehr_of(s)
    patient = s.data["patient"]
    try:
        resp = ehr_call(ehr, "GET", f"{ehr.iss}/Patient/{patient}", base=ehr.iss,
                        token=s.data["token"], headers={"Accept": FHIR_JSON})
    except requests.RequestException as exc:
        raise LaunchError(f"The EHR's FHIR server could not be reached "
                          f"({type(exc).__name__}). Try again in a moment.", 502) from None
    if resp.status_code == 401:
        raise LaunchError("The EHR no longer accepts this sign-in (it has expired). Open the "
                          "app again from the EHR.", 401)
    if resp.status_code == 403:
        raise LaunchError("The EHR's sign-in does not cover this patient's record. Nothing was "
                          "read or saved.", 403)
    if resp.status_code != 200:
        again = " Try again in a moment (reload this page)." if resp.status_code >= 500 else ""
        raise LaunchError(f"The EHR's FHIR server did not give the patient's record (HTTP "
                          f"{resp.status_code}).{again}", 502)
    found: dict[str, list[dict[str, Any]]] = {"Patient": [_json(resp, "patient")]}
    url = rt.knowledge.questionnaire_url
    urls = {"Condition": (f"Condition?patient={patient}", "Condition"),
            "Observation": (f"Observation?patient={patient}", "Observation"),
            "MedicationRequest": (f"MedicationRequest?patient={patient}", "MedicationRequest"),
            "Procedure": (f"Procedure?patient={patient}", "Procedure"),
            "QuestionnaireResponse": (f"QuestionnaireResponse?patient={patient}"
                                      f"&questionnaire={url}", "QuestionnaireResponse")}
    fetcher = rt.fetcher
    assert fetcher is not None
    unread: list[str] = []
    try:
        approved = fetcher.approve(ehr.iss, ehr.rule(ehr.iss))
        results = fetcher.fetch_all(ehr.iss, s.data["token"], urls,
                                    time.monotonic() + rt.policy.deadline, approved)
    except (FhirServerRefused, egress.Unresolvable):
        results = {}
    for rtype in urls:
        resources, _status = results.get(rtype, (None, None))
        if resources is None:
            unread.append(rtype)
            continue
        # A server that ignores `patient=` must not put another patient's data in the form.
        found[rtype] = [r for r in resources if _subject(r) == patient]
    return found, unread


def _subject(resource: dict[str, Any]) -> str | None:
    ref = ((resource.get("subject") or resource.get("patient") or {}).get("reference") or "")
    parts = ref.rstrip("/").split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == "Patient" else None


def _form_page(s: Session, status: int = 200, *, values: dict[str, Any] | None = None,
               errors: dict[str, str] | None = None, save_error: str | None = None,
               record_required: bool = True) -> Response:
    """The form. With ``record_required`` false (a failed save), a record that cannot be read
    again leaves the form without prefill or sex and age, so the posted answers stay on it."""
    rt = runtime()
    try:
        record, unread = _read_record(s)
    except LaunchError:
        if record_required:
            raise
        record, unread = {}, ["the patient's record"]
    patient = next(iter(record.get("Patient") or ()), None)
    sex, age = intake.sex_and_age(patient, rt.clock())
    items = intake.form_items(rt.knowledge, sex=sex, age=age, first_rule=s.data.get("rule"))
    prefills = intake.prefill(rt.knowledge, record, now=rt.clock()) if record else {}
    draft = s.data.get("draft") or {}
    identifier = draft.get("identifier") or f"urn:uuid:{uuid.uuid4()}"
    restored = bool(s.data.pop("restored", False))
    if patient is None:
        banner = s.data.get("shown_banner")  # kept from when the record could be read
    else:
        banner = intake.patient_banner(patient) if s.data.get("banner") else None
    if banner != s.data.get("shown_banner") or not draft or restored:
        s.data["shown_banner"] = banner
        s.data["draft"] = {**draft, "identifier": identifier}
        s.data["draft"].setdefault("values", {})
        save_session(s)
    shown = values if values is not None else draft.get("values") or {}
    return page("intake.html", status, items=items, values=shown, prefills=prefills,
                errors=errors or {}, save_error=save_error, csrf=s.data["csrf"],
                identifier=identifier, action=f"{_prefix()}/smart/s/{s.sid}/intake",
                patient=banner,
                title="Back pain red-flag questions", unread=unread,
                restored=restored, rule=s.data.get("rule"))


@bp.get("/s/<sid>/intake")
def intake_form(sid: str) -> Response:
    """The form, prefilled from the record, the card's questions first."""
    return _form_page(_ready(sid))


@bp.post("/s/<sid>/intake")
def intake_save(sid: str) -> Response:
    """Save: CSRF check, keep the answers, POST the QuestionnaireResponse, say what happened."""
    s = _ready(sid)
    sent = request.form.get("csrf", "")
    if not hmac.compare_digest(sent.encode(), str(s.data["csrf"]).encode()):
        raise LaunchError("This form did not come from this session (CSRF check failed). "
                          "Nothing was saved. Open the app again from the EHR.", 400)
    rt = runtime()
    form = request.form.to_dict(flat=False)
    values, errors = intake.parse_answers(rt.knowledge, form)
    identifier = request.form.get("identifier", "")
    draft = s.data.get("draft") or {}
    if not IDENTIFIER.match(identifier):
        identifier = draft.get("identifier") or f"urn:uuid:{uuid.uuid4()}"
    kept = {k: v[0] if len(v) == 1 else v for k, v in form.items()
            if k not in ("csrf", "identifier")}
    s.data["draft"] = {"identifier": identifier, "values": _jsonable(values),
                       "attempted": bool(draft.get("attempted"))}
    save_session(s)  # kept before anything is sent: nothing typed is lost from here on
    if errors:
        return _form_page(s, 422, values={**values, **{k: kept.get(k) for k in errors}},
                          errors=errors)
    patient = s.data["patient"]
    author = s.data.get("fhir_user")
    if not (author and author.startswith(AUTHOR_TYPES)):
        author = f"Patient/{patient}" if s.data.get("standalone") else None
    qr = intake.build_response(rt.knowledge, values, patient_id=patient, author=author,
                               authored=rt.clock().astimezone(timezone.utc),
                               identifier=identifier)
    ehr = _ehr_of(s)
    started = time.monotonic()
    try:
        # A retry after an attempt whose answer never came may find it stored already: the
        # response's identifier says so (servers differ on conditional create, so it is looked
        # up rather than left to If-None-Exist).
        earlier = _stored_with(ehr, s, identifier) if draft.get("attempted") else None
        if earlier is not None:
            return _saved(s, values, earlier, started, "found")
        s.data["draft"]["attempted"] = True
        save_session(s)
        resp = ehr_call(ehr, "POST", f"{ehr.iss}/QuestionnaireResponse", base=ehr.iss,
                        token=s.data["token"], body=json.dumps(qr).encode(),
                        headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON})
    except requests.RequestException as exc:
        return _save_failed(s, values, 503, "The EHR's FHIR server could not be reached "
                            f"({type(exc).__name__}). Try saving again in a moment.")
    except LaunchError as exc:
        return _save_failed(s, values, exc.status, exc.message)
    if resp.status_code in (200, 201):
        return _saved(s, values, _saved_id(resp), started, str(resp.status_code))
    detail = _diagnostics(resp)
    if resp.status_code == 401:
        return _save_failed(s, values, 401, "The EHR no longer accepts this sign-in (it has "
                            "expired). Open the app again from the EHR's card, in this "
                            "browser: your answers come back, then save.")
    if resp.status_code == 403:
        return _save_failed(s, values, 403, "The EHR refused to save answers for this patient "
                            f"with this sign-in{detail}.")
    if resp.status_code in (400, 409, 412, 422):
        return _save_failed(s, values, 422, f"The EHR's FHIR server rejected the answers"
                            f"{detail}.")
    return _save_failed(s, values, 502, f"The EHR's FHIR server could not save the answers "
                        f"(HTTP {resp.status_code}){detail}. Try saving again in a moment.")


def _saved(s: Session, values: dict[str, Any], saved_id: str | None, started: float,
           how: str) -> Response:
    s.data["stage"] = "saved"
    s.data["saved"] = {"id": saved_id, "at": runtime().clock().isoformat(),
                       "yes": [k for k, v in values.items() if v is True]}
    s.data.pop("draft", None)
    save_session(s)
    log.info("intake saved", extra={"sid": s.sid, "how": how,
                                    "seconds": round(time.monotonic() - started, 3)})
    return redirect(f"{_prefix()}/smart/s/{s.sid}/saved", 303)


def _stored_with(ehr: Ehr, s: Session, identifier: str) -> str | None:
    """The id of the patient's stored response with this identifier, if the server has one.

    Raises:
        requests.RequestException: the server could not be reached.
    """
    patient = s.data["patient"]
    url = (f"{ehr.iss}/QuestionnaireResponse?" + urlencode(
        {"patient": patient, "identifier": f"urn:ietf:rfc:3986|{identifier}"}))
    resp = ehr_call(ehr, "GET", url, base=ehr.iss, token=s.data["token"],
                    headers={"Accept": FHIR_JSON})
    if resp.status_code != 200:
        return None  # cannot tell: saving again risks a duplicate, never a loss
    try:
        bundle = resp.json()
    except ValueError:
        return None
    for entry in (bundle.get("entry") or []) if isinstance(bundle, dict) else []:
        found = entry.get("resource") or {}
        # A server that ignores the search parameters answers with more: check each one.
        if ((found.get("identifier") or {}).get("value") == identifier
                and _subject(found) == patient and found.get("id")):
            return str(found["id"])
    return None


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in values.items()}


def _save_failed(s: Session, values: dict[str, Any], status: int, message: str) -> Response:
    log.warning("intake not saved", extra={"sid": s.sid, "status": status})
    return _form_page(s, status, values=values, save_error=message, record_required=False)


def _saved_id(resp: requests.Response) -> str | None:
    location = resp.headers.get("Location") or resp.headers.get("Content-Location") or ""
    match = re.search(r"QuestionnaireResponse/([A-Za-z0-9\-.]{1,64})", location)
    if match:
        return match.group(1)
    try:
        doc = resp.json()
    except ValueError:
        return None
    return doc.get("id") if isinstance(doc, dict) else None


def _diagnostics(resp: requests.Response) -> str:
    try:
        doc = resp.json()
    except ValueError:
        return ""
    issues = doc.get("issue") if isinstance(doc, dict) else None
    if not isinstance(issues, list) or not issues or not isinstance(issues[0], dict):
        return ""
    text = issues[0].get("diagnostics") or (issues[0].get("details") or {}).get("text") or ""
    return f" (it says: {str(text)[:200]})" if text else ""


@bp.get("/s/<sid>/saved")
def saved(sid: str) -> Response:
    """What was saved, and what happens next."""
    s = load_session(sid)
    if s is None or s.data.get("stage") != "saved":
        raise LaunchError("Nothing was saved in this session, or it has ended.", 404)
    rt = runtime()
    texts = {item.link_id: item.text for item in intake.form_items(
        rt.knowledge, sex=None, age=None, first_rule=None)}
    info = s.data["saved"]
    return page("saved.html", title="Answers saved to the record", saved=info,
                yes=[texts.get(k, k) for k in info.get("yes", [])])

