"""promvae's PromQL against Prometheus itself, over the same anomaly_* samples.

An in-process promvae (fake source, exact fake scores: score = value / 10) scores three hours
of four series. Its stored grid points of every anomaly_* series are written as OpenMetrics,
backfilled with promtool into a real Prometheus, and every supported PromQL form is run on
both, as instant queries at several times and as range queries: labels and values must agree.

Evaluation times sit half a step between grid points, so the two range-selection conventions
(Prometheus 2's closed [t - r, t] and 3's left-open (t - r, t]) select the same samples.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import numpy as np
import pytest

from grafana_plugin_backend.service.registry import ANOMALY_METRICS
from tests.promstack import PrometheusProcess, backfill, write_openmetrics
from tests.service_fixtures import FakeClock, FakeSource, make_config, started_service

pytestmark = pytest.mark.integration

STEP = 60.0
HOUR = 3600.0
NOW = math.floor((time.time() - 2 * HOUR) / HOUR) * HOUR  # recent: inside Prometheus' retention
START = NOW - 3 * HOUR  # queries look at [START, NOW]
LOADED = START - 2 * HOUR  # the oracle holds [LOADED, NOW]: what ranges and offsets reach back to
SPIKE = NOW - 90 * 60
SERIES = {
    ("a", "app"): lambda t: np.where((t >= SPIKE) & (t < SPIKE + 600), 25.0, 5.0),
    ("b", "app"): lambda t: np.full(len(t), 3.0),
    ("c", "db"): lambda t: 4.0 + 3.0 * np.sin(2 * np.pi * t / HOUR),
    ("d", "db"): lambda t: np.where(t < NOW - HOUR, 5.0, 7.5),
}
TIMES = [SPIKE + 30, SPIKE + 330, NOW - 2 * HOUR + 30, NOW - 45 * 60 + 30, NOW - 30]
SEL = 'anomaly_query="q"'

FORMS = [
    # selectors, all four matcher kinds, and names by regex
    "anomaly_score", 'anomaly_score{instance="a"}', 'anomaly_observed{instance!="a"}',
    'anomaly_upper{instance=~"a|c"}', 'anomaly_flag{job!~"d.*"}',
    '{__name__=~"anomaly_(score|observed)"}', f"{{{SEL}}}", 'anomaly_score{instance="zz"}',
    # comparisons with a scalar, either side, with and without bool
    "anomaly_score > 0.4", "0.4 < anomaly_score", "1 < anomaly_score", "2 >= anomaly_observed",
    "anomaly_score >= bool 0.5", "1 >= bool anomaly_score", "anomaly_observed == 5",
    "anomaly_observed != 5", "anomaly_flag == 1", "0.5 != bool anomaly_score",
    # arithmetic with scalars
    "anomaly_observed * 2", "100 - anomaly_observed", "anomaly_observed / 0", "-anomaly_score",
    "anomaly_score ^ 2", "anomaly_observed % 3", "2 * anomaly_observed + 1",
    "(anomaly_observed - 5) > 0", "anomaly_observed / 2 > 2",
    # scalars
    "1 + 2 * 3", "2 ^ 3 ^ 2", "-1", "(1 + 2) / 4", "5 % 3", "1 > bool 2", "time()",
    # aggregations
    "sum(anomaly_score)", "avg by (job) (anomaly_observed)",
    "max without (instance) (anomaly_score)", "min by (instance) (anomaly_upper)",
    "count(anomaly_flag == 1)", "count by (job) (anomaly_score > 0.4)",
    "sum by (job) (anomaly_observed) / 2", "max(anomaly_score) > 1",
    "topk(2, anomaly_observed)", "bottomk(1, anomaly_observed)",
    "topk(1, anomaly_score) by (job)", "bottomk(3, anomaly_score) without (instance)",
    # functions over ranges, offset and @
    "max_over_time(anomaly_score[10m])", "min_over_time(anomaly_observed[15m])",
    "avg_over_time(anomaly_observed[15m])", "sum_over_time(anomaly_score[5m])",
    "count_over_time(anomaly_score[5m])", "last_over_time(anomaly_observed[5m])",
    "max by (job) (max_over_time(anomaly_score[30m]))", "anomaly_observed offset 10m",
    f"anomaly_observed @ {SPIKE + 30:.0f}",
]
MATRIX_FORMS = ['anomaly_observed{instance="a"}[5m]', "anomaly_score[3m]",
                "anomaly_flag[2m] offset 1h"]


class Both:
    def __init__(self, app, prom: PrometheusProcess) -> None:
        self.client, self.prom = app.test_client(), prom

    def ours(self, path: str, **params) -> dict:
        resp = self.client.get(path, query_string=params)
        body = resp.get_json()
        assert resp.status_code == 200 and body["status"] == "success", (params, body)
        return body["data"]

    def theirs(self, path: str, **params) -> dict:
        return self.prom._api(path, params)


@pytest.fixture(scope="module")
def both(tmp_path_factory, prometheus_bin: str, promtool_bin: str) -> Iterator[Both]:
    wd = tmp_path_factory.mktemp("promql_oracle")
    clock = FakeClock(NOW)
    source = FakeSource(clock, start=NOW - 24 * HOUR)
    for (inst, job), fn in SERIES.items():
        source.set("metric_a", {"instance": inst, "job": job}, fn)
    cfg = make_config(wd, keep_scores="1h", query_max_score_points=10_000_000)
    app, svc = started_service(cfg, source, clock)
    states = svc.registry.all()
    assert len(states) == len(SERIES)
    rows = app.extensions["promvae_query"].scorer.rows(states, LOADED, NOW)
    grid = LOADED + STEP * np.arange(round((NOW - LOADED) / STEP) + 1)
    items = []
    for s in states:
        for name, (field, _) in ANOMALY_METRICS.items():
            values = rows[s.id][field]
            assert np.isfinite(values).all(), (s.exposed, name)  # no gaps: no lookback games
            items.append((name, s.exposed, grid, values))
    backfill(write_openmetrics(wd / "scores.om", items), wd / "prom-data")
    prom = PrometheusProcess(wd / "prometheus", [], data_dir=wd / "prom-data")
    try:
        prom.start()
        yield Both(app, prom)
    finally:
        prom.stop()


def _key(metric: dict) -> tuple:
    return tuple(sorted(metric.items()))


def _close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _value(v: str) -> float:
    return float(v.replace("+Inf", "inf").replace("-Inf", "-inf"))


def _same_vector(ours: list[dict], theirs: list[dict], what: str) -> None:
    got = {_key(r["metric"]): _value(r["value"][1]) for r in ours}
    want = {_key(r["metric"]): _value(r["value"][1]) for r in theirs}
    assert len(got) == len(ours), f"{what}: promvae returned a label set twice"
    assert set(got) == set(want), f"{what}: labels differ\n ours {sorted(got)}\n " \
                                  f"prometheus {sorted(want)}"
    bad = {k: (got[k], want[k]) for k in got if not _close(got[k], want[k])}
    assert not bad, f"{what}: values differ (ours, prometheus): {bad}"


def _same_matrix(ours: list[dict], theirs: list[dict], what: str) -> None:
    got = {_key(r["metric"]): [(float(t), _value(v)) for t, v in r["values"]] for r in ours}
    want = {_key(r["metric"]): [(float(t), _value(v)) for t, v in r["values"]] for r in theirs}
    assert set(got) == set(want), f"{what}: labels differ\n ours {sorted(got)}\n " \
                                  f"prometheus {sorted(want)}"
    for k, points in got.items():
        assert [t for t, _ in points] == [t for t, _ in want[k]], f"{what} {k}: timestamps"
        assert all(_close(a, b) for (_, a), (_, b) in zip(points, want[k])), \
            f"{what} {k}: values\n ours {points}\n prometheus {want[k]}"


def _same(ours: dict, theirs: dict, what: str) -> None:
    assert ours["resultType"] == theirs["resultType"], (what, ours, theirs)
    if ours["resultType"] == "scalar":
        assert float(ours["result"][0]) == float(theirs["result"][0]), what
        assert _close(_value(ours["result"][1]), _value(theirs["result"][1])), (what, ours,
                                                                                 theirs)
    elif ours["resultType"] == "vector":
        _same_vector(ours["result"], theirs["result"], what)
    else:
        _same_matrix(ours["result"], theirs["result"], what)


@pytest.mark.parametrize("form", FORMS)
def test_instant_queries_agree_with_prometheus(both, form):
    for t in TIMES:
        _same(both.ours("/api/v1/query", query=form, time=t),
              both.theirs("/api/v1/query", query=form, time=t), f"{form} @ {t}")


@pytest.mark.parametrize("form", [f for f in FORMS if "@" not in f])
def test_range_queries_agree_with_prometheus(both, form):
    start, end = START + 30 * 60 + 30, NOW - 30
    _same(both.ours("/api/v1/query_range", query=form, start=start, end=end, step=STEP),
          both.theirs("/api/v1/query_range", query=form, start=start, end=end, step=STEP),
          f"range {form}")


@pytest.mark.parametrize("form", MATRIX_FORMS)
def test_range_selectors_agree_with_prometheus(both, form):
    for t in TIMES[:3]:
        _same(both.ours("/api/v1/query", query=form, time=t),
              both.theirs("/api/v1/query", query=form, time=t), f"{form} @ {t}")


def test_the_corpus_reaches_every_kind_of_answer(both):
    """Not vacuous: the corpus has non-empty vectors, empty ones, scalars and flags at 1."""
    kinds = set()
    for form in FORMS:
        data = both.theirs("/api/v1/query", query=form, time=SPIKE + 330)
        kinds.add(data["resultType"] if data["result"] else "empty")
    assert kinds >= {"vector", "scalar", "empty"}
    flags = both.theirs("/api/v1/query", query="anomaly_flag == 1", time=SPIKE + 330)
    assert [r["metric"]["instance"] for r in flags["result"]] == ["a"]
