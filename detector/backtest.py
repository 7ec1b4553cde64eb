"""Backtests: train on the head of a series, score all of it causally, as deployed or once."""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

import numpy as np

from .config import VAEConfig, min_train_points
from .deploy import DEPLOYED, DeployedResult, Deployment, deployed_many
from .scoring import ScoreResult, score_many
from .series import Series, regularize
from .train import InsufficientDataError, fit_many


def default_train_points(n: int) -> int:
    """NAB's probationary period: min(floor(0.15 n), 750)."""
    return min(math.floor(0.15 * n), 750)


def infer_step(timestamps: np.ndarray) -> float:
    """The series' step: the median spacing of its sorted distinct timestamps."""
    t = np.unique(np.asarray(timestamps, dtype=np.float64))
    if len(t) < 2:
        raise ValueError("need at least two distinct timestamps to infer the step")
    return float(np.median(np.diff(t)))


def _grid(timestamps: np.ndarray, values: np.ndarray, step: float) -> tuple[Series, np.ndarray]:
    """The series on its grid, and each input row's position on it.

    Jittery timestamps (NAB's traffic series wander around their nominal step) would scatter
    over a grid and leave most of it empty; when the grid would be more than 1.5 times the
    rows, rows are taken as consecutive points at the median step instead.
    """
    t = np.asarray(timestamps, dtype=np.float64)
    grid = regularize(t, values, step)
    if len(grid) <= 1.5 * len(t):
        return grid, np.rint((t - grid.timestamps[0]) / step).astype(np.int64)
    order = np.argsort(t, kind="stable")
    pos = np.empty(len(t), dtype=np.int64)
    pos[order] = np.arange(len(t))
    pseudo = t[order][0] + step * np.arange(len(t))
    return Series(pseudo, np.asarray(values, dtype=np.float64)[order]), pos


def backtest(timestamps: np.ndarray, values: np.ndarray, train_points: int, config: VAEConfig,
             deployment: Deployment | None = DEPLOYED) -> tuple[ScoreResult, np.ndarray]:
    """Train on the first `train_points` input rows, score every row.

    Returns the result on the series' regular grid and each input row's position on it.
    """
    (scores,) = backtest_many([(timestamps, values, train_points)], config, keep_results=True,
                              deployment=deployment)
    if isinstance(scores, Exception):
        raise scores
    return scores


def backtest_series(timestamps: np.ndarray, values: np.ndarray, train_points: int, config: VAEConfig,
                    deployment: Deployment | None = DEPLOYED) -> np.ndarray:
    """Normalised anomaly scores (N,) aligned with the input rows; NaN for unscored rows."""
    (scores,) = backtest_many([(timestamps, values, train_points)], config, deployment=deployment)
    if isinstance(scores, Exception):
        raise scores
    return scores


def backtest_many(
    items: Sequence[tuple[np.ndarray, np.ndarray, int]],
    config: VAEConfig,
    progress=None,
    keep_results: bool = False,
    deployment: Deployment | None = DEPLOYED,
    log: Callable[[str], None] | None = None,
) -> list:
    """`backtest_series` for many series at once, in batched trainings and scoring passes.

    items: (timestamps, values, train_points) per series. Returns scores aligned with each
    input, or the Exception that kept a series from training. With keep_results, each entry
    is (ScoreResult on the grid, row positions on the grid) instead of scores.
    deployment: replay the service's retraining and calibration (the default; see
    detector.deploy). None: train once on the head and score the rest with that model.
    """
    grids, cuts, steps = [], [], []
    for timestamps, values, train_points in items:
        step = infer_step(timestamps)
        grid, pos = _grid(timestamps, values, step)
        cuts.append(int(np.sort(pos)[min(len(pos) - 1, max(0, train_points - 1))]))
        grids.append((grid, pos))
        steps.append(step)
    out: list = []
    if deployment is not None:
        results = deployed_many([g for g, _ in grids], cuts, steps, config, deployment, progress=log)
        for (_grid_s, pos), res in zip(grids, results):
            if isinstance(res, Exception):
                out.append(res)
            else:
                out.append((res.result, pos) if keep_results else res.result.score[pos])
        return out
    heads = [Series(g.timestamps[: c + 1], g.values[: c + 1]) for (g, _), c in zip(grids, cuts)]
    models = fit_many(heads, steps, config, progress=progress)
    ok = [i for i, m in enumerate(models) if not isinstance(m, Exception)]
    results = score_many([models[i] for i in ok], [grids[i][0] for i in ok])
    out = list(models)
    for i, res in zip(ok, results):
        pos = grids[i][1]
        out[i] = (res, pos) if keep_results else res.score[pos]
    return out


