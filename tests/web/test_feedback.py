"""POST /api/v1/feedback: filing a false alarm, and refusing bad input Prometheus-style."""

from __future__ import annotations

import base64
import json

import bcrypt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grafana_plugin_backend.config.web import WebConfig
from grafana_plugin_backend.web.app import Service, create_app
from tests.service_fixtures import (
    FakeClock,
    FakeFit,
    FakeSource,
    fake_score_many,
    make_config,
    seasonal,
)

ERROR_TYPES = {"bad_data", "execution", "timeout", "canceled", "internal", "unavailable", "not_found"}
SEL = '{anomaly_query="q",instance="a"}'


def _service(tmp_path, web=None, **overrides):
    clock = FakeClock()
    source = FakeSource(clock)
    source.set("metric_a", {"instance": "a"}, seasonal(seed=1))
    source.set("metric_a", {"instance": "b"}, seasonal(seed=2))
    cfg = make_config(tmp_path, **overrides)
    svc = Service(cfg, source=source, clock=clock, fit_fn=FakeFit(clock), score_fn=fake_score_many)
    app = create_app(cfg, service=svc, web_config=web)
    svc.poller.poll_once()
    svc.trainer.run_once()
    svc.poller.poll_once()
    return app, svc, clock


@pytest.fixture
def served(tmp_path):
    return _service(tmp_path, web_max_request_bytes=4096)


