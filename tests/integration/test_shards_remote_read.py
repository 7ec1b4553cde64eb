"""Three promvae shards behind a real Prometheus' remote_read, over backfilled history.

Prometheus holds two days of 24 series at 1 minute (series i3 had an incident 14 h before the
test started, outside promvae's 12 h training range) and is at once the shards' source, the
scraper of their /metrics and the user's query engine: its remote_read blocks (one per shard,
read_recent, required_matchers {anomaly_query: app} so that ordinary queries do not fan out)
reach every shard's on-demand scores. Then the shards restart as four, and one goes down.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from grafana_plugin_backend.service.shard import Shard
from tests.promstack import (
    PrometheusProcess,
    PromvaeProcess,
    backfill,
    wait_until,
    wave,
    write_openmetrics,
)

pytestmark = pytest.mark.integration

STEP = 60.0
METRIC = "app_value"
QUERY = "app"
N = 24
INSTANCES = [f"i{i}" for i in range(N)]
SEL = f'{{anomaly_query="{QUERY}"}}'
MODEL = {"hidden": [16], "latent": 2, "max_steps": 300, "max_epochs": 20, "mc_samples": 8,
         "score_scales": [4], "batch_size": 32, "risk": 1e-4}
INCIDENT_AGO = 14 * 3600.0
INCIDENT_LEN = 600.0


def owner(instance: str, count: int) -> int:
    """The shard of a series: its identity is the query and the source labels as Prometheus
    returns them for the query's expression (here with __name__)."""
    return Shard(0, count).owner(QUERY, {"__name__": METRIC, "instance": instance, "job": "app"})


class Cluster:
    """The Prometheus and the shards; restart() changes the shard count."""

    def __init__(self, wd: Path, prom: PrometheusProcess, incident: float) -> None:
        self.wd, self.prom, self.incident = wd, prom, incident
        self.shards: list[PromvaeProcess] = []
        self.started = time.time()

    def shard_config(self) -> dict:
        return {"prometheus": {"url": self.prom.url, "timeout": "20s", "retries": 0},
                "step": "60s", "history": "12h", "window": 16, "poll_every": "5s",
                "queries": [{"name": QUERY, "expr": METRIC}], "model": MODEL,
                "query_max_series": 10_000}

    def start(self, count: int) -> None:
        old = {i: p.port for i, p in enumerate(self.shards)}
        self.shards = []
        for i in range(count):
            wd = self.wd / f"shard{i}"
            wd.mkdir(exist_ok=True)
            p = PromvaeProcess(wd, self.shard_config(),
                               args=["--shard.count", str(count), "--shard.index", str(i)])
            if i in old:
                p.port, p.url = old[i], f"http://127.0.0.1:{old[i]}"
            self.shards.append(p)
        self.write_prometheus_config()
        for p in self.shards:
            p.start()
        for p in self.shards:
            p.wait_ready(timeout=180)
        self.prom.reload()

    def stop(self) -> None:
        for p in self.shards:
            if p.alive():
                p.stop(timeout=30)

    def write_prometheus_config(self) -> None:
        targets = [f"127.0.0.1:{p.port}" for p in self.shards]
        cfg = {"global": {"scrape_interval": "3s", "scrape_timeout": "3s",
                          "evaluation_interval": "3s"},
               "scrape_configs": [{"job_name": "promvae", "honor_labels": True,
                                   "static_configs": [{"targets": targets}]}],
               "remote_read": [{"url": f"http://{t}/api/v1/read", "name": f"promvae-{i}",
                                "read_recent": True, "remote_timeout": "60s",
                                "required_matchers": {"anomaly_query": QUERY}}
                               for i, t in enumerate(targets)]}
        self.prom.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def api(self, path: str, **params) -> dict:
        r = requests.get(f"{self.prom.url}{path}", params=params, timeout=120)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", body
        return body

    def models(self, i: int) -> dict[str, dict]:
        data = self.shards[i].get("/api/v1/status/models").json()["data"]
        return {m["labels"]["instance"]: m for m in data}

    def wait_trained(self) -> None:
        def done() -> bool:
            models = [m for i in range(len(self.shards)) for m in self.models(i).values()]
            return len(models) == N and all(m["state"] == "ready" for m in models)
        wait_until(done, timeout=180, description="every series trained on some shard")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, prometheus_bin: str, promtool_bin: str) -> Iterator[Cluster]:
    wd = tmp_path_factory.mktemp("shards")
    end = math.floor((time.time() - 60) / STEP) * STEP
    ts = np.arange(end - 2 * 86400, end + 1, STEP)
    incident = end - INCIDENT_AGO
    items = []
    for k, inst in enumerate(INSTANCES):
        v = wave(50 + 10 * k, 5, k + 1, STEP)(ts)
        if inst == "i3":
            v[(ts >= incident) & (ts < incident + INCIDENT_LEN)] = 50 + 30 + 40.0  # far above
        items.append((METRIC, {"instance": inst, "job": "app"}, ts, v))
    backfill(write_openmetrics(wd / "history.om", items), wd / "prom-data")
    prom = PrometheusProcess(wd / "prometheus", [], data_dir=wd / "prom-data")
    c = Cluster(wd, prom, incident)
    try:
        prom.start()
        c.start(3)
        c.wait_trained()
        c.started = time.time()
        yield c
    finally:
        failed = False
        c.stop()
        prom.stop()
        for p in c.shards:
            text = p.log.read_text() if p.log.exists() else ""
            if "Traceback" in text:
                failed = True
                print(f"--- {p.log} ---\n{text[-4000:]}")
        assert not failed, "a shard logged a traceback"


