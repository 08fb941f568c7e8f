"""lbp-cds: serve, evaluate offline, check the knowledge, report feedback, load fixtures, probe."""

# Imports of the application happen inside the commands: ``serve`` must set up Prometheus'
# multiprocess directory before the metrics module is first imported. (Kept out of the
# docstring: the docstring is the ``--help`` text.)

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from lbp_cds.display import format_cards

__all__ = ["build_parser", "format_cards", "main", "request_from_bundle"]

#: Exit status of a command whose reader went away (``| head``): 128 + SIGPIPE, as a shell
#: reports a process that SIGPIPE ended.
EXIT_BROKEN_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lbp-cds`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that went away is noticed here, not at exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_gone()
    except Exception as exc:  # noqa: BLE001 - the CLI reports, it does not trace
        from lbp_cds.errors import CdsError, ConfigError, KnowledgeError

        if isinstance(exc, ConfigError | KnowledgeError):
            print(f"lbp-cds: {exc}", file=sys.stderr)
            return 2
        from lbp_cds.fixtures import FixtureError
        from lbp_cds.probe import ProbeError

        if isinstance(exc, FixtureError | ProbeError):
            print(f"lbp-cds: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, CdsError):
            print(f"lbp-cds: {exc.status} {exc.message}", file=sys.stderr)
            for issue in exc.issues:
                print(f"  - {issue.location or '(body)'}: {issue.message}", file=sys.stderr)
            return 1
        raise


def _reader_gone() -> int:
    """Standard output's reader closed the pipe (``lbp-cds ... | head``): end quietly.

    What is still buffered cannot be written; standard output is pointed at /dev/null so that
    the interpreter's flush at exit does not print a BrokenPipeError of its own.
    """
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lbp-cds")
    except PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    p = argparse.ArgumentParser(prog="lbp-cds", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(metavar="COMMAND")

    s = sub.add_parser("serve", help="run the service under gunicorn")
    s.add_argument("--host", help="address to bind (default 127.0.0.1; LBP_CDS_HOST)")
    s.add_argument("--port", type=int, help="port (default 8080; LBP_CDS_PORT)")
    s.add_argument("--workers", type=int, help="worker processes (default 2; LBP_CDS_WORKERS)")
    s.add_argument("--threads", type=int, help="threads per worker (default 4; LBP_CDS_THREADS)")
    s.add_argument("--clients", help="trusted CDS clients YAML (LBP_CDS_CLIENTS_FILE)")
    s.add_argument("--dev", action="store_true",
                   help="NO client authentication (local development only)")
    s.set_defaults(func=cmd_serve)

    e = sub.add_parser("evaluate", help="evaluate a hook request or a patient Bundle offline")
    e.add_argument("file", type=Path, help="hook request JSON, or a FHIR Bundle with --hook")
    e.add_argument("--hook", choices=["patient-view", "order-select", "order-sign"],
                   help="the hook to simulate when FILE is a Bundle")
    e.add_argument("--service", help="service id (default: the one serving the hook)")
    e.add_argument("--now", help="the clock, ISO 8601 (default: now)")
    e.add_argument("--json", action="store_true",
                   help="print the CDS Hooks response JSON instead of the cards as text")
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("check-knowledge", help="load and cross-check the knowledge pack")
    c.add_argument("--knowledge-dir", type=Path, help="pack folder (default: bundled)")
    c.set_defaults(func=cmd_check_knowledge)

    f = sub.add_parser("feedback-report", help="acceptance and override rates per rule")
    f.add_argument("--json", action="store_true",
                   help="print the report (or, with --versions, the versions) as JSON")
    f.add_argument("--knowledge", type=_hex_prefix, metavar="DIGEST",
                   help="only cards issued by the knowledge pack whose SHA-256 starts so (as "
                        "check-knowledge, /readyz and each card's extension show it)")
    f.add_argument("--versions", action="store_true",
                   help="list the knowledge packs cards were issued by, with when, instead")
    f.set_defaults(func=cmd_feedback_report)

    b = sub.add_parser("burden", help="alert burden per rule, knowledge version and week: "
                                      "cards shown, silent, accepted, overridden")
    b.add_argument("--since", type=_since, metavar="DATE",
                   help="only cards issued on or after DATE (ISO 8601, e.g. 2026-11-02; UTC)")
    b.add_argument("--json", action="store_true", help="print the rows as JSON")
    b.add_argument("--html", type=Path, metavar="FILE",
                   help="also write the HTML report (charts) to FILE")
    b.set_defaults(func=cmd_burden)

    m = sub.add_parser("migrate", help="create the store's schema or migrate it to the newest "
                                       "revision (serve does this on start)")
    m.set_defaults(func=cmd_migrate)

    pu = sub.add_parser("purge", help="delete issued cards and feedback older than N days")
    pu.add_argument("--older-than-days", type=_positive_days, required=True, metavar="N",
                    help="keep the last N days (N >= 1)")
    pu.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    pu.set_defaults(func=cmd_purge)

    fx = sub.add_parser("fixtures", help="fixture patients")
    fxs = fx.add_subparsers(metavar="ACTION")
    fl = fxs.add_parser("load", help="load the fixture patients into a FHIR server")
    fl.add_argument("--fhir-server", required=True, help="FHIR R4 base URL")
    fl.add_argument("--token",
                    help="bearer token for the FHIR server (--token=VALUE if it starts with -)")
    fl.add_argument("--only", action="append", help="scenario id (repeatable; default all)")
    fl.set_defaults(func=cmd_fixtures_load)

    fr = fxs.add_parser("request", help="print a scenario's hook request (dates moved to now)")
    fr.add_argument("scenario", help="scenario id (see `lbp-cds fixtures list`)")
    fr.add_argument("--as-written", action="store_true",
                    help="keep the scenario's own dates instead of moving them to today")
    fr.set_defaults(func=cmd_fixtures_request)
    fli = fxs.add_parser("list", help="list the scenarios with their expected cards")
    fli.set_defaults(func=cmd_fixtures_list)
    fe = fxs.add_parser("export", help="write one transaction Bundle per patient-view scenario "
                                       "(dates moved to today) into a folder, for `simulate`")
    fe.add_argument("folder", type=Path, help="folder to write <scenario>.json files into")
    fe.add_argument("--as-written", action="store_true",
                    help="keep the scenarios' own dates instead of moving them to today")
    fe.set_defaults(func=cmd_fixtures_export)

    si = sub.add_parser("simulate", help="alert burden of the knowledge pack over a folder of "
                                         "patient records (Bundles or Bulk Data NDJSON)")
    si.add_argument("folder", type=Path, metavar="DIR",
                    help="FHIR R4 Bundles (*.json) or a Bulk Data export (*.ndjson)")
    si.add_argument("--hook", default="patient-view",
                    choices=["patient-view", "order-select", "order-sign"],
                    help="the hook simulated, one call per patient (default patient-view; the "
                         "order hooks judge the records' draft orders)")
    si.add_argument("--now", help="the clock of every call, ISO 8601 (default: now)")
    si.add_argument("--json", action="store_true", help="print the burden as JSON")
    si.add_argument("--html", type=Path, metavar="FILE",
                    help="also write a self-contained HTML report with charts")
    si.add_argument("--max-share", action="append", default=[], metavar="RULE[:indicator]=SHARE",
                    help="fail (exit 3) when more than SHARE (0-1) of the patients get a card of "
                         "RULE (or of RULE at that indicator); repeatable")
    si.set_defaults(func=cmd_simulate)

    pr = sub.add_parser("probe", help="act as an EHR: call the service for a patient")
    pr.add_argument("--fhir-server", required=True, help="FHIR R4 base URL")
    pr.add_argument("--token",
                    help="bearer token for the FHIR server (--token=VALUE if it starts with -)")
    pr.add_argument("--patient", required=True, help="Patient id on the FHIR server")
    pr.add_argument("--hook", required=True,
                    choices=["patient-view", "order-select", "order-sign"])
    pr.add_argument("--order", type=Path, help="draft order JSON (ServiceRequest) for order hooks")
    pr.add_argument("--service", help="base URL of a running service (default: in-process)")
    pr.add_argument("--no-prefetch", action="store_true",
                    help="send no prefetch: let the service fetch with the token")
    pr.add_argument("--show-request", action="store_true",
                    help="print the hook request sent (JSON; the FHIR token redacted)")
    pr.add_argument("--show-response", action="store_true",
                    help="print the service's raw answer (status and JSON) before the cards")
    pr.set_defaults(func=cmd_probe)

    tk = sub.add_parser(
        "token", help="DEVELOPMENT ONLY: sign a test JWT as a CDS client would (needs --dev)",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=TOKEN_HELP)
    tk.add_argument("--dev", action="store_true",
                    help="confirm this is for development or testing (required)")
    tk.add_argument("--key", type=Path, required=True, metavar="FILE",
                    help="the client's private key: PEM, a private JWK, or a JWK Set holding one")
    tk.add_argument("--new-key", action="store_true",
                    help="first create FILE as a new EC P-384 key (never overwrites)")
    tk.add_argument("--jwks", action="store_true",
                    help="print the key's public JWK Set (for the trusted clients file) "
                         "instead of a token")
    tk.add_argument("--iss", help="the client's issuer, as listed in the trusted clients file")
    tk.add_argument("--aud", metavar="URL",
                    help="the exact URL of the endpoint called, e.g. "
                         "http://127.0.0.1:8080/cds-services/lbp-triage")
    tk.add_argument("--kid", help="key id (default: the JWK's kid, else the RFC 7638 thumbprint)")
    tk.add_argument("--alg", help="JWS algorithm (default: ES384 for a P-384 key, RS384 for RSA)")
    tk.add_argument("--lifetime", type=int, default=300, metavar="SECONDS",
                    help="exp - iat, 1 to 300 (default 300)")
    tk.add_argument("--tenant", help="a tenant claim, for clients with a tenant allowlist")
    tk.add_argument("--jku", metavar="URL", help="a jku header (the client's JWK Set URL)")
    tk.set_defaults(func=cmd_token)
    return p


TOKEN_HELP = """\
DEVELOPMENT AND TESTING ONLY. A real EHR signs its own tokens with its own key; this command
plays that client on your machine so you can try a signed call. It refuses to run without --dev.

It prints one token (a compact JWS) for one endpoint. Header: alg (ES384 for a P-384 key,
RS384 for RSA), typ JWT, kid (the JWK's kid, else the key's RFC 7638 thumbprint), jku only with
--jku. Claims:
  iss     the client, exactly as the trusted clients file lists it (--iss)
  aud     the exact URL of the endpoint called (--aud): LBP_CDS_PUBLIC_BASE_URL + the path,
          e.g. http://127.0.0.1:8080/cds-services/lbp-triage; discovery is .../cds-services
  iat     now
  exp     iat + --lifetime (at most 300 s)
  jti     a new UUID: the service refuses a token it has seen, so sign one per call
  tenant  only with --tenant

  lbp-cds token --dev --key dev-key.pem --new-key --jwks > dev-jwks.json
  lbp-cds token --dev --key dev-key.pem --iss https://ehr.example.org \\
      --aud http://127.0.0.1:8080/cds-services/lbp-triage
"""


# -- serve --------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    """Run gunicorn with the application (the Flask development server is never used)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="lbp-cds-metrics-")
    from lbp_cds.config import Settings
    from lbp_cds.serve import run

    overrides: dict[str, Any] = {"host": args.host, "port": args.port, "workers": args.workers,
                                 "threads": args.threads, "clients_file": args.clients}
    if args.dev:
        overrides["dev"] = True
    settings = Settings.from_env(**overrides)
    return run(settings)


# -- evaluate -----------------------------------------------------------------------------------
def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate offline and print the cards."""
    import logging

    package_log = logging.getLogger("lbp_cds")
    level = package_log.level
    package_log.setLevel(logging.ERROR)  # offline: no dev-mode banner
    try:
        return _evaluate(args)
    finally:
        package_log.setLevel(level)


def _evaluate(args: argparse.Namespace) -> int:
    from lbp_cds import api, hooks
    from lbp_cds.app import offline_app
    from lbp_cds.errors import RequestError
    from lbp_cds.fhir_data import load_record

    now = _parse_now(args.now)
    doc = hooks.parse_json(args.file.read_bytes(), 10_000)
    if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
        if not args.hook:
            raise RequestError("a Bundle needs --hook")
        doc = request_from_bundle(doc, args.hook)
    with offline_app(lambda: now) as app:
        rt: api.Runtime = app.extensions["lbp_cds"]
        req = hooks.parse_request(doc)
        candidates = [s for s in rt.knowledge.services if s.hook == req.hook
                      and (not args.service or s.id == args.service)]
        if not candidates:
            raise RequestError(f"no service for hook {req.hook}")
        service = candidates[0]
        record = load_record(req, service, None, rt.policy, rt.knowledge.code_universe)
        with app.app_context():
            issued = api.evaluate(rt, service, req, record, now)
        response = {"cards": [c.card for c in issued]}
    if args.json:
        print(json.dumps(response, indent=2))
    else:
        print(format_cards(response["cards"], service.id, req.hook))
    return 0


def _parse_now(text: str | None) -> datetime:
    if not text:
        return datetime.now(timezone.utc)
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def request_from_bundle(bundle: dict[str, Any], hook: str) -> dict[str, Any]:
    """A hook request whose prefetch holds every resource of a patient Bundle, by type.

    References to an entry's ``fullUrl`` (Synthea's ``urn:uuid:...``) become ``Type/id``, as a
    FHIR server rewrites them when it stores a transaction: an EHR's prefetch never holds
    ``urn:uuid`` references, and the service drops a resource whose subject it cannot tell is
    the patient. Draft ServiceRequests / MedicationRequests (status ``draft``) become the
    context's ``draftOrders`` (all selected at order-select).
    """
    import uuid

    entries = [e for e in bundle.get("entry", []) if isinstance(e, dict)
               and isinstance(e.get("resource"), dict)]
    local = {e["fullUrl"]: f"{e['resource'].get('resourceType')}/{e['resource']['id']}"
             for e in entries if isinstance(e.get("fullUrl"), str) and e["resource"].get("id")}
    resources = [_resolve_references(e["resource"], local) for e in entries]
    patients = [r for r in resources if r.get("resourceType") == "Patient"]
    if not patients:
        from lbp_cds.errors import RequestError

        raise RequestError("the Bundle holds no Patient")
    patient = patients[0]
    pid = patient.get("id") or "unknown"
    drafts = [r for r in resources if r.get("status") == "draft"
              and r.get("resourceType") in ("ServiceRequest", "MedicationRequest")]
    record = [r for r in resources if r not in drafts]
    from lbp_cds.fhir_data import template_type

    prefetch: dict[str, Any] = {}
    for key, template in _prefetch_templates(hook).items():
        rtype = template_type(template)
        if rtype == "Patient":
            prefetch[key] = patient
        else:
            prefetch[key] = {"resourceType": "Bundle", "type": "searchset", "entry": [
                {"resource": r} for r in record if r.get("resourceType") == rtype]}
    context: dict[str, Any] = {"userId": "Practitioner/example", "patientId": pid}
    if hook in ("order-select", "order-sign"):
        context["draftOrders"] = {"resourceType": "Bundle", "type": "collection",
                                  "entry": [{"resource": d} for d in drafts]}
    if hook == "order-select":
        context["selections"] = [f"{d['resourceType']}/{d['id']}" for d in drafts]
    return {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context,
            "prefetch": prefetch}


@functools.lru_cache(maxsize=8)
def _prefetch_templates(hook: str) -> dict[str, str]:
    """The bundled pack's prefetch templates for a hook (loaded once: a population of bundles
    is turned into requests one after another)."""
    from lbp_cds.knowledge import load

    return dict(next(s for s in load().services if s.hook == hook).prefetch)


def _resolve_references(node: Any, local: dict[str, str]) -> Any:
    """A copy of ``node`` with every ``reference`` to a key of ``local`` replaced by its value."""
    if isinstance(node, dict):
        out = {k: _resolve_references(v, local) for k, v in node.items()}
        ref = out.get("reference")
        if isinstance(ref, str) and ref in local:
            out["reference"] = local[ref]
        return out
    if isinstance(node, list):
        return [_resolve_references(v, local) for v in node]
    return node


# -- knowledge and feedback -----------------------------------------------------------------------
def cmd_check_knowledge(args: argparse.Namespace) -> int:
    """Load, compile and lint the pack; print a summary."""
    from lbp_cds import intake, knowledge, pama
    from lbp_cds.lint import lint
    from lbp_cds.rules import RuleEngine

    pack = knowledge.load(args.knowledge_dir)
    pama.rater_for(RuleEngine(pack))
    intake.load_form(pack)  # the intake app's form file (sex/age limits, hints, prefill)
    problems = lint(pack)
    print(f"knowledge at {pack.root} (sha256 {pack.digest}): {len(pack.services)} services, "
          f"{len(pack.rules)} rules, "
          f"{len(pack.cards)} cards, "
          f"{sum(1 for v in pack.valuesets if not v.endswith('+products'))} value sets, "
          f"{len(pack.parameters)} parameters, {len(pack.orderables)} orderables")
    for problem in problems:
        print(f"  problem: {problem}")
    return 1 if problems else 0


class MissingStore(Exception):
    """A command that reads the store found no database where the settings point."""


@contextlib.contextmanager
def _existing_store() -> Iterator[Any]:
    """The store named by the settings, migrated; its connections closed afterwards.

    A command that reads what the service recorded must not create an empty SQLite file
    when run from another folder than the service (the default URL is relative to the current
    folder): a missing file is an error that names the file looked for.

    Raises:
        MissingStore: the settings name a SQLite file that does not exist.
    """
    from lbp_cds.config import Settings
    from lbp_cds.store import Store

    url = Settings.from_env().database_url
    missing = _missing_sqlite_file(url)
    if missing is not None:
        raise MissingStore(
            f"no store at {missing} (LBP_CDS_DATABASE_URL={url}, relative to the current folder "
            f"{Path.cwd()}): run this where the service runs, or set LBP_CDS_DATABASE_URL to "
            "its database")
    store = Store(url)
    try:
        store.migrate()
        yield store
    finally:
        store.engine.dispose()


def _missing_sqlite_file(url: str) -> Path | None:
    """The absolute path of the SQLite file ``url`` names when that file does not exist."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    path = Path(database).expanduser().absolute()
    return None if path.exists() else path


def cmd_feedback_report(args: argparse.Namespace) -> int:
    """Print acceptance and override rates per rule (or the knowledge versions seen)."""
    from lbp_cds.store import store_label
    from lbp_cds.cards import KNOWLEDGE_DIGEST_SHOWN

    try:
        with _existing_store() as store:
            versions = store.knowledge_versions() if args.versions else []
            report = [] if args.versions else store.feedback_report(knowledge=args.knowledge)
            # On standard error: standard output stays the report alone (--json is parsed).
            print(f"store: {store_label(store)} ({store.count('issued_cards')} issued cards, "
                  f"{store.count('feedback')} feedback entries)", file=sys.stderr)
    except MissingStore as exc:
        print(f"lbp-cds feedback-report: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(versions if args.versions else report, indent=2, default=str))
        return 0
    if args.versions:
        print(f"{'knowledge':<14}{'cards':>8}  first issued               last issued")
        for v in versions:
            label = v["digest"][:KNOWLEDGE_DIGEST_SHOWN] if v["digest"] else "(not kept)"
            print(f"{label:<14}{v['cards']:>8}  {v['first_issued']:%Y-%m-%d %H:%M:%S %Z}"
                  f"    {v['last_issued']:%Y-%m-%d %H:%M:%S %Z}")
        return 0
    print(f"{'rule':<14}{'issued':>8}{'accepted':>10}{'overridden':>12}{'accept%':>9}"
          f"{'override%':>11}  reasons")
    for e in report:
        reasons = "; ".join(f"{k} ({v})" for k, v in sorted(e["reasons"].items()))
        print(f"{e['rule']:<14}{e['issued']:>8}{e['accepted']:>10}{e['overridden']:>12}"
              f"{e['acceptance_rate'] * 100:>8.1f}%{e['override_rate'] * 100:>10.1f}%  {reasons}")
    return 0


def write_report(path: Path, html: str) -> None:
    """Write an HTML report, making its folder if need be (``--html .cache/reports/x.html``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")


def cmd_burden(args: argparse.Namespace) -> int:
    """Print the alert burden the store recorded (and write the HTML report)."""
    from lbp_cds.store import store_label
    from lbp_cds.cards import KNOWLEDGE_DIGEST_SHOWN

    render = None
    if args.html is not None:
        import importlib
        import importlib.util

        # Only the module's absence is this message: an error inside it is shown as it is.
        if importlib.util.find_spec("lbp_cds.report") is None:
            print("lbp-cds burden: the HTML report needs lbp_cds.report (not installed)",
                  file=sys.stderr)
            return 2
        render = importlib.import_module("lbp_cds.report").burden_html
    try:
        with _existing_store() as store:
            rows = store.burden(args.since)
            database = store_label(store)
            cards = store.count("issued_cards")
    except MissingStore as exc:
        print(f"lbp-cds burden: {exc}", file=sys.stderr)
        return 1
    since = args.since.date().isoformat() if args.since else None
    counted = sum(r["shown"] + r["silent"] for r in rows)
    # On standard error: standard output stays the report alone (--json is parsed).
    print(f"store: {database} ({cards} issued cards; {counted} counted"
          f"{f' since {since}' if since else ''}, in {len(rows)} rows)", file=sys.stderr)
    if render is not None:
        meta = {"database": database, "rows": len(rows), "since": since,
                "generated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            write_report(args.html, render(rows, meta))
        except OSError as exc:
            print(f"lbp-cds burden: {args.html}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(f"HTML report written to {args.html}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no cards recorded" + (f" since {since}" if since else ""))
        return 0
    w = max(len(r["ruleId"]) for r in [*rows, {"ruleId": "rule"}]) + 2
    print(f"{'week':<12}{'rule':<{w}}{'knowledge':<14}{'indicator':<10}{'shown':>7}{'silent':>8}"
          f"{'accepted':>10}{'overridden':>12}{'accept%':>9}{'override%':>11}  override reasons")
    for r in rows:
        digest = (r["knowledgeDigest"] or "(not kept)")[:KNOWLEDGE_DIGEST_SHOWN]
        reasons = "; ".join(f"{k} ({v})" for k, v in r["overrideReasons"].items())
        print(f"{r['week']:<12}{r['ruleId']:<{w}}{digest:<14}{r['indicator']:<10}"
              f"{r['shown']:>7}{r['silent']:>8}{r['accepted']:>10}{r['overridden']:>12}"
              f"{_percent(r['acceptRate']):>9}{_percent(r['overrideRate']):>11}  {reasons}"
              .rstrip())
    return 0


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def _since(value: str) -> datetime:
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date: {value!r}") from None
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when


def _hex_prefix(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{4,64}", value):
        raise argparse.ArgumentTypeError(f"not 4 to 64 lowercase hex digits: {value!r}")
    return value


def _positive_days(value: str) -> int:
    try:
        days = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of days: {value!r}") from None
    if days < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 day, not {days}")
    return days


def cmd_migrate(args: argparse.Namespace) -> int:
    """Create or migrate the store's schema; print the revision it is at."""
    from lbp_cds.config import Settings
    from lbp_cds.store import Store

    store = Store(Settings.from_env().database_url)
    try:
        print(f"store at schema revision {store.migrate()}")
    finally:
        store.engine.dispose()
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    """Delete what is older than the retention period; print the counts."""
    before = datetime.now(timezone.utc) - timedelta(days=args.older_than_days)
    try:
        with _existing_store() as store:
            counts = store.purge(before, dry_run=args.dry_run)
    except MissingStore as exc:
        print(f"lbp-cds purge: {exc}", file=sys.stderr)
        return 1
    verb = "would delete" if args.dry_run else "deleted"
    print(json.dumps({"before": before.isoformat(), "dry_run": args.dry_run, verb: counts}))
    return 0


def cmd_fixtures_load(args: argparse.Namespace) -> int:
    """Load fixture patients into a FHIR server (idempotent: PUT by id)."""
    from lbp_cds.fixtures import load_into_server, load_scenarios

    patients = {s.id: s.patient_id for s in load_scenarios(args.only)}
    loaded = load_into_server(args.fhir_server, args.token, args.only)
    for scenario_id, count in loaded:
        print(f"loaded {scenario_id}: patient {patients[scenario_id]}, {count} resources")
    return 0


def cmd_fixtures_request(args: argparse.Namespace) -> int:
    """Print the hook request of one scenario, as an EHR would send it today."""
    from lbp_cds.fixtures import hook_request, load_scenarios, rebase
    from lbp_cds.knowledge import load

    (scenario,) = load_scenarios([args.scenario])
    if not args.as_written:
        scenario = rebase(scenario, datetime.now(timezone.utc))
    service = next(s for s in load().services if s.hook == scenario.hook)
    print(json.dumps(hook_request(scenario, service.prefetch), indent=2))
    return 0


def cmd_fixtures_list(args: argparse.Namespace) -> int:
    """List the scenarios: id, patient id (for ``probe --patient``), hook, expected cards."""
    from lbp_cds.fixtures import load_scenarios

    scenarios = load_scenarios()
    width = max([len(s.id) for s in scenarios] + [len("scenario")])
    pwidth = max([len(s.patient_id) for s in scenarios] + [len("patient")])
    print(f"{'scenario':<{width}} {'patient':<{pwidth}} {'hook':<13} expected cards")
    for s in scenarios:
        cards = ", ".join(f"{r} ({i})" for r, i in s.expected_cards) or "no card"
        if s.expected_status != 200:
            cards = f"HTTP {s.expected_status}"
        print(f"{s.id:<{width}} {s.patient_id:<{pwidth}} {s.hook:<13} {cards}")
    return 0


def cmd_fixtures_export(args: argparse.Namespace) -> int:
    """Write each patient-view scenario's record as a transaction Bundle (``simulate`` reads)."""
    from lbp_cds.fixtures import load_scenarios, rebase, transaction_bundle

    try:
        args.folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"lbp-cds fixtures export: {args.folder}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    today = datetime.now(timezone.utc)
    written = 0
    for scenario in load_scenarios():
        if scenario.hook != "patient-view" or scenario.expected_status != 200:
            continue
        if not args.as_written:
            scenario = rebase(scenario, today)
        path = args.folder / f"{scenario.id}.json"
        path.write_text(json.dumps(transaction_bundle(scenario), indent=1) + "\n")
        written += 1
    print(f"wrote {written} patient-view scenarios as transaction Bundles to {args.folder}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """The alert burden of the knowledge pack over a folder of patient records."""
    from lbp_cds import simulate as sim_mod

    try:
        limits = [sim_mod.parse_limit(text) for text in args.max_share]
        now = _parse_now(args.now)
    except ValueError as exc:
        print(f"lbp-cds simulate: {exc}", file=sys.stderr)
        return 2
    if limits:  # a typo must not pass a gate silently: the rules named must exist
        from lbp_cds.config import Settings
        from lbp_cds.knowledge import load

        settings = Settings.from_env()
        rule_ids = {r.id for r in load(settings.knowledge_path, Path(settings.parameters_file)
                                       if settings.parameters_file else None).rules}
    unknown = sorted({lim.rule_id for lim in limits} - rule_ids) if limits else []
    if unknown:
        print(f"lbp-cds simulate: --max-share names rules the knowledge pack does not have: "
              f"{', '.join(unknown)}", file=sys.stderr)
        return 2
    try:
        sim = sim_mod.simulate(args.folder, args.hook, now, progress=sim_mod.ProgressBar())
    except sim_mod.SimulateError as exc:
        print(f"lbp-cds simulate: {exc}", file=sys.stderr)
        return 1
    for source, message in sim.failed:
        print(f"lbp-cds simulate: {source}: the call failed: {message}", file=sys.stderr)
    if not sim.patients:
        print(f"lbp-cds simulate: {args.folder}: no patient records (no Bundle or NDJSON file "
              "holds a Patient)", file=sys.stderr)
        return 1
    summary = sim.summary()
    if args.html:
        try:
            from lbp_cds.report import simulate_html
        except ImportError as exc:
            print(f"lbp-cds simulate: --html needs matplotlib ({exc}): pip install "
                  "'lbp-cds[report]'", file=sys.stderr)
            return 2
        try:
            write_report(args.html, simulate_html(summary))
        except OSError as exc:
            print(f"lbp-cds simulate: {args.html}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(f"report: {args.html.absolute()}", file=sys.stderr)
    print(json.dumps(summary, indent=2) if args.json else sim_mod.text_report(summary))
    over = sim_mod.exceeded(summary, sim, limits)
    for message in over:
        print(f"lbp-cds simulate: limit exceeded: {message}", file=sys.stderr)
    return sim_mod.EXIT_OVER_LIMIT if over else 0


def cmd_token(args: argparse.Namespace) -> int:
    """Sign a test JWT (or print the key's public JWK Set); development and testing only."""
    from lbp_cds.devtoken import TokenError, new_key, read_key, sign

    if not args.dev:
        print("lbp-cds token signs TEST tokens with a key file on this machine (a real EHR signs "
              "its own). Add --dev to confirm this is for development or testing.",
              file=sys.stderr)
        return 2
    try:
        if args.new_key:
            new_key(args.key)
        key = read_key(args.key, kid=args.kid, alg=args.alg)
        if args.jwks:
            print(json.dumps({"keys": [key.public_jwk()]}, indent=2))
            return 0
        if not args.iss or not args.aud:
            print("lbp-cds token: --iss and --aud are needed to sign a token (or --jwks)",
                  file=sys.stderr)
            return 2
        print(sign(key, args.iss, args.aud, lifetime_s=args.lifetime, tenant=args.tenant,
                   jku=args.jku))
    except TokenError as exc:
        print(f"lbp-cds token: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    """Act as an EHR for one patient and print the cards."""
    from lbp_cds.probe import probe

    return probe(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
