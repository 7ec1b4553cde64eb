"""GET /metrics: anomaly_* families from state, NaN omitted, promvae_* self-metrics."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from grafana_plugin_backend.service.registry import ANOMALY_METRICS, READY
from grafana_plugin_backend.web.app import create_app
from tests.service_fixtures import FakeClock, FakeSource, make_config


def rows(score: float, observed: float = 5.0, expected: float = 4.0) -> dict:
    return {"timestamp": np.array([1.0]), "observed": np.array([observed]),
            "score": np.array([score]), "flag": np.array([float(score >= 1)]),
            "expected": np.array([expected]), "lower": np.array([1.0]),
            "upper": np.array([7.0])}


@pytest.fixture
def app(tmp_path):
    clock = FakeClock()
    return create_app(make_config(tmp_path), source=FakeSource(clock), clock=clock)


def scrape(app) -> dict:
    resp = app.test_client().get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = resp.get_data(as_text=True)
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names))  # one TYPE line per metric name
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_every_anomaly_metric_with_source_labels_and_query(app):
    reg = app.extensions["promvae"].registry
    a = reg.upsert("q", {"__name__": "node_load1", "instance": "a", "job": "node"})
    b = reg.upsert("q", {"device": "sda"})  # different label names in one family
    for s, score in ((a, 0.2), (b, 3.0)):
        s.state = READY
        s.record(rows(score), 10)
    fams = scrape(app)
    for name in ANOMALY_METRICS:
        labels = [smp.labels for smp in fams[name].samples]
        assert {"instance": "a", "job": "node", "anomaly_query": "q"} in labels
        assert {"device": "sda", "anomaly_query": "q"} in labels
    score = {smp.labels.get("device", ""): smp.value for smp in fams["anomaly_score"].samples}
    assert score == {"": 0.2, "sda": 3.0}
    flag = {smp.labels.get("device", ""): smp.value for smp in fams["anomaly_flag"].samples}
    assert flag == {"": 0.0, "sda": 1.0}


def test_nan_scores_are_omitted_and_huge_values_exposed(app):
    reg = app.extensions["promvae"].registry
    reg.upsert("q", {"i": "nan"}).record(rows(float("nan")), 10)
    reg.upsert("q", {"i": "never"})  # no score yet
    reg.upsert("q", {"i": "huge"}).record(rows(50.0, observed=1e300, expected=float("nan")), 10)
    fams = scrape(app)
    scored = [smp.labels["i"] for smp in fams["anomaly_score"].samples]
    assert scored == ["huge"]
    assert fams["anomaly_observed"].samples[0].value == 1e300
    assert "anomaly_expected" not in fams or not fams["anomaly_expected"].samples


def test_self_metrics(app):
    reg = app.extensions["promvae"].registry
    reg.upsert("q", {"i": "a"}).state = READY
    reg.upsert("q", {"i": "b"})
    reg.max_series = 2
    reg.upsert("q", {"i": "c"})
    fams = scrape(app)
    models = {s.labels["state"]: s.value for s in fams["promvae_models"].samples}
    assert models == {"pending": 1, "ready": 1, "insufficient_data": 0, "failed": 0}
    dropped = {s.labels["reason"]: s.value for s in fams["promvae_series_dropped"].samples
               if s.name.endswith("_total")}
    assert dropped == {"max_series": 1, "duplicate_labels": 0}
    build = fams["promvae_build_info"].samples[0]
    assert build.value == 1 and build.labels["version"]
    for name in ("promvae_poll_duration_seconds", "promvae_poll_errors",
                 "promvae_training_duration_seconds", "promvae_training_errors",
                 "promvae_last_successful_poll_timestamp_seconds", "promvae_models_trained",
                 "promvae_models_loaded", "promvae_points_scored", "process_cpu_seconds"):
        assert name in fams, name
    reasons = {s.labels["reason"] for s in fams["promvae_poll_errors"].samples}
    assert {"connection", "timeout", "http", "bad_query"} <= reasons  # present from the start
