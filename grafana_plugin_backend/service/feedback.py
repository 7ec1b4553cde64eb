"""Feedback: false alarms and bad data marked by people, through the API or Alertmanager.

A record (detector.feedback.Feedback) joins its series' list, is saved in the series' model
file at once (so it survives a restart before the retrain) and asks for an early retrain, as
the new-normal policy does. The training that follows honours it (detector.train.fit_many).

Alertmanager: every `alertmanager.feedback_interval` the reader lists the silences
(GET /api/v2/silences). A silence whose comment starts with a marker (MARKERS, any case)
judges every series its matchers match: matchers on labels the query's series carry must
match the series (a missing label is ""), matchers on other labels (alertname, severity:
the alert rule's) are ignored, and an anomaly_query matcher is required. The range runs from
the start of the series' flagged run at the silence's start (RUN_LOOKBACK at most) to the
silence's end or the time of reading, whichever is first. Each silence is read once.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from detector.feedback import EXCLUDE, NORMAL, Feedback, FeedbackError, merge

from ..source.alertmanager import AlertmanagerClient, AlertmanagerError, parse_time
from .registry import Registry, SeriesState
from .store import ModelStore

log = logging.getLogger(__name__)

# Comment prefixes of a feedback silence (case does not matter), and what they mean.
MARKERS = {"promvae: false alarm": NORMAL, "promvae: bad data": EXCLUDE}
RUN_LOOKBACK = 6 * 3600.0  # a silence's flagged run is looked for this far before its start
NO_RUN = 3600.0  # no flagged run found: the range starts this long before the silence


class FeedbackMetrics:
    """Self-metrics of feedback, on the service's registry."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.received = Counter("promvae_feedback_total",
                                "Feedback records accepted, by source (api, alertmanager) and kind "
                                "(normal: a false alarm, exclude: bad data).", ["source", "kind"],
                                registry=registry)
        self.errors = Counter("promvae_alertmanager_errors_total",
                              "Failed reads of Alertmanager's silences, by reason.", ["reason"],
                              registry=registry)
        self.last_read = Gauge("promvae_alertmanager_last_read_timestamp_seconds",
                               "Time of the last successful read of Alertmanager's silences.",
                               registry=registry)
        for reason in ("unreachable", "timeout", "http", "too_large", "bad_response"):
            self.errors.labels(reason)


class NoModelError(ValueError):
    """Feedback for a series that has no model yet: there is nothing to correct."""


def submit(registry: Registry, store: ModelStore, s: SeriesState, fb: Feedback,
           metrics: FeedbackMetrics | None = None) -> bool:
    """Add `fb` to series `s`, save it with the model, ask for an early retrain.

    Returns False if the same judgement is already there. NoModelError if `s` has no model.
    """
    with registry.lock:
        if s.model is None:
            raise NoModelError(f"series {s.id} has no model yet: nothing to correct")
        records, added = merge(s.feedback, fb)
        if not added:
            return False
        s.feedback = records
        s.adapt_requested = True  # retrain soon, not at the next regular slot
        model = s.model
        model.feedback = list(records)
    try:
        store.save(s.id, model)
    except Exception as e:  # noqa: BLE001 - e.g. disk full: kept in memory, saved at the retrain
        log.error("cannot save the feedback of %s %s with its model (kept in memory): %s",
                  s.query, s.exposed, e)
    if metrics is not None:
        metrics.received.labels(fb.source, fb.kind).inc()
    log.info("feedback for %s %s: %s from %s to %s (%s%s); retraining early", s.query, s.exposed,
             "false alarm" if fb.kind == NORMAL else "bad data", _iso(fb.start), _iso(fb.end),
             fb.source, f" {fb.ref}" if fb.ref else "")
    return True


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def marker_kind(comment: Any) -> str | None:
    """The kind a silence comment asks for, or None if it carries no promvae marker."""
    if not isinstance(comment, str):
        return None
    text = comment.strip().lower()
    return next((kind for marker, kind in MARKERS.items() if text.startswith(marker)), None)


def _matcher_ok(m: Mapping[str, Any], value: str) -> bool:
    want = str(m.get("value", ""))
    if m.get("isRegex"):
        try:
            hit = re.fullmatch(want, value) is not None
        except re.error:
            return False
    else:
        hit = value == want
    return hit if m.get("isEqual", True) else not hit


def matches(matchers: Sequence[Mapping[str, Any]], exposed: Mapping[str, str],
            series_labels: set[str]) -> bool:
    """True if a silence's matchers select the anomaly alerts of a series.

    exposed: the series' anomaly_* labels; series_labels: label names its query's series carry
    (matchers on any other name are the alert rule's own labels and ignored).
    """
    if not any(isinstance(m, Mapping) and m.get("name") == "anomaly_query" for m in matchers):
        return False
    for m in matchers:
        if not isinstance(m, Mapping):
            return False
        name = str(m.get("name", ""))
        if (name in series_labels or name == "anomaly_query") and not _matcher_ok(m, exposed.get(name, "")):
            return False
    return True