def _vector(body: dict) -> dict[str, float]:
    return {r["metric"].get("instance", ""): float(r["value"][1]) for r in body["data"]["result"]}


def test_every_series_is_owned_by_exactly_one_shard(cluster):
    owned = [set(cluster.models(i)) for i in range(3)]
    assert sorted(x for s in owned for x in s) == sorted(INSTANCES)  # disjoint, complete
    for i, s in enumerate(owned):
        assert s == {x for x in INSTANCES if owner(x, 3) == i}
        assert cluster.shards[i].value("promvae_shard_series_owned") == len(s)
        assert cluster.shards[i].value("promvae_series_dropped") == 0


def test_past_range_through_prometheus_returns_each_series_once_and_scored(cluster):
    t0, t1 = cluster.incident - 3600, cluster.incident + 3600
    assert t1 < cluster.started - 12 * 3600  # no shard ever saw this range live
    body = cluster.api("/api/v1/query_range", query=f"anomaly_score{SEL}", start=t0, end=t1,
                       step=60)
    result = body["data"]["result"]
    assert "warnings" not in body
    assert sorted(r["metric"]["instance"] for r in result) == sorted(INSTANCES)  # each once
    for r in result:
        assert r["metric"] == {"__name__": "anomaly_score", "anomaly_query": QUERY,
                               "instance": r["metric"]["instance"], "job": "app"}
        assert len(r["values"]) == 121  # scored all along
    score = {r["metric"]["instance"]: {t: float(v) for t, v in r["values"]} for r in result}
    during = [v for t, v in score["i3"].items() if cluster.incident <= t < cluster.incident + 600]
    assert max(during) > 1, during
    # the same points as the owning shard's own query API
    i = owner("i3", 3)
    own = cluster.shards[i].get("/api/v1/query_range", params={
        "query": 'anomaly_score{instance="i3"}', "start": t0, "end": t1, "step": 60}).json()
    assert {t: float(v) for t, v in own["data"]["result"][0]["values"]} == score["i3"]


def test_joins_with_the_source_metric_and_aggregations_across_shards(cluster):
    t = cluster.incident + 300
    observed = _vector(cluster.api("/api/v1/query", time=t, query=(
        f"anomaly_observed{SEL} - ignoring(anomaly_query) {METRIC}")))
    assert set(observed) == set(INSTANCES) and set(observed.values()) == {0.0}
    hot = _vector(cluster.api("/api/v1/query", time=t, query=(
        f"{METRIC} and on(instance, job) (anomaly_score{SEL} > 1)")))
    assert "i3" in hot and hot["i3"] == 120.0  # the source value of the anomalous series
    count = cluster.api("/api/v1/query", time=t, query=f"count(anomaly_score{SEL})")
    assert float(count["data"]["result"][0]["value"][1]) == N  # all three shards' series
    flagged = cluster.api("/api/v1/query", time=t,
                          query=f"count by (job) (anomaly_flag{SEL} == 1)")
    assert {r["metric"]["job"] for r in flagged["data"]["result"]} == {"app"}
    # Ordinary queries carry no anomaly_query matcher: Prometheus does not ask the shards.
    plain = cluster.api("/api/v1/query", time=t, query="anomaly_score")
    assert plain["data"]["result"] == [] or all(
        r["metric"].get("anomaly_query") == QUERY for r in plain["data"]["result"])


