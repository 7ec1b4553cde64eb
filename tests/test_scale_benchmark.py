"""benchmarks/scale.py: its FLOP count against the trainer, its log reader, and a smoke run
(promvae subprocess, synthetic source, 20 series, 2 steps, a small window)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks import load, scale
from detector import Series, VAEConfig
from detector import train as train_mod


def test_flops_of_the_default_model_are_the_issue_s_floor() -> None:
    cfg = VAEConfig()
    cost = scale.train_flops(cfg, 7 * 1440)  # the default 7 d of history at 60 s
    assert cost.steps == 1500 and cost.steps_per_epoch == 125
    forward = sum(2 * i * o for _, i, o in scale.layer_shapes(cfg))
    assert forward == 118_400  # 59,200 multiply-adds; 59,856 weights with the biases
    total = 10_000 * cost.steps * 64 * 3 * forward
    assert 3.3e14 < total < 3.5e14  # issue 11: ~345 TFLOP
    # Less than the rule of thumb: the first layer needs no input gradient (-7 %); validation
    # passes add 0.1 %.
    assert 0.92 < 10_000 * cost.flop / total < 0.95


def test_step_count_is_what_the_trainer_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    # The throughput figure divides these FLOPs by the loop time: the step and validation
    # counts must be the ones detector.train really runs.
    cfg = VAEConfig(window=16, hidden=(8,), latent=2, max_epochs=3, max_steps=1000,
                    batch_size=16, patience=100, mc_samples=2)
    steps, checks = [], []
    real_step, real_val = train_mod._Trainer.step, train_mod._val_loss
    monkeypatch.setattr(train_mod._Trainer, "step",
                        lambda self, *a: (steps.append(1), real_step(self, *a))[1])
    monkeypatch.setattr(train_mod, "_val_loss",
                        lambda *a: (checks.append(1), real_val(*a))[1])
    n = 300
    t = 1.7e9 + 60.0 * np.arange(n)
    vals = np.sin(np.arange(n) / 10.0) + 0.01 * np.cos(np.arange(n))
    train_mod.train_weights([Series(t, vals)], cfg)
    cost = scale.train_flops(cfg, n)
    assert (len(steps), len(checks)) == (cost.steps, cost.checks)
    bounded = VAEConfig(**{**cfg.to_dict(), "max_steps": 7})
    steps.clear()
    checks.clear()
    train_mod.train_weights([Series(t, vals)], bounded)
    assert (len(steps), len(checks)) == (7, scale.train_flops(bounded, n).checks) == (7, 1)


LOG = """\
2026-12-02 01:00:00,000 INFO grafana_plugin_backend.service.trainer: training 500 series (500 new, 0 retraining) on 7 d of history (history 7 d)
2026-12-02 01:00:05,000 INFO grafana_plugin_backend.service.trainer: trained 0/500 series, 12 s
2026-12-02 01:00:10,500 INFO grafana_plugin_backend.service.trainer: trained 500/500 series, 18 s
2026-12-02 01:00:30,500 INFO grafana_plugin_backend.service.trainer: training batch done: 500/500 series trained in 38.0 s
2026-12-02 01:01:00,000 INFO grafana_plugin_backend.service.trainer: training 300 series (300 new, 0 retraining) on 7 d of history (history 7 d)
2026-12-02 01:01:02,000 INFO grafana_plugin_backend.service.trainer: trained 300/300 series, 4 s
2026-12-02 01:01:03,000 INFO grafana_plugin_backend.service.trainer: training batch done: 300/300 series trained in 5.0 s
"""


def test_training_log_phases_add_up_over_batches() -> None:
    tl = scale.parse_training_log(LOG)
    assert tl.batches == [500, 300] and tl.complete == 2
    assert tl.loop_s == pytest.approx(10.5 + 2.0)
    assert tl.fit_s == pytest.approx(20.0 + 1.0)
    assert tl.batch_s == pytest.approx(43.0)
    # Only the first batch logged its first validation ("trained 0/500"): the steady rate is
    # timed from there to "trained 500/500".
    assert tl.steady_models == [500] and tl.steady_s == pytest.approx(5.5)


def test_the_fleet_spreads_series_over_queries_of_different_shapes() -> None:
    metrics = scale.fleet(1003, 20)
    assert sum(m.n_series for m in metrics) == 1003 and len({m.name for m in metrics}) == 20
    t = 1.7e9 + 60.0 * np.arange(7 * 1440)
    for m in metrics[:5]:
        v = m.values(np.arange(4), t)
        assert v.shape == (4, len(t)) and np.isfinite(v).all()
        assert np.ptp(v, axis=1).min() > 0 and np.abs(v[0] - v[1]).max() > 0
    assert load.pick_metric(metrics, "(fleet_heap_2) and on(instance) (vector(1))") is metrics[2]
    assert load.wanted_ids('(x) and on(instance, job) (label_replace(label_replace(vector(1), '
                           '"instance", "host-7", "", ""), "job", "fleet", "", "") or '
                           'label_replace(vector(1), "instance", "host-12", "", ""))') == [7, 12]
    body = json.loads(load.matrix_body(0, 1.7e9, 1.7e9 + 600, 60.0, 1.7e9 + 600,
                                       metric=metrics[1], history=3600.0, ids=[3, 1, 999]))
    assert [r["metric"]["instance"] for r in body["data"]["result"]] == ["host-1", "host-3"]


@pytest.mark.integration
def test_smoke_run_measures_every_figure() -> None:
    # max_steps by default: one epoch (3 steps of 64 windows at 3 h) plus STEADY_STEPS.
    opt = scale.Options(series=(20,), queries=2, window=16, history=3 * 3600.0,
                        poll_every=3.0, polls=1, scrapes=2, queries_repeat=1)
    out = scale.run(opt, say=lambda s: None)
    (r,) = out["sizes"]
    assert r["series"] == 20 and r["train_batches_timed"] >= 1 and r["trained_in_batches"] == 20
    assert r["steps_run"] == 3 + scale.STEADY_STEPS
    for key, _, _, _ in scale.FIGURES:
        if key == "lock_s" and not r["lock_exposed"]:
            assert r[key] is None  # printed as "n/a (not exposed)"
            continue
        assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, key
    assert r["instant_series"] == 20 and r["range_series"] == 20
    assert r["prom_error"] is None and r["prom_samples"] >= r["metrics_samples"]
    assert r["peak_rss_bytes"] >= r["baseline_rss_bytes"]
    text = scale.report(out["sizes"], out["meta"])
    assert "| poll tick (s) |" in text and "not run" in text
    json.dumps(out)  # --out writes it