CSV_HEADER = ("timestamp", "value", "score", "flag", "expected", "lower", "upper")


def _parse_time(text: str) -> float:
    """Unix seconds, or an ISO 8601 / NAB 'YYYY-MM-DD HH:MM:SS' time (UTC if no zone)."""
    try:
        return float(text)
    except ValueError:
        pass
    dt = datetime.fromisoformat(text.strip())
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def read_csv(stream: TextIO) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read `timestamp,value` CSV: (raw timestamp strings, unix seconds, values).

    A header row is optional. Empty, 'NaN' or unparsable values become NaN (missing); an
    unparsable timestamp is an error naming the line.
    """
    raw, ts, vs = [], [], []
    for lineno, row in enumerate(csv.reader(stream), start=1):
        if not row or not "".join(row).strip():
            continue
        if lineno == 1 and row[0].strip().lower() in ("timestamp", "time", "ts"):
            continue
        if len(row) < 2:
            raise ValueError(f"line {lineno}: expected 'timestamp,value', got {','.join(row)!r}")
        try:
            t = _parse_time(row[0])
        except ValueError:
            raise ValueError(f"line {lineno}: cannot parse timestamp {row[0]!r}") from None
        try:
            v = float(row[1])
        except ValueError:
            v = math.nan
        raw.append(row[0])
        ts.append(t)
        vs.append(v)
    return raw, np.asarray(ts, dtype=np.float64), np.asarray(vs, dtype=np.float64)


def _fmt(x: float) -> str:
    return "" if not np.isfinite(x) else f"{x:.6g}"


def run_backtest_csv(
    stream: TextIO,
    out: TextIO,
    config: VAEConfig,
    train_points: int | None = None,
    log: Callable[[str], None] = lambda s: None,
    deployment: Deployment | None = DEPLOYED,
) -> list[tuple[str, float, float]]:
    """Backtest a `timestamp,value` CSV; writes `CSV_HEADER` rows, one per input row.

    Score, flag and band are empty for warm-up rows. Returns the incidents found:
    (first timestamp, last timestamp, peak score) for each run of flagged rows.
    """
    raw, ts, vs = read_csv(stream)
    n = len(ts)
    if n < 2:
        raise ValueError(f"need at least two rows of timestamp,value; got {n}")
    tp = default_train_points(n) if train_points is None else int(train_points)
    if not 0 < tp <= n:
        raise ValueError(f"--train-points must be between 1 and {n} rows, got {tp}")
    mode = ("train once" if deployment is None else
            f"deployed: retrain every {deployment.retrain_every / 3600:g} h on "
            f"{deployment.history / 86400:g} d")
    log(f"read {n} rows; first model on the first {tp} (window {config.window}; {mode})")
    t0 = time.time()
    (first,) = backtest_many([(ts, vs, tp)], config, keep_results=True, deployment=deployment,
                             log=log)
    if isinstance(first, Exception):
        raise first
    res, pos = first
    log(f"trained and scored in {time.time() - t0:.1f} s")
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_HEADER)
    incidents: list[tuple[str, float, float]] = []
    run_start, peak = None, -math.inf
    for i in range(n):
        j = pos[i]
        s, f = res.score[j], res.flag[j]
        w.writerow([raw[i], _fmt(vs[i]), _fmt(s), "" if not np.isfinite(f) else int(f),
                    _fmt(res.expected[j]), _fmt(res.lower[j]), _fmt(res.upper[j])])
        if np.isfinite(f) and f >= 1:
            if run_start is None:
                run_start, peak = raw[i], -math.inf
            peak = max(peak, float(s))
            last = raw[i]
        elif run_start is not None:
            incidents.append((run_start, last, peak))
            run_start = None
    if run_start is not None:
        incidents.append((run_start, last, peak))
    return incidents


@dataclass
class RangeBacktest:
    """One series' backtest over a time range: its result on the grid and how it was run."""

    result: ScoreResult  # every point of the pulled grid; before `first_model_at`: NaN
    first_model_at: float  # when the first model took over (unix s)
    first_history: float  # seconds of history the first model trained on
    cold_start: bool  # True: too little history before the range; the first model came later
    retrains: int = 0
    early: int = 0
    failed: int = 0
    adaptations: int = 0


