"""Self-contained HTML reports with charts for a CDS committee: alert burden and feedback.

``simulate_html`` draws what ``lbp-cds simulate`` measured on a folder of records;
``burden_html`` what the store recorded (``lbp-cds burden``). Each page opens without a network:
its CSS is inline and its charts are inline SVG drawn by matplotlib (Agg backend; text kept as
SVG text, so it is readable, selectable and read out by a screen reader), with no script.

Every chart has a title, axis labels, an SVG ``<title>`` and an ``aria-label``; indicators are
told apart by colour AND hatching AND a text label, never by colour alone. Every text that comes
from a caller (rule ids, override reasons, the database URL) is HTML-escaped, and a database URL
is shown without its password. Neither report holds patient data: counts and rates only.

matplotlib is imported here, lazily: ``pip install 'lbp-cds[report]'``; serving never needs it.
"""

from __future__ import annotations

import html
import io
import re
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

#: Colour, hatch and word per indicator (and for ask-state prompts).
STYLE = {
    "critical": ("#b2182b", "xx", "critical"),
    "warning": ("#e08214", "//", "warning"),
    "info": ("#2166ac", "..", "info"),
    "ask": ("#7f7f7f", "\\\\", "ask prompt"),
}
_SERIES = [("#1b7837", "o", "-"), ("#762a83", "s", "--"), ("#b35806", "^", "-."),
           ("#2166ac", "D", ":"), ("#b2182b", "v", "-"), ("#4d4d4d", "P", "--")]
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;
max-width:1100px;color:#1a1a1a;line-height:1.4;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem}
.meta{color:#444;font-size:.9rem}.meta code{background:#f2f2f2;padding:0 .2rem}
figure{margin:1rem 0}figure svg{max-width:100%;height:auto}
table{border-collapse:collapse;font-size:.9rem;margin:.5rem 0}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f2f2f2}
.note{color:#444;font-size:.9rem}
"""


def esc(value: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape("" if value is None else str(value), quote=True)


def safe_url(url: str) -> str:
    """A database URL without its password (``user:***@``)."""
    return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", url)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


# -- charts -------------------------------------------------------------------------------------
class _Charts:
    """Figures to inline SVG; each with a unique id salt (several SVGs share one page)."""

    def __init__(self) -> None:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        self.plt = plt
        self.count = 0

    def figure(self, width: float, height: float) -> Any:
        return self.plt.figure(figsize=(width, height), layout="constrained")

    def svg(self, fig: Any, title: str) -> str:
        """The figure as an inline ``<svg>`` with ``role=img``, ``aria-label`` and ``<title>``."""
        self.count += 1
        buf = io.StringIO()
        rc: Any = {"svg.fonttype": "none", "svg.hashsalt": f"lbp-cds-chart-{self.count}"}
        with self.plt.rc_context(rc):
            fig.savefig(buf, format="svg", bbox_inches="tight")
        self.plt.close(fig)
        text = buf.getvalue()
        text = text[text.index("<svg"):]  # no XML declaration or DOCTYPE inside HTML
        # Nor the RDF metadata (matplotlib's version and the date): nothing but the chart.
        text = re.sub(r"<metadata>.*?</metadata>", "", text, count=1, flags=re.DOTALL)
        label = esc(title)
        text = re.sub(r"<svg\b", f'<svg role="img" aria-label="{label}"', text, count=1)
        end = text.index(">") + 1
        return f"<figure>{text[:end]}<title>{label}</title>{text[end:]}</figure>"


def _rc() -> Any:  # Any: matplotlib types rcParams keys as a Literal of every name
    return {"text.parse_math": False, "font.size": 10, "axes.titlesize": 12,
            "hatch.linewidth": 0.8, "axes.spines.top": False, "axes.spines.right": False}


def _share_bars(ch: _Charts, rows: list[dict[str, Any]], title: str, ask: bool) -> str:
    """Horizontal bars: share of patients per rule and indicator (colour, hatch and label)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = sorted(rows, key=lambda r: (r["ruleId"], r["indicator"]), reverse=True)
    with plt.rc_context(_rc()):
        fig = ch.figure(9, max(1.6, 0.34 * len(rows) + 1.2))
        ax = fig.add_subplot()
        styles = [STYLE["ask"] if ask else STYLE.get(r["indicator"], STYLE["info"])
                  for r in rows]
        y = range(len(rows))
        bars = ax.barh(list(y), [r["share"] * 100 for r in rows],
                       color=[s[0] for s in styles], edgecolor="white", linewidth=0.5)
        for bar, style in zip(bars, styles, strict=True):
            bar.set_hatch(style[1])
        ax.set_yticks(list(y), [f"{r['ruleId']} · {r['indicator']}" for r in rows])
        for bar, r in zip(bars, rows, strict=True):
            ax.annotate(f" {r['share']:.1%} ({r['patients']})",
                        (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                        va="center", fontsize=8)
        top = max([r["share"] * 100 for r in rows] + [1.0])
        ax.set_xlim(0, top * 1.25)
        ax.set_xlabel("share of patients with the card (%)")
        ax.set_ylabel("rule · indicator")
        ax.set_title(title)
        used = ["ask"] if ask else [k for k in ("critical", "warning", "info")
                                    if any(r["indicator"] == k for r in rows)]
        ax.legend(handles=[Patch(facecolor=STYLE[k][0], hatch=STYLE[k][1], label=STYLE[k][2],
                                 edgecolor="white") for k in used],
                  loc="lower right", frameon=False)
        return ch.svg(fig, title)


def _bucket_bars(ch: _Charts, dist: dict[str, int], n: int) -> str:
    import matplotlib.pyplot as plt

    title = "Cards per patient"
    with plt.rc_context(_rc()):
        fig = ch.figure(6, 3)
        ax = fig.add_subplot()
        keys = list(dist)
        bars = ax.bar(keys, [dist[k] for k in keys], color="#2166ac", hatch="..",
                      edgecolor="white")
        for bar, k in zip(bars, keys, strict=True):
            share = dist[k] / n if n else 0
            ax.annotate(f"{dist[k]} ({share:.0%})", (bar.get_x() + bar.get_width() / 2,
                                                     bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, max(list(dist.values()) + [1]) * 1.2)
        ax.set_xlabel("cards shown to the patient's clinician at one patient-view")
        ax.set_ylabel("patients")
        ax.set_title(title)
        return ch.svg(fig, title)


def _page(title: str, meta: str, body: str) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{esc(title)}</h1><p class='meta'>{meta}</p>{body}</body></html>")


def _table(head: Iterable[str], rows: Iterable[Iterable[str]], numeric: set[int]) -> str:
    """A table; every cell is already escaped text."""
    out = ["<table><thead><tr>", *(f"<th scope='col'>{h}</th>" for h in head),
           "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td class='n'>{c}</td>" if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


# -- simulate -----------------------------------------------------------------------------------
def simulate_html(result: dict[str, Any]) -> str:
    """The alert-burden report of ``lbp-cds simulate`` (its ``--json`` document)."""
    ch = _Charts()
    n = int(result.get("patients", 0))
    rules = list(result.get("rules") or [])
    cards = [r for r in rules if r.get("state", "fire") != "ask"]
    asks = [r for r in rules if r.get("state", "fire") == "ask"]
    digest = str(result.get("knowledgeDigest", ""))
    meta = (f"Knowledge pack <code>{esc(digest)}</code> · hook {esc(result.get('hook'))} · "
            f"records dated as of {esc(result.get('now'))} · generated "
            f"{esc(result.get('generated') or _now())} · {n} patients"
            + (f" · {esc(result.get('failed'))} calls failed" if result.get("failed") else ""))
    body = ["<p class='note'>One simulated hook call per patient, evaluated by the same engine "
            "as the service. Shares are of all patients simulated; a patient counts once per "
            "rule and indicator. No patient data is in this report.</p>"]
    body.append("<h2>Cards by rule and indicator</h2>")
    body.append(_share_bars(ch, cards, "Share of patients with a card, by rule and indicator",
                            ask=False) if cards else "<p>No card.</p>")
    body.append("<h2>Ask-state prompts</h2><p class='note'>Cards that ask the clinician a "
                "question because an unknown stands between the rule and firing.</p>")
    body.append(_share_bars(ch, asks, "Share of patients with an ask prompt, by rule", ask=True)
                if asks else "<p>No ask prompt.</p>")
    dist = {str(k): int(v) for k, v in (result.get("cardsPerPatient") or {}).items()}
    body.append("<h2>Cards per patient</h2>")
    body.append(_bucket_bars(ch, dist, n))
    body.append("<h2>Figures</h2>")
    body.append(_table(["rule", "indicator", "kind", "patients", "share"],
                       ([esc(r["ruleId"]), esc(r["indicator"]),
                         "ask prompt" if r.get("state") == "ask" else "card",
                         esc(r["patients"]), _pct(r["share"])] for r in rules), {3, 4}))
    body.append(_table(["cards per patient", "patients", "share"],
                       ([esc(k), esc(v), _pct(v / n if n else 0.0)] for k, v in dist.items()),
                       {1, 2}))
    return _page("Alert-burden simulation", meta, "".join(body))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- burden (the store) -------------------------------------------------------------------------
def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def burden_html(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The report of ``lbp-cds burden``: cards shown and silent, weekly acceptance and override
    rates per rule, and the two most recent knowledge digests side by side."""
    import matplotlib.pyplot as plt

    ch = _Charts()
    by_rule: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    weekly: dict[str, dict[str, dict[str, int]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(int)))
    by_digest: dict[str, dict[str, dict[str, int]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(int)))
    last_week: dict[str, str] = {}
    for r in rows:
        rule, week, digest = str(r["ruleId"]), str(r["week"]), str(r.get("knowledgeDigest") or "")
        for k in ("shown", "silent", "accepted", "overridden"):
            value = int(r.get(k) or 0)
            by_rule[rule][k] += value
            weekly[rule][week][k] += value
            by_digest[digest][rule][k] += value
        last_week[digest] = max(last_week.get(digest, ""), week)
    rules = sorted(by_rule)
    weeks = sorted({str(r["week"]) for r in rows})
    meta_html = (f"Database <code>{esc(safe_url(str(meta.get('database', ''))))}</code> · "
                 f"{esc(meta.get('rows', len(rows)))} rows · since "
                 f"{esc(meta.get('since') or 'the first record')} · generated "
                 f"{esc(meta.get('generated') or _now())}")
    body = ["<p class='note'>Cards the service issued, per rule: shown to clinicians or kept "
            "silent, and what clinicians did with the shown ones. No patient data is in this "
            "report.</p>"]
    if not rows:
        body.append("<p>No card recorded in this period.</p>")
        return _page("Alert burden and feedback", meta_html, "".join(body))

    # 1. shown vs silent per rule
    title = "Cards shown and silent, by rule"
    with plt.rc_context(_rc()):
        fig = ch.figure(9, max(1.8, 0.45 * len(rules) + 1.2))
        ax = fig.add_subplot()
        height = 0.38
        ys = list(range(len(rules)))[::-1]
        for offset, key, colour, hatch, label in (
                (height / 2, "shown", "#2166ac", "..", "shown"),
                (-height / 2, "silent", "#bababa", "//", "silent")):
            bars = ax.barh([y + offset for y in ys], [by_rule[x][key] for x in rules], height,
                           color=colour, hatch=hatch, edgecolor="white", label=label)
            for bar, rule in zip(bars, rules, strict=True):
                ax.annotate(f" {by_rule[rule][key]} {label}",
                            (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                            va="center", fontsize=8)
        ax.set_yticks(ys, rules)
        top = max([max(v["shown"], v["silent"]) for v in by_rule.values()] + [1])
        ax.set_xlim(0, top * 1.3)
        ax.set_xlabel("cards")
        ax.set_ylabel("rule")
        ax.set_title(title)
        ax.legend(loc="lower right", frameon=False)
        body.append("<h2>Cards shown and silent</h2>" + ch.svg(fig, title))

    # 2. weekly rates per rule
    body.append("<h2>Acceptance and override rates by week</h2>")
    for key, word in (("accepted", "Acceptance"), ("overridden", "Override")):
        title = f"{word} rate of shown cards by week, per rule"
        with plt.rc_context(_rc()):
            fig = ch.figure(9, 3.4)
            ax = fig.add_subplot()
            for i, rule in enumerate(rules):
                colour, marker, style = _SERIES[i % len(_SERIES)]
                points = [(weeks.index(w), _rate(v[key], v["shown"]))
                          for w, v in sorted(weekly[rule].items())]
                xs = [x for x, y in points if y is not None]
                ys2 = [y * 100 for x, y in points if y is not None]
                if xs:
                    ax.plot(xs, ys2, color=colour, marker=marker, linestyle=style, label=rule)
            ax.set_xticks(range(len(weeks)), weeks, rotation=30, ha="right")
            ax.set_ylim(0, 105)
            ax.set_xlabel("week")
            ax.set_ylabel(f"{word.lower()} rate (% of shown)")
            ax.set_title(title)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
                          title="rule")
            body.append(ch.svg(fig, title))

    # 3. before/after of the two most recent knowledge digests
    digests = sorted(last_week, key=lambda d: (last_week[d], d))
    if len(digests) >= 2:
        before, after = digests[-2], digests[-1]
        title = (f"Knowledge {before[:12]} (before) and {after[:12]} (after): "
                 "rates per rule")
        shared = sorted(set(by_digest[before]) | set(by_digest[after]))
        with plt.rc_context(_rc()):
            fig = ch.figure(10, max(2.2, 0.45 * len(shared) + 1.4))
            axes = fig.subplots(1, 3, sharey=True)
            ys = list(range(len(shared)))[::-1]
            for ax, (key, word) in zip(axes, (("shown", "cards shown"),
                                              ("accepted", "acceptance rate (%)"),
                                              ("overridden", "override rate (%)")), strict=True):
                for offset, digest, colour, hatch, label in (
                        (0.2, before, "#bababa", "//", f"before {before[:12]}"),
                        (-0.2, after, "#1b7837", "..", f"after {after[:12]}")):
                    values = []
                    for rule in shared:
                        v = by_digest[digest].get(rule, {})
                        if key == "shown":
                            values.append(float(v.get("shown", 0)))
                        else:
                            rate = _rate(v.get(key, 0), v.get("shown", 0))
                            values.append(0.0 if rate is None else rate * 100)
                    ax.barh([y + offset for y in ys], values, 0.38, color=colour, hatch=hatch,
                            edgecolor="white", label=label)
                ax.set_xlabel(word)
            axes[0].set_yticks(ys, shared)
            axes[0].set_ylabel("rule")
            axes[-1].legend(loc="lower right", frameon=False)
            fig.suptitle(title)
            body.append("<h2>Before and after a knowledge change</h2>" + ch.svg(fig, title))

    # tables
    body.append("<h2>Figures per rule</h2>")
    body.append(_table(
        ["rule", "shown", "silent", "accepted", "overridden", "acceptance", "override"],
        ([esc(name), esc(v["shown"]), esc(v["silent"]), esc(v["accepted"]),
          esc(v["overridden"]), _pct(_rate(v["accepted"], v["shown"])),
          _pct(_rate(v["overridden"], v["shown"]))]
         for name, v in ((name, by_rule[name]) for name in rules)), {1, 2, 3, 4, 5, 6}))
    body.append("<h2>Figures per rule, knowledge digest, week and indicator</h2>")
    body.append(_table(
        ["rule", "knowledge", "week", "indicator", "shown", "silent", "accepted", "overridden",
         "acceptance", "override", "override reasons"],
        ([esc(r["ruleId"]), f"<code>{esc(str(r.get('knowledgeDigest') or '')[:12])}</code>",
          esc(r["week"]), esc(r.get("indicator")), esc(r.get("shown", 0)),
          esc(r.get("silent", 0)), esc(r.get("accepted", 0)), esc(r.get("overridden", 0)),
          _pct(r.get("acceptRate")), _pct(r.get("overrideRate")),
          "; ".join(f"{esc(code)} ({esc(k)})"
                    for code, k in sorted((r.get("overrideReasons") or {}).items()))]
         for r in rows), {4, 5, 6, 7, 8, 9}))
    return _page("Alert burden and feedback", meta_html, "".join(body))
