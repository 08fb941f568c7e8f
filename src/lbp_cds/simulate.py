"""Alert burden before go-live: the knowledge pack over a folder of patient records.

``lbp-cds simulate DIR`` reads FHIR R4 Bundles (``*.json``: transaction, collection, batch or
searchset; ``urn:uuid:`` or ``Type/id`` references) or a Bulk Data export (``*.ndjson``, one
resource per line, grouped by patient through their subject/patient references), makes one hook
call per patient exactly as ``lbp-cds evaluate`` does (``api.evaluate``: the same cards the HTTP
service returns) and counts, per rule and indicator, how many patients would see a card.

Nothing here writes patient data out: the result holds rule ids, counts and shares only.
"""

from __future__ import annotations

import dataclasses

import json
import logging
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

#: Exit status of ``simulate`` when a ``--max-share`` limit is exceeded.
EXIT_OVER_LIMIT = 3
#: The buckets of the cards-per-patient distribution.
CARD_BUCKETS = ("0", "1", "2", "3", "4+")
_PATIENT_REFS = ("subject", "patient", "beneficiary")


class SimulateError(Exception):
    """A folder or file that cannot be read as patient records (the message names it)."""


@dataclass
class PatientResult:
    """One patient's hook call: where the record came from and the cards it got."""

    source: str
    patient_id: str
    cards: list[dict[str, Any]]


@dataclass
class Simulation:
    """Every patient's cards, and the calls that could not be made."""

    hook: str
    now: datetime
    knowledge_digest: str
    patients: list[PatientResult] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (source, message)
    skipped: list[str] = field(default_factory=list)  # files holding no Patient

    def summary(self) -> dict[str, Any]:
        """The alert burden: counts and shares of patients, no patient data."""
        return summarize(self)


def card_key(card: dict[str, Any]) -> tuple[str, str, str]:
    """(rule id, indicator, state) of a card; state is ``fire`` unless the card says otherwise."""
    ext = (card.get("extension") or {}).get("org.lbp-cds.rule") or {}
    return (str(ext.get("ruleId", "?")), str(card.get("indicator", "?")),
            str(ext.get("state", "fire")))


