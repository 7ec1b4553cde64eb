"""The world the query API and remote read tests share: a day of history for two series, with
a three-minute spike on instance "a" five hours back (before a 1 h live buffer)."""

from __future__ import annotations

import numpy as np

from tests.service_fixtures import T0, FakeClock, FakeSource, make_config, started_service

HOUR = 3600.0
SPIKE = T0 - 5 * HOUR  # instance "a" reads 25 (score 2.5) for three minutes from here
A = {"instance": "a", "job": "app"}
B = {"instance": "b", "job": "app"}


def level_a(t: np.ndarray) -> np.ndarray:
    return np.where((t >= SPIKE) & (t < SPIKE + 180), 25.0, 5.0)


def spike_world(tmp_path):
    """(app, service, source, clock) of a started fake-fit service over that world."""
    clock = FakeClock(T0)
    source = FakeSource(clock, start=T0 - 24 * HOUR)
    source.set("metric_a", A, level_a)
    source.set("metric_a", B, lambda t: np.full(len(t), 3.0))
    cfg = make_config(tmp_path, keep_scores="1h")  # SPIKE lies before the live buffer
    app, svc = started_service(cfg, source, clock)
    return app, svc, source, clock
