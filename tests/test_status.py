"""Operational endpoints: health, readiness, the model status API and the HTML page."""

from __future__ import annotations

import numpy as np
import pytest

from grafana_plugin_backend.app import create_app
from grafana_plugin_backend.state import READY
from tests.service_fixtures import T0, FakeClock, FakeModel, FakeSource, make_config


@pytest.fixture
def app(tmp_path):
    clock = FakeClock()
    return create_app(make_config(tmp_path), source=FakeSource(clock), clock=clock)


def add_ready(app, labels, score):
    svc = app.extensions["promvae"]
    s = svc.registry.upsert("q", labels)
    s.state, s.model_origin = READY, "trained"
    s.model = FakeModel(svc.vae_config, 60.0, T0 - 60, T0)
    flag = np.nan if np.isnan(score) else float(score >= 1)
    s.record({"timestamp": np.array([T0]), "observed": np.array([1.5]),
              "score": np.array([score]), "flag": np.array([flag]),
              "expected": np.array([1.0]), "lower": np.array([0.5]), "upper": np.array([2.0])},
             10)
    return s


def test_healthy(app):
    resp = app.test_client().get("/-/healthy")
    assert resp.status_code == 200 and "Healthy" in resp.get_data(as_text=True)


def test_ready_only_after_models_and_then_stays_ready(app):
    svc = app.extensions["promvae"]
    client = app.test_client()
    assert client.get("/-/ready").status_code == 503
    svc.registry.upsert("q", {"i": "x"})
    svc.trainer.loaded_once = True
    svc.poller.polls_ok = 1
    assert client.get("/-/ready").status_code == 503  # a series still waits for its model
    add_ready(app, {"i": "a"}, 0.5)
    assert client.get("/-/ready").status_code == 503  # "x" is still in the first batch
    svc.registry.get_by_labels("q", {"i": "x"}).state = "insufficient_data"
    assert client.get("/-/ready").status_code == 200
    svc.registry.upsert("q", {"i": "new"})  # a series appearing later: still ready
    assert client.get("/-/ready").status_code == 200


def test_ready_with_no_series_after_a_good_poll(app):
    svc = app.extensions["promvae"]
    svc.trainer.loaded_once = True
    svc.poller.polls_ok = 1
    assert app.test_client().get("/-/ready").status_code == 200


def test_models_api(app):
    s = add_ready(app, {"__name__": "m", "instance": "a"}, 1.7)
    svc = app.extensions["promvae"]
    svc.registry.upsert("q", {"instance": "b"}).last_error = "12 observed points, need 50"
    data = app.test_client().get("/api/v1/status/models").get_json()
    assert data["status"] == "success" and len(data["data"]) == 2
    entry = next(e for e in data["data"] if e["id"] == s.id)
    assert entry["labels"] == {"__name__": "m", "instance": "a"}
    assert entry["anomaly_query"] == "q" and entry["state"] == "ready"
    assert entry["origin"] == "trained"
    assert entry["trained_at"] == T0 and entry["trained_to"] == T0 - 60
    assert entry["threshold"] == 10.0 and entry["last_score"] == 1.7 and entry["last_flag"] == 1
    other = next(e for e in data["data"] if e["id"] != s.id)
    assert other["state"] == "pending" and other["last_score"] is None and other["last_error"]
    only = app.test_client().get("/api/v1/status/models?state=ready").get_json()["data"]
    assert [e["id"] for e in only] == [s.id]


def test_model_detail_with_recent_scores_and_404(app):
    s = add_ready(app, {"instance": "a"}, float("nan"))
    detail = app.test_client().get(f"/api/v1/status/models/{s.id}").get_json()["data"]
    assert detail["recent"]["fields"][0] == "timestamp"
    assert detail["recent"]["values"] == [[T0, 1.5, None, None, 1.0, 0.5, 2.0]]  # NaN -> null
    resp = app.test_client().get("/api/v1/status/models/nope")
    assert resp.status_code == 404 and resp.get_json()["errorType"] == "not_found"


def test_html_status_page(app):
    add_ready(app, {"instance": "<script>alert(1)</script>"}, 2.5)
    add_ready(app, {"instance": "quiet"}, 0.1)
    resp = app.test_client().get("/")
    assert resp.status_code == 200 and resp.mimetype == "text/html"
    html = resp.get_data(as_text=True)
    assert "<script>alert" not in html and "&lt;script&gt;" in html
    assert html.index("&lt;script&gt;") < html.index("quiet")  # most anomalous first
    assert 'class="hot"' in html and "1 anomalous now" in html
