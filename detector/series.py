"""Series on a regular grid, robust normalisation and cyclic time features (pure numpy)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DAY = 86400.0
WEEK = 7 * DAY
N_TIME_FEATURES = 4  # sin/cos of time of day, sin/cos of day of week
MAX_GRID_POINTS = 20_000_000  # a regular grid longer than this (160 MB) is refused


@dataclass
class Series:
    """One series at a fixed step.

    timestamps: (N,) float64 unix seconds, ascending, evenly spaced.
    values: (N,) float64; NaN marks a missing point.
    """

    timestamps: np.ndarray
    values: np.ndarray

    def __post_init__(self) -> None:
        self.timestamps = np.asarray(self.timestamps, dtype=np.float64)
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.timestamps.shape != self.values.shape or self.values.ndim != 1:
            raise ValueError(
                f"timestamps and values must be 1-d of one length, got "
                f"{self.timestamps.shape} and {self.values.shape}"
            )

    def __len__(self) -> int:
        return len(self.values)

    def observed(self) -> int:
        return int(np.isfinite(self.values).sum())


def regularize(timestamps: np.ndarray, values: np.ndarray, step: float) -> Series:
    """Put samples on a regular grid of `step` seconds.

    Sorts, snaps each timestamp to the nearest grid point (the grid starts at the first
    timestamp rounded down to a multiple of `step`), keeps the last sample of duplicates,
    marks grid points without a sample as NaN and turns ±Inf into NaN.
    """
    if not (step > 0 and np.isfinite(step)):
        raise ValueError(f"step must be a positive number of seconds, got {step}")
    t = np.asarray(timestamps, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if t.shape != v.shape or t.ndim != 1:
        raise ValueError("timestamps and values must be 1-d arrays of one length")
    keep = np.isfinite(t)
    t, v = t[keep], v[keep]
    if len(t) == 0:
        return Series(np.empty(0), np.empty(0))
    with np.errstate(over="ignore"):
        q = np.rint(t / step)  # grid positions, as floats until they are known to fit
    if not np.isfinite(q).all() or np.abs(q).max() > 2.0**53:
        raise ValueError(f"timestamps out of range for a grid of step {step} s "
                         f"(from {t.min()} to {t.max()})")
    if q.max() - q.min() >= MAX_GRID_POINTS:
        raise ValueError(f"timestamps from {t.min()} to {t.max()} span more than "
                         f"{MAX_GRID_POINTS} points of step {step} s")
    idx = q.astype(np.int64)
    start = idx.min()
    pos = idx - start
    grid = np.full(int(pos.max()) + 1, np.nan)
    # Fancy assignment keeps the last write for repeated positions; order by time first
    # so that "last" means the newest sample.
    order = np.argsort(t, kind="stable")
    grid[pos[order]] = v[order]
    grid[~np.isfinite(grid)] = np.nan
    ts = (start + np.arange(len(grid))) * step
    return Series(ts.astype(np.float64), grid)


def robust_stats(values: np.ndarray) -> tuple[float, float]:
    """(center, scale) from the observed values: median and IQR/1.349.

    Falls back to MAD, then the standard deviation, then a scale relative to the level, so
    a constant or mostly-constant series still gets a usable positive scale.
    """
    x = values[np.isfinite(values)]
    if len(x) == 0:
        return 0.0, 1.0
    # float64 can overflow on 1e300-sized data; clip to a range where arithmetic is safe.
    x = np.clip(x, -1e150, 1e150)
    center = float(np.median(x))
    q75, q25 = np.percentile(x, [75, 25])
    scale = float(q75 - q25) / 1.349
    if not scale > 0:
        scale = float(np.median(np.abs(x - center))) * 1.4826
    if not scale > 0:
        scale = float(np.std(x))
    if not scale > 0:
        scale = max(abs(center) * 1e-2, 1e-3)
    return center, scale


def normalise(values: np.ndarray, center: float, scale: float, clip: float) -> np.ndarray:
    """Robust z-values clipped to ±clip; NaN stays NaN. Shape preserved."""
    with np.errstate(over="ignore", invalid="ignore"):
        z = (np.asarray(values, dtype=np.float64) - center) / scale
    return np.clip(z, -clip, clip)


def time_features(timestamps: np.ndarray) -> np.ndarray:
    """Cyclic encoding of time of day and day of week, (N,) -> (N, 4), UTC."""
    t = np.asarray(timestamps, dtype=np.float64)
    day = 2 * np.pi * (t % DAY) / DAY
    week = 2 * np.pi * (t % WEEK) / WEEK
    return np.stack([np.sin(day), np.cos(day), np.sin(week), np.cos(week)], axis=-1)


def sliding_windows(x: np.ndarray, window: int) -> np.ndarray:
    """Windows ending at each point from window-1 on: (N,) -> (N - window + 1, window), a view."""
    if len(x) < window:
        return np.empty((0, window), dtype=x.dtype)
    return np.lib.stride_tricks.sliding_window_view(x, window)
