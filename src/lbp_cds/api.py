"""The HTTP surface: discovery, service calls, feedback, health, metrics. No logic of its own.

Each handler reads the request, calls the modules that do the work, and writes the answer;
errors are ``CdsError``s rendered as OperationOutcomes by ``errors_to_outcome``.
"""

from __future__ import annotations

import html
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson
from flask import Blueprint, Flask, Response, current_app, g, has_request_context, request
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException

from lbp_cds import cards, facts, hooks, observability, pama
from lbp_cds.auth import JwtVerifier, TrustedClient
from lbp_cds.config import Settings
from lbp_cds.egress import EgressRule
from lbp_cds.errors import (
    AuthenticationError,
    CdsError,
    Issue,
    PayloadTooLarge,
    PreconditionFailed,
    RequestError,
    ServiceNotFound,
    StoreUnavailable,
    UnprocessableFeedback,
    UnsupportedMediaType,
)
from lbp_cds.fhir_data import FetchPolicy, FhirFetcher, PatientRecord, load_record
from lbp_cds.knowledge import Knowledge, Service
from lbp_cds.rules import RuleEngine
from lbp_cds.store import Store

log = logging.getLogger(__name__)
bp = Blueprint("cds", __name__)
JSON_TYPES = ("application/json", "application/fhir+json")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclass
class Runtime:
    """Everything a request handler needs, built once by ``create_app``."""

    settings: Settings
    knowledge: Knowledge
    engine: RuleEngine
    store: Store
    verifier: JwtVerifier | None
    fetcher: FhirFetcher | None
    policy: FetchPolicy
    clock: Callable[[], datetime]
    # Rules run silently (LBP_CDS_SILENT_RULES and the site file's silent_rules, checked).
    silent: frozenset[str] = frozenset()
    # The trusted clients (empty in dev mode): the intake app's `iss` allowlist is theirs.
    clients: tuple[TrustedClient, ...] = ()


def runtime() -> Runtime:
    """The runtime of the current app."""
    rt: Runtime = current_app.extensions["lbp_cds"]
    return rt


def json_response(doc: Any, status: int = 200, content_type: str = "application/json"
                  ) -> Response:
    """A JSON response serialized with orjson."""
    return Response(orjson.dumps(doc), status=status, content_type=content_type)


# -- request plumbing -------------------------------------------------------------------------
@bp.before_app_request
def _start() -> None:
    g.started = time.perf_counter()
    incoming = request.headers.get("X-Request-Id", "")
    # A caller's id is kept only if it looks like one (it is logged and echoed).
    rid = incoming if REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
    g.request_id = rid
    observability.request_id_var.set(rid)
    observability.hook_instance_var.set("")


@bp.after_app_request
def _finish(response: Response) -> Response:
    response.headers["X-Request-Id"] = g.get("request_id", "")
    response.headers.setdefault("Cache-Control", "no-store")
    endpoint = request.endpoint or "unknown"
    service, hook = g.get("service_id", ""), g.get("hook", "")
    elapsed = time.perf_counter() - g.get("started", time.perf_counter())
    observability.REQUESTS.labels(endpoint, service, hook, str(response.status_code)).inc()
    observability.LATENCY.labels(endpoint, service, hook).observe(elapsed)
    log.info("request", extra={"method": request.method, "path": _safe_path(),
                               "status": response.status_code,
                               "ms": round(elapsed * 1000, 2)})
    return response


def _safe_path() -> str:
    # Paths are ours (service ids); query strings are not logged.
    return request.path[:200]


def authenticate() -> None:
    """Verify the client's JWT unless running in dev mode; remember where it may send us.

    Sets ``g.egress``: the authenticated client's FHIR destinations, or dev mode's.

    Raises:
        AuthenticationError: any failure (401 naming the reason's category; the reason itself
            is logged under the request id).
    """
    rt = runtime()
    if rt.verifier is None:
        g.egress = EgressRule.dev()
        return
    base = rt.settings.public_base_url.rstrip("/") or request.host_url.rstrip("/")
    audience = base + request.path
    try:
        g.claims = rt.verifier.verify(request.headers.get("Authorization"), audience)
    except AuthenticationError as exc:
        observability.AUTH_FAILURES.labels(request.endpoint or "unknown").inc()
        log.warning("client authentication failed", extra={"reason": exc.message,
                                                            "category": exc.category})
        raise
    g.egress = rt.verifier.client(g.claims["iss"]).egress()


def _service_or_404(service_id: str) -> list[Service]:
    """The services with this id (one per hook), after authentication (an anonymous caller
    must not learn which ids exist).

    Raises:
        ServiceNotFound: no service has this id.
    """
    services = runtime().knowledge.services_with_id(service_id)
    if not services:
        raise ServiceNotFound(f"no CDS service {service_id!r}",
                              [Issue("id", f"no CDS service {service_id!r}", "not-found")])
    g.service_id = service_id  # a metric label: only ids we serve, never caller text
    return services


