"""The Prometheus-compatible query API, driven with the requests Grafana's datasource sends.

The service runs in-process over a fake source with a day of history; scoring is the fake
score = value / 10 (tests/service_fixtures.py), so expected values are exact.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from grafana_plugin_backend.source.prometheus import SourceError
from grafana_plugin_backend.web.app import Service, create_app
from tests.service_fixtures import (
    T0,
    FakeClock,
    FakeFit,
    FakeSource,
    fake_score_many,
    make_config,
    started_service,
)
from tests.web.spike_world import HOUR, SPIKE, A, B, level_a, spike_world


@pytest.fixture
def world(tmp_path):
    return spike_world(tmp_path)


@pytest.fixture
def client(world):
    return world[0].test_client()


def scorer(world):
    return world[0].extensions["promvae_query"].scorer


def ok(resp) -> dict:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["status"] == "success"
    return body["data"]


def error(resp, status: int, error_type: str) -> str:
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body) == {"status", "errorType", "error"}
    assert body["status"] == "error" and body["errorType"] == error_type
    assert body["error"] and "Traceback" not in body["error"]
    return body["error"]


# ---- what Grafana sends -------------------------------------------------------------------

def test_grafana_save_and_test_posts_one_plus_one(client):
    resp = client.post("/api/v1/query", data="query=1%2B1&time=4",
                       content_type="application/x-www-form-urlencoded")
    assert resp.get_json() == {"status": "success",
                               "data": {"resultType": "scalar", "result": [4, "2"]}}


def test_post_with_parameters_in_the_url_and_an_empty_body(client):
    data = ok(client.post("/api/v1/query?query=1%2B1&time=4"))
    assert data == {"resultType": "scalar", "result": [4, "2"]}


def test_range_query_as_grafana_posts_it(client):
    start, end = SPIKE - 600, SPIKE + 600  # aligned to the 60 s step, sent as floats
    data = ok(client.post("/api/v1/query_range", data={
        "query": 'anomaly_score{anomaly_query="q"}', "start": f"{start:.1f}",
        "end": f"{end:.1f}", "step": "60"}))
    assert data["resultType"] == "matrix"
    series = {r["metric"]["instance"]: r for r in data["result"]}
    assert set(series) == {"a", "b"}
    a = series["a"]
    assert set(a) == {"metric", "values"}
    assert a["metric"] == {"__name__": "anomaly_score", "anomaly_query": "q", **A}
    assert len(a["values"]) == 21
    for t, v in a["values"]:
        assert isinstance(t, (int, float)) and isinstance(v, str)
    values = {t: float(v) for t, v in a["values"]}
    assert values[SPIKE] == 2.5 and values[SPIKE + 120] == 2.5
    assert values[SPIKE - 60] == 0.5 and values[SPIKE + 180] == 0.5
    assert {v for _, v in series["b"]["values"]} == {"0.3"}


def test_coarse_steps_keep_a_short_spike_but_observed_is_the_last_value(client):
    # the spike covers SPIKE, +60, +120: in (SPIKE - 600, SPIKE] and (SPIKE, SPIKE + 600]
    args = {"start": SPIKE - 1200, "end": SPIKE + 1200, "step": "600"}
    score = ok(client.get("/api/v1/query_range",
                          query_string={"query": 'anomaly_score{instance="a"}', **args}))
    assert [float(v) for _, v in score["result"][0]["values"]] == [0.5, 0.5, 2.5, 2.5, 0.5]
    obs = ok(client.get("/api/v1/query_range",
                        query_string={"query": 'anomaly_observed{instance="a"}', **args}))
    # the value at each time
    assert [float(v) for _, v in obs["result"][0]["values"]] == [5.0, 5.0, 25.0, 5.0, 5.0]


def test_rfc3339_times_and_duration_steps_equal_floats(client):
    def iso(t: float) -> str:
        return datetime.fromtimestamp(t, tz=UTC).isoformat().replace("+00:00", "Z")

    q = 'anomaly_flag{instance="a"}'
    floats = ok(client.get("/api/v1/query_range", query_string={
        "query": q, "start": SPIKE - 300, "end": SPIKE + 300, "step": "60"}))
    texts = ok(client.get("/api/v1/query_range", query_string={
        "query": q, "start": iso(SPIKE - 300), "end": iso(SPIKE + 300), "step": "1m"}))
    assert floats == texts
    assert ["1"] * 3 == [v for t, v in floats["result"][0]["values"] if SPIKE <= t < SPIKE + 180]


def test_instant_query_at_now_agrees_with_metrics(world):
    app, _, _, clock = world
    client = app.test_client()
    text = client.get("/metrics").get_data(as_text=True)
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("anomaly_score", "anomaly_observed", "anomaly_flag", "anomaly_upper"):
        exposed = {s.labels["instance"]: s.value for s in fams[name].samples}
        data = ok(client.post("/api/v1/query", data={"query": name}))  # time: now
        got = {r["metric"]["instance"]: float(r["value"][1]) for r in data["result"]}
        assert got == exposed and len(got) == 2
        assert all(r["value"][0] == clock() for r in data["result"])
    assert scorer(world).passes == 0  # answered from the live state, nothing rescored


def test_on_demand_rescoring_with_the_real_model_matches_the_live_scores(tmp_path):
    """The live poller scores a few new points at a time; the query API scores whole ranges
    on demand. With the real model (training and score_many), both must give the same values
    for the same times, up to the newest point /metrics exposes (to float32 rounding: the live
    bank scores one window per series, on demand a range, and batched matmuls round by shape)."""
    from tests.service_fixtures import seasonal

    clock = FakeClock(T0)
    source = FakeSource(clock, start=T0 - 12 * HOUR)
    source.set("metric_a", A, seasonal(level=10.0, seed=1))
    source.set("metric_a", B, seasonal(level=3.0, noise=0.1, seed=2))
    cfg = make_config(tmp_path, keep_scores="1h")
    svc = Service(cfg, source=source, clock=clock)  # real fit_many and score_many
    app = create_app(cfg, service=svc)
    svc.poller.poll_once()
    svc.trainer.run_once()
    for _ in range(12):  # twelve ticks: live points scored one poll at a time
        svc.poller.poll_once()
        clock.advance(60)
    svc.poller.poll_once()
    client = app.test_client()
    fams = {f.name: f for f in text_string_to_metric_families(
        client.get("/metrics").get_data(as_text=True))}
    live = {}
    for inst, labels in (("a", A), ("b", B)):
        s = svc.registry.get_by_labels("q", labels)
        live[inst] = {k: v.copy() for k, v in s.recent.items()}
        assert len(live[inst]["timestamp"]) >= 13 and np.isfinite(live[inst]["score"]).all()
        s.recent = {}  # forget the live points: the query API must score these times again
    t0, t1 = (float(live["a"]["timestamp"][0]), float(live["a"]["timestamp"][-1]))
    assert t1 == clock()
    passes = app.extensions["promvae_query"].scorer.passes
    for metric, field in (("anomaly_score", "score"), ("anomaly_expected", "expected"),
                          ("anomaly_upper", "upper"), ("anomaly_flag", "flag")):
        data = ok(client.get("/api/v1/query_range", query_string={
            "query": metric, "start": t0, "end": t1, "step": 60}))
        got = {r["metric"]["instance"]: r["values"] for r in data["result"]}
        assert set(got) == {"a", "b"}
        for inst, rows in got.items():
            assert [t for t, _ in rows] == list(live[inst]["timestamp"]), (metric, inst)
            assert np.array([float(v) for _, v in rows]) == pytest.approx(
                live[inst][field], rel=1e-6, abs=1e-6), (metric, inst)
        # where the live buffer ends: the newest point, which /metrics exposed
        exposed = {x.labels["instance"]: x.value for x in fams[metric].samples}
        now = ok(client.get("/api/v1/query", query_string={"query": metric, "time": t1}))
        assert {r["metric"]["instance"]: float(r["value"][1]) for r in now["result"]} \
            == pytest.approx(exposed, rel=1e-6, abs=1e-6), metric
    assert app.extensions["promvae_query"].scorer.passes > passes  # rescored, not the live buffer


def test_comparison_and_topk_instant_queries(client):
    t = SPIKE + 60
    hot = ok(client.get("/api/v1/query", query_string={"query": "anomaly_score > 1", "time": t}))
    assert hot["resultType"] == "vector"
    assert [(r["metric"]["instance"], r["value"]) for r in hot["result"]] == [("a", [t, "2.5"])]
    top = ok(client.get("/api/v1/query", query_string={"query": "topk(1, anomaly_score)",
                                                       "time": t}))
    assert [r["metric"]["instance"] for r in top["result"]] == ["a"]


def test_range_selector_instant_query_returns_a_matrix(client):
    # prometheus-api-client's get_metric_range_data sends this (single-quoted values)
    data = ok(client.get("/api/v1/query", query_string={
        "query": "anomaly_score{instance='b'}[10m]", "time": SPIKE}))
    assert data["resultType"] == "matrix"
    (series,) = data["result"]
    assert series["metric"]["__name__"] == "anomaly_score"
    assert [t for t, _ in series["values"]] == [SPIKE - 540 + 60 * i for i in range(10)]


def test_scalar_in_a_range_query_is_one_series_without_labels(client):
    data = ok(client.get("/api/v1/query_range", query_string={
        "query": "2*3", "start": 100, "end": 220, "step": 60}))
    assert data == {"resultType": "matrix",
                    "result": [{"metric": {}, "values": [[100, "6"], [160, "6"], [220, "6"]]}]}


# ---- labels, series, metadata -------------------------------------------------------------

def test_labels_merge_match_lists_from_url_and_form(client):
    every = ok(client.get("/api/v1/labels"))
    assert every == ["__name__", "anomaly_query", "instance", "job"]
    data = ok(client.post("/api/v1/series?match[]=anomaly_score{instance=%22a%22}",
                          data={"match[]": ['anomaly_flag{instance="b"}']}))
    assert sorted((s["__name__"], s["instance"]) for s in data) == [
        ("anomaly_flag", "b"), ("anomaly_score", "a")]
    assert all(set(s) == {"__name__", "anomaly_query", "instance", "job"} for s in data)


def test_label_values(client):
    assert ok(client.get("/api/v1/label/anomaly_query/values")) == ["q"]
    assert ok(client.get("/api/v1/label/__name__/values")) == sorted([
        "anomaly_score", "anomaly_flag", "anomaly_expected", "anomaly_lower",
        "anomaly_upper", "anomaly_observed"])
    assert ok(client.get("/api/v1/label/instance/values",
                         query_string={"match[]": 'anomaly_score{instance!="a"}'})) == ["b"]
    assert ok(client.get("/api/v1/label/instance/values", query_string={"limit": 1})) == ["a"]
    assert ok(client.get("/api/v1/label/nonexistent/values")) == []


def test_metadata_buildinfo_rules_exemplars(client):
    meta = ok(client.get("/api/v1/metadata"))
    # The metadata Grafana shows must be what /metrics says of each metric (HELP and TYPE).
    text = client.get("/metrics").get_data(as_text=True)
    exposed = {f.name: f for f in text_string_to_metric_families(text)
               if f.name.startswith("anomaly_")}
    assert set(meta) == set(exposed) and len(meta) == 6
    for name, fam in exposed.items():
        assert meta[name] == [{"type": fam.type, "help": fam.documentation, "unit": ""}], name
    assert "threshold" in meta["anomaly_score"][0]["help"]
    assert list(ok(client.get("/api/v1/metadata", query_string={"metric": "anomaly_flag"}))) \
        == ["anomaly_flag"]
    info = ok(client.get("/api/v1/status/buildinfo"))
    assert "features" not in info and info["version"]
    assert ok(client.get("/api/v1/rules")) == {"groups": []}
    assert ok(client.post("/api/v1/query_exemplars", data={"query": "anomaly_score"})) == []


def test_status_page_still_answers(client):
    import html

    # "/" is still the HTML status page of this service's series, not taken by the query API
    resp = client.get("/")
    assert resp.status_code == 200 and resp.mimetype == "text/html"
    page = html.unescape(resp.get_data(as_text=True))
    assert 'instance="a", job="app"' in page and 'instance="b", job="app"' in page
    assert "2 series" in page


# ---- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("params,status,etype,words", [
    ({"query": "anomaly_score{", "start": 0, "end": 60, "step": 60}, 400, "bad_data", "parse"),
    ({"query": "rate(anomaly_score[5m])", "start": 0, "end": 60, "step": 60}, 422, "execution",
     "not supported"),
    ({"query": "up", "start": 0, "end": 60, "step": 60}, 422, "execution", "Prometheus itself"),
    ({"query": "anomaly_score", "start": "yesterday", "end": 60, "step": 60}, 400, "bad_data",
     "'start'"),
    ({"query": "anomaly_score", "start": 0, "end": "nan", "step": 60}, 400, "bad_data", "'end'"),
    ({"query": "anomaly_score", "start": 0, "end": 60, "step": 0}, 400, "bad_data", "positive"),
    ({"query": "anomaly_score", "start": 0, "end": 60, "step": "-5"}, 400, "bad_data",
     "'step'"),
    ({"query": "anomaly_score", "start": 0, "end": 60, "step": "fast"}, 400, "bad_data",
     "'step'"),
    ({"query": "anomaly_score", "start": 120, "end": 60, "step": 60}, 400, "bad_data",
     "before start"),
    ({"query": "anomaly_score", "start": 0, "end": 11_000 * 60, "step": 60}, 400, "bad_data",
     "11,000"),
    ({"start": 0, "end": 60, "step": 60}, 400, "bad_data", "'query'"),
    ({"query": "anomaly_score", "end": 60, "step": 60}, 400, "bad_data", "'start'"),
    ({"query": "anomaly_score[5m]", "start": 0, "end": 60, "step": 60}, 400, "bad_data",
     "range vector"),
])
def test_range_query_errors(client, params, status, etype, words):
    assert words in error(client.post("/api/v1/query_range", data=params), status, etype)


def test_exactly_eleven_thousand_points_is_allowed(client):
    ok(client.get("/api/v1/query_range", query_string={
        "query": "1", "start": 0, "end": 10_999 * 60, "step": 60}))


def test_instant_query_errors(client):
    error(client.get("/api/v1/query", query_string={"query": "1+1", "time": "soon"}),
          400, "bad_data")
    error(client.get("/api/v1/query", query_string={"query": "anomaly_score / anomaly_flag"}),
          422, "execution")


def test_label_endpoint_errors(client):
    assert "label name" in error(client.get("/api/v1/label/1bad/values"), 400, "bad_data")
    error(client.get("/api/v1/labels", query_string={"match[]": "sum(anomaly_score)"}),
          400, "bad_data")
    error(client.get("/api/v1/series"), 400, "bad_data")
    error(client.get("/api/v1/labels", query_string={"limit": "x"}), 400, "bad_data")


def test_series_limit_per_query(world):
    app, *_ = world
    app.config["PROMVAE_QUERY_MAX_SERIES"] = 1
    resp = app.test_client().get("/api/v1/query", query_string={"query": "anomaly_score"})
    assert "limit of 1" in error(resp, 422, "execution")
    sample = world[1].metrics_registry.get_sample_value
    assert sample("promvae_query_errors_total", {"type": "execution"}) == 1


def test_source_down_is_unavailable(world):
    app, _, source, _ = world
    source.fail = "connection"
    resp = app.test_client().get("/api/v1/query_range", query_string={
        "query": "anomaly_score", "start": SPIKE, "end": SPIKE + 60, "step": 60})
    assert "source series" in error(resp, 503, "unavailable")


def test_an_unexpected_failure_is_a_422_not_a_500(world, monkeypatch):
    app = world[0]

    def broken(models, series):
        raise RuntimeError("boom")

    monkeypatch.setattr(scorer(world), "score_fn", broken)
    resp = app.test_client().get("/api/v1/query_range", query_string={
        "query": "anomaly_score", "start": SPIKE, "end": SPIKE + 60, "step": 60})
    assert "internal error" in error(resp, 422, "execution")


# ---- on-demand scoring and its cache ------------------------------------------------------

def test_past_ranges_are_cached_until_the_model_changes(world):
    app, svc, source, _ = world
    client = app.test_client()
    args = {"query": "anomaly_score", "start": SPIKE - 3600, "end": SPIKE, "step": 60}
    first = ok(client.get("/api/v1/query_range", query_string=args))
    calls, passes = len(source.calls), scorer(world).passes
    assert ok(client.get("/api/v1/query_range", query_string=args)) == first
    assert (len(source.calls), scorer(world).passes) == (calls, passes)  # served from cache
    s = svc.registry.get_by_labels("q", A)
    fit = FakeFit(svc.clock)
    s.model = fit([svc.trainer._pull_history([s])[0][1]], 60.0, svc.vae_config)[0]  # retrained
    assert ok(client.get("/api/v1/query_range", query_string=args)) == first
    assert scorer(world).passes == passes + 1  # the new model scored again
    assert source.calls[-1][0] == "metric_a"


def test_on_demand_pull_includes_the_lead_in(world):
    from detector import lead_in_points

    app, svc, source, _ = world
    before = len(source.calls)
    ok(app.test_client().get("/api/v1/query_range", query_string={
        "query": 'anomaly_score{instance="a"}', "start": SPIKE, "end": SPIKE + 600, "step": 60}))
    (expr, start, end, step), = source.calls[before:]
    assert expr == "metric_a"
    assert start <= SPIKE - 300 - lead_in_points(svc.vae_config) * 60  # lookback + lead-in
    assert end >= SPIKE + 600 and step == 60.0


def test_source_errors_never_leak_a_500(world):
    app, _, source, _ = world

    def raising(*a, **k):
        raise SourceError("bad_query", "Prometheus answered HTTP 400")

    source.query_range = raising
    resp = app.test_client().get("/api/v1/query", query_string={
        "query": "anomaly_score", "time": SPIKE})
    error(resp, 503, "unavailable")


def test_a_range_ending_now_is_scored_once_then_served_from_cache_and_live_state(world):
    app = world[0]
    client = app.test_client()
    args = {"query": 'anomaly_observed{instance="b"}', "start": T0 - 3 * HOUR, "end": T0,
            "step": 60}
    first = ok(client.get("/api/v1/query_range", query_string=args))
    passes = scorer(world).passes
    assert passes == 1
    assert ok(client.get("/api/v1/query_range", query_string=args)) == first
    assert scorer(world).passes == passes  # settled part cached, the last hour is live state
    times = [t for t, _ in first["result"][0]["values"]]
    assert times == [T0 - 3 * HOUR + 60 * i for i in range(181)]  # no hole at the seam


def _dashboard_exprs() -> list[str]:
    import json
    from pathlib import Path

    found: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str) and "anomaly_" in node["expr"]:
                found.append(node["expr"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    root = Path(__file__).resolve().parents[2] / "dashboards" / "grafana"
    for path in sorted(root.glob("*.json")):
        walk(json.loads(path.read_text()))
    return sorted(set(found))


@pytest.mark.parametrize("expr", _dashboard_exprs() or ["anomaly_score"])
def test_every_anomaly_query_of_the_shipped_dashboards_is_answered(client, expr):
    q = (expr.replace("$anomaly_query", "q").replace("$instance", ".*")
         .replace("$series", 'anomaly_query="q",instance="a",job="app"')  # one label set
         .replace("$__rate_interval", "5m").replace("$__interval", "1m"))
    data = ok(client.post("/api/v1/query_range", data={
        "query": q, "start": SPIKE - 600, "end": SPIKE + 600, "step": "60"}))
    assert data["resultType"] == "matrix" and data["result"], q


# ---- limits from the config and vanished series ------------------------------------------

def _world_with(tmp_path, **overrides):
    clock = FakeClock(T0)
    source = FakeSource(clock, start=T0 - 24 * HOUR)
    source.set("metric_a", A, level_a)
    source.set("metric_a", B, lambda t: np.full(len(t), 3.0))
    cfg = make_config(tmp_path, **{"keep_scores": "1h", **overrides})
    app, svc = started_service(cfg, source, clock)
    return app, svc, source


def test_query_limits_are_config_keys(tmp_path):
    app, *_ = _world_with(tmp_path, query_max_series=6, query_max_score_points=100)
    client = app.test_client()
    assert len(ok(client.get("/api/v1/query", query_string={"query": "anomaly_score"}))[
        "result"]) == 2  # 2 series x 1 metric fits 6
    msg = error(client.get("/api/v1/query", query_string={"query": "{__name__=~'anomaly_.*'}"}),
                422, "execution")
    assert "limit of 6" in msg  # 2 series x 6 metrics
    msg = error(client.get("/api/v1/query_range", query_string={
        "query": "anomaly_score", "start": SPIKE - 3 * HOUR, "end": SPIKE, "step": 60}),
        422, "execution")
    assert "limit of 100 points" in msg


def test_a_query_past_its_timeout_is_cancelled_with_a_timeout_error(tmp_path):
    app, svc, source = _world_with(tmp_path, query_timeout="1ms")
    calls = len(source.calls)
    scorer = app.extensions["promvae_query"].scorer
    scorer._score_lock.acquire()  # another query is scoring and holds on for longer
    try:
        msg = error(app.test_client().get("/api/v1/query_range", query_string={
            "query": "anomaly_score", "start": SPIKE, "end": SPIKE + 600, "step": 60}),
            503, "timeout")
    finally:
        scorer._score_lock.release()
    assert "timed out" in msg and "query_timeout" in msg
    assert len(source.calls) == calls  # cancelled before reading the source
    sample = svc.metrics_registry.get_sample_value
    assert sample("promvae_query_errors_total", {"type": "timeout"}) == 1


def test_a_timeout_between_scoring_batches_stops_the_pass(tmp_path, monkeypatch):
    from grafana_plugin_backend.query import ondemand

    app, _svc, _source = _world_with(tmp_path)
    scorer = app.extensions["promvae_query"].scorer
    monkeypatch.setattr(ondemand, "SCORE_BATCH", 1)
    batches = []

    def slow_score(models, series):  # the first batch uses up the query's time
        batches.append(len(models))
        scorer.timeout = -1.0
        monkeypatch.setattr(ondemand.time, "monotonic", lambda: math.inf)
        return fake_score_many(models, series)

    scorer.score_fn = slow_score
    msg = error(app.test_client().get("/api/v1/query_range", query_string={
        "query": "anomaly_score", "start": SPIKE, "end": SPIKE + 600, "step": 60}),
        503, "timeout")
    assert batches == [1] and "1 of 2 series done" in msg


def test_a_vanished_series_stays_queryable_for_past_ranges(tmp_path):
    from tests.service_fixtures import FakeStore

    app, svc, _source = _world_with(tmp_path)
    svc.store = FakeStore()
    s = svc.registry.get_by_labels("q", A)
    svc.store.save(s.id, s.model)
    s.stored = True
    svc.registry.remove(s.id, T0)  # gone from the source and from /metrics
    assert svc.registry.get(s.id) is None
    client = app.test_client()
    values = ok(client.get("/api/v1/label/instance/values"))
    assert "a" in values
    data = ok(client.get("/api/v1/query_range", query_string={
        "query": 'anomaly_score{instance="a"}', "start": SPIKE, "end": SPIKE + 120, "step": 60}))
    (row,) = data["result"]
    assert [float(v) for _, v in row["values"]] == [2.5, 2.5, 2.5]
    svc.store.delete(s.id)  # model deleted after model_retention: nothing to score
    svc.registry.vanished.pop(s.id)
    data = ok(client.get("/api/v1/query_range", query_string={
        "query": 'anomaly_score{instance="a"}', "start": SPIKE, "end": SPIKE + 120, "step": 60}))
    assert data["result"] == []


def test_queries_beyond_the_concurrency_limit_wait_then_time_out(tmp_path):
    app, _svc, _ = _world_with(tmp_path, query_max_concurrency=1, query_timeout="50ms")
    api = app.extensions["promvae_query"]
    client = app.test_client()
    assert ok(client.get("/api/v1/query", query_string={"query": "1+1"}))["result"][1] == "2"
    api.slots.acquire()  # one query running: the next one waits for its slot, then gives up
    try:
        msg = error(client.get("/api/v1/query", query_string={"query": "1+1"}), 503, "timeout")
    finally:
        api.slots.release()
    assert "query_max_concurrency" in msg
    assert ok(client.get("/api/v1/query", query_string={"query": "1+1"}))["result"][1] == "2"


def test_the_dashboards_default_6h_range_is_served_from_the_live_buffer(tmp_path):
    app, _, source = _world_with(tmp_path, keep_scores="6h")  # the default
    calls, passes = len(source.calls), app.extensions["promvae_query"].scorer.passes
    data = ok(app.test_client().get("/api/v1/query_range", query_string={
        "query": 'anomaly_score{instance="a"}', "start": T0 - 6 * HOUR, "end": T0, "step": 60}))
    (row,) = data["result"]
    assert len(row["values"]) == 361  # every point, scored after the first training
    assert max(float(v) for _, v in row["values"]) == 2.5  # the spike, 5 h ago
    assert len(source.calls) == calls  # no on-demand pull
    assert app.extensions["promvae_query"].scorer.passes == passes


def test_an_on_demand_pull_for_one_series_asks_prometheus_for_that_series_only(world):
    import re

    app, _, source, _ = world
    base = type(source).query_range

    def narrowed(expr, start, end, step):  # what Prometheus would do with only_series()
        m = re.fullmatch(r"\((.*)\) and on\((.*?)\) \((.*)\)", expr)
        if m is None:
            return base(source, expr, start, end, step)
        names = m.group(2).split(", ")
        wanted = [{k: "" for k in names} | dict(re.findall(r'"(\w+)", "([^"]*)"', part))
                  for part in m.group(3).split(" or ")]
        found = base(source, m.group(1), start, end, step)
        source.calls[-1] = (expr, start, end, step)
        return [rs for rs in found if {k: rs.labels.get(k, "") for k in names} in wanted]

    source.narrowable = True
    source.query_range = narrowed
    data = ok(app.test_client().get("/api/v1/query_range", query_string={
        "query": 'anomaly_score{instance="a"}', "start": SPIKE, "end": SPIKE + 120, "step": 60}))
    assert [float(v) for _, v in data["result"][0]["values"]] == [2.5, 2.5, 2.5]
    expr = source.calls[-1][0]
    assert expr.startswith("(metric_a) and on(instance, job) (")
    assert '"instance", "a"' in expr and '"instance", "b"' not in expr
    # Both series wanted: the plain query, no narrowing.
    ok(app.test_client().get("/api/v1/query_range", query_string={
        "query": "anomaly_score", "start": SPIKE - 7200, "end": SPIKE - 3600, "step": 60}))
    assert source.calls[-1][0] == "metric_a"


def test_rfc3339_without_an_offset_is_utc_and_a_lower_case_z_is_accepted(client):
    from grafana_plugin_backend.query.params import parse_time

    assert parse_time("t", "2023-11-14T22:13:20") == 1700000000.0
    assert parse_time("t", "2023-11-14t22:13:20z") == 1700000000.0
    assert parse_time("t", "2023-11-14T23:13:20+01:00") == 1700000000.0


def test_the_warm_up_at_the_start_of_the_live_buffer_is_scored_on_demand(tmp_path):
    # history == keep_scores: the buffer filled after the first training starts with a
    # window's warm-up of unscored points; the source holds more, so the API scores them.
    app, svc, _ = _world_with(tmp_path, keep_scores="1h", history="1h")
    s = svc.registry.get_by_labels("q", B)
    ts, score = s.recent["timestamp"], s.recent["score"]
    assert np.isnan(score[0]) and np.isfinite(score[-1])
    t = float(ts[10])  # unscored in the buffer, as is the lookback before it
    data = ok(app.test_client().get("/api/v1/query", query_string={
        "query": 'anomaly_score{instance="b"}', "time": t}))
    assert [float(r["value"][1]) for r in data["result"]] == [0.3]
