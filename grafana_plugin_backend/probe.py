"""`promvae check-config --probe`: run each query against Prometheus before serving it.

For every query: how many series it returns now, how much history each has at the configured
step (observed points, counted by Prometheus itself with a subquery, so nothing big is
downloaded), whether that is enough to train (window + 32 observed points) and, if not, when
it will be, and what step or window the history there is would support.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from detector import min_train_points

from .config.base import format_duration
from .config.settings import Config
from .service.poller import grid_floor
from .service.progress import human_wait
from .source.prometheus import PrometheusSource, Source, SourceError


@dataclass(frozen=True)
class QueryProbe:
    name: str
    series: int  # series the query returns now (with any point in the history)
    points: list[int]  # observed points per series at `step` within `history`
    spans: list[float]  # seconds from each series' first point to now
    error: str = ""


def probe_query(source: Source, expr: str, cfg: Config, now: float) -> tuple[list[int],
                                                                            list[float]]:
    """(observed points, history span in seconds) per series of `expr`, as Prometheus counts
    them on the step grid over the configured history (one subquery each, evaluated once)."""
    step, t = cfg.step, grid_floor(now, cfg.step)
    rng = f"[{format_duration(cfg.history)}:{format_duration(step)}]"
    counts = source.query_range(f"count_over_time(({expr}){rng})", t, t, step)
    firsts = source.query_range(f"min_over_time(timestamp({expr}){rng})", t, t, step)
    first_of = {tuple(sorted(r.labels.items())): float(r.values[-1]) for r in firsts
                if len(r.values)}
    points, spans = [], []
    for r in counts:
        if not len(r.values):
            continue
        points.append(int(r.values[-1]))
        first = first_of.get(tuple(sorted(r.labels.items())), t)
        spans.append(max(0.0, t - first) + step)
    return points, spans


def probe(cfg: Config, source: Source | None = None,
          clock: Callable[[], float] = time.time) -> list[QueryProbe]:
    """Probe every configured query; errors are reported per query, never raised."""
    own = source is None
    src = source if source is not None else PrometheusSource(cfg.prometheus)
    out = []
    try:
        for q in cfg.queries:
            try:
                points, spans = probe_query(src, q.expr, cfg, clock())
            except SourceError as e:
                out.append(QueryProbe(q.name, 0, [], [], f"{e.reason}: {e}"))
                continue
            out.append(QueryProbe(q.name, len(points), points, spans))
    finally:
        if own:
            src.close()
    return out


def report(cfg: Config, results: list[QueryProbe]) -> tuple[list[str], bool]:
    """Lines for people, and whether every query answered with at least one series."""
    need = min_train_points(cfg.vae_config())
    step, window = cfg.step, cfg.window
    lines, ok = [], True
    for r in results:
        if r.error:
            ok = False
            lines.append(f"  query {r.name}: FAILED ({r.error})")
            continue
        if not r.series:
            ok = False
            lines.append(f"  query {r.name}: returns no series now: check the expression (and "
                         "that Prometheus scrapes its metrics)")
            continue
        span, most = max(r.spans), max(r.points)
        ready = sum(p >= need for p in r.points)
        spans = _range(_dur(min(r.spans)), _dur(span))
        points = _range(str(min(r.points)), str(most))
        lines.append(f"  query {r.name}: {r.series} series; history {spans}, {points} observed "
                     f"points at step {format_duration(step)} (history "
                     f"{format_duration(cfg.history)})")
        if ready == r.series:
            lines.append(f"    all can train now (window {window} needs {need} observed points)")
        else:
            wait = (need - most) * step
            first = (f"the first in {human_wait(wait)}" if ready == 0
                     else f"{ready} can train now")
            lines.append(f"    {r.series - ready} of {r.series} series need more history: "
                         f"window {window} needs {need} observed points; {first}")
        fits = most - (need - window)  # the widest window this history trains
        fits_at = f"window up to {fits}" if fits >= 2 else "no window"
        best_step = math.floor(span / need)
        step_text = (f"step {format_duration(best_step)} or less for window {window} (not "
                     "below the scrape interval)"
                     if best_step >= 1 else f"no step for window {window} yet")
        lines.append(f"    this history supports: {fits_at} at step {format_duration(step)}; "
                     f"{step_text}")
    return lines, ok


def _range(lo: str, hi: str) -> str:
    return lo if lo == hi else f"{lo} to {hi}"


def _dur(seconds: float) -> str:
    return human_wait(seconds).removeprefix("about ")
