"""Build conceptmaps/rxnorm-product-ingredient.json from the VSAC value-set extract.

Usage:
    python cds_services/tools/build_rxnorm_map.py PATH/TO/vsac-valueset-extract.tsv \
        [--out cds_services/conceptmaps/rxnorm-product-ingredient.json]

The extract is tab-separated: value-set name, OID, code system, code, display.
Only the RxNorm rows of three product-level VSAC sets are read (Opioids; Glucocorticoids
(oral only); Anticoagulants for All Indications). Each product (SCD/SBD/pack) is mapped to
the ingredient RxCUIs of clinical-rules.md sections 2.2 and 3.5 whose names appear as whole
words in the product's display name ("oxycodone hydrochloride 5 MG Oral Tablet" -> 7804
oxycodone). Combination products map to every listed ingredient they contain. Products
with no listed ingredient are left out and counted.

This script is a build tool: the service never runs it. Its JSON output is committed and
reviewed like every other file of the knowledge pack.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import Counter
from pathlib import Path

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
BASE = "https://lbp-cds.example.org/fhir"
DATE = "2026-11-22"

SOURCE_SETS = {
    "Opioids": "2.16.840.1.113762.1.4.1248.120",
    "Glucocorticoids (oral only)": "2.16.840.1.113883.3.464.1003.196.12.1266",
    "Anticoagulants for All Indications": "2.16.840.1.113762.1.4.1248.22",
}

# name -> (RxCUI, verification tag of the ingredient code in clinical-rules.md)
INGREDIENTS: dict[str, tuple[str, str]] = {
    # opioids, clinical-rules 3.5 [V-CQF]
    "codeine": ("2670", "V-CQF"),
    "fentanyl": ("4337", "V-CQF"),
    "hydrocodone": ("5489", "V-CQF"),
    "hydromorphone": ("3423", "V-CQF"),
    "methadone": ("6813", "V-CQF"),
    "morphine": ("7052", "V-CQF"),
    "oxycodone": ("7804", "V-CQF"),
    "oxymorphone": ("7814", "V-CQF"),
    "tramadol": ("10689", "V-CQF"),
    "tapentadol": ("787390", "V-CQF"),
    "buprenorphine": ("1819", "V-CQF"),
    "butorphanol": ("1841", "V-CQF"),
    "levorphanol": ("6378", "V-CQF"),
    "meperidine": ("6754", "V-CQF"),
    "pentazocine": ("8001", "V-CQF"),
    # analgesics in combination products, clinical-rules 3.5 [V-VSAC]
    "acetaminophen": ("161", "V-VSAC"),
    "ibuprofen": ("5640", "V-VSAC"),
    "naproxen": ("7258", "V-VSAC"),
    "diclofenac": ("3355", "V-VSAC"),
    "celecoxib": ("140587", "V-VSAC"),
    "meloxicam": ("41493", "V-VSAC"),
    "ketorolac": ("35827", "V-VSAC"),
    "sulindac": ("10237", "V-VSAC"),
    # systemic corticosteroids, clinical-rules 2.2 RF-E [V-VSAC]
    "prednisone": ("8640", "V-VSAC"),
    "prednisolone": ("8638", "V-VSAC"),
    "methylprednisolone": ("6902", "V-VSAC"),
    "dexamethasone": ("3264", "V-VSAC"),
    "hydrocortisone": ("5492", "V-VSAC"),
    "cortisone": ("2878", "V-VSAC"),
    "betamethasone": ("1514", "V-VSAC"),
    "triamcinolone": ("10759", "V-VSAC"),
    "budesonide": ("19831", "V-VSAC"),
    # anticoagulants, clinical-rules 3.5
    "warfarin": ("11289", "V-VSAC"),
    "apixaban": ("1364430", "V-VSAC"),
    "rivaroxaban": ("1114195", "V-VSAC"),
    "heparin": ("5224", "V-VSAC"),
    "enoxaparin": ("67108", "V-VSAC"),
    "dabigatran": ("1546356", "UNVERIFIED"),
    "edoxaban": ("1599538", "UNVERIFIED"),
    "dalteparin": ("67109", "UNVERIFIED"),
    "fondaparinux": ("321208", "UNVERIFIED"),
}

# Products deliberately not mapped, with the reason (kept in the ConceptMap's description).
EXCLUDED = {
    "1085728": "triamcinolone acetonide oral paste: a topical (oromucosal) product, not a systemic corticosteroid",
}

_PATTERNS = {name: re.compile(rf"\b{name}\b") for name in INGREDIENTS}


def ingredients_of(display: str) -> list[str]:
    """Return the listed ingredient names whose whole word appears in a product display."""
    text = display.lower()
    return [name for name, pattern in _PATTERNS.items() if pattern.search(text)]


def read_products(extract: Path) -> list[tuple[str, str, str]]:
    """Return (set name, code, display) for the RxNorm rows of the source sets, first seen wins."""
    seen: set[str] = set()
    rows: list[tuple[str, str, str]] = []
    with extract.open(encoding="utf-8", newline="") as handle:
        for row in csv.reader(handle, delimiter="\t"):
            if len(row) < 5 or row[0] not in SOURCE_SETS or row[2].lower() != "rxnorm":
                continue
            code, display = row[3].strip(), row[4].strip()
            if code in seen:
                continue
            seen.add(code)
            rows.append((row[0], code, display))
    return rows


def build(extract: Path) -> tuple[dict, Counter, list[str]]:
    """Build the ConceptMap resource; return it with per-set counts and unmapped displays."""
    elements = []
    counts: Counter = Counter()
    unmapped: list[str] = []
    for set_name, code, display in sorted(read_products(extract), key=lambda r: int(r[1])):
        counts[f"{set_name}: products read"] += 1
        if code in EXCLUDED:
            counts[f"{set_name}: excluded"] += 1
            continue
        names = ingredients_of(display)
        if not names:
            counts[f"{set_name}: no listed ingredient"] += 1
            unmapped.append(f"{code} {display}")
            continue
        counts[f"{set_name}: mapped"] += 1
        targets = []
        for name in names:
            rxcui, tag = INGREDIENTS[name]
            comment = f"ingredient code tag {tag}"
            if len(names) > 1:
                comment += f"; one of {len(names)} listed ingredients of a combination product"
            targets.append(
                {"code": rxcui, "display": name, "equivalence": "wider", "comment": comment}
            )
        elements.append({"code": code, "display": display, "target": targets})

    summary = "; ".join(f"{key} {value}" for key, value in sorted(counts.items()))
    excluded = "; ".join(f"{code} ({why})" for code, why in EXCLUDED.items())
    concept_map = {
        "resourceType": "ConceptMap",
        "id": "rxnorm-product-ingredient",
        "url": f"{BASE}/ConceptMap/rxnorm-product-ingredient",
        "version": "1.0.0",
        "name": "RxNormProductIngredient",
        "title": "RxNorm product (SCD/SBD/pack) to ingredient RxCUI",
        "status": "active",
        "date": DATE,
        "publisher": "lbp-cds clinical knowledge team",
        "description": (
            "Maps RxNorm product codes found in three VSAC product-level value sets "
            "(Opioids 2.16.840.1.113762.1.4.1248.120; Glucocorticoids (oral only) "
            "2.16.840.1.113883.3.464.1003.196.12.1266; Anticoagulants for All Indications "
            "2.16.840.1.113762.1.4.1248.22; expansions from cqframework/ecqm-content-qicore-2024, "
            "shared/data/terminology/vsac-valueset-extract.tsv) to the ingredient RxCUIs listed in "
            "clinical-rules.md sections 2.2 and 3.5. Built by cds_services/tools/build_rxnorm_map.py: "
            "an ingredient is mapped when its name appears as a whole word in the product's RxNorm "
            "display name; combination products map to each listed ingredient they contain; products "
            "without a listed ingredient (for example sufentanil, opium, betrixaban, bivalirudin) are "
            "not mapped, and the value sets list those product codes directly where they matter. "
            f"Excluded: {excluded}. Counts: {summary}. The mapping was derived from display names, "
            "not from RxNorm RRF relationships: confirm against a licensed RxNorm release before go-live."
        ),
        "sourceUri": RXNORM,
        "targetUri": RXNORM,
        "group": [{"source": RXNORM, "target": RXNORM, "element": elements}],
    }
    return concept_map, counts, unmapped


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extract", type=Path, help="path to vsac-valueset-extract.tsv")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "conceptmaps" / "rxnorm-product-ingredient.json",
    )
    args = parser.parse_args(argv)
    concept_map, counts, unmapped = build(args.extract)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(concept_map, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for key, value in sorted(counts.items()):
        print(f"{key}: {value}")
    for line in unmapped:
        print(f"unmapped: {line}", file=sys.stderr)
    print(f"wrote {args.out} ({len(concept_map['group'][0]['element'])} elements)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
