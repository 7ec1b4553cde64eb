"""`promvae backtest --query`: pull a query's history from the source and replay the service on it.

The history is pulled as the trainer pulls it (the query's expression on the `step` grid, in
range requests of at most the source's points per request), from `history` before the range
on, so each series' first model trains on what the service would have found had it started
at the range's start. Then the series retrain and calibrate as deployed (detector.deploy),
and the range is reported: flag episodes, share of time flagged, the worst incidents.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from detector import regularize
from detector.backtest import RangeBacktest, backtest_range
from detector.deploy import retrain_phase
from detector.report import QueryReport, SeriesReport, fmt_duration, fmt_time, summarize
from detector.scoring import ScoreResult

from .config.base import format_duration, parse_duration
from .config.settings import Config, QueryConfig
from .service.registry import series_id
from .source.demo import QUERIES as DEMO_QUERIES
from .source.demo import DemoSource
from .source.prometheus import MAX_POINTS, PrometheusSource, Source, chunk_ranges, grid_points

Progress = Callable[[str], None]


class BacktestError(ValueError):
    """Bad input for a backtest (an unknown query, a bad time range): one sentence."""


def parse_time(text: str, now: float) -> float:
    """Unix seconds, RFC 3339 / ISO 8601 (UTC unless it says otherwise), `now` or `now-2d`."""
    s = text.strip()
    if s == "now":
        return now
    if s.startswith("now-"):
        try:
            return now - parse_duration(s[4:])
        except ValueError:
            raise BacktestError(f"cannot parse time {text!r}: {s[4:]!r} is no duration") from None
    try:
        return float(s)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        raise BacktestError(f"cannot parse time {text!r} (use unix seconds, RFC 3339 such as "
                            "2026-11-25T00:00:00Z, now or now-2d)") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def time_range(range_: str | None, start: str | None, end: str | None,
               now: float) -> tuple[float, float]:
    """(start, end) from --range and/or --start/--end; --end defaults to now."""
    if range_ is not None and start is not None:
        raise BacktestError("give --range or --start, not both")
    if range_ is None and start is None:
        raise BacktestError("give the time range: --range DURATION (e.g. 7d), or --start TIME "
                            "[--end TIME]")
    t1 = parse_time(end, now) if end is not None else now
    if range_ is not None:
        try:
            span = parse_duration(range_)
        except ValueError as e:
            raise BacktestError(f"--range: {e}") from None
        t0 = t1 - span
    else:
        t0 = parse_time(start, now)
    if not t1 > t0:
        raise BacktestError(f"the range is empty: start {fmt_time(t0)} is not before end "
                            f"{fmt_time(t1)} UTC")
    if t1 > now + 60:
        raise BacktestError(f"--end {fmt_time(t1)} UTC is in the future")
    return t0, t1


def pick_query(cfg: Config, name: str | None, expr: str | None) -> QueryConfig:
    """The query to backtest: a configured one by name, or an ad-hoc expression."""
    if (name is None) == (expr is None):
        raise BacktestError("give exactly one of --query NAME and --expr PROMQL")
    if expr is not None:
        if not expr.strip():
            raise BacktestError("--expr is empty")
        return QueryConfig(expr.strip(), expr.strip())
    queries = queries_of(cfg)
    for q in queries:
        if q.name == name:
            return q
    where = "the built-in demo" if cfg.demo else "the config"
    known = ", ".join(q.name for q in queries) or "none"
    raise BacktestError(f"no query named {name!r} in {where} (queries: {known})")


def queries_of(cfg: Config) -> Sequence[QueryConfig]:
    return DEMO_QUERIES if cfg.demo else cfg.queries


def make_source(cfg: Config, clock: Callable[[], float] = time.time) -> Source:
    return DemoSource(clock=clock) if cfg.demo else PrometheusSource(cfg.prometheus)


def series_name(labels: Mapping[str, str]) -> str:
    """Prometheus' spelling of a series: name{k="v", ...}, labels sorted."""
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
    return f"{labels.get('__name__', '')}{{{inner}}}"