def test_scraped_and_remote_samples_of_a_series_merge_into_one(cluster):
    """Recent scores are in Prometheus' TSDB (scraped, honor_labels) and behind remote read
    with the same labels: one series each, not two."""
    def scraped() -> bool:
        got = cluster.api("/api/v1/query", query='count(up{job="promvae"} == 1)')
        return float(got["data"]["result"][0]["value"][1]) == 3
    wait_until(scraped, timeout=30, description="every shard scraped")
    time.sleep(4)  # a scrape after the last poll: scraped anomaly_* samples exist
    # without an anomaly_query matcher no shard is asked: these are the scraped samples alone
    local = cluster.api("/api/v1/query", query='anomaly_score{job="app"}', time=time.time())
    assert len(local["data"]["result"]) == N
    both = cluster.api("/api/v1/query", query=f"count(anomaly_score{SEL})", time=time.time())
    assert float(both["data"]["result"][0]["value"][1]) == N
    body = cluster.api("/api/v1/query_range", query=f"anomaly_score{SEL}",
                       start=time.time() - 600, end=time.time(), step=15)
    assert sorted(r["metric"]["instance"] for r in body["data"]["result"]) == sorted(INSTANCES)


def test_four_shards_move_about_a_quarter_and_the_rest_keep_their_models(cluster):
    before = {x: m for i in range(3) for x, m in cluster.models(i).items()}
    cluster.stop()
    cluster.start(4)
    cluster.wait_trained()
    after = {i: cluster.models(i) for i in range(4)}
    assert sorted(x for m in after.values() for x in m) == sorted(INSTANCES)
    moved = set(after[3])
    assert moved == {x for x in INSTANCES if owner(x, 4) == 3}
    assert 0 < len(moved) <= N // 2  # about a quarter (jump hashing: 1/(N+1))
    assert all(owner(x, 3) == i for i in range(3) for x in after[i])  # nothing else moved
    for i in range(3):
        for x, m in after[i].items():
            assert m["origin"] == "loaded", (x, m)  # its model from disk, not retrained
            assert m["trained_at"] == before[x]["trained_at"]
        stale = {p.stem for p in (cluster.wd / f"shard{i}" / "storage" / "models").glob("*")}
        assert {m["id"] for m in after[i].values()} <= stale
        assert not {before[x]["id"] for x in moved} & stale  # the moved models left this disk
    for x in moved:
        assert after[3][x]["origin"] == "trained"


def test_one_shard_down_is_visible_not_silent(cluster):
    down = 1
    lost = set(cluster.models(down))
    assert lost
    cluster.shards[down].stop(timeout=30)
    t = cluster.incident + 300
    body = cluster.api("/api/v1/query", time=t, query=f"count(anomaly_score{SEL})")
    assert float(body["data"]["result"][0]["value"][1]) == N - len(lost)
    assert any("promvae" in w or "remote" in w or "connection refused" in w
               for w in body.get("warnings", [])), body  # Prometheus says a part is missing
    down_target = f"127.0.0.1:{cluster.shards[down].port}"

    def gap() -> bool:  # the scrapes say which shard is missing, and that one is
        zero = _vector(cluster.api("/api/v1/query", query='up{job="promvae"} == 0'))
        missing = cluster.api("/api/v1/query", query=(
            'max(promvae_shards) - count(up{job="promvae"} == 1)'))["data"]["result"]
        return set(zero) == {down_target} and float(missing[0]["value"][1]) == 1
    wait_until(gap, timeout=30, description="up == 0 for the down shard, one shard missing")
    wait_until(lambda: float(cluster.api("/api/v1/query", query=(
        "sum(promvae_shard_series_owned)"))["data"]["result"][0]["value"][1]) == N - len(lost),
        timeout=30, description="the owned count without the down shard")
