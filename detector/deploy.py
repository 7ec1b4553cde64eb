"""Deployed backtests: replay what the service does to a series, retrains and calibration included.

The first model trains on the head of the series. Then, as the service's `retrain_every` and
`history` say, a model is retrained every `retrain_every` on the trailing `history`, using
only points before its own time (causal). Each point is scored by the model in force at its
time, and the model-normalised score goes through the series' `Calibrator` (streaming
threshold, new-normal policy). A run of flags that is admitted as the new normal also
retrains the series early, as the service does.

The retrains of all series are independent models, so each round trains them in one
batched `fit_many` (the K axis). Early retrains depend on the flags of the models before
them: each round finds, per series, the first early retrain the new flags ask for, and
trains those together in the next round.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .calibration import CalibrationConfig, Calibrator, refit_offset
from .config import VAEConfig, lead_in_points
from .scoring import ScoreResult, score_many
from .series import Series
from .threshold import debounce_flags
from .train import fit_many

MAX_ROUNDS = 64  # rounds of early retrains; each round needs flags from the one before


@dataclass(frozen=True)
class Deployment:
    """The service's schedule, in seconds: config keys retrain_every, history, adapt_after."""

    retrain_every: float = 86400.0
    history: float = 7 * 86400.0
    adapt_after: float | None = 3 * 3600.0  # None: a persistent change is never adopted
    calibration_span: float = 14 * 86400.0
    adapt_bridge: float | None = 2 * 86400.0  # None: admitted scores stay for the span
    calibrate: bool = True  # False: the model's own threshold only
    adapt_retrain: bool = True  # False: an admitted change raises the threshold only, and the
    # next regular retrain learns it (no early retrain)

    def calibration(self, step: float) -> CalibrationConfig:
        return CalibrationConfig.for_step(step, span=self.calibration_span,
                                          adapt_after=self.adapt_after, bridge=self.adapt_bridge)


DEPLOYED = Deployment()  # the service's defaults


@dataclass
class DeployedResult:
    """A ScoreResult on the series' grid plus what the deployment did."""

    result: ScoreResult
    retrains: list[float]  # times at which a model took over (first model excluded)
    early: list[float]  # of those, the early retrains the new-normal policy asked for
    failed: int  # retrains that could not train (the previous model kept serving)
    adaptations: int


def _slice(grid: Series, lo: int, hi: int) -> Series:
    return Series(grid.timestamps[lo:hi], grid.values[lo:hi])


def deployed_many(
    grids: Sequence[Series],
    cuts: Sequence[int],
    steps: Sequence[float],
    config: VAEConfig,
    deployment: Deployment = DEPLOYED,
    progress: Callable[[str], None] | None = None,
    phases: Sequence[float | None] | None = None,
) -> list[DeployedResult | Exception]:
    """Replay the deployment on each regular `grids[i]`, the first model trained on points
    [0, cuts[i]]. Returns per series a DeployedResult (every point of the grid) or the
    Exception that kept its first model from training.

    phases[i]: the series' retrain phase (`retrain_phase` of its service id) to replay the
    service's slots for that series exactly; None: slots at the first model's time, so the
    regular retrains come every `retrain_every` after it (what a series trained alone at the
    cut would see with that phase).
    """
    say = progress or (lambda _m: None)
    lead = lead_in_points(config)
    n = len(grids)
    # starts[i]: sorted grid indices where a model takes over; models[i][start] = model or error
    starts: list[list[int]] = []
    early: list[set[int]] = [set() for _ in range(n)]
    for i, (g, cut) in enumerate(zip(grids, cuts)):
        phase = phases[i] if phases is not None else None
        starts.append([cut + 1] + _regular_after(g.timestamps, cut + 1, deployment.retrain_every, phase))
    models: list[dict[int, object]] = [{} for _ in range(n)]
    # raw_scores[i][start] = (key of what was scored, first index, ScoreResult)
    raw_scores: list[dict[int, tuple]] = [{} for _ in range(n)]
    out: list[DeployedResult | Exception] = [None] * n  # type: ignore[list-item]
    for rnd in range(MAX_ROUNDS):
        todo = [(i, j) for i in range(n) for j in starts[i] if j not in models[i]]
        if todo:
            train = []
            for i, j in todo:
                if j == starts[i][0]:
                    train.append(_slice(grids[i], 0, j))
                else:
                    t = grids[i].timestamps
                    a = int(np.searchsorted(t, t[j] - deployment.history - 1e-6))
                    train.append(_slice(grids[i], a, j))
            say(f"round {rnd + 1}: training {len(todo)} models")
            fitted = fit_many(train, [steps[i] for i, _ in todo], config)
            for (i, j), m in zip(todo, fitted):
                models[i][j] = m
        # Score every segment whose model or extent changed, each with the model in force.
        jobs = []
        for i in range(n):
            if isinstance(models[i].get(starts[i][0]), Exception):
                continue
            for a_pos, j in enumerate(starts[i]):
                end = starts[i][a_pos + 1] if a_pos + 1 < len(starts[i]) else len(grids[i])
                mdl = _in_force(models[i], starts[i], a_pos)
                key = (j, end, id(mdl))
                if raw_scores[i].get(j, (None,))[0] == key:
                    continue
                lo = max(0, (0 if a_pos == 0 else j) - lead)
                jobs.append((i, j, end, lo, mdl, key))
        if jobs:
            res = score_many([jb[4] for jb in jobs], [_slice(grids[jb[0]], jb[3], jb[2]) for jb in jobs])
            for (i, j, end, lo, _m, key), r in zip(jobs, res):
                raw_scores[i][j] = (key, lo, r)
        # Calibrate in time order; collect the early retrains the policy asks for.
        new = 0
        for i in range(n):
            first = models[i].get(starts[i][0])
            if isinstance(first, Exception):
                out[i] = first
                continue
            res_i, asks = _assemble(grids[i], starts[i], models[i], raw_scores[i], steps[i],
                                    deployment, config, early[i],
                                    phases[i] if phases is not None else None)
            out[i] = res_i
            for j in asks:
                # Regular retrains stay where they were: the service counts retrain_every
                # from the last regular training (SeriesState.regular_at), not an early one.
                bisect.insort(starts[i], j)
                early[i].add(j)
                new += 1
        if not new:
            break
        say(f"round {rnd + 1}: {new} early retrains asked for by the new-normal policy")
    return out


