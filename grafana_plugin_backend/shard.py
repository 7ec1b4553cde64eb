"""Series-level shards: which promvae instance owns which series, and what it says about that.

Each series (query name + source labels, the identity of its model) belongs to exactly one of
`count` shards by jump consistent hashing (Lamping & Veach, 2014) of a 64-bit hash of its
identity: going from N to N+1 shards moves about 1/(N+1) of the series, all of them to the
new shard, and every other series keeps its shard and its model. Nothing coordinates the
shards: each one discovers every series of its queries and keeps its own. The user's
Prometheus scrapes every shard and reaches their on-demand scores through remote read.

The index comes from --shard.index, else from a StatefulSet pod name (POD_NAME, else the host
name) ending in -<ordinal>, such as promvae-2.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

_ORDINAL = re.compile(r"-(\d+)$")
_JUMP_MUL = 2862933555777941757
_MASK = 2**64 - 1

bp = Blueprint("shard", __name__)


def identity_hash(query: str, labels: Mapping[str, str]) -> int:
    """A stable 64-bit hash of a series' identity (independent of label order and process)."""
    blob = json.dumps([query, sorted(labels.items())], separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "little")


def jump_hash(key: int, buckets: int) -> int:
    """The bucket in [0, buckets) of a 64-bit `key` (jump consistent hash)."""
    if buckets < 1:
        raise ValueError(f"buckets must be at least 1, got {buckets}")
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * _JUMP_MUL + 1) & _MASK
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def ordinal_of(name: str) -> int | None:
    """The StatefulSet ordinal of a pod name such as promvae-2 (None if it has none)."""
    m = _ORDINAL.search(name.strip())
    return int(m.group(1)) if m else None


def index_from_environment(environ: Mapping[str, str] | None = None,
                           hostname: str | None = None) -> tuple[int | None, str]:
    """(ordinal, where it came from) from POD_NAME, else the host name (`hostname`, by default
    this machine's)."""
    environ = os.environ if environ is None else environ
    hostname = socket.gethostname() if hostname is None else hostname
    for where, name in (("POD_NAME", environ.get("POD_NAME", "")), ("host name", hostname)):
        if name:
            n = ordinal_of(name)
            if n is not None:
                return n, f"{where} {name!r}"
    return None, "neither POD_NAME nor the host name ends in -<number>"


@dataclass(frozen=True)
class Shard:
    """This instance's place among `count` shards; owns() says which series are its own."""

    index: int = 0
    count: int = 1

    def owner(self, query: str, labels: Mapping[str, str]) -> int:
        return jump_hash(identity_hash(query, labels), self.count)

    def owns(self, query: str, labels: Mapping[str, str]) -> bool:
        return self.count == 1 or self.owner(query, labels) == self.index

    def describe(self) -> str:
        return f"shard {self.index} of {self.count}"


class ShardCollector:
    """promvae_shard_* self-metrics: this shard's index, the shard count, the series it owns."""

    def __init__(self, shard: Shard, registry: Any) -> None:
        self.shard, self.registry = shard, registry

    def describe(self) -> list:
        return []

    def collect(self):
        yield GaugeMetricFamily("promvae_shard_index", "This instance's shard index "
                                "(0-based; --shard.index or the StatefulSet ordinal).",
                                value=self.shard.index)
        yield GaugeMetricFamily("promvae_shard_count", "Number of shards the series are spread "
                                "over (--shard.count).", value=self.shard.count)
        yield GaugeMetricFamily("promvae_shard_series_owned", "Series this shard owns and "
                                "models (series of other shards are not counted anywhere).",
                                value=len(self.registry))


def init_app(app: Flask, shard: Shard, registry: Any, metrics: CollectorRegistry) -> None:
    """Register the shard's self-metrics on `metrics` and its status endpoint."""
    try:
        metrics.register(ShardCollector(shard, registry))
    except ValueError:  # a second app of the same service: its collector is there already
        pass
    app.extensions["promvae_shard"] = shard
    app.register_blueprint(bp)


@bp.get("/api/v1/status/shard")
def status() -> Response:
    shard: Shard = current_app.extensions["promvae_shard"]
    svc = current_app.extensions["promvae"]
    return jsonify(status="success", data={
        "index": shard.index, "count": shard.count, "series_owned": len(svc.registry),
        "hash": "jump consistent hash of sha256(query name, sorted source labels)"})
