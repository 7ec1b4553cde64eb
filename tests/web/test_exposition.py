"""GET /metrics: anomaly_* families from state, NaN omitted, promvae_* self-metrics."""

from __future__ import annotations

import gzip
import math
import subprocess
import zlib

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from grafana_plugin_backend.service.registry import ANOMALY_METRICS, READY
from grafana_plugin_backend.web.app import create_app
from tests.fake_results import TRICKY_VALUES, fill, result_rows
from tests.promstack import PROMTOOL_BIN, require_binary
from tests.service_fixtures import FakeClock, FakeSource, make_config, started_service


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


# --- the rendered anomaly_* block: same samples as prometheus_client, cached per generation ---

class OldAnomalyCollector:
    """The anomaly_* families as the scrape-time collector built them before the text cache:
    the oracle the rendered block must equal."""

    def __init__(self, registry) -> None:
        self._registry = registry

    def collect(self):
        families = {name: GaugeMetricFamily(name, doc)
                    for name, (_, doc) in ANOMALY_METRICS.items()}
        for s in self._registry.all():
            last = s.last_result()
            if last is None or math.isnan(last["score"]):
                continue
            for name, (key, _) in ANOMALY_METRICS.items():
                if not math.isnan(last[key]):
                    families[name].add_sample(name, s.exposed, last[key])
        yield from families.values()


def oracle_text(registry) -> bytes:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(OldAnomalyCollector(registry))
    return generate_latest(reg)


def samples(text: bytes) -> list[tuple]:
    """(name, sorted labels, repr of value) of every sample, in order; NaN compares equal."""
    return [(smp.name, tuple(sorted(smp.labels.items())), repr(smp.value))
            for fam in text_string_to_metric_families(text.decode()) for smp in fam.samples]


def tricky_registry(app):
    reg = app.extensions["promvae"].registry
    reg.max_series = 100
    values = iter([0.5, 1e300, -1e300, 1234567.0, 1e16, 5e-324, -0.0, 3.0, 123456789.5, 2.0])
    for i, v in enumerate(TRICKY_VALUES):
        s = reg.upsert('q"\\\n', {"path": v, "i": str(i)})
        s.record(result_rows(1.0, observed=next(values), score=float(i) / 2), 10)
    reg.upsert("q", {"k8s.io/app": "x"}).record(
        result_rows(1.0, observed=next(values), upper=math.inf, lower=-math.inf), 10)
    reg.upsert("q", {"anomaly_query": "clash"}).record(
        result_rows(1.0, expected=math.nan, lower=math.nan, upper=math.nan), 10)
    reg.upsert("q", {"i": "nan score"}).record(result_rows(1.0, score=math.nan), 10)
    reg.upsert("q", {"i": "never scored"})
    reg.upsert("q", {"i": "inf score"}).record(result_rows(1.0, score=math.inf), 10)
    return reg


def test_rendered_block_equals_prometheus_client_output(app):
    reg = tricky_registry(app)
    block = app.extensions["promvae"].anomaly_text.current().text
    assert block == oracle_text(reg)  # byte for byte: escaping, value format, order
    got = samples(block)
    assert got == samples(oracle_text(reg))
    labels = [dict(lab) for name, lab, _ in got if name == "anomaly_score"]
    assert [lab.get("path") for lab in labels if "path" in lab] == list(TRICKY_VALUES)
    assert {"k8s_io_app": "x", "anomaly_query": "q"} in labels
    assert {"exported_anomaly_query": "clash", "anomaly_query": "q"} in labels
    assert not [lab for lab in labels if lab.get("i") in ("nan score", "never scored")]
    values = {v for _, _, v in got}
    assert {"inf", "-inf", "1e+300", "-1e+300", "1234567.0", "5e-324", "-0.0"} <= values
    assert b"anomaly_observed{" in block and b" 1.234567e+06\n" in block  # Go-style exponent
    expected = [dict(lab) for name, lab, _ in got if name == "anomaly_expected"]
    assert len(expected) == len(labels) - 1  # the NaN one skipped in its family only