def retrain_phase(key: str, every: float) -> float:
    """Offset in [0, every) of a series' regular retrain slots: a stable hash of its id.

    Series first trained together (a fleet discovered at once) would otherwise all come due
    together `every` later, in one batch as big as the fleet; with slots at their own phase
    they come due spread over the interval, and a restart keeps each series' slots.
    """
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h / 2.0**64 * every


def next_regular(last: float, every: float, phase: float) -> float:
    """When the regular retrain after a regular training at `last` comes: the first slot
    phase + n * every at least every / 2 after `last`.

    Retrained at (or soon after) its slot, a series keeps retraining every `every` at its
    own phase; its first retrain after a first training comes 0.5 to 1.5 intervals later.
    The service (SeriesState.regular_at) and the replay below both use this.
    """
    return phase + math.ceil((last + every / 2 - phase) / every) * every


def _regular_after(t: np.ndarray, j0: int, every: float, phase: float | None = None) -> list[int]:
    """Grid indices of the regular retrains after a model took over at index j0: each at the
    first point at or after `next_regular` of the one before (phase None: t[j0]'s phase)."""
    out: list[int] = []
    if j0 >= len(t):
        return out
    if phase is None:
        phase = float(t[j0]) % every
    last = float(t[j0])
    while True:
        j = int(np.searchsorted(t, next_regular(last, every, phase) - 1e-6))
        if j >= len(t):
            return out
        out.append(j)
        last = float(t[j])


def _in_force(models: dict[int, object], starts: list[int], a_pos: int):
    """The model serving segment a_pos: its own, or the newest earlier one that trained."""
    for b in range(a_pos, -1, -1):
        m = models.get(starts[b])
        if m is not None and not isinstance(m, Exception):
            return m
    return models[starts[0]]


def _assemble(grid, starts, models, raw_scores, step, deployment, config, early, phase=None):
    n = len(grid)
    fields = {k: np.full(n, np.nan) for k in ("raw", "score", "expected", "lower", "upper")}
    for a_pos, j in enumerate(starts):
        _key, lo, r = raw_scores[j]
        a = 0 if a_pos == 0 else j
        end = starts[a_pos + 1] if a_pos + 1 < len(starts) else n
        sl = slice(a - lo, end - lo)
        for k, arr in fields.items():
            arr[a:end] = getattr(r, k)[sl]
    cut = starts[0]
    asks: list[int] = []
    adaptations = 0
    if deployment.calibrate and cut < n:
        cfg_cal = deployment.calibration(step)
        # The service's refit slots for this series (its phase), else those of phase 0.
        cal = Calibrator(cfg_cal, phase=refit_offset(phase or 0.0, cfg_cal.refit, step))
        t = grid.timestamps
        for a_pos, j in enumerate(starts):  # segment by segment: the calibrator sees retrains
            a = cut if a_pos == 0 else j
            end = starts[a_pos + 1] if a_pos + 1 < len(starts) else n
            if a < end:
                key = float(_in_force(models, starts, a_pos).trained_to)
                fields["score"][a:end] = cal.apply(t[a:end], fields["score"][a:end], step,
                                                   model_key=key)
        adaptations = cal.adaptations
        # Only the first new early retrain is certain: every flag after it depends on it.
        idx = np.searchsorted(t, np.asarray(cal.adapted_at), side="right")
        fresh = [int(j) for j in idx if j < n and int(j) not in models]
        asks = fresh[:1] if deployment.adapt_retrain else []
    ok = np.isfinite(fields["score"])
    result = ScoreResult(
        timestamps=grid.timestamps.copy(), observed=grid.values.copy(), raw=fields["raw"],
        score=fields["score"], flag=debounce_flags(fields["score"], config.debounce),
        expected=np.where(ok, fields["expected"], np.nan), lower=fields["lower"],
        upper=fields["upper"],
    )
    failed = sum(isinstance(models.get(j), Exception) for j in starts[1:])
    retrain_times = [float(grid.timestamps[j]) for j in starts[1:] if j < n]
    early_times = [float(grid.timestamps[j]) for j in sorted(early) if j < n]
    return DeployedResult(result, retrain_times, early_times, failed, adaptations), asks
