"""Scoring windows with many models in one pass: reconstruction probability, bands, flags.

The raw score of the window ending at t is the negative log-likelihood of its points under
the model, Monte Carlo over L latent samples (Donut's reconstruction probability), attached
to t: scores are causal. It is computed at several scales from one pass: the mean NLL of
the newest n points for each n in `score_scales` (default the whole window and its newest
half). The whole window catches slow changes of shape, the newest half reacts faster and
fades sooner; each scale is standardised by its own training distribution and the mean is
the combined raw score that the threshold is fitted on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import rng
from .config import VAEConfig
from .fitted import SeriesModel
from .model import LOG_2PI, Params, as_float32, decode, encode, stack
from .series import DAY, WEEK, Series, normalise

# Bound on K*c*L*W per scoring chunk: 8 MB of float32, so the elementwise likelihood pass
# stays in cache (measured 2.7x faster than 64 MB chunks for 20 series x 1,600 windows).
_CHUNK_ELEMENTS = 1 << 21


@dataclass
class Packed:
    """K series padded to one length T (missing and padding: z = 0, m = 0)."""

    z: torch.Tensor  # (K, T) float32 normalised values
    m: torch.Tensor  # (K, T) float32 1 = observed
    t: torch.Tensor  # (K, T) float64 timestamps
    lengths: torch.Tensor  # (K,) int64
    cond_mask: torch.Tensor  # (K, 4) float32: which time features each model may use


def seasonality_mask(span_seconds: float) -> tuple[bool, bool]:
    """(daily, weekly): which cycles a training range of this length can teach.

    A model conditioned on day of week but trained on two days would meet unseen inputs on
    the other five and raise false alarms; a cycle is used once its period fits in the
    training range twice (daily) or once (weekly, minus half a day of slack).
    """
    return span_seconds >= 2 * DAY, span_seconds >= WEEK - DAY / 2


def pack(
    series: Sequence[Series],
    centers: Sequence[float],
    scales: Sequence[float],
    clip: float,
    seasonality: Sequence[tuple[bool, bool]] | None = None,
) -> Packed:
    k = len(series)
    length = max(1, max(len(s) for s in series))
    z = np.zeros((k, length), dtype=np.float32)
    m = np.zeros((k, length), dtype=np.float32)
    t = np.zeros((k, length), dtype=np.float64)
    for i, s in enumerate(series):
        n = len(s)
        zi = normalise(s.values, centers[i], scales[i], clip)
        obs = np.isfinite(zi)
        z[i, :n] = np.where(obs, zi, 0.0)
        m[i, :n] = obs
        t[i, :n] = s.timestamps
        if 0 < n < length:  # keep padding times finite; they are never used
            t[i, n:] = s.timestamps[-1]
    lengths = torch.tensor([len(s) for s in series], dtype=torch.int64)
    seas = seasonality if seasonality is not None else [(True, True)] * k
    cond_mask = torch.tensor([[d, d, w, w] for d, w in seas], dtype=torch.float32)
    return Packed(torch.from_numpy(z), torch.from_numpy(m), torch.from_numpy(t), lengths, cond_mask)


def valid_ends(packed: Packed, config: VAEConfig) -> torch.Tensor:
    """(K, T) bool: a window ends here, lies inside the series and has enough observed points.

    "Enough" is config.min_observed of the window (default half), and the newest point
    counts only if the window can be judged: see `min_observed` in VAEConfig.
    """
    k, length = packed.m.shape
    w = config.window
    c = torch.cumsum(torch.cat([torch.zeros(k, 1), packed.m], dim=1), dim=1)  # (K, T+1)
    ok = torch.zeros(k, length, dtype=torch.bool)
    if length >= w:
        counts = c[:, w:] - c[:, :-w]  # (K, T-W+1) observed points per window
        ok[:, w - 1 :] = counts >= math.ceil(config.min_observed * w)
    inside = torch.arange(length)[None, :] < packed.lengths[:, None]
    return ok & inside


def cond_features(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(K, E) float64 unix seconds, (K, 4) mask -> (K, E, 4) float32 cyclic time of day and
    day of week; features a model may not use are 0."""
    day = 2 * math.pi * torch.remainder(t, DAY) / DAY
    week = 2 * math.pi * torch.remainder(t, WEEK) / WEEK
    f = torch.stack([day.sin(), day.cos(), week.sin(), week.cos()], dim=-1).float()
    return f * mask[:, None, :]


