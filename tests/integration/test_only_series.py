"""only_series against a real Prometheus: a narrowed expression returns exactly the series asked
for, whatever characters their label values hold, for selectors and derived expressions."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from grafana_plugin_backend.config.settings import PrometheusConfig
from grafana_plugin_backend.source.prometheus import PrometheusSource, only_series
from tests.promstack import PrometheusProcess, backfill, write_openmetrics

STEP = 60.0
ODD = ['plain', 'with "quotes"', "back\\slash", "dollar $1 and $$", "ünïcødé ✓", "new\nline", ""]


@pytest.fixture(scope="module")
def source(tmp_path_factory, prometheus_bin):
    wd = tmp_path_factory.mktemp("only-series")
    end = math.floor(time.time() / STEP) * STEP - 600
    ts = np.arange(end - 3600, end + 1, STEP)
    items = []
    for i, odd in enumerate(ODD):
        labels = {"instance": f"host-{i}", "job": "probe"}
        if odd:
            labels["odd"] = odd
        items.append(("probe_value", labels, ts, np.full(len(ts), float(i))))
    backfill(write_openmetrics(wd / "history.om", items), wd / "data")
    prom = PrometheusProcess(wd / "prometheus", [], data_dir=wd / "data").start()
    try:
        yield PrometheusSource(PrometheusConfig(url=prom.url)), [lab for _, lab, _, _ in items], end
    finally:
        prom.stop()


def _values(result) -> set[float]:
    return {float(np.nanmax(rs.values)) for rs in result}


@pytest.mark.integration
def test_each_series_alone_whatever_its_label_values(source):
    src, labelsets, end = source
    assert len(src.query_range("probe_value", end - 600, end, STEP)) == len(ODD)
    for i, labels in enumerate(labelsets):
        result = src.query_range(only_series("probe_value", [{"__name__": "probe_value",
                                                               **labels}]), end - 600, end, STEP)
        assert [rs.labels for rs in result] == [{"__name__": "probe_value", **labels}]
        assert _values(result) == {float(i)}


@pytest.mark.integration
def test_several_series_and_a_derived_expression(source):
    src, labelsets, end = source
    pick = [labelsets[1], labelsets[3], labelsets[6]]
    result = src.query_range(only_series("probe_value * 2", pick), end - 600, end, STEP)
    assert _values(result) == {2.0, 6.0, 12.0}
    by = [{"instance": lab["instance"]} for lab in pick[:2]]
    result = src.query_range(only_series("sum by (instance) (probe_value)", by),
                             end - 600, end, STEP)
    assert sorted(rs.labels["instance"] for rs in result) == ["host-1", "host-3"]
