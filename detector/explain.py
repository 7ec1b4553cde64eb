"""Why a point scores what it scores: each point's part in the score, and its band.

The raw score of the window ending at t is, per score scale, the mean negative
log-likelihood (NLL) of the newest n observed points, standardised by that scale's training
spread and averaged over the scales; the score at t is that raw score averaged over the
newest `smooth` windows (see scoring.py and threshold.smooth_scores). So the score is a
weighted sum over the points of those windows: a point counts once per window and scale it
is in. The explanation splits that sum point by point.

Each point's NLL in a window has a part its observed value cannot change,
`0.5 log 2π + log σ` (what it would cost sitting exactly at the decoder's mean), and the
surprise on top, `0.5 ((x - μ) / σ)²`, averaged over the same latent draws the score uses.
A point's `share` is its weighted surprise over the total, so shares are non-negative, sum
to 1 over the observed points and name the points that drive the score.

Per point, expected value and band are those of the window ending at that point: what the
anomaly_expected, anomaly_lower and anomaly_upper series show at its time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import rng
from .fitted import SeriesModel
from .model import LOG_2PI, as_float32, decode, encode, stack
from .scoring import cond_features, gather_windows, pack, score_windows, valid_ends
from .series import Series
from .threshold import combine_scales


@dataclass
class Explanation:
    """The points the score at `time` depends on, oldest first, all (P,) arrays.

    P = window + smooth - 1 points ending at `time` (fewer near the start of the series).
    observed, nll, weight and share are NaN where a point is missing or in no scored
    window; expected, lower, upper (source units) are NaN where no window ends at the point.
    nll: the point's negative log-likelihood (normalised units), mean over the scored
    windows that hold it. weight: how much its NLL counts in the score.
    share: its weighted surprise over the total (sums to 1 when any point is surprising).
    raw: the smoothed raw score at `time` (what the threshold is compared with);
    windows: how many windows it averages; scale_raw: per-scale NLLs of the newest window.
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
    windows: int
    scale_raw: np.ndarray

    def top(self, n: int = 5) -> list[int]:
        """Indices of the n points with the largest shares, largest first."""
        s = np.where(np.isfinite(self.share), self.share, -1.0)
        order = np.argsort(-s, kind="stable")[:n]
        return [int(i) for i in order if s[i] >= 0]


def _index(series: Series, t: float, step: float) -> int:
    ts = series.timestamps
    if not len(ts):
        raise ValueError("no points to explain: the series is empty")
    i = int(np.searchsorted(ts, t - 1e-6 * step))
    if i >= len(ts) or abs(ts[i] - t) > 1e-6 * step:
        raise ValueError(f"time {t:.3f} is not a point of the series (grid of {step:g} s from "
                         f"{ts[0]:.0f} to {ts[-1]:.0f})")
    return i


def _tail_weights(m: np.ndarray, config, stats) -> tuple[np.ndarray, np.ndarray]:
    """Weights of each point's NLL in each window's combined raw score, and per-scale tails.

    m (E, W) observed mask -> weights (E, W) and tails (E, S, W) bool. Scale s adds
    1 / (observed points of its tail x its spread), over the number of scales; an
    unobserved tail falls back to the whole window, as scoring does.
    """
    e, w = m.shape
    scales = config.score_scales
    weight = np.zeros((e, w))
    tails = np.zeros((e, len(scales), w), dtype=bool)
    for si, n in enumerate(scales):
        tail = np.zeros((e, w), dtype=bool)
        tail[:, w - n:] = True
        tail &= m
        empty = ~tail.any(1)
        tail[empty] = m[empty]
        k = np.maximum(tail.sum(1, keepdims=True), 1)
        weight += tail / (k * stats[si][1] * len(scales))
        tails[:, si] = tail
    return weight, tails


