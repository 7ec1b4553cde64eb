"""An inline SVG chart of one series' recent scores: observed, expected band, score, flags.

Server-side and script-free, so the status page shows it in any browser (and in a terminal
browser's dump) with nothing to load. Two panels on one time axis: the observed value over
its expected band, and the anomaly score with its 1.0 threshold; flagged runs are shaded in
both, and the points an explanation names are circled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from html import escape

import numpy as np

WIDTH, LEFT, RIGHT = 960, 84, 16
TOP_H, SCORE_H, GAP, PAD_TOP, AXIS_H = 230, 110, 26, 8, 22
_BIG = np.finfo(np.float64).max / 2
SCORE_CAP = 20.0  # the score axis stops here: one huge spike must not flatten the rest
_TIME_STEPS = [60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
               2 * 86400, 7 * 86400]


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values (1, 2, 5 x 10^k apart) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    if not math.isfinite(hi - lo):  # a span past the largest float: its ends will do
        return [lo, hi]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) index of each run of True."""
    out, start = [], None
    for i, v in enumerate(mask):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i - 1))
            start = None
    if start is not None:
        out.append((start, len(mask) - 1))
    return out


def _path(xs: np.ndarray, ys: np.ndarray) -> str:
    """An SVG path through the finite points, broken at gaps."""
    parts = []
    for a, b in _runs(np.isfinite(ys)):
        pts = " L".join(f"{xs[i]:.1f} {ys[i]:.1f}" for i in range(a, b + 1))
        parts.append(f"M{pts}")
    return " ".join(parts)


def _time_label(t: float, span: float) -> str:
    dt = datetime.fromtimestamp(t, tz=UTC)
    return dt.strftime("%m-%d %H:%M" if span > 86400 else "%H:%M")


