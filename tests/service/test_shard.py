"""Series-level shards: the hash, the shard index from flags or pod names, and a sharded service."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from grafana_plugin_backend.cli import _parser
from grafana_plugin_backend.config.base import ConfigError
from grafana_plugin_backend.config.pod import ordinal_of
from grafana_plugin_backend.config.settings import load_config
from grafana_plugin_backend.service.registry import series_id
from grafana_plugin_backend.service.shard import Shard, identity_hash, jump_hash
from grafana_plugin_backend.web.app import Service, create_app
from tests.service_fixtures import T0, FakeClock, FakeFit, FakeSource, fake_score_many, make_config

LABELS = [{"instance": f"host-{i}", "job": "node"} for i in range(3000)]


def owners(count: int) -> np.ndarray:
    return np.array([Shard(0, count).owner("cpu", lab) for lab in LABELS])


def test_jump_hash_spreads_evenly_and_stays_in_range():
    for n in (1, 2, 3, 7):
        got = owners(n)
        assert got.min() >= 0 and got.max() < n
        shares = np.bincount(got, minlength=n) / len(LABELS)
        assert np.all(np.abs(shares - 1 / n) < 0.05), shares


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_one_more_shard_moves_about_one_in_n_plus_one_and_only_to_it(n):
    before, after = owners(n), owners(n + 1)
    moved = before != after
    assert np.all(after[moved] == n)  # nothing moves between the old shards
    assert abs(moved.mean() - 1 / (n + 1)) < 0.04, moved.mean()


def test_every_series_is_owned_by_exactly_one_shard():
    shards = [Shard(i, 3) for i in range(3)]
    for lab in LABELS[:300]:
        assert sum(s.owns("cpu", lab) for s in shards) == 1


def test_the_identity_ignores_label_order_and_includes_the_query():
    a = {"instance": "a", "job": "x"}
    assert identity_hash("q", a) == identity_hash("q", dict(reversed(list(a.items()))))
    assert identity_hash("q", a) != identity_hash("r", a)
    assert identity_hash("q", a) < 2**64
    # Pinned: a different value means every deployed shard would reshuffle its series.
    assert jump_hash(identity_hash("cpu", {"instance": "host-0", "job": "node"}), 1000) == \
        jump_hash(identity_hash("cpu", {"job": "node", "instance": "host-0"}), 1000)
    assert [jump_hash(k, 10) for k in (0, 1, 2**63, 2**64 - 1)] == [0, 6, 5, 9]


def test_jump_hash_needs_a_bucket():
    with pytest.raises(ValueError, match="at least 1"):
        jump_hash(1, 0)


@pytest.mark.parametrize("name, ordinal", [("promvae-2", 2), ("promvae-shards-10", 10),
                                           ("promvae", None), ("web-1a", None), ("-0", 0)])
def test_ordinal_of_statefulset_pod_names(name, ordinal):
    assert ordinal_of(name) == ordinal


def test_index_from_flags_environment_and_pod_name():
    cfg = load_config(None, environ={"POD_NAME": "promvae-1"}, overrides={"shard.count": 3})
    assert (cfg.shard.index, cfg.shard.count) == (1, 3)
    cfg = load_config(None, environ={"HOSTNAME": "promvae-2"}, overrides={"shard.count": "3"})
    assert cfg.shard.index == 2
    cfg = load_config(None, environ={"POD_NAME": "promvae-1", "PROMVAE_SHARD_INDEX": "0",
                                     "PROMVAE_SHARD_COUNT": "2"})
    assert cfg.shard.index == 0  # an explicit index wins over the pod name
    assert load_config(None, environ={}).shard.index == 0
    args = _parser().parse_args(["serve", "--shard.count", "4", "--shard.index", "3"])
    assert (args.shard_count, args.shard_index) == ("4", "3")


@pytest.mark.parametrize("environ, overrides, words", [
    ({}, {"shard.count": 3}, "not found in the pod name"),
    ({"POD_NAME": "promvae-3"}, {"shard.count": 3}, "gives 3"),
    ({}, {"shard.count": 3, "shard.index": 3}, "0..2"),
    ({}, {"shard.count": 0}, "shard.count: must be at least 1"),
    ({}, {"shard.count": "two"}, "shard.count: not an integer"),
])
def test_bad_shard_settings_are_config_errors(environ, overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, environ=environ, overrides=overrides)


# ---- a sharded service --------------------------------------------------------------------

def sharded(tmp_path, index: int, count: int, n: int = 40):
    clock = FakeClock(T0)
    source = FakeSource(clock, start=T0 - 24 * 3600)
    for i in range(n):
        source.set("metric_a", {"instance": f"i{i}"}, lambda t, i=i: np.full(len(t), float(i)))
    cfg = make_config(tmp_path / f"s{index}", **{"shard.count": count, "shard.index": index})
    svc = Service(cfg, source=source, clock=clock, fit_fn=FakeFit(clock),
                  score_fn=fake_score_many)
    return create_app(cfg, service=svc), svc


def metric(app, name: str) -> dict[tuple, float]:
    text = app.test_client().get("/metrics").get_data(as_text=True)
    return {tuple(sorted(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == name}


def test_each_shard_keeps_its_own_series_and_counts_none_as_dropped(tmp_path):
    seen = {}
    for i in range(3):
        app, svc = sharded(tmp_path, i, 3)
        svc.poller.poll_once()
        svc.poller.poll_once()
        mine = {s.labels["instance"] for s in svc.registry.all()}
        assert all(svc.shard.owns("q", {"instance": x}) for x in mine)
        for x in mine:
            seen[x] = seen.get(x, 0) + 1
        assert sum(metric(app, "promvae_series_dropped_total").values()) == 0
        assert metric(app, "promvae_shard_index") == {(): i}
        assert metric(app, "promvae_shards") == {(): 3}
        assert metric(app, "promvae_shard_series_owned") == {(): len(mine)}
        data = app.test_client().get("/api/v1/status/shard").get_json()["data"]
        assert (data["index"], data["count"], data["series_owned"]) == (i, 3, len(mine))
    assert seen == {f"i{i}": 1 for i in range(40)}  # each series on exactly one shard


def test_one_shard_is_the_default_and_owns_everything(tmp_path):
    app, svc = sharded(tmp_path, 0, 1)
    svc.poller.poll_once()
    assert len(svc.registry) == 40
    assert metric(app, "promvae_shards") == {(): 1}


def test_a_restart_with_more_shards_hands_over_the_moved_series(tmp_path):
    _, svc = sharded(tmp_path, 0, 1)
    svc.poller.poll_once()
    for s in svc.registry.all():
        s.stored = True
    svc.registry.remove(series_id("q", {"instance": "i0"}), T0)  # one vanished series too
    assert svc.registry.vanished
    svc.persist()
    models = svc.store.models_dir
    models.mkdir(parents=True, exist_ok=True)
    ids = [series_id("q", {"instance": f"i{i}"}) for i in range(40)]
    for sid in ids:
        (models / f"{sid}.safetensors").write_bytes(b"stand-in")
    # The same storage as shard 0 of 2: series hashed to shard 1 leave it, files and all.
    cfg = make_config(tmp_path / "s0", **{"shard.count": 2, "shard.index": 0})
    clock = FakeClock(T0)
    again = Service(cfg, source=FakeSource(clock), clock=clock, fit_fn=FakeFit(clock),
                    score_fn=fake_score_many)
    again.open()
    two = Shard(0, 2)
    kept = {s.id for s in again.registry.all()} | set(again.registry.vanished)
    expect = {sid for i, sid in enumerate(ids) if two.owns("q", {"instance": f"i{i}"})}
    assert kept == expect and 0 < len(kept) < 40
    assert {p.stem for p in models.glob("*.safetensors")} == expect
    assert again.store.read_index()["series"]  # the index no longer lists the moved ones
    assert {e["labels"]["instance"] for e in again.store.read_index()["series"]} <= {
        f"i{i}" for i in range(40) if ids[i] in expect}
