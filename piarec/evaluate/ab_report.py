"""The A/B report's figures from per-arm user sums: the table, the plot and the page.

The Spark job (``pipelines/ab_report.py``) reduces the events of a period to, per arm and
per scope (the whole period, and each day), the :class:`~piarec.evaluate.ab.UserSums` of
every ratio metric and a few counts. Here they become rows with delta-method intervals and
the uplift of each arm against the control (:mod:`piarec.evaluate.ab`), a PNG with one
panel per metric over the days, and a one-page HTML report. No Spark.

The metrics (docs/ab-logging.md): ``click_rate_per_view`` (clicks on recommended titles /
views), ``click_rate_per_user_view`` (user-days with such a click / user-days with a view),
``playtime_per_user_view`` (seconds played of recommended titles started from the card /
user-days with a view), ``rec_plays_per_user`` (plays of recommended titles from anywhere /
assigned users).
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any, Mapping

from piarec.evaluate.ab import Srm, UserSums, ratio_from_sums, uplift

RATIO_METRICS = ("click_rate_per_view", "click_rate_per_user_view", "playtime_per_user_view", "rec_plays_per_user")
COUNT_METRICS = ("assigned_users", "users_with_view", "views", "clicks", "coverage")
LABELS = {
    "click_rate_per_view": "click rate per view",
    "click_rate_per_user_view": "click rate per daily user view",
    "playtime_per_user_view": "playtime (s) per daily user view",
    "rec_plays_per_user": "plays of recommended titles per user",
}
PERIOD = "period"


def figures(sums: Mapping[tuple[str, str | None, str, str], UserSums], counts: Mapping[tuple[str, str | None, str], dict],
            control: str, confidence: float = 0.95) -> list[dict[str, Any]]:
    """Rows of the report table, one per (scope, day, arm, metric).

    ``sums[(scope, day, arm, metric)]``: the user sums of a ratio metric (scope ``period``
    with day None, or ``day`` with an ISO date); ``counts[(scope, day, arm)]``: that scope's
    counts. A treatment arm's row carries its uplift against ``control`` in the same scope."""
    rows = []
    keys = sorted({k[:3] for k in counts}, key=lambda k: (k[0] != PERIOD, k[1] or "", k[2] != control, k[2]))
    for scope, day, arm in keys:
        for metric in RATIO_METRICS:
            got = sums.get((scope, day, arm, metric))
            rows.append(_ratio_row(scope, day, arm, metric, got, sums.get((scope, day, control, metric)),
                                   control, confidence))
        for metric in COUNT_METRICS:
            rows.append({"scope": scope, "day": day, "arm": arm, "metric": metric,
                         "value": float(counts[(scope, day, arm)][metric]), **_EMPTY})
    return rows


_EMPTY = {"low": None, "high": None, "n_users": None, "control": None, "uplift": None, "uplift_low": None,
          "uplift_high": None, "p_value": None}


def _ratio_row(scope, day, arm, metric, got: UserSums | None, base: UserSums | None, control: str,
               confidence: float) -> dict[str, Any]:
    row = {"scope": scope, "day": day, "arm": arm, "metric": metric, "value": None, **_EMPTY}
    est = _estimate(got, confidence)
    if est is None:
        return row
    row.update(value=est.value, low=est.low, high=est.high, n_users=est.n_users)
    ref = _estimate(base, confidence)
    if arm != control and ref is not None:
        u = uplift(ref, est)
        row.update(control=control, uplift=_finite(u.rel), uplift_low=_finite(u.rel_low),
                   uplift_high=_finite(u.rel_high), p_value=u.p_value)
    return row


