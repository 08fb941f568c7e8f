"""Build the VSAC-derived parts of condition value sets from the shared VSAC extracts.

Usage:
    python cds_services/tools/build_valuesets.py [TERMINOLOGY_FOLDER] \
        [--spec cds_services/tools/valuesets-build.yaml] [--out cds_services/valuesets] \
        [--only cancer-active ...]

TERMINOLOGY_FOLDER (default ``../shared/data/terminology`` from the repository root) holds
``vsac-valueset-extract-2.tsv`` (value-set name, OID or canonical, code system, code, display,
source), its ``.summary.tsv`` (version and expansion timestamp per set) and
``vsac-valueset-extract.tsv`` (name, OID, code system, code, display; expansions of
cqframework/ecqm-content-qicore-2024, version not recorded).

For every value set named in the spec (``valuesets-build.yaml``), the script reads the pack's
current JSON file and keeps its hand-curated part verbatim: metadata, extensions and every
``compose.include`` that does not carry the ``valueset-vsac-source`` extension, and
``compose.exclude``. It then replaces the generated includes: one include per VSAC source and
code system, holding the expansion's codes that pass the spec's ``keep`` and ``exclude`` rules
and that the curated part does not already match (an ICD-10-CM is-a filter or an exact code;
codes removed by the set's ``compose.exclude`` are left out too). A code appears once, in the
first include that brings it. Each generated include carries ``valueset-vsac-source`` (name,
OID or canonical, version, expansion timestamp, source file, counts) and the verification tag
``V-VSAC``. A curated concept tagged ``V-VSAC`` that a source of the spec lists with the same
display moves into the generated include (``absorb_vsac_tagged: true``).

The same inputs give byte-identical files: rerunning the script on its own output changes
nothing (tests/test_build_valuesets.py checks the committed files).

This script is a build tool: the service never runs it and never reads the shared folder. Its
JSON output is committed and reviewed like every other file of the knowledge pack.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

BASE = "https://lbp-cds.example.org/fhir/StructureDefinition/"
VSAC_SOURCE_URL = BASE + "valueset-vsac-source"
VERIFICATION_URL = BASE + "code-verification"
SOURCE_URL = BASE + "valueset-source"
INCLUSION_URL = BASE + "valueset-inclusion-criteria"
EXCLUSION_URL = BASE + "valueset-exclusion-criteria"
SINGLE_SYSTEM_URL = BASE + "valueset-single-system-reason"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"

# Code-system names of the extracts -> FHIR system URIs (the pack's spelling: see
# transplant-procedures.json for ICD-10-PCS and HCPCS).
SYSTEMS = {
    "icd-10-cm": ICD10CM,
    "sct": "http://snomed.info/sct",
    "ICD10": "http://www.cms.gov/Medicare/Coding/ICD10",
    "cpt": "http://www.ama-assn.org/go/cpt",
    "hcpcs": "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
    "rxnorm": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "loinc.org": "http://loinc.org",
}
EXTRACT_1 = "vsac-valueset-extract.tsv"
EXTRACT_2 = "vsac-valueset-extract-2.tsv"
EXTRACT_2_SUMMARY = "vsac-valueset-extract-2.summary.tsv"
EXTRACT_1_SOURCE = ("cqframework/ecqm-content-qicore-2024@9ebd48ffe:input/vocabulary/valueset/"
                    "external/ValueSet-{oid}.json")
REPO_ROOT = Path(__file__).resolve().parents[2]


def norm(system: str, code: str) -> str:
    """The form codes are compared in (as the engine does): ICD-10-CM without dot, upper case."""
    return code.replace(".", "").strip().upper() if system == ICD10CM else code.strip()


# -- reading the extracts ------------------------------------------------------------------------
class Extracts:
    """The rows and per-set metadata of both VSAC extracts of a terminology folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rows: dict[tuple[str, str], list[tuple[str, str, str, str]]] = {}
        self.meta: dict[tuple[str, str], dict[str, str]] = {}
        self._read(EXTRACT_1, width=5)
        self._read(EXTRACT_2, width=6)
        with (folder / EXTRACT_2_SUMMARY).open(encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                self.meta[(EXTRACT_2, row["OID/canonical"])] = {
                    "version": row["version"].strip(),
                    "expansion": row["expansion timestamp"].strip(),
                    "source": row["source"].strip(),
                }

    def _read(self, name: str, width: int) -> None:
        with (self.folder / name).open(encoding="utf-8", newline="") as handle:
            for row in csv.reader(handle, delimiter="\t"):
                if len(row) < width:
                    continue
                key = (name, row[1].strip())
                source = row[5].strip() if width > 5 else EXTRACT_1_SOURCE.format(oid=row[1])
                self.rows.setdefault(key, []).append(
                    (row[2].strip(), row[3].strip(), row[4].strip(), source))

    def expansion(self, extract: str, oid: str, name: str) -> list[tuple[str, str, str, str]]:
        """Rows (system name, code, display, source) of one value set; first seen wins."""
        rows = self.rows.get((extract, oid))
        if not rows:
            raise SystemExit(f"{extract}: no rows for {name} ({oid})")
        seen: set[tuple[str, str]] = set()
        out = []
        for row in rows:
            if (row[0], row[1]) not in seen:
                seen.add((row[0], row[1]))
                out.append(row)
        return out


# -- the spec's selection rules ------------------------------------------------------------------
class Rule:
    """One keep/exclude rule: ICD-10-CM prefixes, a code regex or a display regex, on a system."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.system = str(spec["system"])
        self.reason = str(spec.get("reason", "")).strip()
        self.prefixes = tuple(norm(ICD10CM, p) for p in spec.get("prefix", []))
        self.code = re.compile(spec["code"]) if "code" in spec else None
        self.display = re.compile(spec["display"], re.IGNORECASE) if "display" in spec else None
        self.label = str(spec.get("label") or self._label(spec))

    @staticmethod
    def _label(spec: dict[str, Any]) -> str:
        if "prefix" in spec:
            return "ICD-10-CM " + ", ".join(spec["prefix"])
        if "code" in spec:
            return f"code /{spec['code']}/"
        return f"display /{spec['display']}/"

    def matches(self, system: str, code: str, display: str) -> bool:
        """Tell whether a row of the extract meets the rule."""
        if system != self.system:
            return False
        if self.prefixes and norm(ICD10CM, code).startswith(self.prefixes):
            return True
        if self.code is not None and self.code.search(code):
            return True
        return self.display is not None and bool(self.display.search(display))


class Curated:
    """What the hand-curated part of a value set already matches (engine semantics)."""

    def __init__(self, includes: list[dict[str, Any]], excludes: list[dict[str, Any]]) -> None:
        self.exact, self.prefixes = self._split(includes)
        self.ex_exact, self.ex_prefixes = self._split(excludes)

    @staticmethod
    def _split(includes: list[dict[str, Any]]) -> tuple[set[tuple[str, str]], dict[str, tuple]]:
        exact: set[tuple[str, str]] = set()
        prefixes: dict[str, list[str]] = {}
        for inc in includes:
            system = inc["system"]
            exact.update((system, norm(system, str(c["code"]))) for c in inc.get("concept", []))
            prefixes.setdefault(system, []).extend(
                norm(system, str(f["value"])) for f in inc.get("filter", []))
        return exact, {s: tuple(p) for s, p in prefixes.items()}

    def includes(self, system: str, code: str) -> bool:
        """The curated includes match the code."""
        code = norm(system, code)
        return (system, code) in self.exact or code.startswith(self.prefixes.get(system, ()))

    def excludes(self, system: str, code: str) -> bool:
        """The set's compose.exclude removes the code."""
        code = norm(system, code)
        return (system, code) in self.ex_exact or code.startswith(self.ex_prefixes.get(system, ()))


# -- building one value set ------------------------------------------------------------------------
def _is_generated(include: dict[str, Any]) -> bool:
    return any(e.get("url") == VSAC_SOURCE_URL for e in include.get("extension", []))


def _tag(concept: dict[str, Any]) -> str | None:
    return next((e.get("valueCode") for e in concept.get("extension", [])
                 if e.get("url") == VERIFICATION_URL), None)


def _selected(system_name: str, code: str, display: str, keep: list[Rule],
              exclude: list[Rule]) -> bool:
    """The row passes the spec's keep rules (of its system, if any) and no exclude rule."""
    system_keep = [r for r in keep if r.system == system_name]
    if system_keep and not any(r.matches(system_name, code, display) for r in system_keep):
        return False
    return not any(r.matches(system_name, code, display) for r in exclude)


def build_one(vs_id: str, spec: dict[str, Any], current: dict[str, Any], extracts: Extracts,
              date: str) -> tuple[dict[str, Any], list[str]]:
    """Return the rebuilt ValueSet and report lines."""
    compose = current.get("compose") or {}
    curated = [inc for inc in compose.get("include", []) if not _is_generated(inc)]
    excludes = list(compose.get("exclude", []))
    keep_rules = [Rule(r) for r in spec.get("keep", [])]
    exclude_rules = [Rule(r) for r in spec.get("exclude", [])]
    report: list[str] = []

    # Read every source first: curated V-VSAC concepts the sources list move into them.
    sources = []
    offered: dict[tuple[str, str], str] = {}
    for src in spec["sources"]:
        extract = src.get("extract", EXTRACT_2)
        rows = extracts.expansion(extract, src["oid"], src["name"])
        systems = src["systems"]
        rows = [r for r in rows if r[0] in systems]
        sources.append((src, extract, rows))
        for system_name, code, display, _ in rows:
            if _selected(system_name, code, display, keep_rules, exclude_rules):
                offered.setdefault((SYSTEMS[system_name], norm(SYSTEMS[system_name], code)),
                                   display)
    if spec.get("absorb_vsac_tagged"):
        absorbed = 0
        kept_includes = []
        for inc in curated:
            concepts = [
                c for c in inc.get("concept", [])
                if not (_tag(c) == "V-VSAC" and offered.get(
                    (inc["system"], norm(inc["system"], str(c["code"])))) == c.get("display"))
            ]
            absorbed += len(inc.get("concept", [])) - len(concepts)
            if concepts or inc.get("filter"):
                kept_includes.append({**inc, "concept": concepts} if "concept" in inc else inc)
        curated = kept_includes
        report.append(f"{vs_id}: {absorbed} curated V-VSAC concepts taken over by the sources")
    matcher = Curated(curated, excludes)

    generated = []
    listed: set[tuple[str, str]] = set()
    exclusion_counts: Counter = Counter()
    for src, extract, rows in sources:
        meta = extracts.meta.get((extract, src["oid"]), {})
        for system_name in src["systems"]:
            system = SYSTEMS[system_name]
            counts: Counter = Counter()
            concepts = []
            system_keep = [r for r in keep_rules if r.system == system_name]
            for row_system, code, display, _ in rows:
                if row_system != system_name:
                    continue
                counts["in the expansion"] += 1
                if system_keep and not any(r.matches(system_name, code, display)
                                           for r in system_keep):
                    counts["outside the keep rules"] += 1
                    continue
                rule = next((r for r in exclude_rules if r.matches(system_name, code, display)),
                            None)
                if rule is not None:
                    counts["excluded"] += 1
                    exclusion_counts[(rule.label, rule.reason)] += 1
                    continue
                if matcher.excludes(system, code):
                    counts["removed by the set's compose.exclude"] += 1
                    continue
                if matcher.includes(system, code):
                    counts["already matched by the curated part"] += 1
                    continue
                key = (system, norm(system, code))
                if key in listed:
                    counts["listed by an earlier source"] += 1
                    continue
                listed.add(key)
                concepts.append({"code": code, "display": display})
            counts["listed here"] = len(concepts)
            summary = "; ".join(f"{k} {v}" for k, v in counts.items())
            report.append(f"{vs_id}: {src['name']} {system_name}: {summary}")
            if not concepts:
                continue
            concepts.sort(key=lambda c: (c["code"]))
            provenance: list[dict[str, Any]] = [{"url": "name", "valueString": src["name"]}]
            if src["oid"].startswith("http"):
                provenance.append({"url": "canonical", "valueUri": src["oid"]})
            else:
                provenance.append({"url": "oid", "valueOid": "urn:oid:" + src["oid"]})
            if meta.get("version"):
                provenance.append({"url": "version", "valueString": meta["version"]})
            if meta.get("expansion"):
                provenance.append({"url": "expansion", "valueDateTime": meta["expansion"]})
            provenance.append({"url": "source",
                               "valueString": meta.get("source") or rows[0][3]})
            provenance.append({"url": "extract", "valueString": f"shared/data/terminology/{extract}"})
            provenance.append({"url": "codes", "valueString": f"{system_name}: {summary}"})
            generated.append({
                "system": system,
                "extension": [
                    {"url": VSAC_SOURCE_URL, "extension": provenance},
                    {"url": VERIFICATION_URL, "valueCode": "V-VSAC"},
                ],
                "concept": concepts,
            })

    doc = _metadata(vs_id, spec, current, date, sources, extracts, exclusion_counts)
    doc["compose"] = {"include": curated + generated}
    if excludes:
        doc["compose"]["exclude"] = excludes
    return doc, report


def _metadata(vs_id: str, spec: dict[str, Any], current: dict[str, Any], date: str,
              sources: list, extracts: Extracts, exclusion_counts: Counter) -> dict[str, Any]:
    names = "; ".join(
        f"{src['name']} {src['oid']} "
        f"(version {extracts.meta.get((extract, src['oid']), {}).get('version') or 'not recorded'}, "
        f"{', '.join(src['systems'])}; shared/data/terminology/{extract})"
        for src, extract, _ in sources)
    source_text = (f"Generated by cds_services/tools/build_valuesets.py from the VSAC expansions "
                   f"{names}, spec cds_services/tools/valuesets-build.yaml; the hand-curated "
                   f"part (includes without valueset-vsac-source) is kept from the previous "
                   f"version: {spec['curated_source'].strip()}")
    exclusions = "".join(
        f"\n- {label} ({count} codes): {reason}"
        for (label, reason), count in sorted(exclusion_counts.items()))
    exclusion_text = spec["exclusion"].strip()
    if exclusions:
        exclusion_text += "\n\nRemoved from the VSAC expansions by the build spec:" + exclusions
    extensions: list[dict[str, Any]] = [
        {"url": SOURCE_URL, "valueString": source_text},
        {"url": INCLUSION_URL, "valueMarkdown": spec["inclusion"].strip()},
        {"url": EXCLUSION_URL, "valueMarkdown": exclusion_text},
    ]
    if spec.get("single_system_reason"):
        extensions.append({"url": SINGLE_SYSTEM_URL,
                           "valueMarkdown": spec["single_system_reason"].strip()})
    managed = {SOURCE_URL, INCLUSION_URL, EXCLUSION_URL, SINGLE_SYSTEM_URL}
    extensions += [e for e in current.get("extension", []) if e.get("url") not in managed]
    doc: dict[str, Any] = {}
    for key in ("resourceType", "id", "url"):
        doc[key] = current[key]
    doc["version"] = str(spec["version"])
    for key in ("name", "title", "status"):
        doc[key] = current[key]
    doc["date"] = date
    doc["publisher"] = current["publisher"]
    doc["description"] = spec["description"].strip()
    doc["extension"] = extensions
    return doc


# -- writing ----------------------------------------------------------------------------------------
def dumps(doc: dict[str, Any]) -> str:
    """JSON with two-space indentation, one concept per line (large sets stay reviewable)."""

    def render(value: Any, indent: int, inline: bool) -> str:
        if inline or not isinstance(value, dict | list):
            return json.dumps(value, ensure_ascii=False)
        pad = " " * (indent + 2)
        if isinstance(value, list):
            if not value:
                return "[]"
            items = [pad + render(v, indent + 2, False) for v in value]
            return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
        items = []
        for key, val in value.items():
            one_line = key == "concept"
            if one_line and isinstance(val, list):
                rows = [pad + "  " + json.dumps(c, ensure_ascii=False) for c in val]
                text = "[\n" + ",\n".join(rows) + "\n" + pad + "]" if rows else "[]"
            else:
                text = render(val, indent + 2, False)
            items.append(f"{pad}{json.dumps(key)}: {text}")
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"

    return render(doc, 0, False) + "\n"


def build(folder: Path, spec_path: Path, pack_valuesets: Path, out: Path,
          only: list[str] | None = None) -> list[str]:
    """Rebuild the spec's value sets from ``pack_valuesets`` into ``out``; return the report."""
    spec = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    extracts = Extracts(folder)
    report: list[str] = []
    out.mkdir(parents=True, exist_ok=True)
    for vs_id, vs_spec in spec["valuesets"].items():
        if only and vs_id not in only:
            continue
        current = json.loads((pack_valuesets / f"{vs_id}.json").read_text(encoding="utf-8"))
        doc, lines = build_one(vs_id, vs_spec, current, extracts, str(spec["date"]))
        (out / f"{vs_id}.json").write_text(dumps(doc), encoding="utf-8")
        report += lines
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("terminology", type=Path, nargs="?",
                        default=REPO_ROOT.parent / "shared" / "data" / "terminology",
                        help="folder of the VSAC extracts (default ../shared/data/terminology)")
    parser.add_argument("--spec", type=Path, default=Path(__file__).resolve().parent
                        / "valuesets-build.yaml")
    parser.add_argument("--valuesets", type=Path, default=REPO_ROOT / "cds_services" / "valuesets",
                        help="the pack's value sets (read for their hand-curated part)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write (default: the --valuesets folder)")
    parser.add_argument("--only", nargs="*", help="rebuild only these value set ids")
    args = parser.parse_args(argv)
    report = build(args.terminology, args.spec, args.valuesets, args.out or args.valuesets,
                   args.only)
    for line in report:
        print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