def test_families_present_when_empty(app):
    text = app.test_client().get("/metrics").get_data()
    for name in ANOMALY_METRICS:
        assert f"# TYPE {name} gauge\n".encode() in text
        assert f"# HELP {name} ".encode() in text
    assert app.extensions["promvae"].anomaly_text.current().text == oracle_text(
        app.extensions["promvae"].registry)


def test_gzip_when_asked_is_one_member_of_the_same_text(app):
    tricky_registry(app)
    client = app.test_client()
    plain = client.get("/metrics", headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers
    zipped = client.get("/metrics", headers={"Accept-Encoding": "gzip, deflate"})
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert zipped.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "Accept-Encoding" in zipped.headers["Vary"]
    d = zlib.decompressobj(31)
    text = d.decompress(zipped.get_data())
    assert d.eof and not d.unused_data  # one complete gzip member, its CRC checked
    block = app.extensions["promvae"].anomaly_text.current().text
    assert text.startswith(block) and plain.get_data().startswith(block)
    assert b"# TYPE promvae_models gauge" in text[len(block):]
    assert {f.name for f in text_string_to_metric_families(text.decode())} == {
        f.name for f in text_string_to_metric_families(plain.get_data(as_text=True))}
    again = client.get("/metrics", headers={"Accept-Encoding": "gzip"}).get_data()
    assert gzip.decompress(again).startswith(block)  # the cached prefix serves twice
    refused = client.get("/metrics", headers={"Accept-Encoding": "gzip;q=0"})
    assert "Content-Encoding" not in refused.headers


def test_block_follows_results_and_is_reused_between_them(app):
    reg = app.extensions["promvae"].registry
    cache = app.extensions["promvae"].anomaly_text
    a = reg.upsert("q", {"i": "a"})
    a.record(result_rows(60.0, score=0.2), 10)
    assert scrape(app)["anomaly_score"].samples[0].value == 0.2
    first = cache.current()
    assert cache.current() is first  # nothing changed: no render
    a.record(result_rows(120.0, score=3.0), 10)
    assert scrape(app)["anomaly_score"].samples[0].value == 3.0
    b = reg.upsert("q", {"i": "b"})
    b.record(result_rows(120.0, score=0.1), 10)
    assert {s.labels["i"] for s in scrape(app)["anomaly_score"].samples} == {"a", "b"}
    reg.remove(a.id, wall=0.0)
    assert {s.labels["i"] for s in scrape(app)["anomaly_score"].samples} == {"b"}
    assert cache.current().text == oracle_text(reg)


def test_promtool_accepts_ten_thousand_series(tmp_path):
    promtool = require_binary(PROMTOOL_BIN, "prometheus")
    clock = FakeClock()
    app = create_app(make_config(tmp_path, max_series=10_000), source=FakeSource(clock),
                     clock=clock)
    fill(app.extensions["promvae"].registry, 10_000)
    text = app.test_client().get("/metrics").get_data()
    assert text.count(b"\nanomaly_score{") == 10_000
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                         check=False,
                         timeout=60)
    problems = (out.stdout + out.stderr).decode().strip().splitlines()
    # Exit 1 is a parse error, 3 lint problems (e.g. a gauge named *_count): neither is allowed.
    assert out.returncode == 0, problems
    assert not problems, problems


def test_each_poll_shows_up_in_the_cached_block(tmp_path):
    """Through the real poller (fake models): whatever path publishes results must move the
    registry generation, or /metrics keeps the previous poll's values."""
    clock = FakeClock()
    source = FakeSource(clock)
    source.set("metric_a", {"i": "a"}, lambda t: 1.0 + (t // 60) % 7)
    app, svc = started_service(make_config(tmp_path), source, clock)
    for _ in range(3):
        observed = scrape(app)["anomaly_observed"].samples
        assert [s.value for s in observed] == [1.0 + (clock() // 60) % 7]
        clock.advance(60)
        svc.poller.poll_once()
