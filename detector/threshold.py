"""Thresholds without labels: peaks over threshold (SPOT, Siffer et al. KDD 2017)."""

from __future__ import annotations

import math

import numpy as np

MIN_PEAKS = 10  # fewer peaks than this cannot support a tail fit: fall back to a quantile
SCORE_CLIP = 1e150  # scores are clipped to ±this so quantile spreads and moments cannot overflow


def fit_gpd_moments(peaks: np.ndarray) -> tuple[float, float]:
    """Generalised Pareto (shape gamma, scale sigma) of excesses by the method of moments.

    Closed form, so a thousand models fit in microseconds; it is valid for gamma < 1/2. The
    shape is clipped to [0, 0.45]: a dozen peaks cannot show that a tail is bounded, and
    believing so (gamma < 0) puts the threshold at the training maximum, where fresh data
    crosses it all the time. gamma = 0 is the exponential tail, the conservative middle.
    """
    top = float(np.max(peaks))
    unit = top if 0 < top < np.inf else 1.0  # moments of peaks / unit cannot overflow
    m = float(np.mean(peaks / unit))
    v = float(np.var(peaks / unit))
    if not v > 0:
        return 0.0, max(m * unit, 1e-12)
    gamma = 0.5 * (1.0 - m * m / v)
    gamma = float(np.clip(gamma, 0.0, 0.45))
    sigma = m * (1.0 - gamma) * unit  # mean of a GPD is sigma / (1 - gamma)
    return gamma, max(sigma, 1e-12)


def spot_threshold(scores: np.ndarray, risk: float, init_quantile: float) -> tuple[float, str]:
    """Threshold z_q that a training score exceeds with probability `risk`.

    Fits a GPD to the excesses over the `init_quantile` quantile and extrapolates (SPOT's
    initial batch step). Returns (threshold, "spot"), or (threshold, "quantile") when the tail
    is too short or degenerate. Non-finite scores are ignored.
    """
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if len(s) == 0:
        raise ValueError("no finite training scores to fit a threshold on")
    s = np.clip(s, -SCORE_CLIP, SCORE_CLIP)
    t = float(np.quantile(s, init_quantile))
    peaks = s[s > t] - t
    if len(peaks) >= MIN_PEAKS and np.ptp(peaks) > 0:
        gamma, sigma = fit_gpd_moments(peaks)
        r = risk * len(s) / len(peaks)
        if abs(gamma) < 1e-6:
            z = t - sigma * np.log(r)
        else:
            z = t + sigma / gamma * (r ** (-gamma) - 1.0)
        if np.isfinite(z) and z > t:
            return float(z), "spot"
    # Short tail: a high quantile, lifted above the training maximum's neighbourhood when the
    # risk asks for more than the data can show.
    q = float(np.quantile(s, max(0.0, 1.0 - risk)))
    spread = float(np.quantile(s, 0.99) - np.median(s))
    return q + max(spread, 1e-9) * 0.1, "quantile"


def normalise_scores(raw: np.ndarray, baseline: float, threshold: float) -> np.ndarray:
    """anomaly_score: 0 at the training median, exactly 1 at the threshold, monotone."""
    span = threshold - baseline
    if not span > 0:
        span = max(abs(threshold), 1e-9)
    with np.errstate(over="ignore"):  # a span of a few ulps: scores beyond float64 saturate
        out = (np.asarray(raw, dtype=np.float64) - baseline) / span
    big = np.finfo(np.float64).max
    return np.clip(out, -big, big)


def scale_stats(raw: np.ndarray) -> list[tuple[float, float]]:
    """(median, spread) of each scale's training scores, raw (N, S) -> S pairs.

    spread = 99th percentile - median: robust, and puts every scale's tail on one footing.
    """
    out = []
    for s in range(raw.shape[-1]):
        x = raw[:, s][np.isfinite(raw[:, s])]
        if len(x) == 0:
            out.append((0.0, 1.0))
            continue
        x = np.clip(x, -SCORE_CLIP, SCORE_CLIP)
        med = float(np.median(x))
        spread = float(np.quantile(x, 0.99) - med)
        out.append((med, spread if spread > 1e-9 else max(float(np.std(x)), 1e-9)))
    return out


def combine_scales(raw: np.ndarray, stats: list[tuple[float, float]]) -> np.ndarray:
    """Mean of the per-scale standardised scores: (N, S) -> (N,)."""
    med = np.array([m for m, _ in stats])
    spread = np.array([s for _, s in stats])
    return ((np.asarray(raw, dtype=np.float64) - med) / spread).mean(-1)


def smooth_scores(raw: np.ndarray, n: int) -> np.ndarray:
    """Causal mean of the finite raw scores among the last n points, (N,) -> (N,).

    NaN where the point itself is NaN. Near the start (or after a gap) fewer than n scores
    are averaged; give `lead_in_points` of history for the full n.
    """
    r = np.asarray(raw, dtype=np.float64)
    ok = np.isfinite(r)
    if n <= 1 or len(r) == 0:
        return np.where(ok, r, np.nan)
    # Windows of the last n points, not running sums: a huge score cannot overflow a sum or
    # cancel out the precision of the scores after it.
    pad = np.concatenate([np.zeros(n - 1), np.where(ok, r, 0.0)])
    okp = np.concatenate([np.zeros(n - 1, dtype=bool), ok])
    win = np.lib.stride_tricks.sliding_window_view(pad, n)  # (N, n)
    cnt = np.lib.stride_tricks.sliding_window_view(okp, n).sum(1)  # (N,)
    with np.errstate(over="ignore"):
        out = (win / np.maximum(cnt, 1)[:, None]).sum(1)
    # A mean of finite scores is finite; only rounding at the edge of float64 (scores near
    # 1.8e308) can push the sum of the parts past it.
    big = np.finfo(np.float64).max
    np.clip(out, -big, big, out=out)
    out[~ok] = np.nan
    return out


def debounce_flags(score: np.ndarray, n: int) -> np.ndarray:
    """1.0 where the last n points (this one included) all scored >= 1, else 0; NaN stays NaN.

    (N,) -> (N,). A NaN breaks a run: a gap never raises a flag.
    """
    s = np.asarray(score, dtype=np.float64)
    if len(s) <= 8:  # the service's poll: a point or two per series, in Python floats
        run, need, out = 0, max(n, 1), []
        for x in s.tolist():
            if math.isfinite(x):
                run = run + 1 if x >= 1.0 else 0
                out.append(float(run >= need))
            else:  # NaN or inf: no flag, and the run breaks
                run = 0
                out.append(math.nan)
        return np.array(out, dtype=np.float64)
    above = np.where(np.isfinite(s), s >= 1.0, False).astype(np.int64)
    if n <= 1:
        run_ok = above.astype(bool)
    else:
        c = np.concatenate([[0], np.cumsum(above)])
        counts = c[n:] - c[:-n]
        run_ok = np.zeros(len(s), dtype=bool)
        run_ok[n - 1 :] = counts == n
    out = run_ok.astype(np.float64)
    out[~np.isfinite(s)] = np.nan
    return out
