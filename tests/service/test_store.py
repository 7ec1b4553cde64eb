"""The model store around detector's model files: index round trip, corrupt index, retention."""

from __future__ import annotations

import logging
import math

import pytest

from grafana_plugin_backend.service.registry import Registry
from grafana_plugin_backend.service.store import ModelStore, collect_garbage, index_of, restore


def test_index_round_trip(tmp_path):
    store = ModelStore(tmp_path / "s")
    store.prepare()
    reg = Registry(10)
    a = reg.upsert("q", {"__name__": "m", "instance": "a"})
    a.scored_to, a.last_present, a.stored = 600.0, 660.0, True
    b = reg.upsert("q", {"instance": "b"})  # never scored, no model
    reg.positions["q"] = 660.0
    reg.vanished["gone"] = {"query": "q", "labels": {"instance": "z"}, "vanished_at": 5.0}
    store.write_index(index_of(reg))

    again = Registry(10)
    assert restore(again, store.read_index(), now=1000.0) == 2
    a2, b2 = again.get(a.id), again.get(b.id)
    assert a2.labels == a.labels and a2.scored_to == 600.0 and a2.last_present == 660.0
    assert a2.stored and a2.state == "pending"
    assert not b2.stored and math.isnan(b2.scored_to)
    assert again.positions == {"q": 660.0}
    assert again.vanished["gone"]["vanished_at"] == 5.0


def test_restored_series_without_last_sample_still_expires(tmp_path):
    reg = Registry(10)
    restore(reg, {"series": [{"query": "q", "labels": {"i": "a"}, "last_present": None}]},
            now=1000.0)
    assert reg.all()[0].last_present == 1000.0
    assert reg.expire("q", now_data=2000.0, ttl=900.0, wall=0.0)


def test_corrupt_or_foreign_index_starts_empty(tmp_path, caplog):
    store = ModelStore(tmp_path)
    store.prepare()
    store.index_path.write_text("{not json")
    with caplog.at_level(logging.ERROR):
        assert store.read_index() == {}
    assert "unreadable" in caplog.text
    store.index_path.write_text('{"format": 99}')
    assert store.read_index() == {}
    assert restore(Registry(10), {"series": [{"labels": 3}, "junk"]}, now=0.0) == 0


def test_garbage_collection_after_retention(tmp_path):
    store = ModelStore(tmp_path)
    store.prepare()
    for sid in ("old", "young"):
        (store.models_dir / f"{sid}.safetensors").write_bytes(b"x")
    reg = Registry(10)
    reg.vanished = {"old": {"vanished_at": 0.0}, "young": {"vanished_at": 900.0}}
    assert collect_garbage(reg, store, retention=500.0, now=1000.0) == 1
    assert not (store.models_dir / "old.safetensors").exists()
    assert (store.models_dir / "young.safetensors").exists()
    assert list(reg.vanished) == ["young"]


def test_storage_path_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="storage path .* is not writable"):
        ModelStore(tmp_path / "file").prepare()