def summarize(sim: Simulation) -> dict[str, Any]:
    """The ``--json`` document of a simulation."""
    n = len(sim.patients)
    by_key: Counter[tuple[str, str, str]] = Counter()
    per_patient: Counter[str] = Counter({b: 0 for b in CARD_BUCKETS})
    for p in sim.patients:
        by_key.update({card_key(c) for c in p.cards})
        per_patient[str(len(p.cards)) if len(p.cards) < 4 else "4+"] += 1
    rules = [{"ruleId": r, "indicator": i, "state": s, "patients": k,
              "share": round(k / n, 4) if n else 0.0}
             for (r, i, s), k in sorted(by_key.items(), key=lambda x: (-x[1], x[0]))]
    return {
        "patients": n,
        "rules": rules,
        "cardsPerPatient": {b: per_patient[b] for b in CARD_BUCKETS},
        "knowledgeDigest": sim.knowledge_digest,
        "hook": sim.hook,
        "now": sim.now.isoformat(),
        "failed": len(sim.failed),
        "skippedFiles": len(sim.skipped),
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# -- reading the folder -------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except OSError as exc:
        raise SimulateError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise SimulateError(f"{path}: not valid JSON ({exc})") from None


def _ndjson(path: Path) -> Iterator[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SimulateError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise SimulateError(f"{path}: not UTF-8 text ({exc})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            resource = json.loads(line)
        except ValueError as exc:
            raise SimulateError(f"{path} line {number}: not valid JSON ({exc})") from None
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise SimulateError(f"{path} line {number}: not a FHIR resource")
        yield resource


def _patient_of(resource: dict[str, Any], patients: dict[str, str]) -> str | None:
    """The key (in ``patients``) of the patient a resource is about, if it names one."""
    for element in _PATIENT_REFS:
        ref = resource.get(element)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            key = patients.get(ref["reference"])
            if key:
                return key
    return None


def group_by_patient(resources: list[dict[str, Any]],
                     full_urls: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One ``collection`` Bundle per Patient of ``resources``.

    A resource goes with the patient its ``subject``/``patient``/``beneficiary`` reference names
    (``Patient/id``, or the patient's ``fullUrl`` such as ``urn:uuid:...``); a resource naming
    no patient (a Practitioner, a Medication) goes with every patient when there is only one, and
    is left out otherwise.
    """
    refs: dict[str, str] = {}
    for r in resources:
        if r.get("resourceType") == "Patient" and r.get("id"):
            key = f"Patient/{r['id']}"
            refs[key] = key
    for url, target in (full_urls or {}).items():
        if target in refs:
            refs[url] = target
    groups: dict[str, list[dict[str, Any]]] = {key: [] for key in refs.values()}
    shared: list[dict[str, Any]] = []
    for r in resources:
        if r.get("resourceType") == "Patient" and r.get("id"):
            groups[f"Patient/{r['id']}"].insert(0, r)
            continue
        owner = _patient_of(r, refs)
        if owner:
            groups[owner].append(r)
        else:
            shared.append(r)
    if len(groups) == 1:
        next(iter(groups.values())).extend(shared)
    return [{"resourceType": "Bundle", "type": "collection",
             "entry": [{"resource": r} for r in members]} for members in groups.values()]


def records(folder: Path) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """``(source, Bundle)`` per patient of a folder; ``(file, None)`` for a file with no Patient.

    Raises:
        SimulateError: the folder cannot be listed, or a file cannot be read or parsed.
    """
    if not folder.exists():
        raise SimulateError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise SimulateError(f"{folder}: not a folder")
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file())
    except OSError as exc:
        raise SimulateError(f"{folder}: cannot be listed ({exc.strerror or exc})") from None
    bundles = [p for p in files if p.suffix.lower() == ".json"]
    ndjson = [p for p in files if p.suffix.lower() == ".ndjson"]
    if not bundles and not ndjson:
        raise SimulateError(f"{folder}: no *.json Bundles or *.ndjson files")
    for path in bundles:
        doc = _read_json(path)
        if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle":
            kind = doc.get("resourceType") if isinstance(doc, dict) else type(doc).__name__
            raise SimulateError(f"{path}: not a FHIR Bundle (resourceType {kind!r})")
        entries = [e for e in doc.get("entry") or [] if isinstance(e, dict)
                   and isinstance(e.get("resource"), dict)]
        patients = [e for e in entries if e["resource"].get("resourceType") == "Patient"]
        if not patients:
            yield path.name, None
        elif len(patients) == 1:
            yield path.name, doc  # as the HTTP tests send it: request_from_bundle resolves it
        else:
            urls = {e["fullUrl"]: f"{e['resource'].get('resourceType')}/{e['resource'].get('id')}"
                    for e in entries if isinstance(e.get("fullUrl"), str)}
            from lbp_cds.cli import _resolve_references

            resolved = [_resolve_references(e["resource"], urls) for e in entries]
            for i, bundle in enumerate(group_by_patient(resolved, urls)):
                yield f"{path.name}#{i + 1}", bundle
    if ndjson:
        resources = [r for path in ndjson for r in _ndjson(path)]
        for i, bundle in enumerate(group_by_patient(resources)):
            yield f"ndjson#{i + 1}", bundle


# -- running ------------------------------------------------------------------------------------
def simulate(folder: Path, hook: str = "patient-view", now: datetime | None = None,
             progress: Callable[[int, int], None] | None = None) -> Simulation:
    """One hook call per patient of ``folder`` through the engine the service runs.

    Args:
        folder: Bundles (``*.json``) and/or a Bulk Data export (``*.ndjson``).
        hook: the hook simulated (``patient-view`` by default).
        now: the clock of every call (default: now).
        progress: called with (done, total) after each patient.

    Raises:
        SimulateError: the folder or one of its files cannot be read.
    """
    from lbp_cds import api, hooks
    from lbp_cds.app import offline_app
    from lbp_cds.cli import request_from_bundle
    from lbp_cds.config import Settings
    from lbp_cds.errors import CdsError
    from lbp_cds.fhir_data import load_record

    clock = now or datetime.now(timezone.utc)
    items = list(records(folder))
    package_log = logging.getLogger("lbp_cds")
    level = package_log.level
    package_log.setLevel(logging.ERROR)  # no dev-mode banner, no per-record lenient-read notes
    try:
        # The app the service builds (same settings, pack and parameters); its store is a
        # throw-away file that nothing is written to.
        # Cards carry links to this service (the intake questionnaire of an ask card): the
        # service builds them from its public URL, or the URL a call arrived at; here there
        # is no call, so the URL `lbp-cds serve` answers at stands in for it.
        env = Settings.from_env()
        base = env.public_base_url or f"http://{env.host}:{env.port}"
        with offline_app(lambda: clock, public_base_url=base) as app:
            # A simulation measures what every rule would show: rules the site runs silently
            # (LBP_CDS_SILENT_RULES, the site file's silent_rules) count as live here.
            rt: api.Runtime = dataclasses.replace(app.extensions["lbp_cds"], silent=frozenset())
            app.extensions["lbp_cds"] = rt
            services = [s for s in rt.knowledge.services if s.hook == hook]
            if not services:
                raise SimulateError(f"no service of the knowledge pack serves hook {hook}")
            service = services[0]
            sim = Simulation(hook, clock, rt.knowledge.digest)
            with app.app_context():
                for done, (source, bundle) in enumerate(items, 1):
                    if bundle is None:
                        sim.skipped.append(source)
                    else:
                        try:
                            req = hooks.parse_request(request_from_bundle(bundle, hook))
                            record = load_record(req, service, None, rt.policy,
                                                 rt.knowledge.code_universe)
                            issued = api.evaluate(rt, service, req, record, clock)
                            sim.patients.append(PatientResult(
                                source, req.patient_id or "", [c.card for c in issued]))
                        except CdsError as exc:
                            sim.failed.append((source, exc.message))
                    if progress:
                        progress(done, len(items))
    finally:
        package_log.setLevel(level)
    return sim


class ProgressBar:
    """A one-line progress bar on a terminal's standard error (nothing when not a terminal)."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.active = bool(getattr(self.stream, "isatty", lambda: False)())

    def __call__(self, done: int, total: int) -> None:
        if not self.active or not total:
            return
        filled = self.width * done // total
        self.stream.write(f"\rsimulate [{'#' * filled}{'.' * (self.width - filled)}] "
                          f"{done}/{total}")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


# -- limits -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShareLimit:
    """``--max-share RULE[:indicator]=SHARE``."""

    rule_id: str
    indicator: str | None
    limit: float

    @property
    def label(self) -> str:
        return self.rule_id + (f":{self.indicator}" if self.indicator else "")


def parse_limit(text: str) -> ShareLimit:
    """Parse ``RULE=0.05`` or ``RULE:indicator=0.05`` (a share between 0 and 1).

    Raises:
        ValueError: not of that form.
    """
    target, sep, value = text.partition("=")
    if not sep or not target.strip():
        raise ValueError(f"expected RULE=SHARE or RULE:indicator=SHARE, got {text!r}")
    try:
        limit = float(value)
    except ValueError:
        raise ValueError(f"not a share between 0 and 1: {value!r}") from None
    if not 0 <= limit <= 1:
        raise ValueError(f"a share is between 0 and 1, not {limit}")
    rule, _, indicator = target.strip().partition(":")
    return ShareLimit(rule, indicator or None, limit)


def exceeded(summary: dict[str, Any], sim: Simulation, limits: list[ShareLimit]
             ) -> list[str]:
    """One message per limit exceeded (share of patients with any card of the rule[/indicator],
    ask prompts included)."""
    n = summary["patients"]
    out = []
    for lim in limits:
        hit = sum(1 for p in sim.patients if any(
            k[0] == lim.rule_id and (lim.indicator is None or k[1] == lim.indicator)
            for k in map(card_key, p.cards)))
        share = hit / n if n else 0.0
        if share > lim.limit:
            out.append(f"{lim.label} on {share:.1%} of patients ({hit} of {n}), above "
                       f"--max-share {lim.label}={lim.limit:g}")
    return out


# -- text ---------------------------------------------------------------------------------------
def text_report(summary: dict[str, Any]) -> str:
    """The burden as a terminal table."""
    from lbp_cds.cards import KNOWLEDGE_DIGEST_SHOWN

    n = summary["patients"]
    lines = [f"knowledge {summary['knowledgeDigest'][:KNOWLEDGE_DIGEST_SHOWN]} · hook "
             f"{summary['hook']} · now {summary['now']}",
             f"patients: {n}" + (f" ({summary['failed']} calls failed)" if summary["failed"]
                                 else "")
             + (f"; {summary['skippedFiles']} files held no Patient"
                if summary.get("skippedFiles") else "")]
    for title, state in (("cards", "fire"), ("ask-state prompts (the card asks a question)",
                                             "ask")):
        rows = [r for r in summary["rules"] if (r["state"] == "ask") == (state == "ask")]
        lines.append("")
        lines.append(f"{title}:")
        if not rows:
            lines.append("  none")
            continue
        w = max(len("rule"), *(len(r["ruleId"]) for r in rows))
        lines.append(f"  {'rule':<{w}} {'indicator':<9} {'patients':>8} {'share':>7}")
        lines += [f"  {r['ruleId']:<{w}} {r['indicator']:<9} {r['patients']:>8} "
                  f"{r['share']:>7.1%}" for r in rows]
    dist = summary["cardsPerPatient"]
    lines.append("")
    lines.append("cards per patient: " + "  ".join(
        f"{b}: {dist[b]} ({dist[b] / n:.1%})" if n else f"{b}: 0" for b in CARD_BUCKETS))
    return "\n".join(lines)
