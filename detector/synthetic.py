"""Seeded synthetic infrastructure series with labelled anomalies (tests, demo, `make run`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .series import DAY, Series

ANOMALY_KINDS = ("spike", "level_shift", "seasonality_break", "flatline")


@dataclass
class Labelled:
    series: Series
    labels: np.ndarray  # (N,) 1 inside an injected anomaly, else 0
    kinds: list[tuple[str, int, int]]  # (kind, start index, end index exclusive)


def seasonal_series(
    n: int,
    step: float = 60.0,
    start: float = 1_700_000_000.0,
    level: float = 50.0,
    daily: float = 20.0,
    weekly: float = 5.0,
    noise: float = 2.0,
    seed: int = 0,
) -> Series:
    """A CPU-like series: daily and weekly cycles, AR(1) noise. (n,) points at `step`."""
    r = np.random.default_rng(seed)
    t = start + step * np.arange(n)
    phase = r.uniform(0, 2 * np.pi)
    tod = 2 * np.pi * (t % DAY) / DAY
    dow = 2 * np.pi * (t % (7 * DAY)) / (7 * DAY)
    base = level + daily * np.sin(tod + phase) + 0.3 * daily * np.sin(2 * tod) + weekly * np.cos(dow)
    e = r.normal(0, noise, n)
    ar = np.empty(n)
    acc = 0.0
    for i in range(n):  # AR(1): real metrics are smoother than white noise
        acc = 0.7 * acc + e[i]
        ar[i] = acc
    return Series(t, base + ar * 0.7)


def inject(series: Series, kind: str, at: int, length: int, size: float, seed: int = 0) -> Series:
    """A copy of `series` with one anomaly of `kind` over [at, at+length)."""
    v = series.values.copy()
    end = min(len(v), at + length)
    if kind in ("spike", "level_shift"):
        v[at:end] += size
    elif kind == "seasonality_break":
        # The daily cycle stops: the series holds its mean plus noise where it should swing.
        r = np.random.default_rng(seed)
        v[at:end] = np.nanmean(v) + r.normal(0, size * 0.05, end - at)
    elif kind == "flatline":
        v[at:end] = v[at]
    else:
        raise ValueError(f"unknown anomaly kind {kind!r}; known: {', '.join(ANOMALY_KINDS)}")
    return Series(series.timestamps.copy(), v)


def labelled_example(
    kind: str, n: int = 6 * 1440, train: int = 4 * 1440, seed: int = 0, step: float = 60.0, after: int = 0
) -> Labelled:
    """A seasonal series with one anomaly of `kind` after the first `train` points.

    Labels cover the anomaly plus `after` points: a window-based detector still sees an
    event while it is inside its window, as NAB's labelled windows also allow.
    """
    s = seasonal_series(n, step=step, seed=seed)
    r = np.random.default_rng(seed + 1000)
    at = int(r.integers(train + 60, n - 300))
    length = {"spike": 5, "level_shift": 240, "seasonality_break": 360, "flatline": 180}[kind]
    # About 5 and 4 noise sigmas (the AR(1) noise has a std of about 2): anomalies a good
    # detector must find, not 20-sigma ones that any threshold catches.
    size = {"spike": 10.0, "level_shift": 8.0, "seasonality_break": 20.0, "flatline": 0.0}[kind]
    out = inject(s, kind, at, length, size, seed=seed)
    labels = np.zeros(n)
    labels[at : min(n, at + length + after)] = 1
    return Labelled(out, labels, [(kind, at, min(n, at + length))])
