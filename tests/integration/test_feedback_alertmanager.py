"""Feedback through a real Alertmanager: a silence marked "promvae: false alarm" retrains the
series so that a repeat of the pattern no longer fires.

The service runs in-process over the fake source (real fit_many and scoring, small model) on
a clock that meets real time when the silence is created: Alertmanager stamps silences with
its own clock. The reader runs as the service runs it, in its thread, on a short interval.
"""

from __future__ import annotations

import math
import threading
import time
from datetime import UTC, datetime

import numpy as np
import pytest
import requests

from detector import Series, fit_many, score_many
from tests.promstack import wait_until
from tests.service_fixtures import FakeClock, FakeSource, make_config

pytestmark = pytest.mark.integration

STEP = 60.0
MODEL = {"hidden": [24, 24], "latent": 3, "max_epochs": 30, "max_steps": 300, "batch_size": 32,
         "mc_samples": 4, "score_scales": [16, 8], "smooth": 3}
PATTERN = np.array([6, 10, 14, 16, 16, 16, 16, 14, 10, 6, 3, 1.0]) * 0.25  # a 12-minute bump
AM_CONFIG = "route:\n  receiver: none\nreceivers:\n  - name: none\n"


def _wave(t: np.ndarray) -> np.ndarray:
    noise = np.sin(t * 12.9898) * 43758.5453
    return 10.0 + 2.0 * np.sin(2 * np.pi * t / 3600.0) + 0.3 * (noise - np.floor(noise) - 0.5)


def _with_bumps(starts: list[float]):
    def fn(t: np.ndarray) -> np.ndarray:
        v = _wave(t)
        for s in starts:
            i = np.rint((t - s) / STEP).astype(int)
            inside = (i >= 0) & (i < len(PATTERN))
            v[inside] += PATTERN[i[inside]]
        return v
    return fn


def _recording_fit(fits: list[dict]):
    """fit_many, noting the series and feedback of each call in `fits`."""
    def fit(series, step, config, progress=None, feedback=None):
        fits.append({"feedback": feedback, "series": series})
        return fit_many(series, step, config, progress=progress, feedback=feedback)
    return fit


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).isoformat().replace("+00:00", "Z")


def _peak(s, lo: float, hi: float) -> float:
    t, sc = s.recent["timestamp"], s.recent["score"]
    return float(np.nanmax(sc[(t >= lo) & (t <= hi)]))


def test_a_false_alarm_silenced_in_alertmanager_stops_firing_on_its_repeat(tmp_path, alertmanager_factory):
    from grafana_plugin_backend.web.app import Service

    am = alertmanager_factory(AM_CONFIG)
    now = math.floor(time.time() / 3600) * 3600  # the hour: the bump meets the wave at one phase
    p1 = now - 40 * 60  # the false alarm, live, just before the silence
    p2 = p1 + 2 * 3600  # its repeat: same phase of the hourly wave
    clock = FakeClock(now - 2 * 3600)
    source = FakeSource(clock)
    labels = {"instance": "a", "job": "app"}
    source.set("metric_a", labels, _with_bumps([p1, p2]))
    cfg = make_config(tmp_path, window=16, history="12h", model=MODEL, retrain_every="24h",
                      keep_scores="6h", **{"alertmanager.url": am.url,
                                           "alertmanager.feedback_interval": "0.2s"})
    fits: list[dict] = []
    fit = _recording_fit(fits)
    svc = Service(cfg, source=source, clock=clock, fit_fn=fit)
    svc.open()
    svc.poller.poll_once()
    assert svc.trainer.run_once() == 1 and fits[0]["feedback"] is None
    (s,) = svc.registry.all()
    first = s.model
    while clock() < now:  # live: the bump comes and fires
        clock.advance(600)
        svc.poller.poll_once()
    before = _peak(s, p1, p1 + 30 * 60)
    assert before >= 1.0, "the first model should raise the false alarm this test is about"

    # Someone silences the alert with the marker; Alertmanager stamps it with real time.
    clock.t = max(clock(), time.time() + 1)
    r = requests.post(f"{am.url}/api/v2/silences", timeout=10, json={
        "matchers": [{"name": "anomaly_query", "value": "q", "isRegex": False, "isEqual": True},
                     {"name": "instance", "value": "a", "isRegex": False, "isEqual": True},
                     {"name": "alertname", "value": "AnomalyDetected", "isRegex": False}],
        "startsAt": _iso(time.time()), "endsAt": _iso(time.time() + 3600),
        "createdBy": "on-call", "comment": "promvae: false alarm - the nightly report job"})
    assert r.status_code == 200, r.text
    silence_id = r.json()["silenceID"]
    stop = threading.Event()
    reader = threading.Thread(target=svc.feedback_reader.run, args=(stop,), daemon=True)
    reader.start()
    try:
        wait_until(lambda: s.feedback, timeout=20, description="the reader files the silence")
    finally:
        stop.set()
        reader.join(5)
    (fb,) = s.feedback
    assert (fb.source, fb.ref, fb.kind) == ("alertmanager", silence_id, "normal")
    assert fb.start <= p1 and fb.end >= p1 + len(PATTERN) * STEP  # the flagged run, whole
    assert s.adapt_requested  # queued for an early retrain

    assert svc.trainer.run_once() == 1  # the early retrain, without waiting for retrain_every
    assert fits[1]["feedback"] == [[fb]]
    trained = fits[1]["series"][0]
    assert trained.timestamps[0] <= p1 and np.isfinite(trained.values[(trained.timestamps >= p1)
                                                                      & (trained.timestamps < p1 + 600)]).all()
    second = s.model
    assert second is not first and second.feedback == [fb] and not s.adapt_requested
    applied = second.extra["feedback"]
    assert applied["normal_windows"] > 0 and applied["threshold_lifted"] >= 1.0

    while clock() < p2 + 40 * 60:  # the repeat comes, scored by the retrained model
        clock.advance(600)
        svc.poller.poll_once()
    after = _peak(s, p2, p2 + 30 * 60)
    # The first model on the very same repeat: it would have fired again.
    grid = np.arange(p2 - 60 * STEP, p2 + 30 * 60 + STEP / 2, STEP)
    (old,) = score_many([first], [Series(grid, _with_bumps([p1, p2])(grid))])
    old_peak = float(np.nanmax(old.score[grid >= p2]))
    print(f"false alarm {before:.2f}; repeat: first model {old_peak:.2f}, after feedback {after:.2f} "
          f"(threshold lifted x{applied['threshold_lifted']:.2f})")
    assert old_peak >= 1.0 and after < 1.0

    # The feedback is in the model file: a restart keeps it.
    svc.persist(final=True)
    again = Service(cfg, source=source, clock=clock)
    again.open()
    assert again.trainer.load_stored() == 1
    assert again.registry.get(s.id).feedback == [fb]
    assert again.registry.get(s.id).model.feedback == [fb]


