"""The alert path end to end with real components: a live exporter -> Prometheus -> promvae
(polls Prometheus, exposes anomaly_*) -> Prometheus (scrapes promvae, evaluates the shipped rules
with `for:` shortened) -> Alertmanager (the shipped routing, receivers pointed at a webhook the
test runs).

1. An anomaly injected into one series reaches the webhook as AnomalyDetected with that series'
   labels, no other series alerts, and the alert resolves after the series returns to normal.
2. While one of promvae's queries fails (PromvaePollFailing fires), an anomaly on another series
   still fires in Prometheus but Alertmanager inhibits it: the webhook gets no notification.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import requests
import yaml

from grafana_plugin_backend.web.links import series_selector
from tests.promstack import (
    Feeder,
    LiveExporter,
    PromvaeProcess,
    QuietHandler,
    ServerThread,
    WebhookReceiver,
    backfill,
    wait_until,
    wave,
    write_openmetrics,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "dashboards" / "prometheus" / "anomaly-rules.yml"
AM_CONFIG = ROOT / "dashboards" / "alertmanager" / "alertmanager.yml"
STEP = 2.0
METRIC = "app_value"
QUERY = "app"
# Trains in a few seconds; short smoothing so a level shift is flagged (and cleared) quickly.
MODEL = {"hidden": [16], "latent": 2, "max_steps": 300, "max_epochs": 20, "mc_samples": 8,
         "score_scales": [4], "batch_size": 32, "risk": 1e-4, "smooth": 2}
WINDOW = 8
CANARY = "canary_value"  # a second query; the proxy can make it fail


SERIES = {
    "a": ({"instance": "a", "job": "app"}, wave(100, 10, 1, STEP)),  # gets the anomaly
    "b": ({"instance": "b", "job": "app"}, wave(50, 5, 2, STEP)),
    "c": ({"instance": "c", "job": "app", "device": "sda"}, wave(7, 1, 3, STEP)),
}


def shortened_rules(path: Path) -> Path:
    """The shipped rules with every `for:` in minutes turned into the same number of seconds."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = re.sub(r"^(\d+)m$", r"\1s", rule["for"])
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def routed_to(webhook_url: str) -> str:
    """The shipped Alertmanager config, every receiver pointed at the test's webhook, short
    timers."""
    cfg = yaml.safe_load(AM_CONFIG.read_text())
    for receiver in cfg["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = webhook_url
    routes = [cfg["route"], *cfg["route"].get("routes", [])]
    for route in routes:
        route.update({"group_wait": "1s", "group_interval": "1s"})
    return yaml.safe_dump(cfg, sort_keys=False)


class BreakableProxy(ServerThread):
    """An HTTP proxy to Prometheus that answers 422 for queries naming CANARY while broken."""

    def __init__(self, upstream: str) -> None:
        self.broken = False
        proxy = self

        class Handler(QuietHandler):
            def _forward(self, body: bytes | None) -> None:
                if proxy.broken and CANARY.encode() in self.path.encode() + (body or b""):
                    status, payload = 422, (b'{"status":"error","errorType":"execution",'
                                            b'"error":"broken by the test"}')
                    ctype = "application/json"
                else:
                    r = requests.request(self.command, upstream + self.path, data=body,
                                         headers={"Content-Type": self.headers.get(
                                             "Content-Type", "")}, timeout=10)
                    status, payload = r.status_code, r.content
                    ctype = r.headers.get("Content-Type", "application/json")
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                self._forward(None)

            def do_POST(self) -> None:
                self._forward(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

        self._serve(Handler)


class Promvae(PromvaeProcess):
    """`promvae serve` against `prometheus_url`."""

    def __init__(self, workdir: Path, prometheus_url: str) -> None:
        super().__init__(workdir, {
            "prometheus": {"url": prometheus_url, "timeout": "5s", "retries": 0},
            "step": f"{STEP:g}s", "history": "1h", "window": WINDOW, "poll_every": "2s",
            "poll_delay": "2s",  # a 2 s step: the default 30 s suits 15-60 s scrapes
            "retrain_every": "24h",
            "queries": [{"name": QUERY, "expr": METRIC}, {"name": "canary", "expr": CANARY}],
            "model": MODEL,
        }, storage=workdir / "promvae-data")


@pytest.fixture
def promvae_factory(tmp_workdir: Path) -> Iterator[Callable[[str], Promvae]]:
    started: list[Promvae] = []

    def start(prometheus_url: str) -> Promvae:
        pv = Promvae(tmp_workdir, prometheus_url)
        started.append(pv)
        pv.start(cwd=ROOT)
        return pv

    try:
        yield start
    finally:
        for pv in started:
            pv.stop(timeout=30)


@pytest.fixture
def feeder(live_exporter: LiveExporter) -> Iterator[Feeder]:
    f = Feeder(live_exporter, METRIC, SERIES)
    try:
        yield f
    finally:
        f.stop()


def write_history(path: Path, end: float) -> None:
    """The last hour of every series at STEP, up to `end`."""
    ts = np.arange(end - 3600, end + STEP / 2, STEP)
    write_openmetrics(path, [(METRIC, labels, ts, fn(ts)) for labels, fn in SERIES.values()])


def firing(receiver: WebhookReceiver, instance: str) -> list[dict]:
    return [a for a in receiver.alerts()
            if a["status"] == "firing" and a["labels"].get("instance") == instance]


@pytest.fixture
def proxy_factory() -> Iterator[Callable[[str], BreakableProxy]]:
    started: list[BreakableProxy] = []

    def start(upstream: str) -> BreakableProxy:
        started.append(BreakableProxy(upstream))
        return started[-1]

    try:
        yield start
    finally:
        for p in started:
            p.stop()


def test_alert_path_end_to_end(tmp_workdir, promtool_bin, prometheus_factory,
                               alertmanager_factory, live_exporter, webhook_receiver, feeder,
                               promvae_factory, proxy_factory):
    history = tmp_workdir / "history.om"
    write_history(history, math.floor(time.time() / STEP) * STEP)
    backfill(history, tmp_workdir / "prom-data")

    # Prometheus first (promvae polls it), then promvae, then Prometheus also scrapes promvae.
    am = alertmanager_factory(routed_to(webhook_receiver.url))
    prom = prometheus_factory(
        scrape_configs=[live_exporter.scrape_config("live")],
        rule_files=[shortened_rules(tmp_workdir / "anomaly-rules.yml")],
        alertmanager_url=am.url, data_dir=tmp_workdir / "prom-data")
    proxy = proxy_factory(prom.url)
    pv = promvae_factory(proxy.url)
    # Scrape promvae as the shipped config does: job "promvae", honor_labels.
    prom.write_config(
        scrape_configs=[live_exporter.scrape_config("live"),
                        {"job_name": "promvae", "honor_labels": True,
                         "static_configs": [{"targets": [f"127.0.0.1:{pv.port}"]}]}],
        rule_files=[tmp_workdir / "anomaly-rules.yml"], alertmanager_url=am.url)
    prom.reload()
    pv.wait_ready()
    prom.wait_for_target_up("promvae", timeout=30)

    # 1. Every series is scored; nothing is anomalous before the injection.
    wait_until(lambda: len(prom.query(f'anomaly_score{{anomaly_query="{QUERY}"}}')) == 3,
               timeout=60, description="3 series scored and scraped back")
    time.sleep(8)  # longer than AnomalyDetected's shortened `for`
    assert not prom.query("ALERTS"), prom.query("ALERTS")

    feeder.set_override("a", 160.0)  # a level shift of six amplitudes
    try:
        alert = webhook_receiver.wait_for(
            lambda a: a["status"] == "firing" and a["labels"]["alertname"] == "AnomalyDetected",
            timeout=60)[0]
    finally:
        feeder.set_override("a", None)
    labels = alert["labels"]
    assert {k: labels[k] for k in ("instance", "job", "anomaly_query")} == \
        {"instance": "a", "job": "app", "anomaly_query": QUERY}
    assert labels["severity"] == "warning" and labels["component"] == "anomaly"
    assert "device" not in labels
    assert "/d/promvae-drilldown/" in alert["annotations"]["dashboard"]
    assert "instance=\"a\"" in alert["annotations"]["description"]
    # Context for the on-call: observed value, expected value and band read back with all the
    # series' labels, and a drill-down link opening on exactly this series.
    notes = alert["annotations"]
    observed, expected = float(notes["observed"]), float(notes["expected"])
    lower, upper = (float(x) for x in notes["band"].strip("[]").split(","))
    assert observed > 100.0 and lower <= expected <= upper and not lower <= observed <= upper, \
        notes
    assert f"Observed {notes['observed']}, expected {notes['expected']}" in notes["description"]
    series = {k: v for k, v in labels.items() if k not in ("alertname", "severity", "component")}
    link = urlsplit(notes["dashboard"])
    assert link.path == "/d/promvae-drilldown/promvae-series-drilldown"
    assert parse_qs(link.query) == {"var-anomaly_query": [QUERY],
                                    "var-series": [series_selector(series)]}
    # The shipped route: anomaly alerts grouped by query and instance, to the on-call webhook.
    payload = next(p for p in webhook_receiver.payloads()
                   if any(a["labels"]["alertname"] == "AnomalyDetected" for a in p["alerts"]))
    assert payload["receiver"] == "oncall-webhook"
    assert payload["groupLabels"] == {"anomaly_query": QUERY, "instance": "a"}

    webhook_receiver.wait_for(
        lambda a: a["status"] == "resolved" and a["labels"]["alertname"] == "AnomalyDetected"
        and a["labels"]["instance"] == "a", timeout=90)
    assert not firing(webhook_receiver, "b") and not firing(webhook_receiver, "c"), \
        webhook_receiver.alerts()
    assert not [a for a in webhook_receiver.alerts()
                if not a["labels"]["alertname"].startswith("Anomaly")], \
        "promvae health alerts fired: " + repr(webhook_receiver.alerts())

    # 2. One query fails: PromvaePollFailing fires and inhibits anomaly alerts in Alertmanager.
    proxy.broken = True
    webhook_receiver.wait_for(lambda a: a["status"] == "firing"
                              and a["labels"]["alertname"] == "PromvaePollFailing", timeout=60)
    feeder.set_override("b", 110.0)  # the app query still polls fine: b is scored and flagged
    try:
        wait_until(lambda: prom.query('ALERTS{alertname="AnomalyDetected",instance="b",'
                                      'alertstate="firing"}'),
                   timeout=60, description="AnomalyDetected for b firing in Prometheus")

        def inhibited() -> list[dict]:
            return [a for a in am.alerts()
                    if a["labels"]["alertname"] == "AnomalyDetected"
                    and a["labels"]["instance"] == "b"
                    and a["status"]["state"] == "suppressed" and a["status"]["inhibitedBy"]]
        wait_until(inhibited, timeout=30, description="AnomalyDetected for b inhibited")
        time.sleep(3)  # several group_wait/group_interval periods
    finally:
        feeder.set_override("b", None)
        proxy.broken = False
    assert not firing(webhook_receiver, "b"), webhook_receiver.alerts()