def flagged_run_start(s: SeriesState, at: float, lag: float) -> float:
    """Start of the series' run of scores >= 1 at or before `at` (call under the lock).

    lag: seconds the score takes to rise after a change (smoothing), taken off the start.
    Without such a run in the RUN_LOOKBACK before `at`: at - NO_RUN.
    """
    t = s.recent.get("timestamp", np.empty(0))
    sc = s.recent.get("score", np.empty(0))
    hot = np.nonzero((t <= at) & (t >= at - RUN_LOOKBACK) & (sc >= 1.0))[0]
    if not len(hot):
        return at - NO_RUN
    i = int(hot[-1])
    while i > 0 and np.isfinite(sc[i - 1]) and sc[i - 1] >= 1.0:
        i -= 1
    return float(t[i]) - lag


class FeedbackReader:
    """Reads Alertmanager's silences every `interval` seconds and files their feedback."""

    def __init__(self, client: AlertmanagerClient, registry: Registry, store: ModelStore,
                 metrics: FeedbackMetrics, interval: float, lag: float, *,
                 clock: Callable[[], float] = time.time,
                 on_feedback: Callable[[], None] | None = None) -> None:
        self.client, self.registry, self.store, self.metrics = client, registry, store, metrics
        self.interval, self.lag, self.clock = interval, lag, clock
        self.on_feedback = on_feedback
        self.reads_ok = 0
        self._failing = False

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.read_once()
            except Exception:  # one tick is a boundary: log, count, try again
                self.metrics.errors.labels("internal").inc()
                log.exception("reading feedback from %s failed", self.client.describe())
            stop.wait(self.interval)

    def read_once(self) -> int:
        """One read; returns how many new records were filed. Never raises AlertmanagerError."""
        try:
            silences = self.client.silences()
        except AlertmanagerError as e:
            self.metrics.errors.labels(e.reason).inc()
            # Said once per outage at warning level, then quietly: it is counted either way.
            log.log(logging.DEBUG if self._failing else logging.WARNING,
                    "cannot read silences for feedback (%s): %s; retrying every %g s",
                    e.reason, e, self.interval)
            self._failing = True
            return 0
        if self._failing:
            log.info("reading silences for feedback from %s again", self.client.describe())
        self._failing = False
        self.reads_ok += 1
        self.metrics.last_read.set(self.clock())
        added = sum(self._file(sil) for sil in silences)
        if added and self.on_feedback is not None:
            self.on_feedback()
        return added

    def _file(self, sil: Mapping[str, Any]) -> int:
        kind = marker_kind(sil.get("comment"))
        if kind is None:
            return 0
        ref = str(sil.get("id", ""))[:128]
        matchers = sil.get("matchers")
        try:
            starts, ends = parse_time(sil.get("startsAt")), parse_time(sil.get("endsAt"))
        except ValueError as e:
            log.warning("silence %s: unreadable times (%s); ignored", ref, e)
            return 0
        now = self.clock()
        if starts > now or not isinstance(matchers, list):
            return 0  # pending: judged once it has begun
        with self.registry.lock:
            names_by_query: dict[str, set[str]] = {}
            for s in self.registry.all():
                names_by_query.setdefault(s.query, set()).update(s.exposed)
            todo = []
            for s in self.registry.all():
                if s.model is None or any(r.source == "alertmanager" and r.ref == ref for r in s.feedback):
                    continue
                if matches(matchers, s.exposed, names_by_query[s.query]):
                    start = flagged_run_start(s, starts, self.lag)
                    todo.append((s, start))
        n = 0
        for s, start in todo:
            end = max(min(ends, now), start + 1.0)
            try:
                fb = Feedback(start=start, end=end, kind=kind, comment=str(sil.get("comment", "")),
                              source="alertmanager", ref=ref, created_at=now)
                n += submit(self.registry, self.store, s, fb, self.metrics)
            except (FeedbackError, NoModelError) as e:
                log.warning("silence %s on %s %s: %s; ignored", ref, s.query, s.exposed, e)
        return n


def describe_feedback(records: Sequence[Feedback]) -> list[dict[str, Any]]:
    """Records as the status API shows them."""
    return [{"start": r.start, "end": r.end, "kind": r.kind, "comment": r.comment,
             "source": r.source, "ref": r.ref, "created_at": r.created_at}
            for r in records if math.isfinite(r.start)]
