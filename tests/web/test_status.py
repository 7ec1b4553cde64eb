"""Operational endpoints: health, readiness, the model status API and the HTML page."""

from __future__ import annotations

import numpy as np
import pytest

from grafana_plugin_backend.service.registry import READY
from grafana_plugin_backend.web.app import create_app
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


# ---- the HTML pages: filters, drill-down, units, Grafana links ----------------------------

def unit_app(tmp_path, **overrides):
    clock = FakeClock()
    queries = [{"name": "mem", "expr": "node_memory_MemAvailable_bytes"},
               {"name": "cpu", "expr": '1 - avg by (instance) (rate(node_cpu_seconds_total'
                                       '{mode="idle"}[5m]))'},
               {"name": "lat", "expr": "some_latency", "unit": "seconds"}]
    return create_app(make_config(tmp_path, queries=queries, **overrides),
                      source=FakeSource(clock), clock=clock)


def add_history(app, query, labels, observed, score, n=120):
    """A ready series with n scored points: observed/score are constants or arrays."""
    svc = app.extensions["promvae"]
    s = svc.registry.upsert(query, labels)
    s.state, s.model_origin = READY, "trained"
    s.model = FakeModel(svc.vae_config, 60.0, T0 - n * 60, T0)
    t = T0 - 60.0 * np.arange(n)[::-1]
    obs = np.broadcast_to(np.asarray(observed, dtype=float), (n,)).copy()
    sc = np.broadcast_to(np.asarray(score, dtype=float), (n,)).copy()
    s.record({"timestamp": t, "observed": obs, "score": sc, "flag": (sc >= 1).astype(float),
              "expected": obs * 0.9, "lower": obs * 0.8, "upper": obs * 1.0}, 1000)
    return s


def page(app, path="/", **params):
    resp = app.test_client().get(path, query_string=params)
    return resp, resp.get_data(as_text=True)


def test_values_are_shown_in_the_unit_of_the_query(tmp_path):
    app = unit_app(tmp_path)
    add_history(app, "mem", {"instance": "a"}, 5.093e9, 0.2)
    add_history(app, "cpu", {"instance": "a"}, 0.4523, 0.3)
    add_history(app, "lat", {"instance": "a"}, 0.35, 0.4)
    _, html = page(app)
    assert "4.74 GiB" in html and "5.093e+09" not in html
    assert "45.2%" in html and "350 ms" in html
    assert "4.27 GiB [3.79 GiB, 4.74 GiB]" in html  # expected [lower, upper]


def test_filter_and_sort(tmp_path):
    app = unit_app(tmp_path)
    add_history(app, "mem", {"instance": "hot-a"}, 1e9, 2.5)
    add_history(app, "mem", {"instance": "calm-b"}, 1e9, 0.1)
    add_history(app, "cpu", {"instance": "hot-c"}, 0.5, 1.5)
    svc = app.extensions["promvae"]
    svc.registry.upsert("cpu", {"instance": "new-d"})
    _, html = page(app)
    assert html.index("hot-a") < html.index("hot-c") < html.index("calm-b") < html.index("new-d")
    _, html = page(app, state="anomalous")
    assert "hot-a" in html and "hot-c" in html and "calm-b" not in html and "new-d" not in html
    assert "2 of 4 series shown" in html and "2 anomalous now" in html
    _, html = page(app, state="pending")
    assert "new-d" in html and "hot-a" not in html
    _, html = page(app, query="mem")
    assert "hot-a" in html and "calm-b" in html and "hot-c" not in html
    _, html = page(app, q="CALM")
    assert "calm-b" in html and "hot-a" not in html
    _, html = page(app, sort="query")  # cpu before mem, labels in order
    assert html.index("hot-c") < html.index("new-d") < html.index("calm-b") < html.index("hot-a")
    _, html = page(app, sort="state")  # pending before ready
    assert html.index("new-d") < html.index("hot-a")
    _, html = page(app, state="failed")
    assert "No series match the filters" in html
    for bad in ({"sort": "nope"}, {"state": "<b>x</b>"}):
        resp, text = page(app, **bad)
        assert resp.status_code == 400 and resp.mimetype == "text/plain" and "unknown" in text