def render(rows: Mapping[str, np.ndarray], fmt: Callable[[float], str], step: float,
           marks: Sequence[float] = (), title: str = "") -> str:
    """The chart of `rows` ("timestamp", "observed", "expected", "lower", "upper", "score",
    "flag", each (N,)) as an <svg> element; `fmt` writes values in the series' unit and
    `marks` are timestamps to circle (an explanation's main drivers)."""
    t = np.asarray(rows["timestamp"], dtype=np.float64)
    get = {k: np.asarray(rows[k], dtype=np.float64) for k in
           ("observed", "expected", "lower", "upper", "score", "flag")}
    height = PAD_TOP + TOP_H + GAP + SCORE_H + AXIS_H
    x0, x1 = LEFT, WIDTH - RIGHT
    t0, t1 = (float(t[0]), float(t[-1])) if len(t) else (0.0, 1.0)
    if t1 <= t0:
        t0, t1 = t0 - step, t1 + step
    xs = x0 + (t - t0) / (t1 - t0) * (x1 - x0)
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" id="chart" '
            f'viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img" '
            f'aria-label="{escape(title)}">'), f"<title>{escape(title)}</title>"]

    # Value panel.
    vy0, vy1 = PAD_TOP, PAD_TOP + TOP_H
    vals = np.concatenate([get["observed"], get["lower"], get["upper"]])
    vals = vals[np.isfinite(vals)]
    lo, hi = (float(vals.min()), float(vals.max())) if len(vals) else (0.0, 1.0)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        pad = abs(hi) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    lo, hi = max(lo, -_BIG), min(hi, _BIG)
    # Positions are computed on values divided by the largest magnitude, so that spans past
    # the largest float (-1e308 .. 1e308) cannot overflow.
    unit = max(abs(lo), abs(hi), 1.0)
    u_lo, u_hi = lo / unit, hi / unit
    u_lo, u_hi = u_lo - 0.05 * (u_hi - u_lo), u_hi + 0.05 * (u_hi - u_lo)

    def vy(v: np.ndarray) -> np.ndarray:
        return vy1 - (np.asarray(v) / unit - u_lo) / (u_hi - u_lo) * (vy1 - vy0)

    # Score panel.
    sy0, sy1 = vy1 + GAP, vy1 + GAP + SCORE_H
    score = get["score"]
    fin = score[np.isfinite(score)]
    s_lo = min(0.0, float(fin.min())) if len(fin) else 0.0
    s_hi = min(max(1.5, float(fin.max()) * 1.05 if len(fin) else 1.5), SCORE_CAP)
    s_lo = max(s_lo, -SCORE_CAP)

    def sy(v: np.ndarray) -> np.ndarray:
        return sy1 - (np.clip(v, s_lo, s_hi) - s_lo) / (s_hi - s_lo) * (sy1 - sy0)

    out.append(f'<rect class="frame" x="{x0}" y="{vy0}" width="{x1 - x0}" height="{TOP_H}"/>')
    out.append(f'<rect class="frame" x="{x0}" y="{sy0}" width="{x1 - x0}" height="{SCORE_H}"/>')
    half = 0.5 * step / (t1 - t0) * (x1 - x0)
    for a, b in _runs(np.nan_to_num(get["flag"]) >= 1):
        xa, xb = max(x0, xs[a] - half), min(x1, xs[b] + half)
        tip = f"flagged {_time_label(t[a], 0)}-{_time_label(t[b], 0)} UTC"
        for y, h in ((vy0, TOP_H), (sy0, SCORE_H)):
            out.append(f'<rect class="flag" x="{xa:.1f}" y="{y}" width="{max(xb - xa, 1.0):.1f}" '
                       f'height="{h}"><title>{tip}</title></rect>')
    for v in nice_ticks(lo, hi):
        y = float(vy(np.array(v)))
        out.append(f'<line class="grid" x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}"/>'
                   f'<text class="tick" x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f"{escape(fmt(v))}</text>")
    for v in nice_ticks(s_lo, s_hi, 3):
        y = float(sy(np.array(v)))
        out.append(f'<line class="grid" x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}"/>'
                   f'<text class="tick" x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f"{v:g}</text>")
    span = t1 - t0
    every = next((s for s in _TIME_STEPS if span / s <= 8), _TIME_STEPS[-1])
    tick = math.ceil(t0 / every) * every
    while tick <= t1:
        x = x0 + (tick - t0) / span * (x1 - x0)
        out.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{vy0}" y2="{sy1}"/>'
                   f'<text class="tick" x="{x:.1f}" y="{sy1 + 16}" text-anchor="middle">'
                   f"{_time_label(tick, span)}</text>")
        tick += every

    lower, upper = get["lower"], get["upper"]
    for a, b in _runs(np.isfinite(lower) & np.isfinite(upper)):
        top = " ".join(f"{xs[i]:.1f},{float(vy(upper[i])):.1f}" for i in range(a, b + 1))
        bottom = " ".join(f"{xs[i]:.1f},{float(vy(lower[i])):.1f}" for i in range(b, a - 1, -1))
        out.append(f'<polygon class="band" points="{top} {bottom}"/>')
    out.append(f'<path class="expected" d="{_path(xs, vy(get["expected"]))}"/>')
    out.append(f'<path class="observed" d="{_path(xs, vy(get["observed"]))}"/>')
    y1 = float(sy(np.array(1.0)))
    out.append(f'<line class="threshold" x1="{x0}" x2="{x1}" y1="{y1:.1f}" y2="{y1:.1f}"/>'
               f'<text class="tick threshold-label" x="{x1 - 4}" y="{y1 - 4:.1f}" '
               f'text-anchor="end">threshold 1.0</text>')
    out.append(f'<path class="score" d="{_path(xs, sy(score))}"/>')
    for m in marks:
        i = int(np.searchsorted(t, m - 1e-6 * step))
        if i < len(t) and abs(t[i] - m) <= 1e-6 * step and math.isfinite(get["observed"][i]):
            out.append(f'<circle class="driver" cx="{xs[i]:.1f}" '
                       f'cy="{float(vy(get["observed"][i])):.1f}" r="5"><title>drives the '
                       f'score: {_time_label(t[i], 0)} UTC, {escape(fmt(get["observed"][i]))}'
                       f"</title></circle>")
    out.append(f'<text class="panel-label" x="{x0 + 6}" y="{vy0 + 14}">observed, expected '
               f'band</text><text class="panel-label" x="{x0 + 6}" y="{sy0 + 14}">anomaly '
               f"score</text>")
    out.append("</svg>")
    return "\n".join(out)


CSS = """
svg.chart{background:#fff;font:11px system-ui,sans-serif;max-width:100%;height:auto}
svg.chart .frame{fill:none;stroke:#ccc}svg.chart .grid{stroke:#eee}
svg.chart .tick{fill:#666}svg.chart .panel-label{fill:#444;font-weight:600}
svg.chart .band{fill:#9ecae1;fill-opacity:.45;stroke:none}
svg.chart .expected{fill:none;stroke:#3182bd;stroke-dasharray:4 3;stroke-width:1.2}
svg.chart .observed{fill:none;stroke:#111;stroke-width:1.5}
svg.chart .score{fill:none;stroke:#e6550d;stroke-width:1.5}
svg.chart .threshold{stroke:#d62728;stroke-dasharray:6 4}
svg.chart .threshold-label{fill:#d62728}
svg.chart .flag{fill:#d62728;fill-opacity:.15}
svg.chart .driver{fill:none;stroke:#d62728;stroke-width:2}
"""