def test_an_unreachable_alertmanager_is_counted_and_never_fatal(tmp_path):
    from grafana_plugin_backend.web.app import Service
    from tests.promstack import free_port

    clock = FakeClock()
    cfg = make_config(tmp_path, **{"alertmanager.url": f"http://127.0.0.1:{free_port()}",
                                   "alertmanager.timeout": "2s"})
    svc = Service(cfg, source=FakeSource(clock), clock=clock)
    assert svc.feedback_reader.read_once() == 0
    assert svc.feedback_reader.read_once() == 0
    value = svc.metrics_registry.get_sample_value("promvae_alertmanager_errors_total",
                                                  {"reason": "unreachable"})
    assert value == 2.0
    assert Service(make_config(tmp_path), source=FakeSource(clock), clock=clock).feedback_reader is None


def test_bad_data_silenced_in_alertmanager_leaves_the_next_training(tmp_path, alertmanager_factory):
    # "promvae: bad data" (an outage, a broken exporter) is the other marker: the range is left
    # out of the retrain's training data and threshold fit, so the model does not learn it and
    # the same shape still stands out (a false alarm, above, is learned as normal instead).
    from grafana_plugin_backend.web.app import Service

    am = alertmanager_factory(AM_CONFIG)
    now = math.floor(time.time() / 3600) * 3600
    p1 = now - 40 * 60
    clock = FakeClock(now - 2 * 3600)
    source = FakeSource(clock)
    source.set("metric_a", {"instance": "a", "job": "app"}, _with_bumps([p1]))
    cfg = make_config(tmp_path, window=16, history="12h", model=MODEL, retrain_every="24h",
                      keep_scores="6h", **{"alertmanager.url": am.url})
    fits: list[dict] = []
    fit = _recording_fit(fits)
    svc = Service(cfg, source=source, clock=clock, fit_fn=fit)
    svc.open()
    svc.poller.poll_once()
    assert svc.trainer.run_once() == 1
    (s,) = svc.registry.all()
    while clock() < now:
        clock.advance(600)
        svc.poller.poll_once()
    assert _peak(s, p1, p1 + 30 * 60) >= 1.0
    clock.t = max(clock(), time.time() + 1)
    r = requests.post(f"{am.url}/api/v2/silences", timeout=10, json={
        "matchers": [{"name": "anomaly_query", "value": "q", "isRegex": False, "isEqual": True},
                     {"name": "instance", "value": "a", "isRegex": False, "isEqual": True}],
        "startsAt": _iso(time.time()), "endsAt": _iso(time.time() + 3600),
        "createdBy": "on-call", "comment": "Promvae: bad data - exporter restarted"})
    assert r.status_code == 200, r.text
    assert svc.feedback_reader.read_once() == 1
    (fb,) = s.feedback
    assert fb.kind == "exclude" and fb.start <= p1 and fb.end >= p1 + len(PATTERN) * STEP
    assert svc.trainer.run_once() == 1  # queued: the early retrain
    assert fits[1]["feedback"] == [[fb]]
    model = s.model
    t_train = fits[1]["series"][0].timestamps
    inside = (t_train >= fb.start) & (t_train <= fb.end)
    assert model.extra["feedback"]["excluded_points"] == int(inside.sum()) > len(PATTERN)
    # Left out, not learned: the retrained model still finds the bump unusual.
    grid = np.arange(p1 - 60 * STEP, p1 + 30 * 60 + STEP / 2, STEP)
    (res,) = score_many([model], [Series(grid, _with_bumps([p1])(grid))])
    assert float(np.nanmax(res.score[grid >= p1])) >= 1.0
