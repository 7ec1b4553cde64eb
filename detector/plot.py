"""The backtest report as a PNG: two panels per series for the series with the highest peaks.

Per series: the observed values with the expected band, and the score with the 1.0 line; flag
episodes are shaded on both. Drawn on a bare matplotlib Figure with the Agg canvas (no pyplot,
no display, no global state), so it runs headless and from any thread. The PNG's text
metadata carries the panel count and the series shown, for whoever checks it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure

from .report import QueryReport, fmt_time
from .scoring import ScoreResult

PANELS_PER_SERIES = 2
META_PANELS = "promvae:panels"
META_SERIES = "promvae:series"
_FLAG_COLOUR = "#d62728"


def _dates(t: np.ndarray) -> np.ndarray:
    """Unix seconds to datetime64, which matplotlib plots as dates (UTC)."""
    return (np.asarray(t, dtype=np.float64) * 1e3).astype("datetime64[ms]")


def build_figure(rep: QueryReport, results: Mapping[str, ScoreResult], top: int) -> Figure:
    """The report figure: PANELS_PER_SERIES axes for each of the `top` series by peak score."""
    shown = [s for s in rep.top(top) if s.name in results]
    rows = max(1, PANELS_PER_SERIES * len(shown))
    fig = Figure(figsize=(12, 1.9 * rows + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(f"promvae backtest of {rep.query}: {fmt_time(rep.start)} to "
                 f"{fmt_time(rep.end)} UTC, {rep.mode}", fontsize=10)
    if not shown:
        ax = fig.add_subplot(1, 1, 1)
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no series was scored", ha="center", va="center")
        return fig
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    start, end = _dates(np.array([rep.start, rep.end]))
    for k, s in enumerate(shown):
        r = results[s.name]
        keep = (r.timestamps >= rep.start) & (r.timestamps <= rep.end)
        t = _dates(r.timestamps[keep])
        obs, score = axes[2 * k], axes[2 * k + 1]
        obs.fill_between(t, r.lower[keep], r.upper[keep], color="#1f77b4", alpha=0.18,
                         linewidth=0, label="expected band")
        obs.plot(t, r.expected[keep], color="#1f77b4", linewidth=0.7, alpha=0.8,
                 label="expected")
        obs.plot(t, r.observed[keep], color="black", linewidth=0.6, label="observed")
        obs.set_title(f"{s.name}  (peak score {s.peak:.2f}, {len(s.episodes)} flag episodes)",
                      fontsize=9, loc="left")
        obs.legend(loc="upper right", fontsize=7, ncols=3)
        score.plot(t, r.score[keep], color="#ff7f0e", linewidth=0.7, label="score")
        score.axhline(1.0, color=_FLAG_COLOUR, linewidth=0.8, linestyle="--", label="1.0")
        score.set_ylabel("score", fontsize=8)
        if s.peak > 10:  # keep the 1.0 line readable beside a peak of 50
            score.set_yscale("symlog", linthresh=2.0)
        score.legend(loc="upper right", fontsize=7, ncols=2)
        for e in s.episodes:
            a, b = _dates(np.array([e.start, e.end + s.step]))
            for ax in (obs, score):
                ax.axvspan(a, b, color=_FLAG_COLOUR, alpha=0.2, linewidth=0)
    for ax in axes:
        ax.tick_params(labelsize=7)
        ax.set_xlim(start, end)
    loc = AutoDateLocator()
    axes[-1].xaxis.set_major_locator(loc)
    axes[-1].xaxis.set_major_formatter(ConciseDateFormatter(loc, tz=UTC))
    return fig


def write_plot(path: str | Path, rep: QueryReport, results: Mapping[str, ScoreResult],
               top: int = 3) -> int:
    """Write the report PNG; returns its number of data panels (0 when nothing was scored)."""
    fig = build_figure(rep, results, top)
    shown = [s.name for s in rep.top(top) if s.name in results]
    panels = PANELS_PER_SERIES * len(shown)
    meta = {META_PANELS: str(panels), META_SERIES: "\n".join(shown),
            "Software": "promvae", "Creation Time": datetime.now(UTC).isoformat()}
    fig.savefig(path, format="png", dpi=100, metadata=meta)
    return panels
