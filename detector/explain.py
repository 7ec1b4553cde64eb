"""Why a window scores what it scores: each point's part in the raw score, and its band.

The raw score of the window ending at t is, per score scale, the mean negative
log-likelihood (NLL) of the newest n observed points, standardised by that scale's training
spread and averaged over the scales (see scoring.py). That makes it a weighted sum over the
window's points: a point in the newest half of a 120-point window counts in both scales, an
older one only in the whole-window scale. The explanation splits the sum point by point.

Each point's NLL has a part the observed value cannot change, `0.5 log 2π + log σ` (what
the point would cost sitting exactly at the decoder's mean), and the surprise on top,
`0.5 ((x - μ) / σ)²`, averaged over the same latent draws the score uses. A point's `share`
is its weighted surprise over the window's total, so shares are non-negative, sum to 1 over
the observed points and name the points that drive the score; `nll` is reported as well.

The smoothing of raw scores over the newest `smooth` windows is not split: the explanation
is of the one window ending at t, which is what a user looking at t asks about.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import rng
from .fitted import SeriesModel
from .model import LOG_2PI, decode, encode
from .scoring import cond_features, gather_windows, pack, valid_ends
from .series import Series
from .threshold import combine_scales


@dataclass
class Explanation:
    """One window's points, oldest first, all (W,) arrays.

    observed, nll, weight and share are NaN where a point is missing; the model's
    expectation (expected, lower, upper) exists for every point, missing ones included.

    observed, expected, lower, upper: source units (expected ± band_k · std, as the
    anomaly_expected/lower/upper series have them for the newest point).
    nll: each point's negative log-likelihood (normalised units, mean over latent draws).
    weight: how much each point's NLL counts in the raw score (the score scales it is in).
    share: the point's weighted surprise over the window's total (sums to 1 when any).
    raw: the window's combined raw score (before smoothing); scale_raw its per-scale NLLs.
    """

    time: float
    timestamps: np.ndarray
    observed: np.ndarray
    nll: np.ndarray
    weight: np.ndarray
    share: np.ndarray
    expected: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    raw: float
    scale_raw: np.ndarray

    def top(self, n: int = 5) -> list[int]:
        """Indices of the n points with the largest shares, largest first."""
        s = np.where(np.isfinite(self.share), self.share, -1.0)
        order = np.argsort(-s, kind="stable")[:n]
        return [int(i) for i in order if s[i] >= 0]


def _window_index(series: Series, t: float, step: float) -> int:
    ts = series.timestamps
    if not len(ts):
        raise ValueError("no points to explain: the series is empty")
    i = int(np.searchsorted(ts, t - 1e-6 * step))
    if i >= len(ts) or abs(ts[i] - t) > 1e-6 * step:
        raise ValueError(f"time {t:.3f} is not a point of the series (grid of {step:g} s from "
                         f"{ts[0]:.0f} to {ts[-1]:.0f})")
    return i


@torch.inference_mode()
def explain_window(model: SeriesModel, series: Series, t: float) -> Explanation:
    """Explain the window of `model.config.window` points of `series` ending at time `t`.

    `series` is on the model's grid (see `regularize`) and holds at least the window before
    t. ValueError if t is not a point of it, if fewer than a window of points lead up to t,
    or if the window has too few observed points to be scored (as score_many would leave
    it NaN).
    """
    config = model.config
    w, big_l = config.window, config.mc_samples
    e = _window_index(series, t, model.step)
    if e < w - 1:
        raise ValueError(f"{e + 1} points up to time {t:.0f}, a window needs {w}")
    part = Series(series.timestamps[e - w + 1:e + 1], series.values[e - w + 1:e + 1])
    packed = pack([part], [model.center], [model.scale], config.clip, [model.seasonality])
    if not bool(valid_ends(packed, config)[0, -1]):
        raise ValueError(f"the window ending at {t:.0f} has {part.observed()} observed points "
                         f"of {w}, fewer than scoring needs ({config.min_observed:.0%})")
    ends = torch.tensor([[w - 1]], dtype=torch.int64)
    x, m, t_end = gather_windows(packed, ends, w)  # (1, 1, W)
    cond = cond_features(t_end, packed.cond_mask) if config.seasonal else None
    mu_z, std_z = encode(model.params, config, x * m, cond)
    # The same latent draws as score_windows: keyed by the window's end time.
    keys = rng.model_keys([model.seed], rng.SCORE)
    eps = rng.normal(keys, torch.round(t_end).to(torch.int64), (big_l, config.latent))
    z = (mu_z[:, :, None, :] + std_z[:, :, None, :] * eps).reshape(1, big_l, -1)
    cond_l = None if cond is None else cond.repeat_interleave(big_l, dim=1)
    mu_x, std_x = decode(model.params, config, z, cond_l)  # (1, L, W)
    mu_x, std_x = mu_x[0].double(), std_x[0].double()  # (L, W)
    xv = x[0, 0].double()
    r = (xv[None, :] - mu_x) / std_x
    surprise = (0.5 * r * r).mean(0)  # (W,)
    floor = std_x.log().mean(0) + 0.5 * LOG_2PI
    nll = (surprise + floor).numpy()
    surprise = surprise.numpy()
    obs = m[0, 0].numpy().astype(bool)

    # Weight of each point in the combined raw score (see combine_scales): scale s adds
    # 1 / (observed points of its tail x its spread), over the number of scales.
    stats = model.scale_stats or [(0.0, 1.0)] * len(config.score_scales)
    weight = np.zeros(w)
    scale_raw = np.empty(len(config.score_scales))
    for si, n in enumerate(config.score_scales):
        tail = np.zeros(w, dtype=bool)
        tail[w - n:] = True
        tail &= obs
        if not tail.any():  # an unobserved tail falls back to the whole window, as scoring does
            tail = obs
        k = max(int(tail.sum()), 1)
        scale_raw[si] = float(nll[tail].sum() / k)
        weight[tail] += 1.0 / (k * stats[si][1] * len(config.score_scales))
    raw = float(combine_scales(scale_raw[None, :], stats)[0])

    contrib = np.where(obs, weight * surprise, 0.0)
    total = float(contrib.sum())
    share = contrib / total if total > 0 and math.isfinite(total) else np.zeros(w)

    mu_n = mu_x.mean(0)
    sd_n = ((std_x**2).mean(0) + mu_x.var(0, unbiased=False)).sqrt()
    expected = mu_n.numpy() * model.scale + model.center
    half = config.band_k * sd_n.numpy() * model.scale
    missing = ~obs
    observed = part.values.copy()
    observed[missing] = np.nan
    return Explanation(
        time=float(part.timestamps[-1]),
        timestamps=part.timestamps.copy(),
        observed=observed,
        nll=np.where(obs, nll, np.nan),
        weight=np.where(obs, weight, np.nan),
        share=np.where(obs, share, np.nan),
        expected=expected,
        lower=expected - half,
        upper=expected + half,
        raw=raw,
        scale_raw=scale_raw,
    )
