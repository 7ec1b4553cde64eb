"""Prometheus misbehaving behind a fault proxy: promvae keeps its last state, counts, recovers.

One stack for the module: a real Prometheus (an hour of backfilled history at the 2 s step plus
a live exporter), tests/faultproxy.py in front of it, and `promvae serve` as a subprocess
pointed at the proxy with a 1 s timeout and one retry. Each test switches the proxy to one
fault, waits until promvae counts it under its reason, checks that /metrics still serves the
last scores, switches back to pass-through and waits until polling and scoring move on.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.faultproxy import FaultProxy
from tests.promstack import PromvaeProcess, live_prometheus, wait_until

pytestmark = pytest.mark.integration

STEP = 2.0
METRIC = "fault_value"
MAX_SERIES = 10
MAX_RESPONSE_BYTES = 32 * 2**20  # the 100,000-series answer (~8 MB) fits, 600,000 do not
TIMEOUT = 1.0
MODEL = {"hidden": [8], "latent": 2, "max_steps": 30, "max_epochs": 3, "mc_samples": 2,
         "score_scales": [8], "batch_size": 32}
SERIES = {name: {"instance": name, "job": "app"} for name in ("a", "b", "c")}


def value(name: str, t: np.ndarray) -> np.ndarray:
    level = {"a": 100.0, "b": 50.0, "c": 7.0}[name]
    return level * (1 + 0.1 * np.sin(2 * np.pi * np.asarray(t) / 600.0))


class Promvae(PromvaeProcess):
    """`promvae serve` pointed at `prometheus_url` with a short timeout and one retry."""

    def __init__(self, workdir: Path, prometheus_url: str) -> None:
        super().__init__(workdir, {
            "prometheus": {"url": prometheus_url, "timeout": f"{TIMEOUT:g}s", "retries": 1,
                           "max_response_bytes": MAX_RESPONSE_BYTES},
            "step": f"{STEP:g}s", "history": "1h", "window": 16, "poll_every": "1s",
            "poll_delay": "2s",  # a 2 s step: the default 30 s suits 15-60 s scrapes
            "retrain_every": "24h", "series_ttl": "30s", "max_series": MAX_SERIES,
            "torch_threads": 1, "queries": [{"name": "app", "expr": METRIC}], "model": MODEL,
        }, storage=workdir / "promvae-data")

    def models(self) -> list[dict]:
        return self.get("/api/v1/status/models").json()["data"]

    def scored_to(self, instance: str) -> float:
        for m in self.models():
            if m["labels"].get("instance") == instance:
                return m["scored_to"] or -math.inf
        return -math.inf

    def rss(self) -> int:
        assert self.proc is not None
        return psutil.Process(self.proc.pid).memory_info().rss


class PeakRss:
    """Samples a process' RSS every 50 ms in a thread; `peak` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self._proc = psutil.Process(pid)
        self.start = self.peak = self._proc.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.05):
            try:
                self.peak = max(self.peak, self._proc.memory_info().rss)
            except psutil.Error:
                return

    def stop(self) -> float:
        """Stop sampling; the peak growth over the start, in MiB."""
        self._done.set()
        self._thread.join(5)
        return (self.peak - self.start) / 2**20


class Stack:
    def __init__(self, proxy: FaultProxy, promvae: Promvae) -> None:
        self.proxy, self.promvae = proxy, promvae


@pytest.fixture(scope="module")
def stack(tmp_path_factory, prometheus_bin: str, promtool_bin: str) -> Iterator[Stack]:
    wd = tmp_path_factory.mktemp("faults")
    end = math.floor((time.time() - 5) / STEP) * STEP
    ts = np.arange(end - 3600, end + STEP / 2, STEP)
    history = [(METRIC, labels, ts, value(n, ts)) for n, labels in SERIES.items()]
    live = {n: (labels, partial(value, n)) for n, labels in SERIES.items()}
    proxy: FaultProxy | None = None
    promvae: Promvae | None = None
    with live_prometheus(wd, history, METRIC, live) as (prom, _):
        try:
            proxy = FaultProxy(prom.url, slow_seconds=3 * TIMEOUT)
            promvae = Promvae(wd, proxy.url)
            promvae.start()
            promvae.wait_ready(timeout=120)
            wait_until(lambda: set(promvae.samples("anomaly_score")) >= set(SERIES), timeout=60,
                       description="every series scored")
            yield Stack(proxy, promvae)
        finally:
            code = promvae.stop(timeout=30) if promvae is not None else None
            if proxy is not None:
                proxy.stop()
            if code not in (0, None) and promvae is not None:
                print(promvae.log.read_text()[-5000:])


