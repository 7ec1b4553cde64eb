"""A fitted model of one series: weights plus everything needed to score in source units."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import VAEConfig
from .feedback import Feedback
from .model import Params


@dataclass
class SeriesModel:
    """One trained per-series VAE. Fitted attributes end in `_`.

    params: tensors with a leading model axis of 1, e.g. "enc0.w" (1, in, out).
    center, scale: robust normalisation of the training data (median, IQR/1.349).
    threshold_: raw score at which anomaly_score is 1; baseline_: median raw training score.
    """

    config: VAEConfig
    params: Params
    step: float
    center: float
    scale: float
    threshold_: float
    baseline_: float
    threshold_method: str
    seed: int
    trained_from: float
    trained_to: float
    trained_at: float
    n_train: int
    train_loss: float = float("nan")
    seasonality: tuple[bool, bool] = (True, True)  # (daily, weekly) cycles the model conditions on
    scale_stats: list[tuple[float, float]] = field(default_factory=list)  # per score scale: (median, spread)
    extra: dict = field(default_factory=dict)
    # Judged ranges of the series (detector.feedback), kept with the model so they survive
    # restarts and reach the next training.
    feedback: list[Feedback] = field(default_factory=list)

    def to(self, dtype: torch.dtype) -> SeriesModel:
        self.params = {k: v.to(dtype) for k, v in self.params.items()}
        return self
