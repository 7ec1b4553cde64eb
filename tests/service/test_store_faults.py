"""The model store when the disk fills up (ENOSPC at fsync, where delayed allocation reports it)
and after a crash left temp files: the trainer with a real ModelStore and real models."""

from __future__ import annotations

import errno
import logging
import os
import time

from prometheus_client import CollectorRegistry

import detector.store
from detector import load_model
from grafana_plugin_backend.service.registry import READY, Registry
from grafana_plugin_backend.service.selfmetrics import SelfMetrics
from grafana_plugin_backend.service.store import ModelStore
from grafana_plugin_backend.service.trainer import Trainer
from tests.service_fixtures import FakeClock, FakeSource, make_config, seasonal


def rig(tmp_path):
    clock = FakeClock(time.time())  # fit_many stamps models with the wall clock
    cfg = make_config(tmp_path, retrain_every="1h")
    source = FakeSource(clock)
    source.set("metric_a", {"i": "a"}, seasonal())
    registry = Registry(cfg.max_series)
    prom = CollectorRegistry()
    store = ModelStore(cfg.storage_path)
    store.prepare()
    trainer = Trainer(cfg, cfg.queries, source, registry, store, SelfMetrics(prom),
                      cfg.vae_config(), clock=clock)
    registry.upsert("q", {"i": "a"})
    return trainer, registry, store, prom, clock


def test_disk_full_keeps_the_old_model_file_and_the_new_model_in_memory(tmp_path, monkeypatch,
                                                                        caplog):
    trainer, registry, store, prom, clock = rig(tmp_path)
    assert trainer.run_once() == 1
    (s,) = registry.all()
    path = store.models_dir / f"{s.id}.safetensors"
    old_bytes, old_model = path.read_bytes(), s.model
    clock.t = trainer.regular_due_at(s) + 60  # past its slot, from the real-time trained_at

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(detector.store.os, "fsync", full)
    with caplog.at_level(logging.ERROR, logger="grafana_plugin_backend.service.trainer"):
        assert trainer.run_once() == 1  # retrained; the save failed
    monkeypatch.undo()
    assert prom.get_sample_value("promvae_training_errors_total", {"reason": "save"}) == 1
    (msg,) = [r.getMessage() for r in caplog.records if "cannot save" in r.getMessage()]
    assert str(path) in msg and "No space left on device" in msg, msg
    assert path.read_bytes() == old_bytes  # the previous version, whole
    assert load_model(store.models_dir, s.id).trained_at == old_model.trained_at
    assert sorted(p.name for p in store.models_dir.iterdir()) == [path.name]  # no temp file
    assert s.state == READY and s.model is not old_model  # the new model serves from memory


def test_temp_files_of_an_interrupted_write_are_removed_at_start(tmp_path):
    store = ModelStore(tmp_path / "storage")
    store.prepare()
    leftovers = [store.models_dir / ".q-0123456789abcdef.k2j3h4.tmp",
                 store.root / ".index.abc123.tmp", store.root / ".probe.xyz"]
    keep = [store.models_dir / "q-0123456789abcdef.safetensors", store.root / "index.json"]
    for p in leftovers + keep:
        p.write_bytes(b"partial")
    store.prepare()
    assert not any(p.exists() for p in leftovers)
    assert all(p.read_bytes() == b"partial" for p in keep)
