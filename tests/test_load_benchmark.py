"""Smoke run of benchmarks/load.py: promvae subprocess, synthetic source, a few seconds of load."""

from __future__ import annotations

import json

import numpy as np

from benchmarks import load


def test_schedule_sends_every_kind_first_and_keeps_the_weights() -> None:
    order = load.schedule(len(load.KINDS) + 10 * sum(load.WEIGHTS.values()))
    assert order[:len(load.KINDS)] == list(load.KINDS)
    counts = {k: order.count(k) for k in load.KINDS}
    assert counts == {k: 1 + 10 * w for k, w in load.WEIGHTS.items()}


def _answer(n_series: int, start: float, end: float, step: float, t0: float) -> dict:
    body = json.loads(load.matrix_body(n_series, start, end, step, t0))
    return {(r["metric"]["instance"], float(t)): float(v)
            for r in body["data"]["result"] for t, v in r["values"]}


def test_the_synthetic_source_answers_each_point_alike_in_every_request() -> None:
    # A poll's short range, an on-demand pull's long one, another step or series count: the
    # value of one series at one time must not depend on what else the request asked for,
    # or on-demand scores in the load run would not match the live ones.
    # A fixed time: the shapes follow the time of day, and over some 6 h spans a series
    # moved less than 10, the bound this test had (it failed at 05:50 UTC).
    t0 = 1_764_561_600.0  # 2025-12-01 04:00 UTC
    long = _answer(5, t0 - 6 * 3600, t0, 60.0, t0)
    short = _answer(3, t0 - 600, t0 - 300, 60.0, t0)
    coarse = _answer(2, t0 - 3 * 3600, t0, 300.0, t0 + 600)  # a source started later
    assert len(long) == 5 * 361 and len(short) == 3 * 6 and len(coarse) == 2 * 37
    for part in (short, coarse):
        assert set(part) <= set(long)
        assert all(long[key] == v for key, v in part.items()), part
    vals = np.array([[long[(f"host-{i}", t0 - 60.0 * j)] for j in range(361)] for i in range(5)])
    assert np.ptp(vals, axis=1).min() > 5  # each series moves (9.5 to 20 in these 6 h)
    assert min(np.abs(vals[i] - vals[j]).max() for i in range(5) for j in range(i)) > 1


def test_rss_growth_slope() -> None:
    samples = [(60.0 * m, int((100 + 2 * m) * 2**20)) for m in range(11)]
    assert load.rss_at(samples, 121.0) == 104 * 2**20
    assert abs(load.slope(samples, 120.0) - 2.0) < 1e-9


def test_quick_run_has_no_errors_and_exercises_every_kind() -> None:
    r = load.run(n_series=50, clients=4, duration=5.0, quick=True, ready_timeout=120.0,
                 say=lambda s: None)
    assert r.errors == 0, r.tally.examples
    assert all(n > 0 for n in r.counts.values()), r.counts
    assert r.source_pulls > 0  # range_ondemand reached the source through promvae
    assert len(r.rss) >= 2 and all(rss > 0 for _, rss in r.rss)
    assert r.ok
