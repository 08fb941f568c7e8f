"""Terminology parity: condition value sets carry SNOMED CT and ICD-10-CM (or say why not), and
the VSAC-derived value sets are exactly what build_valuesets.py makes of the shared extracts."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from lbp_cds import cli, knowledge
from lbp_cds.lint import SINGLE_SYSTEM_URL, lint
from lbp_cds.rules import RuleEngine

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / "cds_services"
TOOLS = PACK / "tools"
TERMINOLOGY = ROOT.parent / "shared" / "data" / "terminology"
SNOMED = "http://snomed.info/sct"


def _linted(root: Path) -> list[str]:
    pack = knowledge.load(root)
    RuleEngine(pack)
    return lint(pack)


@pytest.fixture()
def pack_copy(tmp_path: Path) -> Path:
    root = tmp_path / "cds_services"
    shutil.copytree(PACK, root, ignore=shutil.ignore_patterns("tools", "__pycache__"))
    return root


def _edit(root: Path, vs_id: str, change) -> None:
    path = root / "valuesets" / f"{vs_id}.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    change(doc)
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")


def _drop_snomed(doc: dict) -> None:
    doc["compose"]["include"] = [i for i in doc["compose"]["include"] if i["system"] != SNOMED]


def test_a_condition_value_set_with_one_system_and_no_reason_fails_the_lint(pack_copy):
    _edit(pack_copy, "foot-drop", _drop_snomed)
    problems = _linted(pack_copy)
    assert problems == ["value set foot-drop is used by a condition fact but has no SNOMED CT "
                        "code and no valueset-single-system-reason extension"]


def test_a_single_system_reason_passes_the_lint(pack_copy):
    def change(doc: dict) -> None:
        _drop_snomed(doc)
        doc["extension"].append({"url": SINGLE_SYSTEM_URL,
                                 "valueMarkdown": "HEDIS category, ICD only by definition"})
    _edit(pack_copy, "foot-drop", change)
    assert _linted(pack_copy) == []


def test_an_empty_reason_is_no_reason(pack_copy):
    def change(doc: dict) -> None:
        _drop_snomed(doc)
        doc["extension"].append({"url": SINGLE_SYSTEM_URL, "valueMarkdown": " "})
    _edit(pack_copy, "foot-drop", change)
    assert len(_linted(pack_copy)) == 1


def test_value_sets_not_used_by_a_condition_fact_need_one_system_only(pack_copy):
    # hcg is read by lab facts only: LOINC alone is right.
    pack = knowledge.load(pack_copy)
    RuleEngine(pack)
    assert "condition" not in pack.valueset_facts.get("hcg", set())
    assert "condition" in pack.valueset_facts["foot-drop"]


def test_the_real_pack_checks_clean(capsys):
    assert cli.main(["check-knowledge"]) == 0
    assert "problem" not in capsys.readouterr().out


def _generator():
    spec = importlib.util.spec_from_file_location("build_valuesets", TOOLS / "build_valuesets.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.mark.shared
def test_the_generated_value_sets_are_what_the_generator_makes(tmp_path):
    """Rerunning build_valuesets.py on the committed files gives the committed bytes."""
    module = _generator()
    module.build(TERMINOLOGY, TOOLS / "valuesets-build.yaml", PACK / "valuesets", tmp_path)
    written = sorted(p.name for p in tmp_path.glob("*.json"))
    assert written, "the spec names no value set"
    for name in written:
        assert (tmp_path / name).read_bytes() == (PACK / "valuesets" / name).read_bytes(), name


@pytest.mark.shared
def test_generated_includes_carry_vsac_provenance():
    module = _generator()
    for path in sorted((PACK / "valuesets").glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        for inc in doc["compose"]["include"]:
            urls = {e["url"]: e for e in inc.get("extension", [])}
            if module.VSAC_SOURCE_URL not in urls:
                continue
            parts = {e["url"] for e in urls[module.VSAC_SOURCE_URL]["extension"]}
            assert {"name", "source", "extract"} <= parts, path.name
            assert parts & {"oid", "canonical"}, path.name
            assert urls[module.VERIFICATION_URL]["valueCode"] == "V-VSAC", path.name
