"""Proof that the real-stack harness (tests/promstack.py) works end to end."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.promstack import (
    AlertmanagerProcess,
    LiveExporter,
    PrometheusProcess,
    StackError,
    WebhookReceiver,
    backfill,
    start_prometheus,
    wait_until,
    webhook_alertmanager_config,
    write_openmetrics,
)

pytestmark = pytest.mark.integration

STEP = 60


def _history(now: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3 days at 60 s ending ~10 minutes before now; series b has a 20-minute NaN gap."""
    end = int(now) // STEP * STEP - 600
    ts = np.arange(end - 3 * 86400, end + 1, STEP, dtype=np.float64)
    a = 100.0 + 10.0 * np.sin(ts / 3600.0)  # non-round floats: proves values round-trip exactly
    b = np.arange(ts.size, dtype=np.float64) * 0.25
    b[2000:2020] = np.nan
    return ts, a, b


def _to_dt(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=UTC)


def test_write_openmetrics_format(tmp_path: Path) -> None:
    path = write_openmetrics(
        tmp_path / "x.om",
        [
            ("m", {"instance": 'a"b\\c'}, np.array([3.0, 1.0, 2.0]), np.array([30.0, np.nan, 20.0])),
            ("other", {}, np.array([1.5]), np.array([np.inf])),
            ("m", {"job": "j"}, np.array([1.0]), np.array([-0.1])),
        ],
    )
    assert path.read_text().splitlines() == [
        "# TYPE m gauge",
        'm{instance="a\\"b\\\\c"} 20.0 2',  # sorted by time, NaN skipped
        'm{instance="a\\"b\\\\c"} 30.0 3',
        'm{job="j"} -0.1 1',  # same family stays together even if given later
        "# TYPE other gauge",
        "other +Inf 1.5",
        "# EOF",
    ]
    with pytest.raises(ValueError, match="duplicate"):
        write_openmetrics(tmp_path / "d.om", [("m", {}, np.array([1.0, 1.0]), np.array([1.0, 2.0]))])


def test_backfill_then_query_range(
    prometheus_factory: Callable[..., PrometheusProcess], tmp_workdir: Path
) -> None:
    ts, a, b = _history(time.time())
    om = write_openmetrics(
        tmp_workdir / "history.om",
        [("promstack_hist", {"instance": "a"}, ts, a), ("promstack_hist", {"instance": "b"}, ts, b)],
    )
    data_dir = backfill(om, tmp_workdir / "prom-data")
    prom = prometheus_factory(scrape_configs=[], data_dir=data_dir)

    # Through the real client promvae uses. 4321 points per series: under the 11,000 cap.
    result = prom.client().custom_query_range(
        "promstack_hist", _to_dt(ts[0]), _to_dt(ts[-1]), step=str(STEP)
    )
    by_inst = {r["metric"]["instance"]: r["values"] for r in result}
    assert set(by_inst) == {"a", "b"}
    got_a = {int(t): float(v) for t, v in by_inst["a"]}
    assert len(got_a) == ts.size
    for i in (0, 1, 1234, ts.size // 2, ts.size - 1):
        assert got_a[int(ts[i])] == a[i]  # exact: Prometheus prints shortest round-trip floats

    got_b = {int(t): float(v) for t, v in by_inst["b"]}
    assert got_b[int(ts[1999])] == b[1999]
    assert got_b[int(ts[2020])] == b[2020]
    # Gotcha made visible: the 5m lookback fills the first minutes of a gap with the last value...
    assert got_b[int(ts[2002])] == b[1999]
    # ...and only after that is the gap a gap.
    assert int(ts[2010]) not in got_b

    # Every non-NaN sample made it into the TSDB.
    count = prom.query("count_over_time(promstack_hist[4d])", time=ts[-1])
    counts = {r["metric"]["instance"]: int(r["value"][1]) for r in count}
    assert counts == {"a": ts.size, "b": ts.size - 20}


def test_backfill_failure_raises_with_promtool_output(promtool_bin: str, tmp_workdir: Path) -> None:
    bad = tmp_workdir / "bad.om"
    bad.write_text("# TYPE m gauge\nm{ 1 2\n# EOF\n")
    with pytest.raises(StackError, match="promtool backfill"):
        backfill(bad, tmp_workdir / "out")


def test_startup_failure_raises_with_log_tail(
    prometheus_bin: str, tmp_workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(StackError, match="exited during startup(.|\\n)*field bogus not found"):
        start_prometheus(tmp_workdir / "bad", scrape_configs=[{"job_name": "x", "bogus": 1}])

    # Lost port race: the first port handed out is taken, start() must move to a fresh one.
    import tests.promstack as ps

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1]])
        real_free_port = ps.free_port
        monkeypatch.setattr(ps, "free_port", lambda: next(ports, None) or real_free_port())
        with start_prometheus(tmp_workdir / "race") as prom:
            assert prom.port != taken.getsockname()[1]
            assert requests.get(f"{prom.url}/-/ready", timeout=5).status_code == 200


