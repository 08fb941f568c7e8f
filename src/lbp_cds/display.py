"""Cards as a clinician reads them, in plain text: shared by ``lbp-cds evaluate`` and ``probe``.

Pure formatting of a CDS Hooks response's ``cards``; it imports nothing of the service, so the
command line and the probe can both use it without importing each other.
"""

from __future__ import annotations

from typing import Any

MARKS = {"critical": "!!! CRITICAL", "warning": "!  WARNING", "info": "i  INFO"}


def format_cards(cards: list[dict[str, Any]], service_id: str, hook: str) -> str:
    """Cards as a clinician would read them in a sidebar.

    Args:
        cards: the ``cards`` of a CDS Hooks response.
        service_id: the service that answered.
        hook: the hook it answered.

    Returns:
        The text: a header line, then per card its indicator and summary, source and rule,
        detail, suggestions with their actions, override reasons and links.
    """
    if not cards:
        return f"{service_id} ({hook}): no cards."
    lines = [f"{service_id} ({hook}): {len(cards)} card(s)", ""]
    for card in cards:
        indicator = str(card.get("indicator", ""))
        lines.append(f"{MARKS.get(indicator, indicator.upper())}  {card['summary']}")
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
