"""Built-in demo source: a dozen simulated node-exporter series that answer like Prometheus.

Values are a pure function of time (daily and weekly seasonality, smooth wander, hashed
noise, incidents), so repeated queries agree, and a week of history exists at start.
One incident is ongoing at start and recurs every 4 hours, so scores above 1 show at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..config.settings import QueryConfig
from .prometheus import RangeSeries, grid_points

DAY = 86400.0
WEEK = 7 * DAY
HISTORY = WEEK  # the demo "Prometheus" holds a week of data before start

QUERIES = (
    QueryConfig("cpu_busy",
                '1 - avg by (instance) (rate(node_cpu_seconds_total{mode="idle"}[5m]))'),
    QueryConfig("memory_available", "node_memory_MemAvailable_bytes"),
    QueryConfig("disk_io_busy", "rate(node_disk_io_time_seconds_total[5m])"),
    QueryConfig("network_receive",
                'sum by (instance) (rate(node_network_receive_bytes_total{device!="lo"}[5m]))'),
)


@dataclass(frozen=True)
class Incident:
    """An effect on one series: starts at `start` (unix s), lasts `duration` s."""

    kind: str  # "pegged" | "leak" | "drop" | "spike"
    start: float
    duration: float
    every: float = 0.0  # > 0: recurs with this period from `start` on


@dataclass(frozen=True)
class DemoSeries:
    query: str
    labels: dict[str, str]
    level: float  # typical value
    daily: float  # relative amplitude of the daily cycle (negative: dips by day)
    weekend: float  # relative drop on Saturday and Sunday
    noise: float  # relative noise
    ceiling: float = math.inf
    incidents: tuple[Incident, ...] = field(default=())


def _node(instance: str) -> dict[str, str]:
    return {"instance": f"{instance}:9100"}


def _selector(name: str, instance: str, **extra: str) -> dict[str, str]:
    return {"__name__": name, "instance": f"{instance}:9100", "job": "node", **extra}


def build_series(t0: float) -> list[DemoSeries]:
    """The demo's 12 series; incidents are placed relative to the start time `t0`."""
    gib = 2.0**30
    mem = "node_memory_MemAvailable_bytes"
    return [
        DemoSeries("cpu_busy", _node("web-1"), 0.30, 0.45, 0.35, 0.04, 1.0),
        DemoSeries("cpu_busy", _node("web-2"), 0.32, 0.45, 0.35, 0.04, 1.0,
                   (Incident("pegged", t0 - 300, 2400, every=4 * 3600),)),
        DemoSeries("cpu_busy", _node("db-1"), 0.45, 0.25, 0.20, 0.03, 1.0),
        DemoSeries("cpu_busy", _node("cache-1"), 0.15, 0.30, 0.25, 0.05, 1.0),
        DemoSeries("memory_available", _selector(mem, "web-1"), 5.5 * gib, -0.10, -0.05, 0.01),
        DemoSeries("memory_available", _selector(mem, "web-2"), 5.0 * gib, -0.10, -0.05, 0.01),
        DemoSeries("memory_available", _selector(mem, "db-1"), 12.0 * gib, -0.05, -0.02, 0.005,
                   incidents=(Incident("leak", t0 - 3 * DAY, 6 * 3600),)),
        DemoSeries("disk_io_busy", {"device": "sda", "instance": "web-1:9100", "job": "node"},
                   0.06, 0.40, 0.30, 0.08, 1.0),
        DemoSeries("disk_io_busy", {"device": "nvme0n1", "instance": "db-1:9100", "job": "node"},
                   0.20, 0.30, 0.20, 0.06, 1.0,
                   (Incident("spike", t0 - 5 * DAY + 7200, 1200),)),
        DemoSeries("network_receive", _node("web-1"), 2.0e6, 0.60, 0.40, 0.05),
        DemoSeries("network_receive", _node("web-2"), 1.8e6, 0.60, 0.40, 0.05),
        DemoSeries("network_receive", _node("cache-1"), 8.0e6, 0.50, 0.30, 0.04,
                   incidents=(Incident("drop", t0 - 2 * DAY - 3 * 3600, 1800),)),
    ]


