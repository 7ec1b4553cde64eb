"""The poller against what Prometheus answers: late samples (the default poll_delay) and
queries that select nothing (named in the log and in promvae_query_series)."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from grafana_plugin_backend.service.poller import Poller
from grafana_plugin_backend.service.registry import Registry
from grafana_plugin_backend.service.selfmetrics import SelfMetrics
from tests.service_fixtures import FakeClock, FakeSource, make_config


class LookbackSource:
    """Prometheus' answer to a range query: at each grid time the newest sample at or before it
    that has been ingested by now. Scrapes run every 15 s and land `lag` seconds after their
    timestamp (scrape duration, rule evaluation); the value of a sample is its own timestamp."""

    def __init__(self, clock, lag: float = 8.0) -> None:
        self.clock, self.lag = clock, lag

    def describe(self) -> str:
        return "lookback source"

    def close(self) -> None:
        pass

    def query_range(self, expr, start, end, step):
        from grafana_plugin_backend.source.prometheus import RangeSeries

        grid = start + step * np.arange(round((end - start) / step) + 1)
        visible_until = self.clock() - self.lag  # newest ingested scrape timestamp
        newest = np.floor(np.minimum(grid, visible_until) / 15.0) * 15.0
        return [RangeSeries({"instance": "a"}, grid, newest)]


@pytest.mark.parametrize("delay, exact", [(None, True), ("0s", False)])
def test_the_default_poll_delay_never_reads_a_carried_forward_value(tmp_path, delay, exact):
    # Polled right after each step, a zero delay asks Prometheus for a time whose scrape has
    # not landed: it answers with the previous sample, and no later poll asks again.
    overrides = {} if delay is None else {"poll_delay": delay}
    from grafana_plugin_backend.config.settings import load_config

    cfg = make_config(tmp_path, **overrides)
    if delay is None:  # the product's default, not the fixture's 0s
        cfg = load_config(None, environ={}, overrides={
            "prometheus.url": "http://prometheus.invalid:9090",
            "queries": [{"name": "q", "expr": "metric_a"}], "storage_path": str(tmp_path / "s")})
    clock = FakeClock()
    registry = Registry(cfg.max_series)
    poller = Poller(cfg, cfg.queries, LookbackSource(clock), registry,
                    SelfMetrics(CollectorRegistry()), cfg.vae_config(), clock=clock)
    clock.advance(-clock() % 60 + 2)  # 2 s past a step boundary, as a poll timer drifts
    for _ in range(30):
        poller.poll_once()
        clock.advance(60)
    s = registry.all()[0]
    ts, vals = s.buf_ts, s.buf_vals
    observed = np.isfinite(vals)
    truth = np.floor(ts / 15.0) * 15.0  # the newest sample at or before each grid time
    assert observed.sum() >= 25
    assert np.array_equal(vals[observed] == truth[observed], np.full(observed.sum(), True)) == exact


def test_a_query_that_selects_nothing_is_named_in_the_log_and_the_gauge(tmp_path, caplog):
    cfg = make_config(tmp_path)
    clock = FakeClock()
    source = FakeSource(clock)
    prom = CollectorRegistry()
    poller = Poller(cfg, cfg.queries, source, Registry(cfg.max_series), SelfMetrics(prom),
                    cfg.vae_config(), clock=clock)

    def gauge() -> float | None:
        return prom.get_sample_value("promvae_query_series", {"anomaly_query": "q"})

    with caplog.at_level("INFO", logger="grafana_plugin_backend.service.poller"):
        assert poller.poll_once()  # an empty answer is a successful poll...
        assert gauge() == 0
        assert "query q returned no series (first poll)" in caplog.text
        assert "metric_a" in caplog.text  # ...named with its expr, to check in Prometheus
        caplog.clear()
        for _ in range(10):  # not every poll
            clock.advance(60)
            poller.poll_once()
        assert "returned no series" not in caplog.text
        for _ in range(55):  # but again after an hour
            clock.advance(60)
            poller.poll_once()
        assert caplog.text.count("returned no series (for 1h now)") == 1
        source.set("metric_a", {"instance": "a"}, lambda t: np.ones(len(t)))
        clock.advance(60)
        poller.poll_once()
        assert gauge() == 1 and "query q returns 1 series again" in caplog.text
