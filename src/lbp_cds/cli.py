"""``lbp-cds``: serve, evaluate offline, check the knowledge, report feedback, load fixtures, probe.

Imports of the application happen inside the commands: ``serve`` must set up Prometheus'
multiprocess directory before the metrics module is first imported.
"""

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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lbp-cds`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    p = argparse.ArgumentParser(prog="lbp-cds", description=__doc__)
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
    e.add_argument("--json", action="store_true", help="print the CDS Hooks response JSON")
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("check-knowledge", help="load and cross-check the knowledge pack")
    c.add_argument("--knowledge-dir", type=Path, help="pack folder (default: bundled)")
    c.set_defaults(func=cmd_check_knowledge)

    f = sub.add_parser("feedback-report", help="acceptance and override rates per rule")
    f.add_argument("--json", action="store_true")
    f.add_argument("--knowledge", type=_hex_prefix, metavar="DIGEST",
                   help="only cards issued by the knowledge pack whose SHA-256 starts so (as "
                        "check-knowledge, /readyz and each card's extension show it)")
    f.add_argument("--versions", action="store_true",
                   help="list the knowledge packs cards were issued by, with when, instead")
    f.set_defaults(func=cmd_feedback_report)

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
    pr.add_argument("--show-request", action="store_true")
    pr.add_argument("--show-response", action="store_true")
    pr.set_defaults(func=cmd_probe)
    return p


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
    from lbp_cds import api, create_app, hooks
    from lbp_cds.config import Settings
    from lbp_cds.errors import RequestError
    from lbp_cds.fhir_data import load_record

    now = _parse_now(args.now)
    doc = hooks.parse_json(args.file.read_bytes(), 10_000)
    if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
        if not args.hook:
            raise RequestError("a Bundle needs --hook")
        doc = request_from_bundle(doc, args.hook)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_env(dev=True, database_url=f"sqlite:///{tmp}/evaluate.sqlite3")
        app = create_app(settings, clock=lambda: now)
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
        rt.store.engine.dispose()
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


def format_cards(cards: list[dict[str, Any]], service_id: str, hook: str) -> str:
    """Cards as a clinician would read them in a sidebar."""
    if not cards:
        return f"{service_id} ({hook}): no cards."
    lines = [f"{service_id} ({hook}): {len(cards)} card(s)", ""]
    marks = {"critical": "!!! CRITICAL", "warning": "!  WARNING", "info": "i  INFO"}
    for card in cards:
        lines.append(f"{marks[card['indicator']]}  {card['summary']}")
        rule = (card.get("extension") or {}).get("org.lbp-cds.rule", {}).get("ruleId", "")
        lines.append(f"   source: {card['source']['label']}" + (f"  [rule {rule}]" if rule
                                                                  else ""))
        for para in card.get("detail", "").split("\n"):
            if para.strip():
                lines.append("   " + para.replace("\\", ""))
        for s in card.get("suggestions", []):
            star = " (recommended)" if s.get("isRecommended") else ""
            lines.append(f"   > suggestion: {s['label']}{star}")
            for a in s.get("actions", []):
                lines.append(f"       - {a['type']}: {a['description']}")
        for r in card.get("overrideReasons", []):
            lines.append(f"   x override reason: {r['display']}")
        for link in card.get("links", []):
            lines.append(f"   link: {link['label']} <{link['url']}>")
        lines.append("")
    return "\n".join(lines)


# -- knowledge and feedback -----------------------------------------------------------------------
def cmd_check_knowledge(args: argparse.Namespace) -> int:
    """Load, compile and lint the pack; print a summary."""
    from lbp_cds import knowledge, pama
    from lbp_cds.lint import lint
    from lbp_cds.rules import RuleEngine

    pack = knowledge.load(args.knowledge_dir)
    pama.rater_for(RuleEngine(pack))
    problems = lint(pack)
    print(f"knowledge at {pack.root} (sha256 {pack.digest}): {len(pack.services)} services, "
          f"{len(pack.rules)} rules, "
          f"{len(pack.cards)} cards, "
          f"{sum(1 for v in pack.valuesets if not v.endswith('+products'))} value sets, "
          f"{len(pack.parameters)} parameters, {len(pack.orderables)} orderables")
    for problem in problems:
        print(f"  problem: {problem}")
    return 1 if problems else 0


@contextlib.contextmanager
def _store() -> Iterator[Any]:
    """The store named by the settings, migrated; its connections closed afterwards."""
    from lbp_cds.config import Settings
    from lbp_cds.store import Store

    store = Store(Settings.from_env().database_url)
    try:
        store.migrate()
        yield store
    finally:
        store.engine.dispose()


def cmd_feedback_report(args: argparse.Namespace) -> int:
    """Print acceptance and override rates per rule (or the knowledge versions seen)."""
    from lbp_cds.cards import KNOWLEDGE_DIGEST_SHOWN

    with _store() as store:
        versions = store.knowledge_versions() if args.versions else []
        report = [] if args.versions else store.feedback_report(knowledge=args.knowledge)
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
    with _store() as store:
        counts = store.purge(before, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(json.dumps({"before": before.isoformat(), "dry_run": args.dry_run, verb: counts}))
    return 0


def cmd_fixtures_load(args: argparse.Namespace) -> int:
    """Load fixture patients into a FHIR server (idempotent: PUT by id)."""
    from lbp_cds.fixtures import load_into_server

    loaded = load_into_server(args.fhir_server, args.token, args.only)
    for scenario_id, count in loaded:
        print(f"loaded {scenario_id}: {count} resources")
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
    """List the scenarios: id, hook, expected cards."""
    from lbp_cds.fixtures import load_scenarios

    for s in load_scenarios():
        cards = ", ".join(f"{r} ({i})" for r, i in s.expected_cards) or "no card"
        print(f"{s.id:<52} {s.hook:<13} {cards}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    """Act as an EHR for one patient and print the cards."""
    from lbp_cds.probe import probe

    return probe(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