def gather_windows(packed: Packed, ends: torch.Tensor, window: int):
    """Windows ending at `ends` (K, E): -> x, m (K, E, W) and end times (K, E)."""
    k, e = ends.shape
    # Clamp the start, not every index: ends before a full window only occur as padding.
    start = (ends - (window - 1)).clamp_min(0)
    if packed.z.shape[1] >= window:
        # Indexing the windows view copies each window once, without a (K, E·W) index
        # tensor to build and read (a third less time per training step's batch).
        rows = torch.arange(k)[:, None]
        x = packed.z.unfold(1, window, 1)[rows, start]
        m = packed.m.unfold(1, window, 1)[rows, start]
        return x, m, packed.t.gather(1, ends)
    idx = (start[..., None] + torch.arange(window)).reshape(k, -1)
    x = packed.z.gather(1, idx).reshape(k, e, window)
    m = packed.m.gather(1, idx).reshape(k, e, window)
    return x, m, packed.t.gather(1, ends)


def _mean_nll(x: torch.Tensor, mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """-log N(x; mu, std) averaged over the L samples: x (K, c, W), mu, std (K, c, L, W).

    Computed in place: mu and std are overwritten. Scoring is
    bound by this elementwise pass (K*c*L*W values), so no temporaries of that size.
    """
    d = mu.sub_(x[:, :, None, :]).div_(std).square_().mul_(0.5)
    d.add_(std.log_())
    return d.mean(2).add_(0.5 * LOG_2PI)


@torch.inference_mode()
def score_windows(p: Params, config: VAEConfig, packed: Packed, ends: torch.Tensor, seeds: Sequence[int],
                  pause: Callable[[], None] | None = None):
    """Raw scores per scale and newest-point reconstruction for windows ending at `ends` (K, E).

    Returns numpy arrays: raw (K, E, S) mean NLL of the newest n points for each n in
    config.score_scales (higher = more anomalous), mu and std (K, E) of the newest point in
    normalised units. Chunked so memory stays bounded for long ranges; pause() is called
    before each chunk (the service's trainer waits there while a poll runs).
    """
    k, e = ends.shape
    w, big_l = config.window, config.mc_samples
    keys = rng.model_keys(list(seeds), rng.SCORE)
    raw = np.empty((k, e, len(config.score_scales)), dtype=np.float64)
    mu_last = np.empty((k, e), dtype=np.float64)
    std_last = np.empty((k, e), dtype=np.float64)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, k * big_l * w))
    for a in range(0, e, chunk):
        if pause is not None:
            pause()
        b = min(e, a + chunk)
        x, m, t_end = gather_windows(packed, ends[:, a:b], w)  # (K, c, W)
        c = b - a
        cond = cond_features(t_end, packed.cond_mask) if config.seasonal else None  # (K, c, 4)
        mu_z, std_z = encode(p, config, x * m, cond)  # (K, c, Z)
        # Draws keyed by the window's end time: the same window always gets the same score,
        # whatever else is scored beside it.
        counter = torch.round(t_end).to(torch.int64)
        eps = rng.normal(keys, counter, (big_l, config.latent))  # (K, c, L, Z)
        z = (mu_z[:, :, None, :] + std_z[:, :, None, :] * eps).reshape(k, c * big_l, -1)
        cond_l = None if cond is None else cond.repeat_interleave(big_l, dim=1)
        mu_x, std_x = decode(p, config, z, cond_l)
        mu_x = mu_x.reshape(k, c, big_l, w)
        std_x = std_x.reshape(k, c, big_l, w)
        mu_n = mu_x[..., -1].mean(-1)
        var_n = (std_x[..., -1] ** 2).mean(-1) + mu_x[..., -1].var(-1, unbiased=False)
        nll = _mean_nll(x, mu_x, std_x)  # (K, c, W); mu_x and std_x are consumed
        nll_all = (nll * m).sum(-1) / m.sum(-1).clamp_min(1)
        for si, n in enumerate(config.score_scales):
            mt = m[:, :, -n:]
            n_obs = mt.sum(-1)
            nll_n = (nll[:, :, -n:] * mt).sum(-1) / n_obs.clamp_min(1)
            # An unobserved tail (the newest points missing) falls back to the whole window.
            raw[:, a:b, si] = torch.where(n_obs > 0, nll_n, nll_all).double().numpy()
        mu_last[:, a:b] = mu_n.double().numpy()
        std_last[:, a:b] = var_n.sqrt().double().numpy()
    return raw, mu_last, std_last


