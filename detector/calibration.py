"""Scores that stay calibrated between retrains: a streaming threshold over recent scores.

A model's own threshold is fitted on its training windows. Fresh data scores differently
(drift, a model retrained on another week), so `anomaly_score >= 1` drifts away from the
promised risk: on NAB a third of the quiet time was flagged. The calibrator keeps the
model-normalised scores of recent normal points of one series, across retrains, and refits a
SPOT threshold on them at every `refit` boundary of the grid (Siffer et al., KDD 2017,
streaming mode: flagged points do not enter the reference, so an anomaly cannot raise the
bar it is measured against). The calibrated score is 0 at the reference median and 1 at
the refitted threshold; the model's own threshold (1.0) stays a floor, so calibration only
ever makes the flag rarer.

Persistent change becomes the new normal on purpose: a flag that has been up for
`adapt_after` points is admitted into the reference (and the service retrains the series
early, see `Calibrator.adapt_due`). A level shift that stays raises an alert when it
happens, not for weeks. The admission is a bridge to the retrains, not a lasting bar: once
a model trained `bridge` after the change began scores the series (`apply(..., model_key=)`,
the key being the model's trained_to), the scores admitted since the change leave the
reference again. Kept for the whole span, they held the threshold at the size of the shift
for two weeks, deaf to the next anomaly; dropped at the first regular retrain (hours after
the change), they let the new level flag again under a model that had seen little of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .threshold import spot_threshold

MAX_REFERENCE = 4096  # reference scores kept per series: 16 KB as float32, any step


@dataclass(frozen=True)
class CalibrationConfig:
    """How the streaming threshold behaves; durations in points of the series' step."""

    span: int = 4032  # reference span: 14 days at 5 minutes
    min_reference: int = 288  # recent scores needed before the first refit: 1 day at 5 min
    refit: int = 12  # refit every this many grid points (1 h at 5 min)
    adapt_after: int = 36  # flagged this long: admitted as the new normal (3 h at 5 min)
    risk: float = 1e-3
    init_quantile: float = 0.98
    bridge: int = 576  # admitted scores leave once a model trained this long after the change
    # scores the series (2 days at 5 min); 0: they stay for the span

    @classmethod
    def for_step(cls, step: float, *, span: float = 14 * 86400.0, min_reference: float = 86400.0,
                 refit: float = 3600.0, adapt_after: float | None = 3 * 3600.0,
                 risk: float = 1e-3, init_quantile: float = 0.98,
                 bridge: float | None = 2 * 86400.0) -> CalibrationConfig:
        """Durations in seconds -> points at `step`. adapt_after None: never adapt; bridge
        None: admitted scores stay for the span."""
        pts = lambda seconds: max(1, round(seconds / step))
        return cls(span=pts(span), min_reference=pts(min_reference), refit=pts(refit),
                   adapt_after=0 if adapt_after is None else pts(adapt_after), risk=risk,
                   init_quantile=init_quantile, bridge=0 if bridge is None else pts(bridge))


def refit_offset(phase: float, refit: int, step: float) -> float:
    """The offset of a series' refit slots: `phase` (seconds, e.g. its retrain phase, a hash
    of its id) on the grid of `step`, modulo the `refit` interval (points)."""
    return float(round(phase / step) % max(1, refit)) * step


