"""The PromQL subset: sampling, operators, aggregations and errors, over an in-memory storage."""

from __future__ import annotations

import math

import numpy as np
import pytest

from grafana_plugin_backend.query.promql import (
    Matrix,
    QueryError,
    Vector,
    evaluate,
    parse_selector,
    window_reduce,
)

STEP = 60.0
T = 1_700_000_000.0 - 1_700_000_000.0 % 3600  # a multiple of an hour


class GridStorage:
    """promql.Storage over functions of time: labels (with __name__) -> fn(t) (NaN = absent)."""

    step = STEP

    def __init__(self, series: dict[tuple, object]) -> None:
        self.series = {k: fn for k, fn in series.items()}
        self.loads: list[tuple[float, float]] = []

    def select(self, matchers):
        out = []
        for key in self.series:
            labels = dict(key)
            if all(m.matches(labels) for m in matchers):
                out.append(labels)
        return out

    def load(self, series, start, end):
        self.loads.append((start, end))
        g0 = math.ceil(start / STEP) * STEP
        ts = g0 + STEP * np.arange(max(0, math.floor((end - g0) / STEP + 1e-6) + 1))
        return np.array([self.series[tuple(sorted(lab.items()))](ts) for lab in series])


def key(name: str, **labels: str) -> tuple:
    return tuple(sorted({"__name__": name, "anomaly_query": "q", **labels}.items()))


def const(v: float):
    return lambda t: np.full(len(t), v)


def spike(base: float, at: float, value: float):
    """`base` everywhere, `value` at the one grid point `at`."""
    return lambda t: np.where(t == at, value, base)


@pytest.fixture
def storage() -> GridStorage:
    return GridStorage({
        key("anomaly_score", instance="a", job="x"): spike(0.5, T - 120, 3.0),
        key("anomaly_observed", instance="a", job="x"): lambda t: (t - T) / 60.0,
        key("anomaly_score", instance="b", job="x"): const(0.8),
        key("anomaly_score", instance="c", job="y"): const(1.5),
        key("anomaly_flag", instance="c", job="y"): const(1.0),
        key("anomaly_score", instance="gap", job="y"):
            lambda t: np.where(t < T - 1800, 0.2, np.nan),
    })


def instant(storage, q: str, t: float = T, **kw):
    return evaluate(storage, q, np.array([t]), 0.0, **kw)


def by_instance(v: Vector) -> dict[str, np.ndarray]:
    return {lab.get("instance", ""): row for lab, row in zip(v.labels, v.values)}


# ---- window_reduce ------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["max", "min", "sum", "count", "avg", "last"])
def test_window_reduce_agrees_with_a_loop(how):
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(3, 200))
    grid[rng.random(grid.shape) < 0.3] = np.nan
    hi = rng.integers(-5, 210, size=80)
    lo = hi - rng.integers(-1, 40, size=80)
    got = window_reduce(grid, lo, hi, how)
    for s in range(3):
        for j in range(80):
            a, b = max(lo[j], 0), min(hi[j], 199)
            w = grid[s, a:b + 1] if a <= b else np.empty(0)
            w = w[np.isfinite(w)]
            if not len(w):
                assert np.isnan(got[s, j]), (how, s, j)
                continue
            want = {"max": w.max(), "min": w.min(), "sum": w.sum(), "count": len(w),
                    "avg": w.mean(), "last": w[-1]}[how]
            assert got[s, j] == pytest.approx(want), (how, s, j)


# ---- scalars ------------------------------------------------------------------------------

@pytest.mark.parametrize("q,want", [("1+1", 2.0), ("2^3", 8.0), ("(1+2)*3", 9.0), ("-4", -4.0),
                                    ("7 % 4", 3.0), ("1 > bool 2", 0.0), ("3 >= bool 3", 1.0),
                                    ("10 / 4", 2.5)])
def test_scalar_arithmetic(storage, q, want):
    assert instant(storage, q)[0] == want


def test_scalar_division_by_zero_is_inf_like_prometheus(storage):
    assert instant(storage, "1/0")[0] == math.inf
    assert math.isnan(instant(storage, "5 % 0")[0])


# ---- selectors ----------------------------------------------------------------------------

@pytest.mark.parametrize("q,want", [
    ('anomaly_score{instance="a"}', {"a"}),
    ('anomaly_score{instance!="a"}', {"b", "c"}),  # "gap" has no sample at T
    ('anomaly_score{instance=~"a|b"}', {"a", "b"}),
    ('anomaly_score{instance!~"a|b"}', {"c"}),
    ('anomaly_score{instance=~"a.*|c"}', {"a", "c"}),  # anchored: "a.*" does not match "b"
    ('{__name__=~"anomaly_.*", job="y"}', {"c"}),
    ("anomaly_flag", {"c"}),
])
def test_selectors_with_all_matcher_kinds(storage, q, want):
    v = instant(storage, q)
    assert {lab["instance"] for lab, row in zip(v.labels, v.values) if np.isfinite(row[0])} == want


