"""The service against a real Prometheus: backfilled history, a live exporter, outages, restarts.

One stack for the module (the phases build on each other, in file order): Prometheus with
3 days of history (1-minute step, plus the last hours at the 2 s step the service uses),
a LiveExporter fed from the same functions of time, and `promvae serve` as a subprocess.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from detector import VAEConfig, lead_in_points
from tests.promstack import (
    Feeder,
    PrometheusProcess,
    PromvaeProcess,
    Series,
    live_prometheus,
    wait_until,
    wave,
)

pytestmark = pytest.mark.integration

STEP = 2.0  # the service's step; the live exporter is scraped every second
METRIC = "app_value"
QUERY = "app"
# Small enough to train in seconds; risk 1e-4 (not 1e-3) keeps the quiet series' false alarms
# rare over the minutes this module watches them.
MODEL = {"hidden": [16], "latent": 2, "max_steps": 300, "max_epochs": 20, "mc_samples": 8,
         "score_scales": [4], "batch_size": 32, "risk": 1e-4}


SERIES: dict[str, tuple[dict[str, str], Callable[[np.ndarray], np.ndarray]]] = {
    "a": ({"instance": "a", "job": "app"}, wave(100, 10, 1, STEP)),  # gets the injected anomaly
    "b": ({"instance": "b", "job": "app"}, wave(50, 5, 2, STEP)),
    # other label names
    "c": ({"instance": "c", "job": "app", "device": "sda"}, wave(7, 1, 3, STEP)),
    "const": ({"instance": "const", "job": "app"}, lambda t: np.full(np.shape(t), 42.0)),
    "gappy": ({"instance": "gappy", "job": "app"}, wave(20, 2, 4, STEP)),  # 3 h hole in its history
    "nan": ({"instance": "nan", "job": "app"}, lambda t: np.full(np.shape(t), np.nan)),
    "huge": ({"instance": "huge", "job": "app"}, wave(30, 3, 5, STEP)),  # gets a 1e300 sample
    "vanish": ({"instance": "vanish", "job": "app"}, wave(60, 6, 6, STEP)),  # stops mid-run
}
FRESH = ({"instance": "fresh", "job": "app"}, wave(80, 8, 7, STEP))  # appears mid-run, no history


def history(now: float) -> list[Series]:
    """3 days at 1 minute, the last 7 hours at STEP; `gappy` misses 5h..2h ago."""
    end = math.floor((now - 20) / STEP) * STEP
    fine_start = end - 7 * 3600
    coarse = np.arange(end - 3 * 86400, fine_start, 60.0)
    fine = np.arange(fine_start, end + STEP / 2, STEP)
    ts = np.concatenate([coarse, fine])
    items = []
    for name, (labels, fn) in SERIES.items():
        values = np.array(fn(ts), dtype=float)
        if name == "gappy":
            values[(ts > end - 5 * 3600) & (ts < end - 2 * 3600)] = np.nan
        if name != "nan":  # NaN samples cannot be backfilled; it only exists live
            items.append((METRIC, labels, ts, values))
    return items


class Promvae(PromvaeProcess):
    """`promvae serve` polling `prometheus_url` every 2 s."""

    def __init__(self, workdir: Path, prometheus_url: str) -> None:
        super().__init__(workdir, {
            "prometheus": {"url": prometheus_url, "timeout": "5s", "retries": 0},
            "step": f"{STEP:g}s", "history": "7h", "window": 16, "poll_every": "2s",
            "poll_delay": "2s",  # scraped every second: the default 30 s suits 15-60 s scrapes
            "retrain_every": "24h", "series_ttl": "20s", "max_catchup": "1h",
            "keep_scores": "20m", "queries": [{"name": QUERY, "expr": METRIC}], "model": MODEL,
        }, storage=workdir / "promvae-data")

    def models(self) -> dict[str, dict]:
        data = self.get("/api/v1/status/models").json()["data"]
        return {m["labels"]["instance"]: m for m in data}

    def detail(self, instance: str) -> dict:
        sid = self.models()[instance]["id"]
        return self.get(f"/api/v1/status/models/{sid}").json()["data"]


class Stack:
    def __init__(self, prom: PrometheusProcess, feeder: Feeder, promvae: Promvae,
                 history: set[str], live_from: float) -> None:
        self.prom, self.feeder, self.promvae = prom, feeder, promvae
        self.history = history  # series with backfilled history
        self.live_from = live_from  # time of the first scrape of the live exporter


@pytest.fixture(scope="module")
def stack(tmp_path_factory, prometheus_bin: str, promtool_bin: str) -> Iterator[Stack]:
    wd = tmp_path_factory.mktemp("service")
    with live_prometheus(wd, history(time.time()), METRIC, SERIES) as (prom, feeder):
        live_from = time.time()
        promvae = Promvae(wd, prom.url)
        try:
            promvae.start()
            promvae.wait_ready(timeout=180)
            feeder.add("fresh", FRESH)  # a new series appears mid-run (tested later)
            yield Stack(prom, feeder, promvae, set(SERIES) - {"nan"}, live_from)
        finally:
            if promvae.stop() not in (0, None):
                print(promvae.log.read_text()[-5000:])


def test_every_series_gets_a_model_and_metrics_carry_labels(stack):
    pv = stack.promvae
    def known(fetch):
        found = {k: v for k, v in fetch().items() if k != "fresh"}
        return found if len(found) == expected else None

    expected = 8
    models = wait_until(lambda: known(pv.models), timeout=60, description="8 series registered")
    states = {name: m["state"] for name, m in models.items()}
    assert states.pop("nan") == "insufficient_data"  # a series full of NaN: no model
    assert set(states.values()) == {"ready"}  # constant and gappy series train like others
    expected = 7
    scores = wait_until(lambda: known(lambda: pv.samples("anomaly_score")), timeout=60,
                        description="7 anomaly_score samples")
    assert "nan" not in scores  # never a NaN sample
    fams = pv.families()
    for name in ("anomaly_score", "anomaly_flag", "anomaly_expected", "anomaly_lower",
                 "anomaly_upper", "anomaly_observed"):
        labels = [s.labels for s in fams[name].samples]
        assert {"instance": "c", "job": "app", "device": "sda", "anomaly_query": QUERY} in labels
        assert {"instance": "a", "job": "app", "anomaly_query": QUERY} in labels
        assert all("__name__" not in lab for lab in labels)
    observed = {s.labels["instance"]: s.value for s in fams["anomaly_observed"].samples}
    assert observed["const"] == 42.0
    assert pv.value("promvae_models", state="ready") == 7
    assert pv.value("promvae_build_info") == 1
    # history of 7 h at 2 s is 12,600 points: more than one Prometheus query allows
    assert models["a"]["training_points"] > 11_000


def test_injected_anomaly_raises_score_and_flag_of_that_series_only(stack):
    pv = stack.promvae
    # Between the backfill's end and the first scrape Prometheus repeats the last backfilled
    # sample (lookback): a flat stretch that is itself unusual. Let it leave the window first.
    reach = (lead_in_points(VAEConfig(window=16, **MODEL)) + 1) * STEP
    time.sleep(max(0.0, stack.live_from + reach + 10 - time.time()))
    stack.feeder.set_override("a", 160.0)  # a level shift of six amplitudes
    try:
        def flagged():
            fams = pv.families()
            score = {s.labels["instance"]: s.value for s in fams["anomaly_score"].samples}
            flag = {s.labels["instance"]: s.value for s in fams["anomaly_flag"].samples}
            return flag.get("a") == 1.0 and (score, flag)
        score, flag = wait_until(flagged, timeout=60, description="anomaly_flag of a is 1")
    finally:
        stack.feeder.set_override("a", None)
    assert score["a"] > 1
    others = {k: v for k, v in score.items() if k not in ("a", "huge", "fresh")}
    assert others and all(v < 1 for v in others.values()), sorted(score.items())
    assert all(flag[k] == 0 for k in others), flag


def test_a_vanished_series_leaves_metrics_after_the_ttl(stack):
    pv = stack.promvae
    vanish_id = pv.models()["vanish"]["id"]
    stack.feeder.remove("vanish")
    wait_until(lambda: "vanish" not in pv.models(), timeout=90,
               description="vanish expires after the TTL")
    # Not at once but after the 20 s TTL of data time: the service logs how long the series
    # had been absent from the polled data when it expired it (wall time would be the machine).
    (ago,) = re.findall(r"'instance': 'vanish'[^\n]*? vanished (\d+) s ago", pv.log_text())
    assert 20 <= int(ago) <= 20 + 3 * STEP, ago
    assert "vanish" not in pv.samples("anomaly_score")
    assert list((pv.storage / "models").glob(f"{vanish_id}.*"))  # model kept on disk


def test_huge_values_are_scored_and_the_service_stays_up(stack):
    pv = stack.promvae
    stack.feeder.set_override("huge", 1e300)
    try:
        def seen():
            rec = pv.detail("huge")["recent"]
            rows = [dict(zip(rec["fields"], v)) for v in rec["values"]]
            return [r for r in rows if r["observed"] == 1e300]
        rows = wait_until(seen, timeout=30, description="1e300 polled")
    finally:
        stack.feeder.set_override("huge", None)
    assert all(r["score"] is not None and r["score"] > 1 for r in rows)
    assert pv.get("/-/healthy").status_code == 200
    assert pv.samples("anomaly_observed")  # /metrics still renders


def test_a_new_series_appearing_mid_run_gets_its_own_model(stack):
    pv = stack.promvae
    assert "fresh" not in stack.history  # it started after promvae had trained the others
    wait_until(lambda: "fresh" in pv.models(), timeout=30, description="fresh discovered")
    # 48 observed points (window 16) at 2 s: about 100 s after it appeared it can be trained
    wait_until(lambda: pv.models()["fresh"]["state"] == "ready", timeout=240,
               description="fresh series trained")
    wait_until(lambda: "fresh" in pv.samples("anomaly_score"), timeout=30,
               description="fresh series scored")
    models = pv.models()
    assert models["fresh"]["origin"] == "trained"
    assert models["fresh"]["id"] not in {m["id"] for k, m in models.items() if k != "fresh"}
    assert models["fresh"]["trained_at"] > models["a"]["trained_at"]  # in a later batch


def test_prometheus_outage_keeps_last_state_and_missed_points_are_scored(stack):
    pv = stack.promvae
    before_errors = pv.value("promvae_poll_errors_total")
    last_poll = pv.value("promvae_last_successful_poll_timestamp_seconds")
    stack.prom.stop()
    down_at = time.time()
    try:
        wait_until(lambda: pv.value("promvae_poll_errors_total", reason="connection")
                   >= before_errors + 3, timeout=60, description="poll errors counted")
        assert pv.get("/-/ready").status_code == 200
        assert "b" in pv.samples("anomaly_score")  # last state still served
        assert pv.value("promvae_last_successful_poll_timestamp_seconds") < down_at
        # Three errors can come within ~2 polls; the check below needs grid points strictly
        # inside the outage, so it lasts at least five steps whatever the poll timing was.
        time.sleep(max(0.0, down_at + 5 * STEP - time.time()))
    finally:
        stack.prom.start()
    up_at = time.time()
    wait_until(lambda: pv.value("promvae_last_successful_poll_timestamp_seconds") > up_at,
               timeout=60, description="polling resumed")
    rec = pv.detail("b")["recent"]
    ts = [row[0] for row in rec["values"]]
    scores = [row[2] for row in rec["values"]]
    outage = [s for t, s in zip(ts, scores) if down_at + STEP < t < up_at - STEP]
    assert outage and all(s is not None for s in outage), rec  # the outage's points scored
    assert np.all(np.diff(ts) == STEP), ts  # no hole in the scored timeline
    assert ts[-1] > up_at - 10
    assert last_poll < down_at


def test_restart_loads_models_and_scores_the_missed_points(stack):
    pv = stack.promvae
    ready = {k for k, m in pv.models().items() if m["state"] == "ready"}
    assert pv.stop() == 0  # SIGTERM: clean exit
    stopped_at = time.time()
    time.sleep(6)
    pv.start()
    pv.wait_ready(timeout=60)
    models = pv.models()
    assert {k for k, m in models.items() if m["state"] == "ready"} >= ready, models
    assert all(models[k]["origin"] == "loaded" for k in ready), models
    assert pv.value("promvae_models_loaded_total") == len(ready)
    assert pv.value("promvae_models_trained_total") == 0
    wait_until(lambda: pv.models()["b"]["scored_to"] and
               pv.models()["b"]["scored_to"] > time.time() - 10, timeout=30,
               description="scores continue")
    rec = pv.detail("b")["recent"]
    ts = np.array([row[0] for row in rec["values"]])
    missed = [row for row in rec["values"] if stopped_at < row[0] < stopped_at + 6]
    assert missed and all(row[2] is not None for row in missed), rec  # scored after restart
    assert np.all(np.diff(ts) == STEP), ts
