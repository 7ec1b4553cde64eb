"""The built-in demo source: answers like Prometheus, a week of history, an incident at start."""

from __future__ import annotations

import numpy as np

from grafana_plugin_backend.source.demo import HISTORY, QUERIES, DemoSource, hashed_normal
from tests.service_fixtures import T0, FakeClock


def pull_all(src: DemoSource, start: float, end: float, step: float = 60.0):
    return {(q.name, tuple(sorted(s.labels.items()))): s
            for q in QUERIES for s in src.query_range(q.expr, start, end, step)}


def test_a_dozen_series_with_a_week_of_history():
    clock = FakeClock()
    src = DemoSource(clock=clock)
    series = pull_all(src, T0 - 8 * 86400, T0)
    assert len(series) == 12
    assert {name for name, _ in series} == {q.name for q in QUERIES}
    for s in series.values():
        assert s.timestamps[0] == T0 - HISTORY  # nothing before the week
        assert s.timestamps[-1] == T0  # nothing after now
        assert len(s.timestamps) == HISTORY / 60 + 1
        assert np.all(np.isfinite(s.values))
    assert any("__name__" in dict(labels) for _, labels in series)  # a plain selector's labels


def test_values_are_a_pure_function_of_time():
    clock = FakeClock()
    src = DemoSource(clock=clock)
    a = pull_all(src, T0 - 3600, T0)
    clock.advance(600)
    b = pull_all(src, T0 - 3600, T0 + 600)
    for key, s in a.items():
        assert np.array_equal(s.values, b[key].values[: len(s.values)])
    assert all(s.timestamps[-1] == T0 + 600 for s in b.values())  # new points appear with time


def test_daily_and_weekly_seasonality():
    src = DemoSource(clock=FakeClock())
    cpu = src.query_range(QUERIES[0].expr, T0 - HISTORY, T0, 60.0)[0]  # web-1, no incident
    hours = (cpu.timestamps % 86400) / 3600
    day = ((cpu.timestamps / 86400) + 3) % 7
    weekday = day < 5
    busy = cpu.values[(hours > 12) & (hours < 16) & weekday].mean()
    night = cpu.values[(hours > 1) & (hours < 5) & weekday].mean()
    assert busy > 1.2 * night
    weekend_busy = cpu.values[(hours > 12) & (hours < 16) & ~weekday].mean()
    assert weekend_busy < 0.9 * busy


def test_an_incident_is_ongoing_at_start_and_recurs():
    clock = FakeClock()
    src = DemoSource(clock=clock)
    web2 = {"instance": "web-2:9100"}
    clock.advance(5 * 3600)
    s = next(s for s in src.query_range(QUERIES[0].expr, T0 - 86400, T0 + 5 * 3600, 60.0)
             if s.labels == web2)
    at = dict(zip(s.timestamps, s.values))
    assert at[T0] > 0.9 and at[T0 + 60] > 0.9  # pegged at start
    assert at[T0 - 3600] < 0.8  # normal before
    assert at[T0 + 3600] < 0.8  # over after 40 minutes
    assert at[T0 + 4 * 3600] > 0.9  # and back 4 hours later


def test_unknown_expression_returns_nothing_like_prometheus():
    assert DemoSource(clock=FakeClock()).query_range("nope", T0 - 600, T0, 60.0) == []


def test_hashed_noise_is_standard_normal():
    x = hashed_normal(3, np.arange(200_000))
    assert abs(x.mean()) < 0.02 and abs(x.std() - 1) < 0.02
    assert abs(np.corrcoef(x[:-1], x[1:])[0, 1]) < 0.02  # white: neighbours independent


def test_hashed_noise_at_k_depends_on_the_seed_and_k_only():
    # A poll asks for a few new points, a training pull for a week: the noise at a time must
    # be the same whichever other times (or order) the request covers, and differ per seed.
    k = np.arange(1_000_000, 1_050_000)
    x = hashed_normal(3, k)
    picked = np.random.default_rng(0).permutation(len(k))[:500]
    assert np.array_equal(hashed_normal(3, k[picked]), x[picked])
    assert all(hashed_normal(3, k[i:i + 1])[0] == x[i] for i in picked[:20])
    y = hashed_normal(4, k)
    assert abs(np.corrcoef(x, y)[0, 1]) < 0.03  # seeds give independent series