def test_name_regex_selects_several_metrics_with_names(storage):
    v = instant(storage, '{__name__=~"anomaly_.*", instance="c"}')
    assert sorted(lab["__name__"] for lab in v.labels) == ["anomaly_flag", "anomaly_score"]


def test_score_is_max_in_step_but_observed_is_last(storage):
    times = np.arange(T - 600, T + 1, 300.0)  # T-600, T-300, T
    v = evaluate(storage, 'anomaly_score{instance="a"}', times, 300.0)
    assert list(v.values[0]) == [0.5, 0.5, 3.0]  # the spike at T-120 lies in (T-300, T]
    o = evaluate(storage, 'anomaly_observed{instance="a"}', times, 300.0)
    assert list(o.values[0]) == [-10.0, -5.0, 0.0]  # last point at or before each time


def test_instant_query_uses_the_last_point_within_five_minutes(storage):
    assert instant(storage, 'anomaly_score{instance="a"}', T - 120 + 59).values[0, 0] == 3.0
    gap = instant(storage, 'anomaly_score{instance="gap"}', T - 1860 + 299)
    assert gap.values[0, 0] == 0.2  # the last point, T-1860, is 4m59s old
    gone = instant(storage, 'anomaly_score{instance="gap"}', T - 1860 + 300)
    assert np.isnan(gone.values[0, 0])  # 5m old: outside the lookback (t - 5m, t]


def test_offset_shifts_the_evaluation_time(storage):
    v = instant(storage, 'anomaly_observed{instance="a"} offset 10m')
    assert v.values[0, 0] == -10.0


def test_range_selector_in_an_instant_query_is_a_matrix(storage):
    m = instant(storage, "anomaly_observed{instance='a'}[5m]")
    assert isinstance(m, Matrix) and len(m.series) == 1
    labels, ts, vals = m.series[0]
    assert labels["__name__"] == "anomaly_observed"
    assert list(ts) == [T - 240, T - 180, T - 120, T - 60, T]  # (T-5m, T]
    assert list(vals) == [-4.0, -3.0, -2.0, -1.0, 0.0]


def test_range_selector_in_a_range_query_is_bad_data(storage):
    with pytest.raises(QueryError) as e:
        evaluate(storage, "anomaly_score[5m]", np.array([T - 60, T]), 60.0)
    assert e.value.error_type == "bad_data" and e.value.status == 400


@pytest.mark.parametrize("fn,want", [("max_over_time", 3.0), ("avg_over_time", 0.75),
                                     ("min_over_time", 0.5), ("count_over_time", 10.0),
                                     ("last_over_time", 0.5)])
def test_over_time_functions(storage, fn, want):
    v = instant(storage, f'{fn}(anomaly_score{{instance="a"}}[10m])')
    assert v.values[0, 0] == pytest.approx(want)
    # Prometheus drops the metric name, except for last_over_time (the series' own samples).
    assert ("__name__" in v.labels[0]) == (fn == "last_over_time")


# ---- operators ----------------------------------------------------------------------------

def test_comparison_filters_and_keeps_the_name(storage):
    v = instant(storage, "anomaly_score > 1")
    got = {lab["instance"]: row[0] for lab, row in zip(v.labels, v.values) if np.isfinite(row[0])}
    assert got == {"c": 1.5}
    assert all(lab["__name__"] == "anomaly_score" for lab in v.labels)


def test_comparison_with_bool_gives_zero_or_one_without_name(storage):
    v = instant(storage, "anomaly_score > bool 1")
    got = by_instance(v)
    assert got["a"][0] == 0.0 and got["c"][0] == 1.0 and np.isnan(got["gap"][0])
    assert all("__name__" not in lab for lab in v.labels)


def test_scalar_on_the_left_and_arithmetic(storage):
    # As in Prometheus: `scalar < vector` filters and keeps the vector's sample values and name.
    v = instant(storage, '1 < anomaly_score')
    got = {lab["instance"]: r[0] for lab, r in zip(v.labels, v.values) if np.isfinite(r[0])}
    assert got == {"c": 1.5}
    assert all(lab["__name__"] == "anomaly_score" for lab in v.labels)
    # the same over a range: the spike of "a" (3.0 at T-120) passes, its 0.5 elsewhere does not
    r = evaluate(storage, '2 <= anomaly_score{instance="a"}', np.array([T - 180, T - 120, T]), 60.0)
    assert r.values[0, 1] == 3.0 and np.isnan(r.values[0, [0, 2]]).all()
    # with bool: 0 or 1 per sample, name dropped, absent stays absent
    b = by_instance(instant(storage, '1 < bool anomaly_score'))
    assert b["a"][0] == 0.0 and b["b"][0] == 0.0 and b["c"][0] == 1.0 and np.isnan(b["gap"][0])
    # a non-commutative operator with the scalar on the left
    assert instant(storage, '3 - anomaly_score{instance="b"}').values[0, 0] == pytest.approx(2.2)
    w = instant(storage, 'anomaly_score{instance="b"} * 10')
    assert w.values[0, 0] == pytest.approx(8.0) and "__name__" not in w.labels[0]


