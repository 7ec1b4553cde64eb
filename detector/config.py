"""Model configuration: one frozen dataclass, saved with every model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of one per-series VAE and of its scoring.

    Defaults follow Donut (WWW 2018) where it has an opinion; the odd ones say why.
    """

    window: int = 120  # points per window: 2 h at 1-minute step
    hidden: tuple[int, ...] = (100, 100)  # Donut: two hidden layers of 100
    latent: int = 8  # Donut uses 3-8; the wider window wants the upper end
    seasonal: bool = True  # condition encoder and decoder on time of day / day of week (Bagel)
    batch_size: int = 64  # per model: K models each draw their own minibatch of this size
    lr: float = 1e-3
    weight_decay: float = 1e-4  # L2, Donut's regulariser
    max_epochs: int = 60
    max_steps: int = 1500  # caps long histories: 7 d at 1 min is ~125 steps per epoch
    patience: int = 6  # epochs without validation improvement before early stopping
    val_fraction: float = 0.2  # held-back tail of the training windows
    missing_injection: float = 0.01  # Donut: share of observed points hidden during training
    std_min: float = 0.05  # floor of the decoder std, in robust units: stops collapse on flat parts
    clip: float = 50.0  # normalised values are clipped here, so 1e300 cannot overflow float32
    mc_samples: int = 16  # L: latent samples per scored window
    min_observed: float = 0.5  # a window needs this share of observed points to be scored
    # Newest points of the window whose NLL each make one score; the anomaly score combines
    # them (see scoring.py). Whole window and its newest half: measured on NAB, the pair
    # ranks anomalies better than either alone.
    score_scales: tuple[int, ...] = ()  # empty: (window, window // 2)
    smooth: int = 18  # raw scores are averaged over the newest windows: fewer, longer alarms
    band_k: float = 3.0  # band = expected ± band_k · std
    risk: float = 1e-3  # SPOT risk q: expected share of training windows above the threshold
    init_quantile: float = 0.98  # SPOT initial threshold (peaks are fitted above it)
    debounce: int = 1  # consecutive points at score >= 1 before the flag rises
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        scales = tuple(int(s) for s in self.score_scales) or (self.window, max(1, self.window // 2))
        object.__setattr__(self, "score_scales", scales)
        problems = []
        if self.window < 2:
            problems.append("window must be at least 2")
        if not self.hidden or any(h < 1 for h in self.hidden):
            problems.append("hidden must list positive layer widths")
        if self.latent < 1:
            problems.append("latent must be positive")
        if not 0 < self.min_observed <= 1:
            problems.append("min_observed must be in (0, 1]")
        if not 0 < self.risk < 1:
            problems.append("risk must be in (0, 1)")
        if not 0.5 <= self.init_quantile < 1:
            problems.append("init_quantile must be in [0.5, 1)")
        if not 0 <= self.val_fraction < 1:
            problems.append("val_fraction must be in [0, 1)")
        if not self.score_scales or any(not 1 <= s <= self.window for s in self.score_scales):
            problems.append("score_scales must list point counts between 1 and window")
        if self.smooth < 1:
            problems.append("smooth must be at least 1")
        if self.debounce < 1:
            problems.append("debounce must be at least 1")
        if self.mc_samples < 1 or self.batch_size < 1 or self.max_epochs < 1:
            problems.append("mc_samples, batch_size and max_epochs must be positive")
        if problems:
            raise ValueError("invalid VAEConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["score_scales"] = list(self.score_scales)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        """Build from a dict, refusing unknown keys (a typo must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown VAEConfig keys: {', '.join(unknown)}")
        return cls(**d)


def lead_in_points(config: VAEConfig) -> int:
    """Points of history needed before the first point to score (window, smoothing, debounce)."""
    return config.window - 1 + config.smooth - 1 + config.debounce - 1


def min_train_points(config: VAEConfig) -> int:
    """Observed points needed to train: a window plus 32, so there are a few dozen windows."""
    return config.window + 32


