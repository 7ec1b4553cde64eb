"""The series registry: identities, label sets kept apart, caps, buffers, recent scores, TTL."""

from __future__ import annotations

import math

import numpy as np

from grafana_plugin_backend.service.registry import (
    PENDING,
    READY,
    Registry,
    SeriesState,
    exposed_labels,
    series_id,
)


def test_series_id_is_stable_and_label_order_free():
    a = series_id("cpu", {"instance": "a", "job": "node"})
    assert a == series_id("cpu", {"job": "node", "instance": "a"})
    assert a != series_id("mem", {"instance": "a", "job": "node"})
    assert a != series_id("cpu", {"instance": "a"})
    assert a.startswith("cpu-") and "/" not in a


def test_exposed_labels_drop_name_and_add_query():
    assert exposed_labels("q", {"__name__": "m", "instance": "a"}) == {
        "instance": "a", "anomaly_query": "q"}
    assert exposed_labels("q", {"anomaly_query": "x"}) == {
        "exported_anomaly_query": "x", "anomaly_query": "q"}


def test_label_sets_with_different_names_stay_separate():
    reg = Registry(max_series=10)
    a = reg.upsert("q", {"instance": "a"})
    b = reg.upsert("q", {"instance": "a", "device": "sda"})
    c = reg.upsert("q", {"device": "sda"})
    assert len({a.id, b.id, c.id}) == 3 and len(reg) == 3
    assert reg.upsert("q", {"instance": "a"}) is a


def test_duplicates_after_dropping_name_are_dropped_and_counted_once():
    reg = Registry(max_series=10)
    assert reg.upsert("q", {"__name__": "m1", "instance": "a"}) is not None
    assert reg.upsert("q", {"__name__": "m2", "instance": "a"}) is None
    assert reg.upsert("q", {"__name__": "m2", "instance": "a"}) is None
    assert reg.dropped == {"duplicate_labels": 1}
    assert reg.upsert("other", {"__name__": "m2", "instance": "a"}) is not None


def test_max_series_caps_and_counts_each_dropped_series_once():
    reg = Registry(max_series=2)
    for i in range(5):
        reg.upsert("q", {"i": str(i)})
        reg.upsert("q", {"i": str(i)})
    assert len(reg) == 2
    assert reg.dropped == {"max_series": 3}


def test_add_points_merges_and_new_values_win():
    s = SeriesState("id", "q", {}, {})
    assert s.add_points(np.array([0.0, 60.0, 120.0]), np.array([1.0, np.nan, 3.0])) == 2
    assert s.add_points(np.array([120.0, 180.0]), np.array([30.0, 4.0])) == 1
    assert list(s.buf_ts) == [0, 60, 120, 180]
    assert s.buf_vals[2] == 30.0
    s.add_points(np.array([180.0]), np.array([-1.0]), overwrite=False)
    assert s.buf_vals[3] == 4.0
    assert s.observed_estimate == 3


def test_trim_keeps_lead_in_before_the_unscored_points():
    s = SeriesState("id", "q", {}, {}, state=READY)
    ts = np.arange(100) * 60.0
    s.add_points(ts, np.ones(100))
    s.scored_to = 80 * 60.0
    s.trim(60.0, lead_in=10, max_points=1000)
    assert s.buf_ts[0] == 70 * 60.0 and s.buf_ts[-1] == 99 * 60.0
    s.trim(60.0, lead_in=10, max_points=5)
    assert len(s.buf_ts) == 5
    new = SeriesState("p", "q", {}, {}, state=PENDING)
    new.add_points(ts, np.ones(100))
    new.trim(60.0, lead_in=10, max_points=1000)
    assert len(new.buf_ts) == 11
    restored = SeriesState("r", "q", {}, {}, state=PENDING, scored_to=50 * 60.0)
    restored.add_points(ts, np.ones(100))  # its stored model has not loaded yet
    restored.trim(60.0, lead_in=10, max_points=1000)
    assert restored.buf_ts[0] == 40 * 60.0


def test_record_keeps_the_newest_points_and_moves_scored_to():
    s = SeriesState("id", "q", {}, {})
    assert s.last_result() is None
    rows = {k: np.arange(5, dtype=float) for k in
            ("timestamp", "observed", "score", "flag", "expected", "lower", "upper")}
    s.record(rows, keep_points=3)
    s.record({k: v + 3 for k, v in rows.items()}, keep_points=3)  # overlaps 3 and 4
    assert list(s.recent["timestamp"]) == [5, 6, 7]
    assert s.scored_to == 7
    assert s.last_result()["score"] == 7