def test_scrape_live_exporter(
    prometheus_factory: Callable[..., PrometheusProcess], live_exporter: LiveExporter
) -> None:
    live_exporter.set("promstack_live", {"instance": "a"}, 1.5)
    # Same metric, different label *names*: must be allowed.
    live_exporter.set("promstack_live", {"instance": "b", "extra": "x"}, -2.0)
    prom = prometheus_factory(scrape_configs=[live_exporter.scrape_config("live")])
    prom.wait_for_target_up("live")

    def values() -> dict[str, float]:
        return {r["metric"]["instance"]: float(r["value"][1]) for r in prom.query("promstack_live")}

    wait_until(lambda: values() == {"a": 1.5, "b": -2.0}, timeout=15, description="both series")
    res = prom.query('promstack_live{instance="b"}')
    assert res[0]["metric"] == {
        "__name__": "promstack_live", "instance": "b", "extra": "x", "job": "live",
    }

    live_exporter.set("promstack_live", {"instance": "a"}, 42.0)
    wait_until(lambda: values().get("a") == 42.0, timeout=15, description="a updated to 42")

    # A removed series gets a staleness marker on the next scrape: gone at once, no 5m lookback.
    live_exporter.remove("promstack_live", {"instance": "b", "extra": "x"})
    wait_until(lambda: set(values()) == {"a"}, timeout=15, description="b stale")


def test_stop_restart_keeps_data(
    prometheus_factory: Callable[..., PrometheusProcess],
    live_exporter: LiveExporter,
    tmp_workdir: Path,
) -> None:
    # A little backfilled history too: blocks must survive restarts like scraped data.
    hist_ts = np.arange(int(time.time()) // STEP * STEP - 3600, int(time.time()) - 600, STEP,
                        dtype=np.float64)
    data_dir = backfill(
        write_openmetrics(tmp_workdir / "h.om",
                          [("promstack_old", {"instance": "a"}, hist_ts, hist_ts / 1e9)]),
        tmp_workdir / "prom-data",
    )
    live_exporter.set("promstack_restart", {"instance": "a"}, 7.0)
    prom = prometheus_factory(scrape_configs=[live_exporter.scrape_config("live")],
                              data_dir=data_dir)
    url = prom.url
    wait_until(lambda: prom.query("promstack_restart"), timeout=15, description="first scrape")
    before = time.time()

    def value_at(expr: str, t: float) -> list[float]:
        return [float(r["value"][1]) for r in prom.query(expr, time=t)]

    prom.restart(down_for=1.0)
    assert prom.url == url  # clients keep their URL across the outage
    # Data scraped before the stop survives (head block + WAL replay), and so do the blocks.
    assert value_at("promstack_restart", before) == [7.0]
    assert value_at("promstack_old", hist_ts[5]) == [hist_ts[5] / 1e9]

    # Target health is "unknown" until the new process scraped it (~5 s after start: the scrape
    # manager applies targets on a fixed 5 s tick), so this is the right "scraping again" wait.
    prom.wait_for_target_up("live")
    live_exporter.set("promstack_restart", {"instance": "a"}, 8.0)
    wait_until(lambda: value_at("promstack_restart", time.time()) == [8.0],
               timeout=15, description="scraping resumed after restart")

    # While down, the URL refuses connections (what an outage looks like to promvae).
    prom.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/-/ready", timeout=2)
    # A crash (SIGKILL) and a start also keep the data.
    prom.start()
    prom.kill()
    prom.start()
    assert value_at("promstack_restart", before) == [7.0]
    assert value_at("promstack_old", hist_ts[-1]) == [hist_ts[-1] / 1e9]


def test_alertmanager_routes_to_webhook(
    alertmanager_factory: Callable[..., AlertmanagerProcess], webhook_receiver: WebhookReceiver
) -> None:
    am = alertmanager_factory(webhook_alertmanager_config(webhook_receiver.url))
    am.post_alerts([
        {"labels": {"alertname": "PromstackTest", "instance": "a"},
         "annotations": {"summary": "hello"}},
    ])
    got = webhook_receiver.wait_for(
        lambda al: al["labels"].get("alertname") == "PromstackTest", timeout=15
    )
    assert got[0]["status"] == "firing"
    assert got[0]["labels"]["instance"] == "a"
    assert got[0]["annotations"] == {"summary": "hello"}
    assert webhook_receiver.payloads()[0]["receiver"] == "webhook"


def test_rule_fires_through_prometheus_and_alertmanager(
    prometheus_factory: Callable[..., PrometheusProcess],
    alertmanager_factory: Callable[..., AlertmanagerProcess],
    live_exporter: LiveExporter,
    webhook_receiver: WebhookReceiver,
    tmp_workdir: Path,
) -> None:
    rules = tmp_workdir / "rules.yml"
    rules.write_text(
        "groups:\n"
        "  - name: promstack\n"
        "    rules:\n"
        "      - alert: PromstackHigh\n"
        "        expr: promstack_alert_value > 5\n"
        "        labels: {severity: none}\n"
    )
    am = alertmanager_factory(webhook_alertmanager_config(webhook_receiver.url))
    live_exporter.set("promstack_alert_value", {"instance": "a"}, 10.0)
    prometheus_factory(
        scrape_configs=[live_exporter.scrape_config("live")],
        rule_files=[rules],
        alertmanager_url=am.url,
    )
    firing = webhook_receiver.wait_for(
        lambda al: al["labels"].get("alertname") == "PromstackHigh" and al["status"] == "firing",
        timeout=20,
    )
    assert firing[0]["labels"]["instance"] == "a"
    assert firing[0]["labels"]["severity"] == "none"

    live_exporter.set("promstack_alert_value", {"instance": "a"}, 0.0)
    webhook_receiver.wait_for(
        lambda al: al["labels"].get("alertname") == "PromstackHigh" and al["status"] == "resolved",
        timeout=25,
    )