_M64 = (1 << 64) - 1


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hashed_normal(seed: int, k: np.ndarray) -> np.ndarray:
    """Standard normal noise that is a pure function of (seed, integer k): (N,) -> (N,)."""
    k = np.asarray(k, dtype=np.int64).astype(np.uint64)
    a = np.uint64((seed * 0x9E3779B97F4A7C15 + 1) & _M64)
    b = np.uint64((seed * 0xD1B54A32D192ED03 + 7) & _M64)
    u1 = (_splitmix(k ^ a) >> np.uint64(11)).astype(np.float64) / 2.0**53
    u2 = (_splitmix(k ^ b) >> np.uint64(11)).astype(np.float64) / 2.0**53
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


def _daily_shape(t: np.ndarray) -> np.ndarray:
    """Busy-hours curve in [0, 1]: low at night, peak mid-afternoon UTC."""
    hour = (t % DAY) / 3600.0
    return np.exp(-(((hour - 14.0 + 12.0) % 24.0 - 12.0) / 4.5) ** 2)


def _weekend(t: np.ndarray) -> np.ndarray:
    """1 on Saturday and Sunday (UTC), 0 otherwise, with one-hour ramps."""
    day = ((t / DAY) + 3.0) % 7.0  # 0 = Monday (1970-01-01 was a Thursday)
    return np.clip(np.minimum((day - 5.0) * 24.0, (7.0 - day) * 24.0), 0.0, 1.0)


def values_at(series: DemoSeries, seed: int, t: np.ndarray) -> np.ndarray:
    """The series' values at unix times t: (N,) -> (N,)."""
    t = np.asarray(t, dtype=np.float64)
    k = np.rint(t / 60.0)
    phase = (seed * 0.7548776662) % 1.0
    wander = 0.04 * np.sin(2 * np.pi * (t / 2220.0 + phase)) \
        + 0.05 * np.sin(2 * np.pi * (t / 11160.0 + 2 * phase)) \
        + 0.04 * np.sin(2 * np.pi * (t / 39600.0 + 3 * phase))
    rel = 1.0 + series.daily * _daily_shape(t) - series.weekend * _weekend(t) + wander
    v = series.level * (rel + series.noise * hashed_normal(seed, k))
    for inc in series.incidents:
        into = t - inc.start
        if inc.every > 0:
            into = np.where(into >= 0, into % inc.every, into)
        on = (into >= 0) & (into < inc.duration)
        if not on.any():
            continue
        frac = into[on] / inc.duration
        if inc.kind == "pegged":
            v[on] = 0.96 + 0.01 * hashed_normal(seed + 1000, k[on])
        elif inc.kind == "leak":
            v[on] = v[on] * (1.0 - 0.85 * frac)
        elif inc.kind == "drop":
            v[on] = v[on] * 0.01
        elif inc.kind == "spike":
            v[on] = 0.93 + 0.02 * hashed_normal(seed + 2000, k[on])
    return np.clip(v, 0.0, series.ceiling)


class DemoSource:
    """A Source (same interface as PrometheusSource) over the simulated series."""

    def __init__(self, start_time: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.t0 = float(start_time if start_time is not None else clock())
        self.series = build_series(self.t0)
        self._by_expr: dict[str, list[tuple[int, DemoSeries]]] = {}
        names = {q.name: q.expr for q in QUERIES}
        for i, s in enumerate(self.series):
            self._by_expr.setdefault(names[s.query], []).append((i, s))

    def describe(self) -> str:
        return "built-in demo (12 simulated node-exporter series)"

    def close(self) -> None:
        pass

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[RangeSeries]:
        """Like Prometheus: points on start + k*step up to min(end, now), none before history."""
        end = min(end, self._clock())
        if end < start:
            return []
        grid = start + step * np.arange(grid_points(start, end, step))
        grid = grid[grid >= self.t0 - HISTORY]
        if len(grid) == 0:
            return []
        return [RangeSeries(dict(s.labels), grid.copy(), values_at(s, i, grid))
                for i, s in self._by_expr.get(expr.strip(), [])]
