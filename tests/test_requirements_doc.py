"""docs/requirements-coverage.md is generated from the tests' requirement markers: keep it current."""

from __future__ import annotations

import pytest

from tests.requirements_coverage import CSV, DOC, render, tagged_tests

pytestmark = pytest.mark.shared


def test_the_coverage_table_is_current():
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/requirements-coverage.md is stale: run `python -m tests.requirements_coverage`")


def test_every_marker_names_a_real_requirement():
    import csv

    ids = {row["ID"] for row in csv.DictReader(CSV.open(encoding="utf-8"))}
    assert sorted(set(tagged_tests()) - ids) == []
