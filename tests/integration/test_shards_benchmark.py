"""Smoke run of benchmarks/shards.py with a few series: the set-ups start, train and answer."""

from __future__ import annotations

import pytest

from benchmarks import shards

pytestmark = pytest.mark.integration


def test_shards_benchmark_smoke(prometheus_bin) -> None:
    lines: list[str] = []
    r = shards.run(n_series=30, shards=3, max_steps=2, say=lines.append)
    assert sum(r["owned"]) == 30 and all(r["owned"])  # every series on some shard
    assert r["count_rr"] == r["count_own"] == 30  # the past range: every series, both ways
    assert any(line.startswith("training wall time:") for line in lines)
    assert any("ratio shards/single" in line for line in lines)