# ---- aggregations -------------------------------------------------------------------------

@pytest.mark.parametrize("q,want", [
    ("max by (job) (anomaly_score)", {"x": 0.8, "y": 1.5}),
    ("min by (job) (anomaly_score)", {"x": 0.5, "y": 1.5}),
    ("sum by (job) (anomaly_score)", {"x": 1.3, "y": 1.5}),
    ("avg by (job) (anomaly_score)", {"x": 0.65, "y": 1.5}),
    ("count by (job) (anomaly_score)", {"x": 2.0, "y": 1.0}),
    ("max without (instance, anomaly_query) (anomaly_score)", {"x": 0.8, "y": 1.5}),
])
def test_aggregations_by_and_without(storage, q, want):
    v = instant(storage, q)
    got = {lab["job"]: row[0] for lab, row in zip(v.labels, v.values)}
    assert got == pytest.approx(want)
    assert all(set(lab) == {"job"} for lab in v.labels)


def test_aggregation_without_grouping(storage):
    v = instant(storage, "max(anomaly_score)")
    assert v.labels == [{}] and v.values[0, 0] == 1.5


def test_topk_and_bottomk_keep_labels(storage):
    v = instant(storage, "topk(2, anomaly_score)")
    got = {lab["instance"]: r[0] for lab, r in zip(v.labels, v.values) if np.isfinite(r[0])}
    assert got == {"c": 1.5, "b": 0.8}
    assert all(lab["__name__"] == "anomaly_score" for lab in v.labels)
    w = instant(storage, "bottomk(1, anomaly_score)")
    assert {lab["instance"] for lab, r in zip(w.labels, w.values) if np.isfinite(r[0])} == {"a"}


def test_instant_topk_and_bottomk_come_in_rank_order_as_in_prometheus(storage):
    def ranked(q: str) -> list[tuple[str, float]]:
        v = instant(storage, q)
        return [(lab["instance"], r[0]) for lab, r in zip(v.labels, v.values) if np.isfinite(r[0])]

    assert ranked("topk(3, anomaly_score)") == [("c", 1.5), ("b", 0.8), ("a", 0.5)]
    assert ranked("bottomk(2, anomaly_score)") == [("a", 0.5), ("b", 0.8)]
    # per group, groups in the order their first series comes
    assert ranked("topk(1, anomaly_score) by (job)") == [("b", 0.8), ("c", 1.5)]


def test_topk_over_a_range_selects_per_step(storage):
    times = np.array([T - 180, T - 120])
    v = evaluate(storage, "topk(1, anomaly_score{job='x'})", times, 60.0)
    got = by_instance(v)
    assert np.isnan(got["a"][0]) and got["a"][1] == 3.0  # a's spike at T-120
    assert got["b"][0] == 0.8 and np.isnan(got["b"][1])


# ---- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("q", ["anomaly_score{", "1 +", "sum(", "anomaly_score{instance=~'('}",
                               "", "   "])
def test_malformed_queries_are_bad_data(storage, q):
    with pytest.raises(QueryError) as e:
        instant(storage, q)
    assert e.value.error_type == "bad_data" and e.value.status == 400 and str(e.value)


@pytest.mark.parametrize("q,what", [
    ("rate(anomaly_score[5m])", "rate"),
    ("anomaly_score / anomaly_flag", "two vectors"),
    ("anomaly_score and anomaly_flag", "two vectors"),
    ("max_over_time(anomaly_score[1h:5m])", "range selector"),
    ("anomaly_score[1h:5m]", "subquery"),
    ('"text"', "string"),
    ("quantile(0.9, anomaly_score)", "quantile"),
    ("node_cpu_seconds_total", "Prometheus itself"),
])
def test_unsupported_queries_are_execution_errors_that_say_so(storage, q, what):
    with pytest.raises(QueryError) as e:
        instant(storage, q)
    assert e.value.error_type == "execution" and e.value.status == 422
    assert what in str(e.value)


def test_series_limit(storage):
    with pytest.raises(QueryError) as e:
        instant(storage, "anomaly_score", max_series=3)
    assert e.value.status == 422 and "limit of 3" in str(e.value)
    assert storage.loads == []  # refused before any data was loaded


def test_two_series_with_one_labelset_after_dropping_names(storage):
    with pytest.raises(QueryError) as e:
        instant(storage, '{instance="c"} * 1')
    assert "same labelset" in str(e.value)


def test_match_param_must_be_a_selector():
    assert [m.name for m in parse_selector('anomaly_score{job="x"}')] == ["__name__", "job"]
    with pytest.raises(QueryError) as e:
        parse_selector("sum(anomaly_score)")
    assert e.value.error_type == "bad_data"
