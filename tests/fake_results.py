"""Registries full of scored series without any model: /metrics at fleet size, in tests."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from grafana_plugin_backend.service.registry import READY, RESULT_FIELDS, Registry

# Label values the text format must escape (backslash, double quote, newline) or carry as UTF-8.
TRICKY_VALUES = ('say "hi"', "C:\\temp\\", "two\nlines", "ünïcødé ✓ 日本", '\\"\n', "")


def result_rows(ts: float, **values: float) -> dict[str, np.ndarray]:
    """One scored point ("timestamp" + RESULT_FIELDS) for SeriesState.record; fields default
    to a quiet series."""
    row = {"observed": 5.0, "score": 0.25, "flag": 0.0, "expected": 4.0, "lower": 1.0,
           "upper": 7.0} | values
    return {"timestamp": np.array([ts])} | {k: np.array([float(row[k])]) for k in RESULT_FIELDS}


def fill(registry: Registry, n: int, query: str = "rate(node_cpu_seconds_total[5m])",
         ts: float = 1.7e9, seed: int = 0) -> None:
    """Register n ready series of `query` with one scored point each (fleet-like labels, a few
    of them tricky); seeded, so two registries filled alike expose the same text."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        labels: Mapping[str, str] = {
            "__name__": "node_cpu_seconds_total", "instance": f"host-{i // 20:05d}:9100",
            "job": "node", "mode": f"m{i % 20}"}
        if i % 1000 == 7:
            labels = dict(labels, note=TRICKY_VALUES[(i // 1000) % len(TRICKY_VALUES)])
        s = registry.upsert(query, labels)
        assert s is not None, "registry full: raise max_series"
        s.state = READY
        score = float(rng.gamma(2.0, 0.25))
        expected = float(rng.normal(50, 20))
        s.record(result_rows(ts, score=score, flag=float(score >= 1), expected=expected,
                             observed=expected + float(rng.normal(0, 5)),
                             lower=expected - 10, upper=expected + 10), 10)
