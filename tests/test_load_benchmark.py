"""Smoke run of benchmarks/load.py: promvae subprocess, synthetic source, a few seconds of load."""

from __future__ import annotations

import numpy as np

from benchmarks import load


def test_schedule_sends_every_kind_first_and_keeps_the_weights() -> None:
    order = load.schedule(len(load.KINDS) + 10 * sum(load.WEIGHTS.values()))
    assert order[:len(load.KINDS)] == list(load.KINDS)
    counts = {k: order.count(k) for k in load.KINDS}
    assert counts == {k: 1 + 10 * w for k, w in load.WEIGHTS.items()}


def test_source_values_are_a_pure_function_of_time() -> None:
    t = 1_700_000_000.0 + 60.0 * np.arange(5)
    a = load.source_values(np.arange(3), t)
    assert a.shape == (3, 5)
    assert np.array_equal(a, load.source_values(np.arange(3), t))
    assert not np.allclose(a[0], a[1])


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
