"""service.feedback: which series a silence judges, the range it gets, the reader's errors."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import numpy as np

from grafana_plugin_backend.service.feedback import (
    NO_RUN,
    FeedbackMetrics,
    FeedbackReader,
    flagged_run_start,
    marker_kind,
    matches,
)
from grafana_plugin_backend.service.registry import Registry
from grafana_plugin_backend.source.alertmanager import AlertmanagerError
from tests.service_fixtures import T0, FakeClock, FakeStore

EXPOSED = {"anomaly_query": "cpu", "instance": "a:9100", "job": "node"}
NAMES = {"anomaly_query", "instance", "job", "device"}


def m(name, value, regex=False, equal=True):
    return {"name": name, "value": value, "isRegex": regex, "isEqual": equal}


def test_markers_are_prefixes_in_any_case():
    assert marker_kind("promvae: false alarm - backup job") == "normal"
    assert marker_kind("  PROMVAE: False Alarm") == "normal"
    assert marker_kind("promvae: bad data (exporter broken)") == "exclude"
    assert marker_kind("maintenance; promvae: false alarm") is None
    assert marker_kind(None) is None and marker_kind(3) is None


def test_matchers_on_series_labels_must_match_alert_labels_are_ignored():
    assert matches([m("anomaly_query", "cpu"), m("instance", "a:9100"), m("alertname", "AnomalyDetected")],
                   EXPOSED, NAMES)
    assert matches([m("anomaly_query", "c.*", regex=True), m("instance", "b.*", regex=True, equal=False)],
                   EXPOSED, NAMES)
    assert not matches([m("anomaly_query", "cpu"), m("instance", "b:9100")], EXPOSED, NAMES)
    assert not matches([m("anomaly_query", "cpu"), m("device", "sda")], EXPOSED, NAMES)  # lacks it
    assert matches([m("anomaly_query", "cpu"), m("device", "")], EXPOSED, NAMES)
    assert not matches([m("instance", "a:9100")], EXPOSED, NAMES)  # anomaly_query required
    assert not matches([m("anomaly_query", "(", regex=True)], EXPOSED, NAMES)
    assert not matches([m("anomaly_query", "cpu"), "junk"], EXPOSED, NAMES)


def _series_with_scores(registry, scores):
    s = registry.upsert("cpu", {"instance": "a:9100", "job": "node"})
    t = T0 + 60.0 * np.arange(len(scores))
    s.recent = {"timestamp": t, "score": np.asarray(scores, dtype=float)}
    s.model = SimpleNamespace(feedback=[])  # a model, as far as feedback cares
    return s, t


def test_the_range_starts_where_the_flagged_run_began():
    s, t = _series_with_scores(Registry(10), [0.1] * 10 + [1.2] * 5 + [0.3] * 5)
    assert flagged_run_start(s, t[-1], lag=120.0) == t[10] - 120.0
    assert flagged_run_start(s, t[12], lag=0.0) == t[10]
    quiet, tq = _series_with_scores(Registry(10), [0.1] * 20)
    assert flagged_run_start(quiet, tq[-1], lag=0.0) == tq[-1] - NO_RUN


class FakeClient:
    def __init__(self):
        self.answer: list | AlertmanagerError = []

    def silences(self):
        if isinstance(self.answer, AlertmanagerError):
            raise self.answer
        return self.answer

    def describe(self):
        return "fake alertmanager"


def _iso(t):
    return datetime.fromtimestamp(t, tz=UTC).isoformat()


def test_the_reader_files_each_marked_silence_once_and_counts_failures():
    registry, store, client = Registry(10), FakeStore(), FakeClient()
    s, t = _series_with_scores(registry, [0.1] * 10 + [1.5] * 5 + [0.2] * 5)
    clock = FakeClock(t[-1] + 60)
    metrics = FeedbackMetrics(None)
    woken = []
    reader = FeedbackReader(client, registry, store, metrics, 30.0, lag=0.0, clock=clock,
                            on_feedback=lambda: woken.append(1))
    silence = {"id": "s-1", "comment": "promvae: false alarm", "status": {"state": "active"},
               "startsAt": _iso(t[-1]), "endsAt": _iso(t[-1] + 3600),
               "matchers": [m("anomaly_query", "cpu"), m("instance", "a:9100")]}
    other = {**silence, "id": "s-2", "comment": "maintenance window"}
    pending = {**silence, "id": "s-3", "startsAt": _iso(clock() + 600)}
    client.answer = [silence, other, pending]
    assert reader.read_once() == 1 and woken == [1]
    (fb,) = s.feedback
    assert (fb.start, fb.end, fb.ref, fb.source) == (t[10], clock(), "s-1", "alertmanager")
    assert s.adapt_requested and store.models[s.id] is s.model
    assert reader.read_once() == 0 and len(s.feedback) == 1  # read once
    client.answer = AlertmanagerError("unreachable", "connection refused")
    assert reader.read_once() == 0 and reader.read_once() == 0
    assert metrics.errors.labels("unreachable")._value.get() == 2
    client.answer = [{**silence, "startsAt": "yesterday"}, {"id": "s-4", "comment": "promvae: bad data"}]
    assert reader.read_once() == 0  # unreadable silences are skipped, not fatal