@dataclass
class Calibrator:
    """Streaming calibration state of one series. Feed model-normalised scores in time order.

    reference: (R,) recent accepted scores, oldest first, decimated so R <= MAX_REFERENCE.
    """

    config: CalibrationConfig
    # float32: half the bytes (16 KB a series), and what the store saves anyway
    reference: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float32))
    baseline: float = 0.0
    threshold: float = 1.0
    run: int = 0  # points in the current run of flags
    run_start: float = math.nan  # timestamp where the current run began
    adaptations: int = 0  # runs admitted as the new normal
    adapted_at: list = field(default_factory=list)  # timestamps of the admissions
    adapt_due: bool = False  # set when a run is admitted; the owner clears it (retrain)
    last_t: float = -math.inf  # newest timestamp fed
    model_key: float | None = None  # identity of the model whose scores are fed (trained_to)
    bridged: int = -1  # reference entries appended since an admission (-1: none pending)
    bridge_start: float = math.nan  # where the admitted change began
    # Offset (seconds, on the grid) of this series' refit slots, see refit_offset: not
    # state, its owner derives it from the series' identity.
    phase: float = 0.0
    _pending: list = field(default_factory=list)  # scores of the current run
    _tick: int = 0  # points fed since the last decimated append

    @property
    def stride(self) -> int:
        """Keep every stride-th accepted point, so a long span fits MAX_REFERENCE."""
        return max(1, math.ceil(self.config.span / MAX_REFERENCE))

    def _accept(self, values: list[float]) -> None:
        keep = []
        for v in values:
            self._tick += 1
            if self._tick >= self.stride:
                self._tick = 0
                keep.append(v)
        if keep:
            cap = math.ceil(self.config.span / self.stride)
            self.reference = np.concatenate(
                [self.reference, np.asarray(keep, dtype=np.float32)])[-cap:]
            if self.bridged >= 0:
                self.bridged = min(self.bridged + len(keep), len(self.reference))

    def _refit(self) -> None:
        if len(self.reference) * self.stride < self.config.min_reference:
            return
        thr, _ = spot_threshold(self.reference, self.config.risk, self.config.init_quantile)
        base = float(np.median(self.reference.astype(np.float64)))
        # The model's threshold (1.0) is a floor: fresh scores can make the flag rarer,
        # never more frequent than the model itself would raise it.
        self.threshold = max(thr, 1.0)
        self.baseline = min(base, self.threshold - 1e-6)

    def new_model(self, model_key: float | None, step: float) -> None:
        """The scores fed from now on come from the model `model_key` (its trained_to;
        None: unknown).

        A model trained `bridge` or more after the admitted change began ends the bridge:
        the admitted scores, and those accepted since, leave the reference and the threshold
        is refit from what remains (the model's own threshold if too little does). Models
        before it (the early retrain, the next daily ones) were trained on hours of the new
        level beside a week of the old one: they still find the new level unusual, and
        without the bridge would flag it again.
        """
        if model_key is None or model_key == self.model_key:
            return
        if (self.model_key is not None and self.bridged >= 0 and self.config.bridge
                and not model_key - self.bridge_start < self.config.bridge * step):
            self.reference = self.reference[:len(self.reference) - self.bridged]
            self.threshold, self.baseline = 1.0, 0.0
            self._refit()
            self.bridged, self.bridge_start = -1, math.nan
        self.model_key = model_key

    def apply(self, timestamps: np.ndarray, scores: np.ndarray, step: float,
              model_key: float | None = None) -> np.ndarray:
        """Calibrated scores (N,) for model-normalised `scores` (N,) at `timestamps`, all
        scored by the model `model_key` (see new_model).

        Points at or before the newest one fed are returned calibrated but not fed again,
        so rescoring a point (after a restart) does not count it twice.
        """
        self.new_model(model_key, step)
        # Python floats, not numpy scalars: the service calls this for every series every
        # poll with a point or two, where numpy's per-element cost would dominate.
        ts = np.asarray(timestamps, dtype=np.float64).tolist()
        xs = np.asarray(scores, dtype=np.float64).tolist()
        out = [math.nan] * len(xs)
        refit_every = self.config.refit * step
        for i, (t, x) in enumerate(zip(ts, xs)):
            y = out[i] = (x - self.baseline) / (self.threshold - self.baseline)
            if not t > self.last_t:
                continue
            self.last_t = t
            if math.isfinite(x):
                self._feed(x, y >= 1.0, t)
            # Refit on the grid, not per call: the service (one point per poll) and a
            # backtest (a day at once) then compute the same thresholds. A fleet refits
            # spread over the interval (each series at its phase), not all in the poll at
            # the boundary: 0.2 ms a refit, 2 s at 10,000 series.
            if refit_every > 0:
                u = t - self.phase
                if math.floor(u / refit_every + 1e-9) * refit_every >= u - 1e-6:
                    self._refit()
        return np.array(out, dtype=np.float64)

    def _feed(self, x: float, flagged: bool, t: float) -> None:
        if not flagged:
            if self._pending:
                self._pending = []
            self.run, self.run_start = 0, math.nan
            self._accept([x])
            return
        if self.run == 0:
            self.run_start = t
        self.run += 1
        self._pending.append(x)
        if self.config.adapt_after and self.run >= self.config.adapt_after:
            # The change has lasted: it is the new normal. Its scores join the reference
            # (the threshold rises to it at the next refit) until the owner's early retrain
            # scores the series (new_model).
            if self.bridged < 0:
                self.bridged, self.bridge_start = 0, self.run_start
            self._accept(self._pending)
            self._pending = []
            self.run, self.run_start = 0, math.nan
            self.adaptations += 1
            self.adapted_at.append(t)
            self.adapt_due = True
            self._refit()

    def state(self) -> dict:
        """JSON-able state (the reference goes separately as an array)."""
        return {"baseline": self.baseline, "threshold": self.threshold, "run": self.run,
                "run_start": self.run_start, "adaptations": self.adaptations,
                "last_t": self.last_t, "tick": self._tick, "pending": list(self._pending),
                "model_key": self.model_key, "bridged": self.bridged,
                "bridge_start": self.bridge_start}

    @classmethod
    def restore(cls, config: CalibrationConfig, reference: np.ndarray, state: dict) -> Calibrator:
        c = cls(config, np.asarray(reference, dtype=np.float32))
        c.baseline, c.threshold = float(state["baseline"]), float(state["threshold"])
        c.run, c.run_start = int(state["run"]), float(state["run_start"])
        c.adaptations, c.last_t = int(state["adaptations"]), float(state["last_t"])
        c._tick, c._pending = int(state["tick"]), [float(v) for v in state["pending"]]
        key = state.get("model_key")  # absent in files written before the bridge
        c.model_key = None if key is None else float(key)
        c.bridged = int(state.get("bridged", -1))
        # Files of the second-model bridge: its change began before its first model.
        c.bridge_start = float(state.get("bridge_start", -math.inf))
        return c