def read_json_body(hook_call: bool = False) -> Any:
    """The request body as JSON, within the size, type and depth limits.

    Args:
        hook_call: the body is a hook request: its prefetch is split, not parsed
            (``hooks.parse_hook_body``).

    Raises:
        UnsupportedMediaType: not JSON.
        PayloadTooLarge: over the size limit.
        RequestError: not valid JSON, or nested too deep.
    """
    settings = runtime().settings
    mimetype = (request.mimetype or "").lower()
    if mimetype not in JSON_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {request.mimetype or 'none'}",
            [Issue("Content-Type", "send the body as application/json", "not-supported")])
    length = request.content_length
    if length is not None and length > settings.max_body_bytes:
        raise PayloadTooLarge(f"body of {length} bytes exceeds {settings.max_body_bytes}")
    environ = request.environ
    if length is not None:
        # Exactly Content-Length bytes from the server's input, asked for at once: werkzeug's
        # wrapper would add a copy of the body, and gunicorn's reader copies what it holds
        # beyond each read (64 KB reads of a megabyte body cost quadratic copying).
        stream, limit = environ["wsgi.input"], length
    elif environ.get("wsgi.input_terminated"):
        # Chunked body: werkzeug's request.stream stops silently at the limit (an oversized
        # body would be parsed truncated), so read the server-terminated input ourselves.
        stream, limit = environ["wsgi.input"], settings.max_body_bytes + 1
    else:
        stream, limit = request.stream, settings.max_body_bytes + 1
    parts: list[bytes] = []
    size = 0
    while size < limit:  # loop: a read may return fewer bytes than asked
        part = stream.read(min(limit - size, 1 << 20) if length is None else limit - size)
        if not part:
            break
        parts.append(part)
        size += len(part)
    body = b"".join(parts)
    if len(body) > settings.max_body_bytes:
        raise PayloadTooLarge(f"body exceeds {settings.max_body_bytes} bytes")
    if hook_call:
        return hooks.parse_hook_body(body, settings.max_json_depth)
    return hooks.parse_json(body, settings.max_json_depth)


# -- endpoints ----------------------------------------------------------------------------------
@bp.get("/cds-services")
def discovery() -> Response:
    """CDS Hooks discovery: every service of the knowledge pack."""
    authenticate()
    return json_response({"services": [s.discovery() for s in runtime().knowledge.services]})


@bp.post("/cds-services/<service_id>")
def call_service(service_id: str) -> Response:
    """A hook call: validate, gather the record, evaluate the rules, answer with cards."""
    rt = runtime()
    authenticate()
    services = _service_or_404(service_id)
    doc = read_json_body(hook_call=True)
    # The hook is checked before the request is validated: a hook this service does not serve
    # is the answer, not the context fields that hook would need.
    hook = doc.get("hook") if isinstance(doc, dict) else None
    if isinstance(hook, str) and all(s.hook != hook for s in services):
        served = ", ".join(s.hook for s in services)
        shown = hook[:64]
        raise RequestError(f"service {service_id} does not serve hook {shown}", [Issue(
            "hook", f"service {service_id} serves {served}, not {shown}", "not-supported")])
    req = hooks.parse_request(doc)
    observability.hook_instance_var.set(req.hook_instance)
    service = next(s for s in services if s.hook == req.hook)
    g.hook = service.hook  # a metric label: only hooks we serve, never caller text
    if req.fhir_server:
        g.egress.check_url(req.fhir_server)  # 400 before anything else, fetch or not
    try:
        record = load_record(req, service, rt.fetcher, rt.policy, rt.knowledge.code_universe,
                             egress=g.egress)
    except PreconditionFailed:
        observability.PRECONDITION_FAILED.labels(service_id).inc()
        raise
    _observe_fetch(record)
    answer = respond(rt, service, req, record, rt.clock())
    issued, actions, silent = answer.shown, answer.actions, answer.silent
    try:
        rt.store.record_issued(service.id, req.hook_instance, issued,
                               knowledge_digest=rt.knowledge.digest, silent=silent)
    except SQLAlchemyError as exc:
        # The clinician's cards matter more than their audit row: answer, and say so loudly.
        observability.STORE_FAILURES.labels("record_issued").inc()
        log.error("issued cards were not recorded", extra={"error": type(exc).__name__})
    for c in issued:
        observability.CARDS.labels(service.id, c.rule_id, c.indicator).inc()
    for c in silent:
        observability.CARDS_SILENT.labels(service.id, c.rule_id, c.indicator).inc()
    log.info("cards issued", extra={"service": service.id, "hook": req.hook,
                                    "rules": [c.rule_id for c in issued],
                                    "silent_rules": [c.rule_id for c in silent],
                                    "resources": record.total,
                                    "unparsable": sum(record.parse_failures.values())})
    return json_response(pama.response([c.card for c in issued], actions, rt.engine))


