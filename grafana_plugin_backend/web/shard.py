"""GET /api/v1/status/shard and the promvae_shard_* self-metrics of this instance's shard."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from ..service.shard import Shard

bp = Blueprint("shard", __name__)


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
        yield GaugeMetricFamily("promvae_shards", "Number of shards the series are spread "
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