def recovers(pv: Promvae, since: float, scored: float) -> None:
    """Wait until a poll after `since` succeeded and series a was scored past `scored`."""
    wait_until(lambda: pv.value("promvae_last_successful_poll_timestamp_seconds") > since,
               timeout=30, description="a successful poll after the fault")
    wait_until(lambda: pv.scored_to("a") > scored, timeout=30, description="scores move on")


@pytest.mark.parametrize("mode,reason", [
    ("500", "http_5xx"),
    ("503", "http_5xx"),
    ("truncate", "bad_response"),
    ("slow", "timeout"),
    ("reset", "connection"),
])
def test_fault_is_counted_last_state_served_and_recovered(stack, mode, reason):
    pv, proxy = stack.promvae, stack.proxy
    before = pv.value("promvae_poll_errors_total", reason=reason)
    others = pv.value("promvae_poll_errors_total") - before
    scored = pv.scored_to("a")
    proxy.mode = mode
    try:
        wait_until(lambda: pv.value("promvae_poll_errors_total", reason=reason) >= before + 2,
                   timeout=30, description=f"{mode}: two polls counted as {reason}")
        assert proxy.count(mode) >= 2
        assert set(pv.samples("anomaly_score")) >= set(SERIES)  # the last state is still exposed
        assert pv.get("/-/ready").status_code == 200
        # counted under its own reason only (the trainer's pulls are training errors)
        assert pv.value("promvae_poll_errors_total") - pv.value(
            "promvae_poll_errors_total", reason=reason) == others
    finally:
        proxy.mode = "pass"
    recovers(pv, time.time(), scored)


def test_100k_series_answer_is_capped_counted_and_memory_stays_bounded(stack):
    pv, proxy = stack.promvae, stack.proxy
    rss = PeakRss(pv.proc.pid)
    scored = pv.scored_to("a")
    dropped0 = pv.value("promvae_series_dropped_total", reason="max_series")
    proxy.mode = "many_series"
    sizes = []
    try:
        for polls in (1, 2, 4):  # the same huge answer again and again: no growth per answer
            wait_until(lambda n=polls: proxy.count("many_series") >= n, timeout=60,
                       description=f"{polls} huge answers served")
            sizes.append(len(pv.models()))
            assert sizes[-1] <= MAX_SERIES
            assert set(pv.samples("anomaly_score")) >= set(SERIES)
        wait_until(lambda: pv.value("promvae_series_dropped_total", reason="max_series")
                   >= dropped0 + proxy.many_series - MAX_SERIES, timeout=60,
                   description="extra series counted as dropped")
        rss_mid = pv.rss()
    finally:
        proxy.mode = "pass"
    recovers(pv, time.time(), scored)
    growth_mb = rss.stop()
    models = pv.models()
    assert len(models) <= MAX_SERIES
    assert sum(pv.value("promvae_models", state=s) for s in
               ("pending", "ready", "insufficient_data", "failed")) <= MAX_SERIES
    print(f"RSS before {rss.start / 2**20:.0f} MiB, peak +{growth_mb:.0f} MiB, "
          f"after 4 answers {rss_mid / 2**20:.0f} MiB")
    # Memory itself is the machine's (benchmarks/load.py --soak measures growth); what the
    # code bounds is the state: no series, model or status row beyond max_series, whatever
    # the answers held (checked above), and every extra series counted as dropped.
    assert pv.value("promvae_poll_errors_total", reason="internal") == 0


def test_answer_over_max_response_bytes_is_refused_before_parsing(stack):
    pv, proxy = stack.promvae, stack.proxy
    before = pv.value("promvae_poll_errors_total", reason="too_large")
    scored = pv.scored_to("a")
    rss = PeakRss(pv.proc.pid)
    proxy.many_series = 600_000  # about 45 MB of JSON, over the 32 MiB limit
    proxy.mode = "many_series"
    try:
        wait_until(lambda: pv.value("promvae_poll_errors_total", reason="too_large")
                   >= before + 2, timeout=60, description="two answers refused as too_large")
        assert set(pv.samples("anomaly_score")) >= set(SERIES)
        assert len(pv.models()) <= MAX_SERIES
    finally:
        proxy.mode = "pass"
        proxy.many_series = 100_000
    recovers(pv, time.time(), scored)
    growth_mb = rss.stop()
    print(f"RSS peak growth while refusing: {growth_mb:.0f} MiB")  # information, not a test
    log = pv.log.read_text()
    assert "prometheus.max_response_bytes" in log
    assert "refused before parsing" in log  # the size guard fired before the JSON parser