@dataclass
class ScoreResult:
    """Per-point results for one series, aligned 1:1 with its input points (N,).

    NaN where a point cannot be scored: warm-up (fewer than window-1 points before it) or
    a window with too few observed points.
    """

    timestamps: np.ndarray
    observed: np.ndarray
    raw: np.ndarray
    score: np.ndarray
    flag: np.ndarray
    expected: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


def _groups(models: Sequence[SeriesModel]) -> dict[VAEConfig, list[int]]:
    groups: dict[VAEConfig, list[int]] = {}
    for i, mdl in enumerate(models):
        groups.setdefault(mdl.config, []).append(i)
    return groups


def finish(mdl: SeriesModel, config: VAEConfig, s: Series, valid: np.ndarray, raw: np.ndarray,
           mu: np.ndarray, sd: np.ndarray) -> ScoreResult:
    """One series' results from its window scores: valid (N,) windows that can be judged,
    raw (N, S) per-scale scores, mu and sd (N,) of the newest point in normalised units."""
    from .threshold import combine_scales, debounce_flags, normalise_scores, smooth_scores

    ok = valid
    combined = combine_scales(raw, mdl.scale_stats)
    r = smooth_scores(np.where(ok, combined, np.nan), config.smooth)
    ok = ok & np.isfinite(r)
    score = normalise_scores(r, mdl.baseline_, mdl.threshold_)
    expected = np.where(ok, mu * mdl.scale + mdl.center, np.nan)
    half = np.where(ok, config.band_k * sd * mdl.scale, np.nan)
    lower, upper = expected - half, expected + half
    if mdl.extra.get("nonnegative"):  # the band stays in the series' own domain
        expected, lower = np.maximum(expected, 0.0), np.maximum(lower, 0.0)
    return ScoreResult(
        timestamps=s.timestamps.copy(),
        observed=s.values.copy(),
        raw=r,
        score=score,
        flag=debounce_flags(score, config.debounce),
        expected=expected,
        lower=lower,
        upper=np.maximum(upper, lower),
    )


def score_many(models: Sequence[SeriesModel], series: Sequence[Series]) -> list[ScoreResult]:
    """Score every point of every series with its own model, one batched pass per config.

    models[i] scores series[i]. Give each series `lead_in_points(config)` points before the
    first point you need scored; rows align 1:1 with the input points.
    """
    if len(models) != len(series):
        raise ValueError(f"{len(models)} models for {len(series)} series")
    out: list[ScoreResult | None] = [None] * len(models)
    for config, idx in _groups(models).items():
        ms = [models[i] for i in idx]
        ss = [series[i] for i in idx]
        packed = pack(ss, [m.center for m in ms], [m.scale for m in ms], config.clip, [m.seasonality for m in ms])
        length = packed.z.shape[1]
        # Only positions where a whole window fits; the warm-up before them stays NaN.
        first = min(config.window - 1, length - 1)
        ends = torch.arange(first, length).expand(len(ms), length - first).clone()
        valid = valid_ends(packed, config).numpy()
        raw = np.full((len(ms), length, len(config.score_scales)), np.nan)
        mu, sd = np.full((len(ms), length), np.nan), np.full((len(ms), length), np.nan)
        if length >= config.window:  # else no series holds a whole window: all NaN
            p = as_float32(stack([m.params for m in ms]))  # weights may be stored in fp16
            raw_e, mu_e, sd_e = score_windows(p, config, packed, ends, [m.seed for m in ms])
            raw[:, first:], mu[:, first:], sd[:, first:] = raw_e, mu_e, sd_e
        for j, (mdl, s) in enumerate(zip(ms, ss)):
            n = len(s)
            out[idx[j]] = finish(mdl, config, s, valid[j, :n], raw[j, :n], mu[j, :n], sd[j, :n])
    return out  # type: ignore[return-value]
