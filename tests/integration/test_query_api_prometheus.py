"""The query API driven by prometheus-api-client, with `promvae serve` over a real Prometheus.

Prometheus holds two days of backfilled history at 1 minute; series "a" had an incident 14 h
before the test started, outside promvae's 12 h training range. Every range asked here ends
long before promvae started, so its scores can only come from on-demand scoring.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import numpy as np
import pytest
import requests
from prometheus_api_client import PrometheusConnect

from tests.promstack import PrometheusProcess, PromvaeProcess, backfill, wave, write_openmetrics

pytestmark = pytest.mark.integration

STEP = 60.0
METRIC = "app_value"
QUERY = "app"
MODEL = {"hidden": [16], "latent": 2, "max_steps": 300, "max_epochs": 20, "mc_samples": 8,
         "score_scales": [4], "batch_size": 32, "risk": 1e-4}
INCIDENT_AGO = 14 * 3600.0  # the incident starts this long before the history's end
INCIDENT_LEN = 600.0


class Stack:
    def __init__(self, prom: PrometheusProcess, url: str, incident: float, started: float) -> None:
        self.prom, self.url, self.incident, self.started = prom, url, incident, started
        self.client = PrometheusConnect(url=url, disable_ssl=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, prometheus_bin: str, promtool_bin: str) -> Iterator[Stack]:
    wd = tmp_path_factory.mktemp("query_api")
    end = math.floor((time.time() - 60) / STEP) * STEP
    ts = np.arange(end - 2 * 86400, end + 1, STEP)
    incident = end - INCIDENT_AGO
    a, b, c = (wave(level, amp, seed, STEP)(ts) for level, amp, seed in
               [(100, 10, 1), (50, 5, 2), (7, 1, 3)])
    a[(ts >= incident) & (ts < incident + INCIDENT_LEN)] = 160.0  # six amplitudes up
    items = [(METRIC, {"instance": "a", "job": "app"}, ts, a),
             (METRIC, {"instance": "b", "job": "app"}, ts, b),
             (METRIC, {"instance": "c", "job": "app", "device": "sda"}, ts, c)]
    backfill(write_openmetrics(wd / "history.om", items), wd / "prom-data")
    prom = PrometheusProcess(wd / "prometheus", [], data_dir=wd / "prom-data")
    promvae: PromvaeProcess | None = None
    try:
        prom.start()
        promvae = PromvaeProcess(wd, {
            "prometheus": {"url": prom.url, "timeout": "10s", "retries": 0},
            "step": "60s", "history": "12h", "window": 16, "poll_every": "5s",
            "queries": [{"name": QUERY, "expr": METRIC}], "model": MODEL})
        promvae.start()
        promvae.wait_ready(timeout=60)
        yield Stack(prom, promvae.url, incident, time.time())
    finally:
        code = promvae.stop(timeout=30) if promvae is not None else None
        prom.stop()
        if code not in (0, None) and promvae is not None:
            print(promvae.log.read_text()[-5000:])


def _dt(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=UTC)


def test_connection_and_health_check_query(stack):
    assert stack.client.check_prometheus_connection()
    result = stack.client.custom_query("1+1")
    assert result[1] == "2" and isinstance(result[0], (int, float))


def test_range_before_promvae_started_is_scored_and_shows_the_incident(stack):
    start, end = stack.incident - 3600, stack.incident + 3600
    assert end < stack.started - 12 * 3600  # promvae never saw this range live
    result = stack.client.custom_query_range(
        f'anomaly_score{{anomaly_query="{QUERY}"}}', _dt(start), _dt(end), "60s")
    by = {r["metric"]["instance"]: r for r in result}
    assert set(by) == {"a", "b", "c"}
    assert by["c"]["metric"] == {"__name__": "anomaly_score", "anomaly_query": QUERY,
                                 "instance": "c", "job": "app", "device": "sda"}
    series = {t: float(v) for t, v in by["a"]["values"]}
    assert len(series) > 100  # scored all along, not only around the incident
    during = [v for t, v in series.items() if stack.incident <= t < stack.incident + 900]
    before = [v for t, v in series.items() if t < stack.incident - 600]
    assert max(during) > 1, during
    assert max(during) > 2 * np.median(before)
    flags = stack.client.custom_query_range(
        f'anomaly_flag{{anomaly_query="{QUERY}",instance="a"}}', _dt(start), _dt(end), "600")
    assert "1" in {v for _, v in flags[0]["values"]}  # max in step: the flag survives 10 min


def test_label_values_and_metric_range_data(stack):
    assert stack.client.get_label_values("anomaly_query") == [QUERY]
    assert stack.client.get_label_values("instance") == ["a", "b", "c"]
    data = stack.client.get_metric_range_data(
        "anomaly_score", label_config={"instance": "a", "anomaly_query": QUERY},
        start_time=_dt(stack.incident - 1800), end_time=_dt(stack.incident + 1800))
    assert len(data) == 1 and data[0]["metric"]["instance"] == "a"
    values = [float(v) for _, v in data[0]["values"]]
    assert len(values) >= 55 and max(values) > 1


def _pairs(result: list[dict]) -> list[tuple[str, float]]:
    return [(r["metric"]["instance"], float(r["value"][1])) for r in result]


def test_topk_and_comparison_during_the_incident(stack):
    at = {"time": stack.incident + 300}
    scores = dict(_pairs(stack.client.custom_query("anomaly_score", params=at)))
    assert set(scores) == {"a", "b", "c"}
    ranked = sorted(scores, key=scores.__getitem__, reverse=True)
    assert ranked[0] == "a" and scores["a"] > 1  # the incident
    # k below the number of series: the k highest, highest first, with their own values
    top = stack.client.custom_query("topk(2, anomaly_score)", params=at)
    assert _pairs(top) == [(i, scores[i]) for i in ranked[:2]]
    assert all(r["metric"]["__name__"] == "anomaly_score" for r in top)
    bottom = stack.client.custom_query("bottomk(1, anomaly_score)", params=at)
    assert _pairs(bottom) == [(ranked[-1], scores[ranked[-1]])]
    # a comparison keeps exactly the series past the threshold, with their values, either side
    want = {i: v for i, v in scores.items() if v > 1}
    for q in ("anomaly_score > 1", "1 < anomaly_score"):
        assert dict(_pairs(stack.client.custom_query(q, params=at))) == want, q
    assert dict(_pairs(stack.client.custom_query("anomaly_score > bool 1", params=at))) == {
        i: float(v > 1) for i, v in scores.items()}


@pytest.mark.parametrize("form", ["topk(2, {})", "bottomk(2, {})", "bottomk(3, {})",
                                  "topk(1, {}) by (device)",
                                  "60 < {}", "{} >= 40", "{} > bool 60", "200 - {}"])
def test_operators_over_observed_values_answer_as_prometheus_does(stack, form):
    """anomaly_observed is the source value promvae scored, so the same expression over it and
    over the source metric in Prometheus itself must give the same series, order and values."""
    t = stack.incident + 300
    ours = stack.client.custom_query(form.format(f'anomaly_observed{{anomaly_query="{QUERY}"}}'),
                                     params={"time": t})
    theirs = stack.prom.query(form.format(METRIC), t)
    assert theirs and 0 < len(theirs) <= 3

    def rows(result: list[dict], name: str) -> list[tuple]:
        out = []
        for r in result:
            m = dict(r["metric"])
            m.pop("anomaly_query", None)
            named = m.pop("__name__", None)
            out.append((sorted(m.items()), named == name, float(r["value"][1])))
        return out

    got, want = rows(ours, "anomaly_observed"), rows(theirs, METRIC)
    if not form.startswith(("topk", "bottomk")):  # only topk/bottomk promise an order
        got, want = sorted(got), sorted(want)
    assert got == want


def test_errors_reach_the_client_as_prometheus_errors(stack):
    resp = requests.post(f"{stack.url}/api/v1/query_range",
                         data={"query": "anomaly_score", "start": 0, "end": 1e6, "step": 1})
    assert resp.status_code == 400 and resp.json()["errorType"] == "bad_data"
    resp = requests.get(f"{stack.url}/api/v1/query", params={"query": "rate(x[5m])"})
    assert resp.status_code == 422 and resp.json()["status"] == "error"