def judged_orders(req: hooks.HookRequest, record: PatientRecord) -> list[Any]:
    """The draft orders this call judges: the selected ones at order-select, all at order-sign."""
    orders = record.draft_orders()
    if req.hook == "order-select":
        selected = set(req.selections)
        return [o for o in orders if f"{o.get_resource_type()}/{o.id}" in selected]
    return orders


def evaluate(rt: Runtime, service: Service, req: hooks.HookRequest, record: PatientRecord,
             now: datetime) -> list[cards.IssuedCard]:
    """Evaluate the service's rules and render the cards (shared by the API and the CLI)."""
    return respond(rt, service, req, record, now).shown


@dataclass(frozen=True)
class Answer:
    """What a hook call gives: the cards shown, the system actions, and the silent cards
    (rendered and recorded like the others, never returned)."""

    shown: list[cards.IssuedCard]
    actions: list[dict[str, Any]]
    silent: list[cards.IssuedCard]


def respond(rt: Runtime, service: Service, req: hooks.HookRequest, record: PatientRecord,
            now: datetime) -> Answer:
    """The cards shown, the system actions that rate the judged imaging orders (``pama.py``),
    and the cards of the rules run silently.

    Silent matches are rendered on their own, and the shown cards and the order ratings are
    made as if they were absent (a silent rule must change nothing a clinician sees).
    """
    orders = judged_orders(req, record)
    every = rt.engine.evaluate(service, record, now, orders, silent=rt.silent)
    matches = [m for m in every if not m.silent]
    silent = [m for m in every if m.silent]
    raw_by_id = {str(r.get("id")): r for r in req.draft_orders if isinstance(r, dict)}
    checked = any(s.state != "unavailable" for s in record.statuses) or not record.statuses
    base = rt.settings.public_base_url or (request.host_url if has_request_context() else "")
    sex, age = facts.sex_and_age(record, now)
    cc = cards.CardContext(
        patient_id=req.patient_id or "", now=now, encounter_id=req.encounter_id,
        user_id=req.user_id, base_url=base, record_checked=checked, sex=sex, age=age,
        draft_raw=raw_by_id.get,
        drafts=tuple(r for r in req.draft_orders if isinstance(r, dict)),
    )
    for rtype, n in record.parse_failures.items():
        observability.PARSE_FAILURES.labels(rtype).inc(n)
    if record.parse_failures or record.dropped:
        # Types, element names and counts only: never content or ids.
        log.warning("read leniently", extra={
            "unreadable": dict(record.parse_failures),
            "dropped_elements": {t: dict(c) for t, c in record.dropped.items()}})
    return Answer(cards.render(matches, rt.knowledge, cc), pama.system_actions(
        rt.engine, service.id, req.hook, record, now, orders, matches, raw_by_id),
        cards.render(silent, rt.knowledge, cc) if silent else [])


def _observe_fetch(record: PatientRecord) -> None:
    for status in record.statuses:
        if status.state == "fetched":
            observability.FHIR_FETCH.labels(status.key, "ok").observe(status.seconds)
        elif status.state == "unavailable" and status.seconds:
            observability.FHIR_FETCH.labels(status.key, "failed").observe(status.seconds)
            observability.FHIR_FAILURES.labels(status.key).inc()
        if status.state == "unavailable":
            log.warning("prefetch key unavailable", extra={"key": status.key,
                                                           "reason": status.reason})


@bp.post("/cds-services/<service_id>/feedback")
def post_feedback(service_id: str) -> Response:
    """Feedback on issued cards, stored idempotently."""
    rt = runtime()
    authenticate()
    _service_or_404(service_id)
    items = hooks.parse_feedback(read_json_body())
    try:
        return _store_feedback(rt, service_id, items)
    except SQLAlchemyError as exc:
        observability.STORE_FAILURES.labels("feedback").inc()
        log.error("feedback could not be stored", extra={"error": type(exc).__name__})
        raise StoreUnavailable("the feedback could not be stored; nothing was kept, retry "
                               "later (feedback is idempotent)") from None


