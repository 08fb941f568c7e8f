"""``lbp_cds.display``: cards as text, shared by ``lbp-cds evaluate`` and ``probe``."""

from __future__ import annotations

import subprocess
import sys

from lbp_cds.display import format_cards
from tests.conftest import ROOT

CARD = {
    "uuid": "c1", "indicator": "critical", "summary": "Possible cauda equina syndrome",
    "source": {"label": "NICE NG59"},
    "detail": "Same-day emergency assessment.\n\nMRI within hours \\(STAT\\).",
    "suggestions": [{"label": "Refer to the emergency department now", "isRecommended": True,
                     "actions": [{"type": "create", "description": "Emergency referral"}]},
                    {"label": "Order an MRI", "actions": []}],
    "overrideReasons": [{"code": "x", "display": "Already referred"}],
    "links": [{"label": "Intake", "url": "https://cds.example.org/q", "type": "absolute"}],
    "extension": {"org.lbp-cds.rule": {"ruleId": "CES-1", "knowledgeDigest": "abc"}},
}


def test_a_card_as_a_clinician_reads_it():
    info = {"indicator": "info", "summary": "Stay active", "source": {"label": "ACP"}}
    assert format_cards([CARD, info], "lbp-triage", "patient-view").splitlines() == [
        "lbp-triage (patient-view): 2 card(s)",
        "",
        "!!! CRITICAL  Possible cauda equina syndrome",
        "   source: NICE NG59  [rule CES-1]",
        "   Same-day emergency assessment.",
        "   MRI within hours (STAT).",
        "   > suggestion: Refer to the emergency department now (recommended)",
        "       - create: Emergency referral",
        "   > suggestion: Order an MRI",
        "   x override reason: Already referred",
        "   link: Intake <https://cds.example.org/q>",
        "",
        "i  INFO  Stay active",
        "   source: ACP",
    ]


def test_no_cards():
    assert format_cards([], "lbp-triage", "patient-view") == "lbp-triage (patient-view): no cards."


def test_the_probe_does_not_import_the_command_line():
    """The probe and the CLI share the display module instead of importing each other."""
    code = ("import sys, lbp_cds.probe; "
            "print(sorted(m for m in sys.modules if m in ('lbp_cds.cli', 'lbp_cds.display')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120, env={"PYTHONPATH": str(ROOT / "src"),
                                                       "PATH": "/usr/bin:/bin"}).stdout
    assert out.strip() == "['lbp_cds.display']"
