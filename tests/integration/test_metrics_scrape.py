"""A real Prometheus scrapes /metrics of a promvae app serving 10,000 scored series (no models):
60,000 anomaly_* samples per scrape, gzip as Prometheus asks for it, no scrape errors."""

from __future__ import annotations

import threading

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from grafana_plugin_backend.server import make_server
from grafana_plugin_backend.web.app import create_app
from tests.fake_results import TRICKY_VALUES, fill, result_rows
from tests.promstack import free_port, wait_until
from tests.service_fixtures import FakeClock, FakeSource, make_config

pytestmark = pytest.mark.integration

N = 10_000
JOB = "promvae"
# Prometheus' own counters of samples it refused from a scrape (each says what was wrong).
REFUSED = ("prometheus_target_scrapes_sample_duplicate_timestamp_total",
           "prometheus_target_scrapes_sample_out_of_order_total",
           "prometheus_target_scrapes_sample_out_of_bounds_total",
           "prometheus_target_scrapes_exceeded_sample_limit_total",
           "prometheus_target_scrapes_exceeded_body_size_limit_total")


@pytest.fixture
def served(tmp_path):
    """A promvae app with N fake scored series behind the production server, on a free port;
    yields (app, url, the Content-Encoding of every /metrics response so far)."""
    port = free_port()
    clock = FakeClock()
    cfg = make_config(tmp_path, max_series=N, listen_address=f"127.0.0.1:{port}")
    app = create_app(cfg, source=FakeSource(clock), clock=clock)  # no poller: fake results only
    fill(app.extensions["promvae"].registry, N)
    encodings: list[str] = []

    @app.after_request
    def note_encoding(resp):
        encodings.append(resp.headers.get("Content-Encoding", "identity"))
        return resp

    server = make_server(cfg, app)
    server.prepare()
    thread = threading.Thread(target=server.serve, name="test-promvae-http", daemon=True)
    thread.start()
    try:
        yield app, f"http://127.0.0.1:{port}", encodings
    finally:
        server.stop()
        thread.join(10)


def test_prometheus_scrapes_ten_thousand_series(served, prometheus_factory):
    app, url, encodings = served
    prom = prometheus_factory(scrape_configs=[{
        "job_name": JOB, "honor_labels": True,
        "static_configs": [{"targets": [url.removeprefix("http://")]}]}], scrape_interval="2s")
    prom.wait_for_target_up(JOB, timeout=30)
    [target] = [t for t in prom.targets() if t["labels"]["job"] == JOB]
    assert target["health"] == "up" and target["lastError"] == "", target
    assert "gzip" in encodings  # what the real scraper asked for and got

    # The target turns "up" a moment before the scrape's samples are queryable.
    wait_until(lambda: prom.query(f'up{{job="{JOB}"}} == 1'), timeout=10,
               description="up == 1 queryable")
    scraped = float(prom.query(f'scrape_samples_scraped{{job="{JOB}"}}')[0]["value"][1])
    ours = [line for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines()
            if line and not line.startswith("#")]
    assert sum(line.startswith("anomaly_") for line in ours) == 6 * N
    # Every sample we wrote was taken, no more (a few self-metric series may appear between).
    assert scraped >= 6 * N and abs(scraped - len(ours)) <= 5, (scraped, len(ours))
    assert prom.query("count(anomaly_score)")[0]["value"][1] == str(N)
    assert prom.query("count(anomaly_upper)")[0]["value"][1] == str(N)
    # Escaped label values arrive unescaped (an empty one is no label, as Prometheus has it).
    notes = {r["metric"]["note"] for r in prom.query('anomaly_score{note!=""}')}
    assert notes == {v for v in TRICKY_VALUES if v}

    # A result recorded after the first scrapes reaches Prometheus (the cached text moved on).
    s = app.extensions["promvae"].registry.all()[0]
    with app.extensions["promvae"].registry.lock:
        s.record(result_rows(2e9, score=42.5), 10)
    wait_until(lambda: prom.query("anomaly_score == 42.5"), timeout=15,
               description="the new score scraped")

    [target] = [t for t in prom.targets() if t["labels"]["job"] == JOB]
    assert target["health"] == "up" and target["lastError"] == "", target
    own = {f.name: f for f in text_string_to_metric_families(
        requests.get(f"{prom.url}/metrics", timeout=10).text)}
    for name in REFUSED:
        family = own.get(name.removesuffix("_total"))
        assert family is not None, name
        assert sum(smp.value for smp in family.samples) == 0, name
