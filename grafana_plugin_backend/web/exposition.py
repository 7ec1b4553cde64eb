"""GET /metrics: anomaly_* text rendered once per registry generation, plus promvae_* self-metrics.

At 10,000 series the anomaly_* families are 60,000 samples; building them as prometheus_client
samples at every scrape cost ~1 s of pure Python. They change only when a poll publishes results,
so AnomalyText renders them to text (and to a gzip prefix) once per Registry.generation and each
scrape appends the small self-metrics block from generate_latest.
"""

from __future__ import annotations

import functools
import platform
import threading
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from flask import Blueprint, Response, current_app, request
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import escape_label_name
from prometheus_client.utils import floatToGoString

from .. import __version__
from ..service.registry import ANOMALY_METRICS, STATES, Registry
from ..service.selfmetrics import DROP_REASONS, SelfMetrics

# zlib level 1: measured ~3x faster than the default 6 on 10,000 series (84 vs 234 ms, busy
# box) for ~12 % more bytes, still ~9x fewer than plain; the anomaly block is compressed once
# per generation, only the self-metrics tail at every scrape.
GZIP_LEVEL = 1


def escape_label_value(v: str) -> str:
    """A label value as the text format 0.0.4 wants it between double quotes."""
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


_label_name = functools.lru_cache(maxsize=4096)(escape_label_name)  # a regex match per call


def label_text(labels: Mapping[str, str]) -> str:
    """`{a="1",b="2"}` (sorted, escaped as prometheus_client does), or "" for no labels."""
    if not labels:
        return ""
    return "{" + ",".join(f'{_label_name(k)}="{escape_label_value(v)}"'
                          for k, v in sorted(labels.items())) + "}"


def format_values(values: np.ndarray) -> list[str]:
    """Sample values as prometheus_client writes them (repr, +Inf/-Inf/NaN, Go-style exponent).

    repr is floatToGoString's answer except for inf/nan and 1e6 <= v < 1e16 (Go switches to an
    exponent sooner): only those few go through it.
    """
    out = list(map(repr, values.tolist()))
    for i in np.flatnonzero(~np.isfinite(values) | ((values >= 1e6) & (values < 1e16))):
        out[i] = floatToGoString(values[i])
    return out


class Rendered:
    """One generation of the anomaly_* block: its text, and its gzip prefix when first asked."""

    def __init__(self, generation: int, text: bytes) -> None:
        self.generation = generation
        self.text = text
        self._lock = threading.Lock()
        self._gzip: tuple[bytes, Any] | None = None  # (head, compressor left open after it)

    def gzip_with(self, tail: bytes) -> bytes:
        """One gzip member of text + tail; text is compressed once per generation."""
        with self._lock:
            if self._gzip is None:
                c = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 31: gzip wrapper
                self._gzip = (c.compress(self.text) + c.flush(zlib.Z_SYNC_FLUSH), c)
            head, c = self._gzip
            c = c.copy()  # the shared one stays just after the block
        return head + c.compress(tail) + c.flush()


class AnomalyText:
    """The anomaly_* families of a registry as exposition text, cached per registry generation."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._render_lock = threading.Lock()  # one render at a time; concurrent scrapes reuse it
        self._rendered: Rendered | None = None
        self._labels: dict[str, str] = {}  # series id -> label text (exposed labels never change)

    def current(self) -> Rendered:
        """The block of the registry's current generation (rendered now if it moved)."""
        r = self._rendered
        if r is not None and r.generation == self._registry.generation:
            return r
        with self._render_lock:
            r = self._rendered
            if r is None or r.generation != self._registry.generation:
                r = self._render()
                self._rendered = r
            return r

    def _render(self) -> Rendered:
        keys = [key for key, _ in ANOMALY_METRICS.values()]
        with self._registry.lock:  # a snapshot only: the formatting runs without the lock
            generation = self._registry.generation
            series = [s for s in self._registry.all()
                      if s.recent and len(s.recent.get("timestamp", ()))]
            values = np.array([np.fromiter((s.recent[k][-1] for s in series), np.float64,
                                           len(series)) for k in keys]).reshape(len(keys), -1)
        cache = self._labels
        shown = ~np.isnan(values[keys.index("score")])  # never expose a NaN score series
        self._labels = {s.id: cache.get(s.id) or label_text(s.exposed)
                        for s, ok in zip(series, shown) if ok}  # removed series forgotten
        labels = list(self._labels.values())
        out: list[str] = []
        for name, (_, doc), row in zip(ANOMALY_METRICS, ANOMALY_METRICS.values(), values):
            help_text = doc.replace("\\", r"\\").replace("\n", r"\n")
            out.append(f"# HELP {name} {help_text}\n# TYPE {name} gauge\n")
            row = row[shown]
            keep = ~np.isnan(row)  # a NaN value (no band yet, say) is left out of its family
            if keep.all():
                out.extend([f"{name}{lab} {v}\n" for lab, v in zip(labels, format_values(row))])
            else:
                kept = [lab for lab, k in zip(labels, keep) if k]
                out.extend([f"{name}{lab} {v}\n"
                            for lab, v in zip(kept, format_values(row[keep]))])
        return Rendered(generation, "".join(out).encode("utf-8"))


class StateCollector:
    """State-derived promvae_* families (models by state, drops, build info) at scrape time."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Metric]:
        with self._registry.lock:
            counts = self._registry.counts_by_state()
            dropped = dict(self._registry.dropped)
        models = GaugeMetricFamily("promvae_models", "Series by model state.", labels=["state"])
        for state in STATES:
            models.add_metric([state], counts.get(state, 0))
        yield models
        drops = CounterMetricFamily("promvae_series_dropped",
                                    "Series not tracked, by reason (each series counted once).",
                                    labels=["reason"])
        for reason in sorted(set(DROP_REASONS) | set(dropped)):
            drops.add_metric([reason], dropped.get(reason, 0))
        yield drops
        info = GaugeMetricFamily("promvae_build_info", "promvae build information.",
                                 labels=["version", "python_version"])
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info


def build_registry(state: Registry) -> tuple[CollectorRegistry, SelfMetrics]:
    """A fresh CollectorRegistry with the state collector, self-metrics and process metrics.

    anomaly_* are not in it: AnomalyText renders them, /metrics puts them first.
    """
    disable_created_metrics()  # *_created samples are noise for a scrape target like this
    reg = CollectorRegistry(auto_describe=False)
    metrics = SelfMetrics(reg)
    reg.register(StateCollector(state))
    ProcessCollector(registry=reg)
    return reg, metrics


def _wants_gzip() -> bool:
    return request.accept_encodings["gzip"] > 0


bp = Blueprint("exposition", __name__)


@bp.get("/metrics")
def metrics() -> Response:
    service = current_app.extensions["promvae"]
    block = service.anomaly_text.current()
    tail = generate_latest(service.metrics_registry)
    headers = {"Content-Type": CONTENT_TYPE_PLAIN_0_0_4, "Vary": "Accept-Encoding"}
    if _wants_gzip():  # Prometheus asks for it: ~10x fewer bytes for one cheap tail
        headers["Content-Encoding"] = "gzip"
        return Response(block.gzip_with(tail), mimetype=None, headers=headers)
    return Response(block.text + tail, mimetype=None, headers=headers)
