"""Warnings about counters used raw: they train on a ramp and are flagged forever after."""

from __future__ import annotations

import pytest

from grafana_plugin_backend.config.lint import query_warnings, raw_counters
from tests.service_fixtures import make_config


@pytest.mark.parametrize("expr, names", [
    ("http_requests_total", ["http_requests_total"]),
    ('node_cpu_seconds_total{mode="idle"}', ["node_cpu_seconds_total"]),
    ('{__name__="x_total", job="a"}', ["x_total"]),
    ("sum by (job) (x_total) / 60", ["x_total"]),
    ("avg_over_time(x_total[10m])", ["x_total"]),
    ("max_over_time(x_total[1h:1m])", ["x_total"]),
    ("-(h_bucket)", ["h_bucket"]),
    ("rate(x_total[5m])", []),
    ("sum by (job) (rate(http_requests_total[5m]))", []),
    ("increase(a_total[1h]) + b_count", ["b_count"]),
    ('histogram_quantile(0.9, sum by (le) (rate(h_bucket[5m])))', []),
    ("rate(x_sum[5m]) / rate(x_count[5m])", []),
    ("max_over_time(rate(x_total[5m])[1h:1m])", []),
    ("node_memory_MemAvailable_bytes", []),
    ("1 - avg by (instance) (node_load1)", []),
])
def test_counters_without_rate_are_found(expr, names):
    assert raw_counters(expr) == names


def test_check_config_names_the_query_and_the_fix(tmp_path):
    cfg = make_config(tmp_path, queries=[{"name": "reqs", "expr": "sum(http_requests_total)"},
                                         {"name": "ok", "expr": "rate(x_total[5m])"}])
    (warning,) = query_warnings(cfg)
    assert warning.startswith("query reqs: http_requests_total looks like a counter")
    assert "rate(http_requests_total[5m])" in warning
