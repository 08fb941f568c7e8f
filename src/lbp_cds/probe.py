"""``lbp-cds probe``: act as an EHR for one patient and show what the service answers.

The probe does what a CDS client does: it reads the service's discovery document, picks the
service for the hook, resolves that service's prefetch templates against the EHR's FHIR server
(following ``next`` links; a key that fails is left out, as an EHR would), builds the hook request
(with ``fhirServer`` and a ``fhirAuthorization`` when it has a token, so the service can fetch
what is missing), posts it, and prints the cards as a clinician would read them.

The service is either one running at ``--service URL`` (over HTTP) or, without ``--service``, an
instance built in this process in development mode over a throw-away SQLite store. The access
token is never printed: ``--show-request`` shows it redacted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO
from urllib.parse import urljoin

import requests

from lbp_cds.display import format_cards
from lbp_cds.fhir_data import resolve_template, template_type
from lbp_cds.fixtures import outcome_text
from lbp_cds.hooks import HookRequest

ORDER_HOOKS = ("order-select", "order-sign")
PROBE_USER = "Practitioner/probe"
PROBE_SUBJECT = "lbp-cds-probe"
TOKEN_LIFETIME_S = 300
TOKEN_SCOPE = "patient/*.read"
REDACTED = "<redacted>"
FHIR_TIMEOUT_S = 30.0
SERVICE_TIMEOUT_S = 60.0
MAX_PAGES = 500


class ProbeError(Exception):
    """The probe cannot go on (bad arguments, unreadable order file, no service for the hook)."""


class ServiceUnreachable(ProbeError):
    """The service did not answer at all (connection refused, timeout)."""


# -- the EHR's FHIR side --------------------------------------------------------------------------
@dataclass
class Prefetch:
    """Prefetch resolved against a FHIR server.

    Attributes:
        values: the prefetch object to send (key -> resource or searchset Bundle).
        omitted: keys left out, with the reason (HTTP status, OperationOutcome text ...).
        pages: how many pages each key took.
    """

    values: dict[str, Any] = field(default_factory=dict)
    omitted: dict[str, str] = field(default_factory=dict)
    pages: dict[str, int] = field(default_factory=dict)


class KeyFailed(Exception):
    """One prefetch key could not be resolved; the message says why (never with the token)."""


def fhir_headers(token: str | None) -> dict[str, str]:
    """Request headers towards the FHIR server.

    Args:
        token: a bearer token, or ``None``.

    Returns:
        ``Accept`` and, with a token, ``Authorization``.
    """
    headers = {"Accept": "application/fhir+json, application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _fhir_get(session: requests.Session, url: str, token: str | None) -> dict[str, Any]:
    try:
        response = session.get(url, headers=fhir_headers(token), timeout=FHIR_TIMEOUT_S,
                               allow_redirects=False)  # a redirect is an answer, not followed
    except requests.RequestException as exc:
        raise KeyFailed(f"the FHIR server could not be reached ({type(exc).__name__})") from None
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text[:300]
    if response.status_code != 200:
        raise KeyFailed(f"HTTP {response.status_code}: {outcome_text(body)}")
    if not isinstance(body, dict):
        raise KeyFailed("the FHIR server sent JSON that is not a resource")
    if body.get("resourceType") == "OperationOutcome":
        raise KeyFailed(f"OperationOutcome: {outcome_text(body)}")
    return body


def fetch_key(session: requests.Session, base_url: str, token: str | None, query: str
              ) -> tuple[dict[str, Any], int]:
    """Resolve one filled-in prefetch query: a read, or a search with every page merged.

    Args:
        session: the HTTP session.
        base_url: the FHIR base URL.
        token: a bearer token, or ``None``.
        query: ``Patient/123`` or ``Condition?patient=123`` (relative to the base).

    Returns:
        The resource (read) or one ``searchset`` Bundle holding every page's matches and
        includes (outcome entries dropped), and the number of pages read.

    Raises:
        KeyFailed: an HTTP error, an OperationOutcome instead of data, the wrong resource type,
            or paging that does not end.
    """
    rtype = template_type(query)
    base = base_url.rstrip("/") + "/"
    url: str | None = urljoin(base, query)
    entries: list[dict[str, Any]] = []
    pages = 0
    while url:
        pages += 1
        if pages > MAX_PAGES:
            raise KeyFailed(f"more than {MAX_PAGES} pages")
        doc = _fhir_get(session, url, token)
        kind = doc.get("resourceType")
        if kind != "Bundle":
            if pages == 1 and kind == rtype:
                return doc, 1
            raise KeyFailed(f"expected {rtype} or a Bundle, got {kind!r}")
        for entry in doc.get("entry") or []:
            if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
                continue
            if (entry.get("search") or {}).get("mode") == "outcome":
                continue
            entries.append(entry)
        url = next((urljoin(base, str(link["url"])) for link in doc.get("link") or []
                    if isinstance(link, dict) and link.get("relation") == "next"
                    and link.get("url")), None)
    return {"resourceType": "Bundle", "type": "searchset", "total": len(entries),
            "entry": entries}, pages


def resolve_prefetch(templates: Mapping[str, str], request: HookRequest, base_url: str,
                     token: str | None, session: requests.Session | None = None) -> Prefetch:
    """Resolve a service's prefetch templates against a FHIR server, as an EHR does.

    Args:
        templates: the service's ``prefetch`` from discovery (key -> template).
        request: the hook request so far (its context fills the templates' tokens).
        base_url: the FHIR base URL.
        token: a bearer token, or ``None``.
        session: the HTTP session to use (default: a new one).

    Returns:
        What to send, and which keys were left out and why.
    """
    out = Prefetch()
    http = session or requests.Session()
    try:
        for key, template in templates.items():
            query = resolve_template(template, request)
            if query is None:
                out.omitted[key] = "the template needs a context value the probe does not have"
                continue
            try:
                out.values[key], out.pages[key] = fetch_key(http, base_url, token, query)
            except KeyFailed as exc:
                out.omitted[key] = str(exc)
    finally:
        if session is None:
            http.close()
    return out


# -- the hook request -----------------------------------------------------------------------------
def hook_context(hook: str, patient_id: str, draft_orders: Sequence[Mapping[str, Any]] = (),
                 selections: Sequence[str] | None = None, user_id: str = PROBE_USER
                 ) -> dict[str, Any]:
    """The ``context`` of a hook call.

    Args:
        hook: ``patient-view``, ``order-select`` or ``order-sign``.
        patient_id: the patient in context.
        draft_orders: draft orders (order hooks only).
        selections: ``Type/id`` of the selected drafts at order-select (default: all of them).
        user_id: the user in context.

    Returns:
        The context object.
    """
    context: dict[str, Any] = {"userId": user_id, "patientId": patient_id}
    if hook in ORDER_HOOKS:
        context["draftOrders"] = {"resourceType": "Bundle", "type": "collection",
                                  "entry": [{"resource": dict(o)} for o in draft_orders]}
    if hook == "order-select":
        context["selections"] = list(selections) if selections is not None else [
            f"{o['resourceType']}/{o['id']}" for o in draft_orders]
    return context


def build_request(hook: str, context: dict[str, Any], *, prefetch: dict[str, Any] | None = None,
                  fhir_server: str | None = None, token: str | None = None,
                  hook_instance: str | None = None) -> dict[str, Any]:
    """A CDS Hooks 2.0 request as an EHR sends it.

    Args:
        hook: the hook.
        context: its context (see :func:`hook_context`).
        prefetch: the prefetch object; ``None`` sends none.
        fhir_server: the FHIR base URL the service may fetch from; ``None`` sends none.
        token: a bearer token for ``fhir_server``; sent as ``fhirAuthorization``.
        hook_instance: the invocation's UUID (default: a new one).

    Returns:
        The request body.
    """
    doc: dict[str, Any] = {"hook": hook, "hookInstance": hook_instance or str(uuid.uuid4()),
                           "context": context}
    if fhir_server:
        doc["fhirServer"] = fhir_server
        if token:
            doc["fhirAuthorization"] = {
                "access_token": token, "token_type": "Bearer", "expires_in": TOKEN_LIFETIME_S,
                "scope": TOKEN_SCOPE, "subject": PROBE_SUBJECT,
            }
            if context.get("patientId"):
                doc["fhirAuthorization"]["patient"] = context["patientId"]
    if prefetch is not None:
        doc["prefetch"] = prefetch
    return doc


def redact(request: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a request with the access token replaced, for printing.

    Args:
        request: the request body.

    Returns:
        The copy (the argument is not modified).
    """
    out = dict(request)
    auth = out.get("fhirAuthorization")
    if isinstance(auth, dict) and "access_token" in auth:
        out["fhirAuthorization"] = {**auth, "access_token": REDACTED}
    return out


def read_orders(path: Path, patient_id: str) -> list[dict[str, Any]]:
    """Read the draft order(s) for an order hook.

    Args:
        path: a ServiceRequest (or MedicationRequest) JSON file, or a Bundle of them.
        patient_id: the patient, set as ``subject`` where the order names none.

    Returns:
        The draft orders, each with an id (``probe-draft-N`` where it had none).

    Raises:
        ProbeError: the file cannot be read or holds no order.
    """
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ProbeError(f"cannot read the order file {path}: {exc}") from None
    if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
        items = [e.get("resource") for e in doc.get("entry") or [] if isinstance(e, dict)]
    else:
        items = [doc]
    orders = [o for o in items if isinstance(o, dict)
              and o.get("resourceType") in ("ServiceRequest", "MedicationRequest")]
    if not orders:
        raise ProbeError(f"{path} holds no ServiceRequest or MedicationRequest")
    for pos, order in enumerate(orders, 1):
        order.setdefault("id", f"probe-draft-{pos}")
        order.setdefault("subject", {"reference": f"Patient/{patient_id}"})
    return orders


# -- the service side ----------------------------------------------------------------------------
@dataclass
class Answer:
    """A service's HTTP answer.

    Attributes:
        status: the HTTP status.
        body: the decoded JSON body (or the text when it was not JSON).
        seconds: how long the call took.
    """

    status: int
    body: Any
    seconds: float = 0.0


class ServiceClient(Protocol):
    """The CDS service the probe talks to."""

    where: str

    def get(self, path: str) -> Answer:
        """GET a path under the service's base URL."""

    def post(self, path: str, doc: Any) -> Answer:
        """POST JSON to a path under the service's base URL."""


class HttpService:
    """A service running at a base URL, reached over HTTP.

    Args:
        base_url: e.g. ``http://127.0.0.1:8080`` (a trailing ``/cds-services`` is accepted).
        session: the HTTP session.
    """

    def __init__(self, base_url: str, session: requests.Session) -> None:
        self.where = base_url.rstrip("/").removesuffix("/cds-services")
        self.session = session

    def _answer(self, call: Callable[[], requests.Response]) -> Answer:
        started = time.perf_counter()
        try:
            response = call()
        except requests.RequestException as exc:
            raise ServiceUnreachable(f"cannot reach the service at {self.where}: "
                             f"{type(exc).__name__}") from None
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text
        return Answer(response.status_code, body, time.perf_counter() - started)

    def get(self, path: str) -> Answer:
        """GET a path under the base URL."""
        return self._answer(lambda: self.session.get(
            self.where + path, headers={"Accept": "application/json"},
            timeout=SERVICE_TIMEOUT_S))

    def post(self, path: str, doc: Any) -> Answer:
        """POST JSON to a path under the base URL."""
        return self._answer(lambda: self.session.post(
            self.where + path, data=json.dumps(doc),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            timeout=SERVICE_TIMEOUT_S))


class InProcessService:
    """The service built in this process (development mode, throw-away SQLite store).

    Args:
        app: the Flask application.
    """

    where = "in-process (development mode)"

    def __init__(self, app: Any) -> None:
        self.client = app.test_client()

    def get(self, path: str) -> Answer:
        """GET a path of the app."""
        started = time.perf_counter()
        response = self.client.get(path)
        return Answer(response.status_code, _json_or_text(response),
                      time.perf_counter() - started)

    def post(self, path: str, doc: Any) -> Answer:
        """POST JSON to a path of the app."""
        started = time.perf_counter()
        response = self.client.post(path, data=json.dumps(doc),
                                    content_type="application/json")
        return Answer(response.status_code, _json_or_text(response),
                      time.perf_counter() - started)


def _json_or_text(response: Any) -> Any:
    body = response.get_json(silent=True)
    return body if body is not None else response.get_data(as_text=True)


@contextlib.contextmanager
def in_process_service() -> Iterator[InProcessService]:
    """Build the service in this process (``LBP_CDS_*`` settings, dev mode, temporary store).

    Yields:
        A client of it; the store and its folder are removed afterwards.
    """
    from lbp_cds import create_app
    from lbp_cds.config import Settings

    with tempfile.TemporaryDirectory(prefix="lbp-cds-probe-") as tmp:
        settings = Settings.from_env(dev=True, database_url=f"sqlite:///{tmp}/probe.sqlite3")
        app = create_app(settings)
        try:
            yield InProcessService(app)
        finally:
            app.extensions["lbp_cds"].store.engine.dispose()


def pick_service(discovery: Any, hook: str) -> dict[str, Any]:
    """The first discovery entry serving the hook.

    Args:
        discovery: the discovery document.
        hook: the hook.

    Returns:
        The service's entry.

    Raises:
        ProbeError: none serves it.
    """
    services = discovery.get("services") if isinstance(discovery, dict) else None
    for entry in services or []:
        if isinstance(entry, dict) and entry.get("hook") == hook and entry.get("id"):
            return entry
    served = ", ".join(f"{s.get('id')} ({s.get('hook')})" for s in services or []
                       if isinstance(s, dict))
    raise ProbeError(f"no service for {hook} in discovery (it lists: {served or 'nothing'})")


def _refused(answer: Answer, what: str, where: str, out: TextIO) -> int:
    if answer.status == 401:
        print(f"{what}: HTTP 401 Unauthorized. The service at {where} requires a signed JWT "
              "from a trusted CDS client, and the probe sends no credentials. Probe a "
              "development instance (lbp-cds serve --dev), or leave out --service to build "
              "one in this process.", file=out)
        return 1
    text = outcome_text(answer.body) if not isinstance(answer.body, str) else answer.body[:500]
    print(f"{what}: HTTP {answer.status}: {text}", file=out)
    return 1


# -- the command -------------------------------------------------------------------------------
def run_probe(args: argparse.Namespace, service: ServiceClient, out: TextIO,
              session: requests.Session) -> int:
    """Probe one service: discovery, prefetch, the hook call, the cards.

    Args:
        args: the parsed ``lbp-cds probe`` arguments.
        service: the service to call.
        out: where to print.
        session: the HTTP session towards the FHIR server.

    Returns:
        0 when the hook call answered 200, 1 otherwise.

    Raises:
        ProbeError: bad arguments or no service for the hook.
        ServiceUnreachable: the service did not answer.
    """
    if args.hook in ORDER_HOOKS and not args.order:
        raise ProbeError(f"{args.hook} needs --order FILE (a draft ServiceRequest JSON)")
    orders = read_orders(args.order, args.patient) if args.hook in ORDER_HOOKS else []

    found = service.get("/cds-services")
    if found.status != 200:
        return _refused(found, "discovery", service.where, out)
    entry = pick_service(found.body, args.hook)
    service_id = str(entry["id"])

    context = hook_context(args.hook, args.patient, orders)
    prefetch: Prefetch | None = None
    if not args.no_prefetch:
        draft = HookRequest(hook=args.hook, hook_instance=str(uuid.uuid4()), context=context,
                            prefetch={})
        prefetch = resolve_prefetch(entry.get("prefetch") or {}, draft, args.fhir_server,
                                    args.token, session)
    request = build_request(args.hook, context,
                            prefetch=prefetch.values if prefetch else None,
                            fhir_server=args.fhir_server, token=args.token)

    print(f"probe: {service_id} ({args.hook}) at {service.where}, patient {args.patient}",
          file=out)
    if prefetch is None:
        print("prefetch: none sent (--no-prefetch); the service fetches from "
              f"{args.fhir_server}", file=out)
    else:
        sent = ", ".join(prefetch.values) or "none"
        print(f"prefetch: sent {sent}", file=out)
        for key, reason in prefetch.omitted.items():
            print(f"prefetch: left out {key} ({reason})", file=out)
    if args.show_request:
        print("request:", file=out)
        print(json.dumps(redact(request), indent=2), file=out)

    answer = service.post(f"/cds-services/{service_id}", request)
    if args.show_response:
        print(f"response (HTTP {answer.status}):", file=out)
        print(json.dumps(answer.body, indent=2) if not isinstance(answer.body, str)
              else answer.body, file=out)
    if answer.status != 200:
        return _refused(answer, f"{service_id} ({args.hook})", service.where, out)
    print(f"HTTP 200 in {answer.seconds * 1000:.0f} ms", file=out)
    print(file=out)
    print(format_cards(answer.body.get("cards") or [], service_id, args.hook), file=out)
    return 0


def probe(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``lbp-cds probe``: act as an EHR for one patient and print the cards.

    Args:
        args: the parsed arguments (``--fhir-server``, ``--token``, ``--patient``, ``--hook``,
            ``--order``, ``--service``, ``--no-prefetch``, ``--show-request``,
            ``--show-response``).
        out: where to print (default: standard output).

    Returns:
        The exit code: 0 when the service answered 200, 1 when it answered otherwise (the
        OperationOutcome is printed) or could not be reached, 2 for a usage problem.
    """
    stream = out or sys.stdout
    with requests.Session() as session:
        try:
            if args.service:
                return run_probe(args, HttpService(args.service, session), stream, session)
            with in_process_service() as local:
                return run_probe(args, local, stream, session)
        except ServiceUnreachable as exc:
            print(f"lbp-cds probe: {exc}", file=stream)
            return 1
        except ProbeError as exc:
            print(f"lbp-cds probe: {exc}", file=sys.stderr)
            return 2