def _store_feedback(rt: Runtime, service_id: str, items: list[hooks.Feedback]) -> Response:
    problems = []
    for pos, item in enumerate(items):
        stored = rt.store.card(item.card)
        where = f"feedback[{pos}]"
        if stored is None or stored.silent:  # a silent card was never shown: none to judge
            problems.append(Issue(f"{where}.card", f"card {item.card} was not issued by this "
                                  "service", "not-found"))
            continue
        if stored.service_id != service_id:
            problems.append(Issue(f"{where}.card", f"card {item.card} was issued by service "
                                  f"{stored.service_id}, not {service_id}", "business-rule"))
        unknown = [s for s in item.accepted_suggestions if s not in stored.suggestion_uuids]
        if unknown:
            problems.append(Issue(f"{where}.acceptedSuggestions", "suggestions not on that card: "
                                  + ", ".join(unknown), "business-rule"))
    if problems:
        raise UnprocessableFeedback("feedback refers to cards or suggestions we did not issue",
                                    problems)
    new, duplicates = rt.store.record_feedback(items)
    for item in items:
        observability.FEEDBACK.labels(item.outcome).inc()
    log.info("feedback stored", extra={"service": service_id, "stored": new,
                                       "duplicates": duplicates})
    return json_response({"received": len(items), "stored": new, "duplicates": duplicates})


@bp.get("/healthz")
def healthz() -> Response:
    """Liveness: the process answers."""
    return json_response({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    """Readiness: knowledge loaded and the store reachable."""
    rt = runtime()
    checks = {"knowledge": bool(rt.knowledge.services), "store": rt.store.ping()}
    ok = all(checks.values())
    return json_response({"status": "ready" if ok else "not ready", "checks": checks,
                          "knowledgeDigest": rt.knowledge.digest}, 200 if ok else 503)


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus metrics."""
    payload, content_type = observability.metrics_payload()
    return Response(payload, content_type=content_type)


@bp.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3.1 description of this service's endpoints."""
    from lbp_cds.openapi import openapi_document

    return json_response(openapi_document(runtime().knowledge))


@bp.get("/questionnaires/lbp-intake")
def questionnaire() -> Response:
    """The red-flag intake Questionnaire (FHIR JSON; HTML for a browser)."""
    q = runtime().knowledge.questionnaire
    if request.accept_mimetypes.best_match(["application/fhir+json", "application/json",
                                             "text/html"]) == "text/html":
        return Response(_questionnaire_html(q), content_type="text/html; charset=utf-8")
    return json_response(q, content_type="application/fhir+json")


def _questionnaire_html(q: dict[str, Any]) -> str:
    def items(nodes: list[dict[str, Any]]) -> str:
        out = []
        for item in nodes:
            options = ", ".join(
                html.escape(str((o.get("valueCoding") or {}).get("display")
                                or (o.get("valueCoding") or {}).get("code") or ""))
                for o in item.get("answerOption", []))
            out.append(f"<li><code>{html.escape(item.get('linkId', ''))}</code> "
                       f"{html.escape(item.get('text', ''))}"
                       + (f" <em>({options})</em>" if options else "")
                       + (f"<ul>{items(item['item'])}</ul>" if item.get("item") else "")
                       + "</li>")
        return "".join(out)

    title = html.escape(str(q.get("title", "Intake")))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
            f"<body><h1>{title}</h1><ul>{items(q.get('item', []))}</ul></body></html>")


# -- errors -------------------------------------------------------------------------------------
def errors_to_outcome(app: Flask) -> None:
    """Render every error as a FHIR OperationOutcome with the right status; never a trace."""

    @app.errorhandler(CdsError)
    def _cds(exc: CdsError) -> Response:
        if not isinstance(exc, AuthenticationError):
            log.info("request refused", extra={"status": exc.status, "error": exc.message})
        if isinstance(exc, AuthenticationError):
            outcome = exc.operation_outcome(g.get("request_id", ""))
        else:
            outcome = exc.operation_outcome()
        response = json_response(outcome, exc.status, "application/fhir+json")
        if isinstance(exc, AuthenticationError):
            response.headers["WWW-Authenticate"] = 'Bearer realm="lbp-cds"'  # RFC 6750 §3
        return response

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = {404: "not-found", 405: "not-supported", 413: "too-costly"}.get(status,
                                                                                "processing")
        outcome = {"resourceType": "OperationOutcome", "issue": [{
            "severity": "error", "code": code,
            "diagnostics": f"{status} {exc.name}: {exc.description}"}]}
        response = json_response(outcome, status, "application/fhir+json")
        if status == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            response.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.error("unexpected error", exc_info=exc)
        outcome = {"resourceType": "OperationOutcome", "issue": [{
            "severity": "fatal", "code": "exception",
            "diagnostics": f"internal error; quote request id {g.get('request_id', '')}"}]}
        return json_response(outcome, 500, "application/fhir+json")


def now_utc() -> datetime:
    """The real clock."""
    return datetime.now(timezone.utc)
