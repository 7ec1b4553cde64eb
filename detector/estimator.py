"""pyod-style single-series detector over the batched core (fit / decision_function / predict)."""

from __future__ import annotations

import numpy as np

from .config import VAEConfig
from .fitted import SeriesModel
from .scoring import ScoreResult, score_many
from .series import Series, regularize
from .store import load_model, save_model
from .train import fit_many


class Detector:
    """One series, one model. Fitted attributes end in `_`.

    values: (N,) float, NaN = missing; timestamps: (N,) unix seconds (default: 0, step, 2 step…).
    """

    def __init__(self, config: VAEConfig | None = None, step: float = 60.0):
        self.config = config or VAEConfig()
        self.step = step
        self.model_: SeriesModel | None = None

    def _series(self, values: np.ndarray, timestamps: np.ndarray | None) -> Series:
        v = np.asarray(values, dtype=np.float64)
        t = self.step * np.arange(len(v)) if timestamps is None else np.asarray(timestamps, dtype=np.float64)
        return regularize(t, v, self.step)

    def _check(self) -> SeriesModel:
        if self.model_ is None:
            raise RuntimeError("this Detector is not fitted yet: call fit() first")
        return self.model_

    def fit(self, values: np.ndarray, timestamps: np.ndarray | None = None) -> Detector:
        (result,) = fit_many([self._series(values, timestamps)], self.step, self.config)
        if isinstance(result, Exception):
            raise result
        self.model_ = result
        return self

    @property
    def threshold_(self) -> float:
        """Raw-score threshold; `score` is 1.0 exactly here."""
        return self._check().threshold_

    def score(self, values: np.ndarray, timestamps: np.ndarray | None = None) -> ScoreResult:
        """Per-point results on the regularised grid of the input."""
        (res,) = score_many([self._check()], [self._series(values, timestamps)])
        return res

    def decision_function(self, values: np.ndarray, timestamps: np.ndarray | None = None) -> np.ndarray:
        """Raw anomaly scores (N,), higher = more anomalous, NaN for warm-up points."""
        return self.score(values, timestamps).raw

    def predict(self, values: np.ndarray, timestamps: np.ndarray | None = None) -> np.ndarray:
        """Debounced flags (N,) as 0/1 floats, NaN where unscored."""
        return self.score(values, timestamps).flag

    def save(self, directory: str, name: str) -> None:
        save_model(self._check(), directory, name)

    @classmethod
    def load(cls, directory: str, name: str) -> Detector:
        model = load_model(directory, name)
        d = cls(model.config, model.step)
        d.model_ = model
        return d