def test_series_page_draws_the_chart(tmp_path):
    app = unit_app(tmp_path)
    score = np.r_[np.full(100, 0.2), np.full(10, 3.0), np.full(10, 0.2)]
    s = add_history(app, "mem", {"instance": "a"}, np.linspace(1e9, 2e9, 120), score)
    _, html = page(app)
    assert f'href="/series/{s.id}"' in html
    resp, html = page(app, f"/series/{s.id}")
    assert resp.status_code == 200 and resp.mimetype == "text/html"
    svg = html[html.index("<svg"):html.index("</svg>")]
    for part in ('class="band"', 'class="expected"', 'class="observed"', 'class="score"',
                 'class="threshold"'):
        assert part in svg, part
    assert svg.count('class="flag"') == 2  # one flagged run, shaded in both panels
    assert "GiB" in svg  # axis ticks in the unit
    assert "Last 1 h 59 min" in html
    assert "No explanation" in html  # a FakeModel cannot be explained: said, not a 500
    resp, _ = page(app, "/series/mem-0000000000000000")
    assert resp.status_code == 404


def test_grafana_links_only_when_configured(tmp_path):
    app = unit_app(tmp_path / "a")
    s = add_history(app, "mem", {"instance": "a:9100", "device": "sda"}, 1e9, 0.2)
    assert "/d/promvae-drilldown" not in page(app)[1]
    assert "/d/promvae-drilldown" not in page(app, f"/series/{s.id}")[1]
    app = unit_app(tmp_path / "b", grafana_url="http://grafana.example:3000/")
    s = add_history(app, "mem", {"instance": "a:9100", "device": "sda"}, 1e9, 0.2)
    link = ("http://grafana.example:3000/d/promvae-drilldown/promvae-series-drilldown?"
            "var-anomaly_query=mem&amp;var-series=anomaly_query%3D%22mem%22%2Cdevice%3D%22sda"
            "%22%2Cinstance%3D%22a%3A9100%22&amp;from=now-6h&amp;to=now")
    assert link in page(app)[1]
    assert link in page(app, f"/series/{s.id}")[1]


def test_bad_grafana_url_is_refused(tmp_path):
    from grafana_plugin_backend.config.base import ConfigError

    with pytest.raises(ConfigError, match="grafana_url: must start with http"):
        make_config(tmp_path, grafana_url="grafana:3000")


def test_first_score_is_computed_live_for_waiting_series(tmp_path):
    """A fresh Prometheus: status API, page and /-/ready say when the first score comes, from
    the series' current count of points (not a message written at the last attempt)."""
    app = unit_app(tmp_path)
    svc = app.extensions["promvae"]
    need = svc.trainer.min_points
    s = svc.registry.upsert("mem", {"instance": "new"})
    s.state, s.last_attempt, s.observed_estimate = "insufficient_data", T0 - 600, 13
    add_history(app, "cpu", {"instance": "old"}, 0.5, 0.2)
    client = app.test_client()

    def entry():
        data = client.get("/api/v1/status/models").get_json()["data"]
        return {e["labels"]["instance"]: e for e in data}

    first = entry()["new"]["first_score"]
    assert first["observed_points"] == 13 and first["needed_points"] == need
    assert first["expected_at"] == T0 + (need - 13) * 60
    assert f"13 of {need} observed points; first score in about" in first["text"]
    assert entry()["old"]["first_score"] is None  # scored already
    s.add_points(T0 + 60.0 * np.arange(1, 11), np.ones(10))  # ten polls later
    first = entry()["new"]["first_score"]
    assert first["observed_points"] == 23 and first["expected_at"] == T0 + (need - 23) * 60
    detail = client.get(f"/api/v1/status/models/{s.id}").get_json()["data"]
    assert detail["first_score"]["observed_points"] == 23
    html = page(app)[1]
    assert f"23 of {need} observed points; first score in about" in html
    assert f"23 of {need} observed points" in page(app, f"/series/{s.id}")[1]
    svc.trainer.loaded_once, svc.poller.polls_ok = True, 1
    body = client.get("/-/ready").get_data(as_text=True)
    wait = (need - 23) * 60
    assert body.startswith("promvae is Ready.\n1 of 2 series scored; 1 waiting, the next "
                           "first score in about "), body
    assert f"{wait // 3600} h" in body or f"{wait // 60} min" in body