def first_cut(grid: Series, start: float, config: VAEConfig, warmup: float = 0.0) -> tuple[int, bool]:
    """Index of the last point the first model trains on, and whether it is a cold start.

    A first model needs `min_train_points` observed points spanning at least `warmup`
    seconds. When the grid holds that before `start`, the first model is the one a service
    started at `start` would train (a warm start). Otherwise (a cold start) it is the one a
    service started as soon as the series had that much would train; a series shorter than
    `warmup` trains once it has `min_train_points`, as a new series does in the service.
    """
    need = min_train_points(config)
    v = np.isfinite(grid.values)
    seen = np.cumsum(v)
    if not len(seen) or seen[-1] < need:
        raise InsufficientDataError(
            f"only {int(seen[-1]) if len(seen) else 0} observed points; a model needs {need}")
    t = grid.timestamps
    step = float(t[1] - t[0]) if len(t) > 1 else 0.0
    enough = int(np.searchsorted(seen, need))
    spans = int(np.searchsorted(t, t[int(np.argmax(v))] + warmup - step - 1e-6))
    ready = max(enough, spans)
    before = int(np.searchsorted(t, start))  # points with t < start
    if ready <= before - 1:
        return before - 1, False
    return (ready if ready < len(t) else enough), True


def backtest_range(
    grids: Sequence[Series],
    steps: Sequence[float],
    start: float,
    config: VAEConfig,
    deployment: Deployment | None = DEPLOYED,
    log: Callable[[str], None] | None = None,
    warmup: float | None = None,
    phases: Sequence[float | None] | None = None,
) -> list[RangeBacktest | Exception]:
    """Replay the service on regular grids that begin up to `history` before `start`.

    The first model of each series trains on what the grid holds before `start`, or, with
    too little there, on its first `warmup` (default: the deployment's retrain_every, or a
    day trained once); see `first_cut`. Then, deployed, it retrains and calibrates as the
    service does; with deployment None that model scores the rest. Points up to the first
    model's are not scored. Returns per series a RangeBacktest or the Exception that kept
    it from training. phases: per series, its retrain phase in the service (see
    deployed_many), so the replayed retrains come at the service's slots.
    """
    if warmup is None:
        warmup = deployment.retrain_every if deployment is not None else 86400.0
    out: list[RangeBacktest | Exception] = [None] * len(grids)  # type: ignore[list-item]
    todo: list[int] = []
    cuts: dict[int, tuple[int, bool]] = {}
    for i, g in enumerate(grids):
        try:
            cuts[i] = first_cut(g, start, config, warmup)
            todo.append(i)
        except InsufficientDataError as e:
            out[i] = e
    if not todo:
        return out
    sub = [grids[i] for i in todo]
    if deployment is not None:
        results = deployed_many(sub, [cuts[i][0] for i in todo], [steps[i] for i in todo],
                                config, deployment, progress=log,
                                phases=None if phases is None else [phases[i] for i in todo])
    else:
        heads = [Series(g.timestamps[: cuts[i][0] + 1], g.values[: cuts[i][0] + 1])
                 for i, g in zip(todo, sub)]
        if log:
            log(f"training {len(heads)} models")
        models = fit_many(heads, [steps[i] for i in todo], config)
        ok = [k for k, m in enumerate(models) if not isinstance(m, Exception)]
        scored = score_many([models[k] for k in ok], [sub[k] for k in ok])
        results = list(models)
        for k, r in zip(ok, scored):
            results[k] = r
    for i, res in zip(todo, results):
        if isinstance(res, Exception):
            out[i] = res
            continue
        cut, cold = cuts[i]
        r = res.result if isinstance(res, DeployedResult) else res
        for a in (r.raw, r.score, r.flag, r.expected, r.lower, r.upper):
            a[: cut + 1] = np.nan  # the first model's own training data is no backtest
        t = grids[i].timestamps
        seen = t[: cut + 1][np.isfinite(grids[i].values[: cut + 1])]
        history = float(seen[-1] - seen[0] + steps[i]) if len(seen) else 0.0
        taken = float(t[cut + 1]) if cut + 1 < len(t) else float(t[cut]) + steps[i]
        if isinstance(res, DeployedResult):
            out[i] = RangeBacktest(res.result, taken, history, cold, len(res.retrains),
                                   len(res.early), res.failed, res.adaptations)
        else:
            out[i] = RangeBacktest(res, taken, history, cold)
    return out