def test_a_growing_recent_buffer_keeps_every_point_until_full():
    s = SeriesState("id", "q", {}, {})
    keys = ("timestamp", "observed", "score", "flag", "expected", "lower", "upper")
    s.record({k: np.arange(5, dtype=float) for k in keys}, keep_points=10)
    for t in range(5, 13):  # a point a poll, as the service appends
        s.record({k: np.array([float(t)]) for k in keys}, keep_points=10)
        assert list(s.recent["timestamp"]) == list(range(max(0, t - 9), t + 1))
        assert all(np.array_equal(s.recent[k], s.recent["timestamp"]) for k in keys)


def test_expire_uses_data_time_and_remembers_stored_models():
    reg = Registry(max_series=10)
    a = reg.upsert("q", {"i": "a"})
    b = reg.upsert("q", {"i": "b"})
    a.last_present, b.last_present = 1000.0, 400.0
    b.stored = True
    gone = reg.expire("q", now_data=1000.0, ttl=300.0, wall=5.0)
    assert [s.id for s in gone] == [b.id]
    assert reg.get(b.id) is None and reg.get(a.id) is a
    assert reg.vanished[b.id]["vanished_at"] == 5.0
    back = reg.upsert("q", {"i": "b"})  # returns: its model on disk is used again
    assert back.stored and b.id not in reg.vanished
    assert math.isnan(back.last_present)


def test_of_query_and_expire_see_their_query_only():
    reg = Registry(max_series=10)
    a, b = reg.upsert("q", {"i": "a"}), reg.upsert("q", {"i": "b"})
    c = reg.upsert("r", {"i": "a"})
    for s in (a, b, c):
        s.last_present = 0.0
    assert reg.of_query("q") == [a, b] and reg.of_query("r") == [c] and reg.of_query("x") == []
    assert reg.expire("r", now_data=1000.0, ttl=300.0, wall=5.0) == [c]  # q's are as old
    assert reg.of_query("r") == [] and reg.of_query("q") == [a, b]
    reg.remove(a.id, wall=6.0)
    assert reg.of_query("q") == [b]
    again = reg.upsert("r", {"i": "a"})
    assert reg.of_query("r") == [again] and len(reg) == 2


def test_counts_by_state_lists_every_state():
    reg = Registry(max_series=10)
    reg.upsert("q", {"i": "a"}).state = READY
    reg.upsert("q", {"i": "b"})
    counts = reg.counts_by_state()
    assert counts == {"pending": 1, "ready": 1, "insufficient_data": 0, "failed": 0}


def test_a_full_set_of_dropped_series_never_counts_one_twice(monkeypatch, caplog):
    from grafana_plugin_backend.service import registry as registry_module

    monkeypatch.setattr(registry_module, "_MAX_DROPPED_KEYS", 3)
    reg = Registry(max_series=1)
    reg.upsert("q", {"i": "kept"})
    for poll in range(3):  # the same fleet over the cap, seen every poll
        for i in range(5):
            reg.upsert("q", {"i": str(i)})
    assert reg.dropped == {"max_series": 3}  # 3 remembered; the rest are not counted twice
    assert "no longer counted" in caplog.text


def test_appended_recent_equals_merged_recent_and_leaves_old_views_whole():
    """The poller's O(new rows) append gives merged_recent's buffer every poll, whatever
    comes (one row, several, overlapping rows, a recent set by someone else), and a reader's
    earlier recent never changes under it."""
    from grafana_plugin_backend.service.registry import appended_recent, merged_recent

    keys = ("timestamp", "observed", "score", "flag", "expected", "lower", "upper")
    rng = np.random.default_rng(0)
    s = SeriesState("id", "q", {}, {})
    expect: dict = {}
    held = []  # (a recent as a reader saw it, a copy of it then)
    t = 0.0
    for poll in range(400):
        kind = rng.choice(["one", "few", "overlap", "replaced"], p=[0.7, 0.15, 0.1, 0.05])
        if kind == "replaced":  # the trainer's record() published a recent of its own
            rows = {k: np.array([t + 1.0]) for k in keys}
            s.recent = expect = merged_recent(expect, rows, 12)
            t += 1.0
            continue
        if kind == "overlap":
            ts = np.arange(t - 2.0, t + 2.0)
        else:
            ts = t + 1.0 + np.arange(1 if kind == "one" else int(rng.integers(2, 15)))
        rows = {k: (ts if k == "timestamp" else rng.standard_normal(len(ts))) for k in keys}
        got = appended_recent(s, rows, 12)
        expect = merged_recent(expect, rows, 12)
        for k in keys:
            np.testing.assert_array_equal(got[k], expect[k], err_msg=f"poll {poll} {kind} {k}")
        s.recent = got
        t = float(ts.max())
        held.append((got, {k: v.copy() for k, v in got.items()}))
    for seen, then in held:
        for k in keys:
            np.testing.assert_array_equal(seen[k], then[k])
