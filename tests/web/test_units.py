"""Units guessed from Prometheus metric names, and values written for people."""

from __future__ import annotations

import math

import pytest

from grafana_plugin_backend.web.units import guess_unit, human


@pytest.mark.parametrize(("expr", "unit"), [
    ("node_memory_MemAvailable_bytes", "bytes"),
    ("node_memory_MemAvailable_bytes / node_memory_MemTotal_bytes", "ratio"),
    ('1 - avg by (instance) (rate(node_cpu_seconds_total{mode="idle"}[5m]))', "ratio"),
    ('rate(node_disk_io_time_seconds_total{device!~"loop.*"}[5m])', "ratio"),
    ('sum by (instance) (rate(node_network_receive_bytes_total{device!="lo"}[5m]))',
     "bytes_per_second"),
    ("histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket[5m])))",
     "seconds"),
    ("max_over_time(process_resident_memory_bytes[1h])", "bytes"),
    ("(a_bytes / b_bytes) * 100", "percent"),
    ("node_filesystem_avail_bytes > 0", "bytes"),
    ("process_cpu_seconds_total", "seconds"),
    ("node_load1", "none"),
    ("count(up)", "none"),
    ("a_bytes + b_seconds", "none"),
    ("not valid promql (", "none"),
])
def test_guess_unit(expr, unit):
    assert guess_unit(expr) == unit


@pytest.mark.parametrize(("value", "unit", "text"), [
    (5.093e9, "bytes", "4.74 GiB"), (0, "bytes", "0 B"), (512, "bytes", "512 B"),
    (-2e6, "bytes", "-1.91 MiB"), (1536, "bytes_per_second", "1.5 KiB/s"),
    (0.35, "seconds", "350 ms"), (12.5, "seconds", "12.5 s"), (200, "seconds", "3.33 min"),
    (1e-5, "seconds", "10 µs"), (7200, "seconds", "2 h"), (0, "seconds", "0 s"),
    (0.4523, "ratio", "45.2%"), (-0.031, "ratio", "-3.1%"), (1.0, "ratio", "100%"),
    (45.23, "percent", "45.2%"), (5.093e9, "none", "5.09 G"), (42.0, "none", "42"),
    (0.000123, "none", "0.000123"), (1234.5678, "none", "1235"),
])
def test_human(value, unit, text):
    assert human(value, unit) == text


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, None])
def test_human_leaves_non_numbers_blank(value):
    assert human(value, "bytes") == ""


@pytest.mark.parametrize("value", [1e300, -1e300, 5e-324, 1.7976931348623157e308])
@pytest.mark.parametrize("unit", ["bytes", "bytes_per_second", "seconds", "ratio", "percent",
                                  "none"])
def test_human_of_extremes_stays_short(value, unit):
    assert 0 < len(human(value, unit)) <= 16


def test_a_query_unit_is_checked_and_kept(tmp_path):
    from grafana_plugin_backend.config.base import ConfigError
    from tests.service_fixtures import make_config

    cfg = make_config(tmp_path, queries=[{"name": "q", "expr": "x", "unit": "seconds"},
                                         {"name": "r", "expr": "y"}])
    assert [q.unit for q in cfg.queries] == ["seconds", ""]
    with pytest.raises(ConfigError, match=r"queries\[0\].unit: must be one of bytes, "):
        make_config(tmp_path, queries=[{"name": "q", "expr": "x", "unit": "parsecs"}])