def _mode(cfg: Config, train_once: bool) -> str:
    if train_once:
        return "trained once on the history before the range"
    adapt = (f"new normal after {format_duration(cfg.adapt_after)}" if cfg.adapt_after
             else "no new normal")
    return (f"deployed: retrain every {format_duration(cfg.retrain_every)} on "
            f"{format_duration(cfg.history)}, {adapt}")


def _note(bt: RangeBacktest, cfg: Config) -> str:
    parts = []
    if bt.cold_start:
        parts.append(f"too little history before the range: first model at "
                     f"{fmt_time(bt.first_model_at)} UTC on {fmt_duration(bt.first_history)} "
                     "of data (as if the service had started then), scored from there")
    if bt.failed:
        parts.append(f"{bt.failed} of {bt.retrains} retrains failed (the previous model "
                     "kept serving)")
    if bt.adaptations:
        parts.append(f"{bt.adaptations} change(s) adopted as the new normal after "
                     f"{format_duration(cfg.adapt_after)}, {bt.early} early retrain(s)")
    return "; ".join(parts)


@dataclass
class Outcome:
    report: QueryReport
    results: dict[str, ScoreResult]  # by series name, for the plot


def run(cfg: Config, source: Source, query: QueryConfig, start: float, end: float,
        train_once: bool = False, progress: Progress = lambda _m: None) -> Outcome:
    """Pull, replay and summarise one query over [start, end]; raises SourceError or
    BacktestError (no series)."""
    step = cfg.step
    t0 = math.ceil(start / step - 1e-9) * step  # the service's grid: multiples of step
    t1 = math.floor(end / step + 1e-9) * step
    if t1 < t0:
        raise BacktestError(f"the range holds no point of the {format_duration(step)} grid")
    pull_from = t0 - cfg.history
    n = grid_points(pull_from, t1, step)
    requests_ = len(chunk_ranges(pull_from, t1, step, MAX_POINTS))
    progress(f"pulling {query.name} from {source.describe()}: {fmt_time(pull_from)} to "
             f"{fmt_time(t1)} UTC at step {format_duration(step)} (the range plus "
             f"{format_duration(cfg.history)} of history before it; up to {n} points per "
             f"series, {requests_} range request(s) of at most {MAX_POINTS} points)")
    began = time.monotonic()
    found = source.query_range(query.expr, pull_from, t1, step)
    if not found:
        raise BacktestError(f"query {query.name} returned no series from {fmt_time(pull_from)} "
                            f"to {fmt_time(t1)} UTC")
    found = sorted(found, key=lambda rs: series_name(rs.labels))
    if len(found) > cfg.max_series:  # the service's cardinality cap holds here too
        progress(f"query {query.name} has {len(found)} series; backtesting the first "
                 f"{cfg.max_series} by name (max_series)")
        found = found[: cfg.max_series]
    names = [series_name(rs.labels) for rs in found]
    grids = [regularize(rs.timestamps, rs.values, step) for rs in found]
    progress(f"pulled {len(found)} series, {sum(len(rs.timestamps) for rs in found)} points "
             f"in {time.monotonic() - began:.1f} s; training and scoring "
             f"({'train once' if train_once else 'deployed: first models, then retrains'})")
    began = time.monotonic()
    vae = cfg.vae_config()
    # Each series' retrains at its slot in the service (a hash of its id), as it would see them.
    phases = [retrain_phase(series_id(query.name, rs.labels), cfg.retrain_every) for rs in found]
    outs = backtest_range(grids, [step] * len(grids), t0, vae,
                          None if train_once else cfg.deployment(), log=progress,
                          warmup=cfg.retrain_every, phases=phases)
    progress(f"trained and scored {len(grids)} series in {time.monotonic() - began:.1f} s")
    reports: list[SeriesReport] = []
    results: dict[str, ScoreResult] = {}
    for name, out in zip(names, outs):
        if isinstance(out, Exception):
            reports.append(SeriesReport(name, step, error=str(out)))
            continue
        reports.append(summarize(name, out.result, step, t0, t1, _note(out, cfg)))
        results[name] = out.result
    return Outcome(QueryReport(query.name, t0, t1, _mode(cfg, train_once), reports), results)
