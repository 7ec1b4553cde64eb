"""GET /api/v1/explain over an in-process service with real (tiny) models and a fake source."""

from __future__ import annotations

import base64

import bcrypt
import numpy as np
import pytest
import torch

from grafana_plugin_backend.config.web import WebConfig
from grafana_plugin_backend.web.app import Service, create_app
from tests.service_fixtures import T0, TINY_WINDOW, FakeClock, FakeSource, make_config, seasonal

HOUR = 3600.0
SPIKE_AT = T0 - 600.0  # ten minutes before "now": inside the live buffer
PW_HASH = bcrypt.hashpw(b"secret", bcrypt.gensalt(rounds=4)).decode()
AUTH = "Basic " + base64.b64encode(b"alice:secret").decode()


def spiky(fn):
    def f(t):
        v = fn(t)
        return np.where(np.abs(t - SPIKE_AT) < 1.0, v + 500.0, v)
    return f


@pytest.fixture(scope="module")
def svc_app(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    clock = FakeClock(T0 - HOUR)
    source = FakeSource(clock, start=T0 - 24 * HOUR)
    source.set("metric_a", {"instance": "a", "job": "app"}, spiky(seasonal(10.0, seed=1)))
    source.set("metric_a", {"instance": "b", "job": "app"}, seasonal(5.0, seed=2))
    cfg = make_config(tmp_path_factory.mktemp("explain"), history="6h")
    svc = Service(cfg, source=source, clock=clock)
    app = create_app(cfg, service=svc, web_config=WebConfig(users={"alice": PW_HASH}))
    svc.poller.poll_once()
    svc.trainer.run_once()
    svc.poller.poll_once()
    clock.advance(HOUR)  # an hour of live polling, the spike in it
    for _ in range(4):
        svc.poller.poll_once()
    assert svc.registry.counts_by_state()["ready"] == 2
    yield svc, app, source
    torch.set_num_threads(before)


@pytest.fixture
def client(svc_app):
    c = svc_app[1].test_client()
    c.environ_base["HTTP_AUTHORIZATION"] = AUTH
    return c


def series_a(svc):
    return svc.registry.get_by_labels("q", {"instance": "a", "job": "app"})


def test_newest_point_by_id_matches_the_live_score(svc_app, client):
    svc, _, _ = svc_app
    s = series_a(svc)
    body = client.get("/api/v1/explain", query_string={"series": s.id}).get_json()
    assert body["status"] == "success", body
    d = body["data"]
    last = s.last_result()
    assert d["time"] == last["timestamp"]
    assert d["score"] == pytest.approx(last["score"], rel=1e-5, abs=1e-6)
    assert d["series"] == {"id": s.id, "anomaly_query": "q", "labels": s.exposed}
    smooth = svc.vae_config.smooth
    assert d["window"] == TINY_WINDOW and d["windows"] == smooth
    assert d["points"]["fields"][0] == "timestamp"
    rows = d["points"]["values"]
    assert len(rows) == TINY_WINDOW + smooth - 1 and rows[-1][0] == d["time"]
    assert all(r[2] is not None for r in rows)  # every point has its band
    shares = [r[6] for r in rows if r[6] is not None]
    assert sum(shares) == pytest.approx(1.0) and min(shares) >= 0
    newest = rows[-1]
    assert newest[2] == pytest.approx(last["expected"], rel=1e-4)  # the band /metrics shows
    assert newest[3] == pytest.approx(last["lower"], rel=1e-4)
    assert newest[4] == pytest.approx(last["upper"], rel=1e-4)


def test_the_spike_drives_the_score_when_asked_by_selector(svc_app, client):
    _svc, _, _ = svc_app
    t = SPIKE_AT + 120.0  # the spike two points before the end of the window
    body = client.get("/api/v1/explain", query_string={
        "series": 'anomaly_score{instance="a"}', "time": str(t + 17.0)}).get_json()  # snapped
    d = body["data"]
    assert d["time"] == t
    assert d["top"][0]["timestamp"] == SPIKE_AT and d["top"][0]["share"] > 0.5
    assert d["top"][0]["observed"] > d["top"][0]["upper"]
    assert d["score"] > 1.0


def test_a_time_older_than_the_buffer_is_read_from_the_source(svc_app, client):
    svc, _, source = svc_app
    s = series_a(svc)
    t = T0 - 4 * HOUR
    assert s.buf_ts[0] > t
    calls = len(source.calls)
    body = client.get("/api/v1/explain", query_string={"series": s.id, "time": str(t)}).get_json()
    assert body["status"] == "success", body
    assert body["data"]["time"] == t and body["data"]["score"] is not None
    assert len(source.calls) == calls + 1
    assert source.calls[-1][2] == t  # ends at the explained time


@pytest.mark.parametrize(("params", "status", "error_type", "text"), [
    ({}, 400, "bad_data", "missing parameter 'series'"),
    ({"series": "q-0000000000000000"}, 400, "bad_data", "neither a series id"),
    ({"series": '{instance="zzz"}'}, 404, "not_found", "no live series"),
    ({"series": '{job="app"}'}, 400, "bad_data", "2 series match"),
    ({"series": "sum(anomaly_score)"}, 400, "bad_data", "neither a series id"),
    ({"series": '{instance="a"}', "time": "yesterday"}, 400, "bad_data", "cannot parse"),
    ({"series": '{instance="a"}', "time": "1e300"}, 400, "bad_data", "out of range"),
    ({"series": '{instance="a"}', "time": str(T0 + 3 * HOUR)}, 422, "execution", "no data"),
    ({"series": '{instance="a"}', "time": str(T0 - 30 * HOUR)}, 422, "execution", "no data"),
])
def test_bad_requests_get_prometheus_style_errors(client, params, status, error_type, text):
    resp = client.get("/api/v1/explain", query_string=params)
    body = resp.get_json()
    assert resp.status_code == status, body
    assert body["status"] == "error" and body["errorType"] == error_type
    assert text in body["error"]


def test_a_series_without_a_model_is_refused(svc_app, client):
    svc, _, _ = svc_app
    s = svc.registry.upsert("q", {"instance": "new", "job": "app"})
    try:
        resp = client.get("/api/v1/explain", query_string={"series": s.id})
        assert resp.status_code == 422
        assert "no model yet (state pending" in resp.get_json()["error"]
    finally:
        svc.registry.remove(s.id, 0.0)


def test_behind_basic_auth(svc_app):
    svc, app, _ = svc_app
    client = app.test_client()
    params = {"series": series_a(svc).id}
    resp = client.get("/api/v1/explain", query_string=params)
    assert resp.status_code == 401 and "data" not in resp.get_json()
    resp = client.get("/api/v1/explain", query_string=params, headers={"Authorization": AUTH})
    assert resp.status_code == 200 and resp.get_json()["status"] == "success"
