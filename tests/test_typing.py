"""The package type-checks under ``mypy --strict`` (settings in pyproject.toml).

Types are how this code says what a head, a fact result or a setting may hold (``str | None``
against a missing element); a change that breaks them should fail here, not at a clinician.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_mypy_strict_finds_nothing() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Success: no issues found" in proc.stdout