def _post(client, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post("/api/v1/feedback", data=data, content_type="application/json", **kw)


def _series(svc, instance):
    return next(s for s in svc.registry.all() if s.labels["instance"] == instance)


def test_a_false_alarm_is_filed_queued_for_retraining_and_shown(served):
    app, svc, clock = served
    c = app.test_client()
    now = clock()
    r = _post(c, {"series": SEL, "start": now - 1800, "end": now - 600, "comment": "deploy"})
    assert r.status_code == 200, r.get_json()
    data = r.get_json()["data"]
    s = _series(svc, "a")
    assert data["series"] == s.id and data["added"] and data["retrain"] == "queued"
    assert data["feedback"]["kind"] == "normal" and data["feedback"]["source"] == "api"
    (fb,) = s.feedback
    assert (fb.start, fb.end, fb.comment) == (now - 1800, now - 600, "deploy")
    assert s.adapt_requested and not _series(svc, "b").adapt_requested
    assert s.model.feedback == [fb]
    # Filed twice: nothing changes.
    again = _post(c, {"series": SEL, "start": now - 1800, "end": now - 600, "comment": "deploy"})
    assert again.status_code == 200 and not again.get_json()["data"]["added"]
    assert len(s.feedback) == 1
    # By labels and RFC 3339 times, an exclusion.
    r = _post(c, {"series": {"anomaly_query": "q", "instance": "a"}, "kind": "exclude",
                  "start": "2023-11-14T23:00:00Z", "end": now - 60})
    assert r.status_code == 200 and len(s.feedback) == 2 and s.feedback[1].kind == "exclude"
    detail = c.get(f"/api/v1/status/models/{s.id}").get_json()["data"]
    assert [f["kind"] for f in detail["feedback"]] == ["normal", "exclude"]
    assert svc.metrics_registry.get_sample_value("promvae_feedback_total",
                                                 {"source": "api", "kind": "normal"}) == 1.0
    # The next batch retrains it, and only it, with its feedback.
    seen = []
    svc.trainer.fit_fn = lambda series, step, config, progress=None, feedback=None: (
        seen.append(feedback) or FakeFit(clock)(series, step, config, progress))
    assert svc.trainer.run_once() == 1 and seen == [[s.feedback]]


@pytest.mark.parametrize("body, status, etype, match", [
    ({"series": '{anomaly_query="q",instance="zz"}', "start": -1800, "end": -600}, 404, "not_found", "no live series"),
    ({"series": "{anomaly_query=\"q\"}", "start": -1800, "end": -600}, 400, "bad_data", "2 series match"),
    ({"series": "nope{{", "start": -1800, "end": -600}, 400, "bad_data", "neither a series id"),
    ({"series": 42, "start": -1800, "end": -600}, 400, "bad_data", "invalid field 'series'"),
    ({"series": {"instance": 3}, "start": -1800, "end": -600}, 400, "bad_data", "invalid field 'series'"),
    ({"series": SEL, "start": -600, "end": -1800}, 400, "bad_data", "before end"),
    ({"series": SEL, "start": -600, "end": -600}, 400, "bad_data", "before end"),
    ({"series": SEL, "start": -40 * 86400, "end": -600}, 400, "bad_data", "days"),
    ({"series": SEL, "start": -1800, "end": 3 * 86400}, 400, "bad_data", "future"),
    ({"series": SEL, "start": "ms", "end": -600}, 400, "bad_data", "start"),
    ({"series": SEL, "start": True, "end": -600}, 400, "bad_data", "start"),
    ({"series": SEL, "start": None, "end": -600}, 400, "bad_data", "start"),
    ({"series": SEL, "start": -1800}, 400, "bad_data", "end"),
    ({"series": SEL, "start": -30 * 86400, "end": -29 * 86400}, 400, "bad_data", "history"),
    ({"series": SEL, "start": -1800, "end": -600, "kind": "ignore"}, 400, "bad_data", "kind"),
    ({"series": SEL, "start": -1800, "end": -600, "comment": "x" * 2000}, 400, "bad_data", "comment"),
    ({"series": SEL, "start": -1800, "end": -600, "colour": "red"}, 400, "bad_data", "unknown fields"),
])
def test_bad_input_is_refused_prometheus_style(served, body, status, etype, match):
    app, svc, clock = served
    now = clock()
    for k in ("start", "end"):
        if isinstance(body.get(k), (int, float)) and not isinstance(body[k], bool):
            body = {**body, k: now + body[k]}
    r = _post(app.test_client(), body)
    assert r.status_code == status, r.get_json()
    j = r.get_json()
    assert j["status"] == "error" and j["errorType"] == etype and match in j["error"]
    assert all(not s.feedback and not s.adapt_requested for s in svc.registry.all())


def test_milliseconds_are_refused(served):
    app, _, clock = served
    now_ms = clock() * 1000
    r = _post(app.test_client(), {"series": SEL, "start": now_ms - 60_000, "end": now_ms})
    assert r.status_code == 400 and "milliseconds" in r.get_json()["error"]


@pytest.mark.parametrize("raw, match", [
    (b"not json", "JSON object"), (b"[1, 2]", "JSON list"), (b"\xff\xfe", "JSON object"),
    (b"", "JSON object"), (b'"text"', "JSON str"),
])
def test_a_body_that_is_not_a_json_object_is_bad_data(served, raw, match):
    app, *_ = served
    r = _post(app.test_client(), raw)
    assert r.status_code == 400 and r.get_json()["errorType"] == "bad_data"
    assert match in r.get_json()["error"]


def test_an_oversized_body_is_refused_with_413(served):
    app, svc, clock = served
    body = {"series": SEL, "start": clock() - 1800, "end": clock() - 600, "comment": "x" * 5000}
    r = _post(app.test_client(), body)
    assert r.status_code == 413 and r.get_json()["errorType"] == "bad_data"
    assert not _series(svc, "a").feedback


def test_a_series_without_a_model_cannot_take_feedback(served):
    app, svc, clock = served
    s = _series(svc, "a")
    s.model = None
    r = _post(app.test_client(), {"series": SEL, "start": clock() - 1800, "end": clock() - 600})
    assert r.status_code == 422 and r.get_json()["errorType"] == "execution"
    assert "no model" in r.get_json()["error"]


def test_feedback_sits_behind_basic_auth(tmp_path):
    hashed = bcrypt.hashpw(b"secret", bcrypt.gensalt(rounds=4)).decode()
    app, svc, clock = _service(tmp_path, web=WebConfig(users={"alice": hashed}))
    c = app.test_client()
    body = {"series": SEL, "start": clock() - 1800, "end": clock() - 600}
    assert _post(c, body).status_code == 401
    assert not _series(svc, "a").feedback
    good = {"Authorization": "Basic " + base64.b64encode(b"alice:secret").decode()}
    assert _post(c, body, headers=good).status_code == 200


# ---- fuzz ----------------------------------------------------------------------------------

VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True)
    | st.text(max_size=30) | st.sampled_from([SEL, "{", "a" * 300, "2023-11-15T00:00:00Z", "1e400",
                                              "NaN", "-Inf", "\x00", "normal", "exclude"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
BODIES = st.dictionaries(st.sampled_from(["series", "start", "end", "comment", "kind", "x"]), VALUES,
                         max_size=6)


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    app, svc, clock = _service(tmp_path_factory.mktemp("fuzz"))
    return app, svc, clock


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(body=BODIES | VALUES, raw=st.binary(max_size=64), use_raw=st.booleans())
def test_fuzzed_bodies_get_a_prometheus_envelope_never_a_5xx(fuzz_app, body, raw, use_raw):
    app, svc, _ = fuzz_app
    c = app.test_client()
    try:
        data = raw if use_raw else json.dumps(body, allow_nan=True)
    except (ValueError, OverflowError):
        data = raw
    r = _post(c, data)
    j = r.get_json()
    # Every series has a model: a 422 here would be an internal error.
    assert r.status_code in (200, 400, 404, 413), (r.status_code, data, j)
    if r.status_code == 200:
        assert j["status"] == "success"
        assert isinstance(j["data"]["added"], bool)
    else:
        assert j["status"] == "error" and j["errorType"] in ERROR_TYPES and j["error"]
    # Whatever was filed is a valid record, and the app still answers.
    for s in svc.registry.all():
        for fb in s.feedback:
            assert fb.start < fb.end and fb.end - fb.start <= 31 * 86400
    assert c.get("/-/healthy").status_code == 200