def _estimate(sums: UserSums | None, confidence: float):
    if sums is None or sums.n < 2 or not sums.x > 0:
        return None  # too few users, or no view at all: no interval
    return ratio_from_sums(sums, confidence=confidence)


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def summary_lines(rows: list[dict[str, Any]], srm: Srm, control: str) -> list[str]:
    """The period's figures as text: per metric, each arm's value with its interval and,
    for treatments, the uplift against the control; then the sample-ratio check."""
    out = []
    period = [r for r in rows if r["scope"] == PERIOD]
    for metric in RATIO_METRICS:
        parts = []
        for r in (r for r in period if r["metric"] == metric and r["value"] is not None):
            text = f"{r['arm']} {r['value']:.4g} [{r['low']:.4g}, {r['high']:.4g}]"
            if r["uplift"] is not None:
                text += f" ({r['uplift']:+.1%} [{r['uplift_low']:+.1%}, {r['uplift_high']:+.1%}] vs {control})"
            parts.append(text)
        out.append(f"{LABELS[metric]}: " + "; ".join(parts or ["no data"]))
    verdict = "MISMATCH: the figures are not a result" if srm.mismatch else "ok"
    out.append(f"sample ratio (users with a view): {srm.observed} vs shares {srm.expected}, chi2 {srm.chi2:.2f}, "
               f"p {srm.p_value:.3g} -> {verdict}")
    return out


def plot_png(rows: list[dict[str, Any]]) -> bytes:
    """One panel per ratio metric: each arm's daily value with its interval band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    daily = [r for r in rows if r["scope"] == "day"]
    arms = list(dict.fromkeys(r["arm"] for r in daily))
    fig, axes = plt.subplots(1, len(RATIO_METRICS), figsize=(4.2 * len(RATIO_METRICS), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], RATIO_METRICS):
        for arm in arms:
            pts = [r for r in daily if r["metric"] == metric and r["arm"] == arm and r["value"] is not None]
            if not pts:
                continue
            x = [r["day"][5:] for r in pts]
            ax.plot(x, [r["value"] for r in pts], marker="o", label=arm)
            ax.fill_between(x, [r["low"] for r in pts], [r["high"] for r in pts], alpha=0.2)
        ax.set_title(LABELS[metric], fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _p(p: float | None) -> str:
    """A p-value as text; one below double precision's resolution reads ``< 1e-15``."""
    if p is None:
        return ""
    return "< 1e-15" if p < 1e-15 else f"{p:.3g}"


def html_page(title: str, lines: list[str], rows: list[dict[str, Any]], png: bytes, arms: Mapping[str, dict]) -> str:
    """The one-page report: the summary, the arms, the plot and the period's table."""
    esc = html.escape
    arm_rows = "".join(f"<tr><td>{esc(a)}</td><td>{esc(str(m.get('version')))}</td><td>{esc(str(m.get('uri')))}</td>"
                       f"<td>{m.get('share')}</td></tr>" for a, m in arms.items())
    period = [r for r in rows if r["scope"] == PERIOD]

    def cell(v, fmt="{:.4g}"):
        return "" if v is None else fmt.format(v)

    table = "".join(
        f"<tr><td>{esc(r['arm'])}</td><td>{esc(r['metric'])}</td><td>{cell(r['value'])}</td>"
        f"<td>{cell(r['low'])}</td><td>{cell(r['high'])}</td><td>{cell(r['uplift'], '{:+.1%}')}</td>"
        f"<td>{cell(r['uplift_low'], '{:+.1%}')}</td><td>{cell(r['uplift_high'], '{:+.1%}')}</td>"
        f"<td>{_p(r['p_value'])}</td></tr>" for r in period)
    img = base64.b64encode(png).decode()
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}}td,th{{padding:2px 8px;text-align:right}}
td:first-child,td:nth-child(2){{text-align:left}}table{{border-collapse:collapse}}tr:nth-child(even){{background:#f3f3f3}}img{{max-width:100%}}</style>
</head><body><h2>{esc(title)}</h2><ul>{''.join(f'<li>{esc(line)}</li>' for line in lines)}</ul>
<h3>Arms</h3><table><tr><th>arm</th><th>model version</th><th>model</th><th>share</th></tr>{arm_rows}</table>
<h3>Per day</h3><img alt="metrics per day" src="data:image/png;base64,{img}">
<h3>Over the period</h3><table><tr><th>arm</th><th>metric</th><th>value</th><th>low</th><th>high</th>
<th>uplift</th><th>low</th><th>high</th><th>p</th></tr>{table}</table></body></html>
"""
