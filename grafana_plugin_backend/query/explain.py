"""Which points of a series' window drive its anomaly score at a time.

The points are those of the `smooth` windows whose raw scores the score at that time
averages. They come from the poller's raw buffer when it holds them (the newest
points, what the status page asks about), else from the source, like an on-demand query.
The score at the time is recomputed with the series' current model from the same points
(lead-in included), so the explanation and the score always belong to the same model.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from detector import Series, explain_window, lead_in_points, regularize

from ..service.poller import grid_floor
from ..service.registry import READY, SeriesState, series_id
from ..source.prometheus import SourceError, only_series
from .params import fmt_time
from .promql import ALL_METRICS, QueryError, matches_all, parse_selector

log = logging.getLogger(__name__)

TOP = 5  # points listed as the main drivers
POINT_FIELDS = ("timestamp", "observed", "expected", "lower", "upper", "nll", "share")


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def find_series(svc: Any, text: str) -> SeriesState:
    """The live series named by `text`: a series id, or a selector matching exactly one."""
    s = svc.registry.get(text)
    if s is not None:
        return s
    try:
        matchers = parse_selector(text)
    except QueryError:
        raise QueryError("bad_data", f"invalid parameter 'series': {text[:200]!r} is neither a "
                         "series id (see /api/v1/status/models) nor a selector like "
                         '{anomaly_query="cpu",instance="a:9100"}') from None
    found = [s for s in svc.registry.all()
             if any(matches_all({**s.exposed, "__name__": n}, matchers) for n in ALL_METRICS)]
    if not found:
        raise QueryError("not_found", f"no live series matches {text[:200]!r}", 404)
    if len(found) > 1:
        raise QueryError("bad_data", f"{len(found)} series match {text[:200]!r}; add labels "
                         "so that exactly one does")
    return found[0]


def _points(svc: Any, s: SeriesState, start: float, end: float) -> Series:
    """Raw points of `s` on the grid [start, end]: the poller's buffer if it covers them."""
    step = float(svc.cfg.step)
    eps = 1e-6 * step
    with svc.registry.lock:
        ts, vs = s.buf_ts.copy(), s.buf_vals.copy()
    if len(ts) and ts[0] <= start + eps and ts[-1] >= end - eps:
        keep = (ts >= start - eps) & (ts <= end + eps)
        return regularize(ts[keep], vs[keep], step)
    expr = next((q.expr for q in svc.queries if q.name == s.query), None)
    if expr is None:
        raise QueryError("not_found", f"query {s.query!r} is no longer configured", 404)
    if getattr(svc.source, "narrowable", False):
        expr = only_series(expr, [s.labels])
    try:
        found = svc.source.query_range(expr, start, end, step)
    except SourceError as e:
        raise QueryError("unavailable", f"cannot read the source series of {s.query!r}: "
                         f"{e}") from None
    rs = {series_id(s.query, r.labels): r for r in found}.get(s.id)
    if rs is None:
        return Series(np.empty(0), np.empty(0))
    return regularize(rs.timestamps, rs.values, step)


def explain(svc: Any, s: SeriesState, t: float | None = None, top: int = TOP) -> dict[str, Any]:
    """The explanation of series `s` at time `t` (default: its newest scored point) as JSON.

    QueryError for a series without a model, a time without data or a window too sparse.
    """
    step = float(svc.cfg.step)
    with svc.registry.lock:
        model, state = s.model, s.state
        recent_t = s.recent.get("timestamp")
        newest = float(recent_t[-1]) if recent_t is not None and len(recent_t) else math.nan
    if model is None or state != READY:
        raise QueryError("execution", f"series {s.id} has no model yet (state {state}"
                         + (f": {s.last_error}" if s.last_error else "") + ")")
    if t is None:
        if not math.isfinite(newest):
            raise QueryError("execution", f"series {s.id} has no scored point yet; give 'time'")
        t = newest
    t = grid_floor(t, step)
    # The smoothing's windows, and the window ending at each of their points for its band.
    lead = lead_in_points(model.config) + model.config.window - 1
    ser = _points(svc, s, t - lead * step, t)
    if not len(ser) or ser.timestamps[-1] < t - 1e-6 * step:
        last = f"; its newest point is {fmt_time(ser.timestamps[-1])}" if len(ser) else ""
        raise QueryError("execution", f"no data of series {s.id} at time {fmt_time(t)}{last}")
    try:
        ex = explain_window(model, ser, t)
    except ValueError as e:
        raise QueryError("execution",
                         f"cannot explain series {s.id} at {fmt_time(t)}: {e}") from None
    res = svc.poller.score_fn([model], [ser])[0]
    i = len(res.timestamps) - 1
    fields = {"timestamp": ex.timestamps, "observed": ex.observed, "expected": ex.expected,
              "lower": ex.lower, "upper": ex.upper, "nll": ex.nll, "share": ex.share}
    values = [[_num(float(fields[k][j])) for k in POINT_FIELDS] for j in range(len(ex.timestamps))]
    return {
        "series": {"id": s.id, "anomaly_query": s.query, "labels": dict(s.exposed)},
        "time": fmt_time(t),
        "step": step,
        "window": model.config.window,
        "windows": ex.windows,
        "score": _num(float(res.score[i])),
        "flag": _num(float(res.flag[i])),
        "raw": _num(ex.raw),
        "threshold": _num(float(model.threshold_)),
        "trained_at": _num(float(model.trained_at)),
        "points": {"fields": list(POINT_FIELDS), "values": values},
        "top": [dict(zip(POINT_FIELDS, values[j])) for j in ex.top(top)],
    }