@torch.inference_mode()
def explain_window(model: SeriesModel, series: Series, t: float) -> Explanation:
    """Explain the score of `series` at time `t` under `model`.

    `series` is on the model's grid (see `regularize`); give it `lead_in_points(config)`
    points before t for the full smoothing (as for score_many), and window - 1 more for
    the bands of the oldest points. ValueError if t is not a point of it, if fewer than a
    window of points lead up to t, or if the window ending at t has too few observed points
    to be scored (score_many leaves its score NaN).
    """
    config = model.config
    w, big_l, n_smooth = config.window, config.mc_samples, config.smooth
    e = _index(series, t, model.step)
    if e < w - 1:
        raise ValueError(f"{e + 1} points up to time {t:.0f}, a window needs {w}")
    span = w + n_smooth - 1  # points the score at t depends on
    a = max(0, e - span + 1 - (w - 1))  # and the lead-in of the oldest one's own window
    part = Series(series.timestamps[a:e + 1], series.values[a:e + 1])
    packed = pack([part], [model.center], [model.scale], config.clip, [model.seasonality])
    valid = valid_ends(packed, config)[0].numpy()
    end = e - a  # t's position in `part`
    if not valid[end]:
        raise ValueError(f"the window ending at {t:.0f} has too few observed points to be "
                         f"scored (needs {config.min_observed:.0%} of {w})")
    ends = [j for j in range(end, max(end - n_smooth, w - 2), -1) if valid[j]][::-1]
    idx = torch.tensor([ends], dtype=torch.int64)
    x, m, t_end = gather_windows(packed, idx, w)  # (1, E, W)
    cond = cond_features(t_end, packed.cond_mask) if config.seasonal else None
    params = as_float32(model.params)  # served weights may be stored in float16
    mu_z, std_z = encode(params, config, x * m, cond)
    # The same latent draws as score_windows: keyed by each window's end time.
    keys = rng.model_keys([model.seed], rng.SCORE)
    eps = rng.normal(keys, torch.round(t_end).to(torch.int64), (big_l, config.latent))
    n_win = len(ends)
    z = (mu_z[:, :, None, :] + std_z[:, :, None, :] * eps).reshape(1, n_win * big_l, -1)
    cond_l = None if cond is None else cond.repeat_interleave(big_l, dim=1)
    mu_x, std_x = decode(params, config, z, cond_l)
    mu_x = mu_x.reshape(n_win, big_l, w).double()
    std_x = std_x.reshape(n_win, big_l, w).double()
    r = (x[0].double()[:, None, :] - mu_x) / std_x
    surprise = (0.5 * r * r).mean(1).numpy()  # (E, W)
    nll = surprise + (std_x.log().mean(1) + 0.5 * LOG_2PI).numpy()
    obs = m[0].numpy().astype(bool)  # (E, W)

    stats = model.scale_stats or [(0.0, 1.0)] * len(config.score_scales)
    weight, tails = _tail_weights(obs, config, stats)
    scale_raw = np.array([[nll[k][tails[k, si]].sum() / max(int(tails[k, si].sum()), 1)
                           for si in range(len(config.score_scales))] for k in range(n_win)])
    combined = combine_scales(scale_raw, stats)  # (E,) each window's raw score
    raw = float(np.mean(combined))

    # Onto the points: window k covers positions ends[k] - w + 1 .. ends[k] of `part`.
    first = max(0, end - span + 1)
    n_pts = end - first + 1
    contrib, wsum = np.zeros(n_pts), np.zeros(n_pts)
    nll_sum, nll_cnt = np.zeros(n_pts), np.zeros(n_pts)
    for k, j in enumerate(ends):
        pos = np.arange(j - w + 1, j + 1) - first
        inside = pos >= 0
        p, o = pos[inside], obs[k][inside]
        contrib[p] += np.where(o, weight[k][inside] * surprise[k][inside], 0.0) / n_win
        wsum[p] += np.where(o, weight[k][inside], 0.0) / n_win
        nll_sum[p] += np.where(o, nll[k][inside], 0.0)
        nll_cnt[p] += o
    seen = nll_cnt > 0
    total = float(contrib.sum())
    share = contrib / total if total > 0 and math.isfinite(total) else np.zeros(n_pts)

    # Bands of the window ending at each point, as score_many has them.
    pts = np.arange(first, end + 1)
    ok = valid[pts] & (pts >= w - 1)
    expected = np.full(n_pts, np.nan)
    half = np.full(n_pts, np.nan)
    if ok.any():
        at = torch.tensor([pts[ok].tolist()], dtype=torch.int64)
        _, mu, sd = score_windows(stack([params]), config, packed, at, [model.seed])
        expected[ok] = mu[0] * model.scale + model.center
        half[ok] = config.band_k * sd[0] * model.scale
    observed = part.values[first:end + 1].copy()
    observed[~seen] = np.nan
    return Explanation(
        time=float(part.timestamps[end]),
        timestamps=part.timestamps[first:end + 1].copy(),
        observed=observed,
        nll=np.where(seen, nll_sum / np.maximum(nll_cnt, 1), np.nan),
        weight=np.where(seen, wsum, np.nan),
        share=np.where(seen, share, np.nan),
        expected=expected,
        lower=expected - half,
        upper=expected + half,
        raw=raw,
        windows=n_win,
        scale_raw=scale_raw[-1],
    )
