"""Operational endpoints: /-/healthy, /-/ready, the model status API and an HTML status page."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, render_template_string, request

from . import __version__
from .state import SeriesState

bp = Blueprint("status", __name__)


def _num(x: float | None) -> float | None:
    """JSON-safe number: NaN and ±Inf become null."""
    return float(x) if x is not None and math.isfinite(x) else None


def _iso(t: float | None) -> str:
    if t is None or not math.isfinite(t):
        return ""
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def model_status(s: SeriesState) -> dict[str, Any]:
    """One series' entry in GET /api/v1/status/models (call under the registry lock)."""
    m, last = s.model, s.last_result()
    return {
        "id": s.id,
        "anomaly_query": s.query,
        "labels": dict(s.labels),
        "state": s.state,
        "origin": s.model_origin or None,
        "trained_at": _num(m.trained_at) if m is not None else None,
        "trained_from": _num(m.trained_from) if m is not None else None,
        "trained_to": _num(m.trained_to) if m is not None else None,
        "training_points": m.n_train if m is not None else None,
        "threshold": _num(m.threshold_) if m is not None else None,
        "last_score": _num(last["score"]) if last else None,
        "last_flag": _num(last["flag"]) if last else None,
        "last_observed": _num(last["observed"]) if last else None,
        "last_scored_at": _num(last["timestamp"]) if last else None,
        "scored_to": _num(s.scored_to),
        "last_present": _num(s.last_present),
        "observed_points": s.observed_estimate,
        "train_failures": s.train_failures,
        "last_error": s.last_error or None,
    }


def _error(status: int, error_type: str, message: str) -> tuple[Response, int]:
    return jsonify(status="error", errorType=error_type, error=message), status


@bp.get("/-/healthy")
def healthy() -> Response:
    return Response("promvae is Healthy.\n", mimetype="text/plain")


@bp.get("/-/ready")
def ready() -> tuple[Response, int]:
    if current_app.extensions["promvae"].is_ready():
        return Response("promvae is Ready.\n", mimetype="text/plain"), 200
    return Response("promvae is not ready: loading or training the first models.\n",
                    mimetype="text/plain"), 503


@bp.get("/api/v1/openapi.yaml")
def openapi() -> Response:
    """promvae's HTTP API as an OpenAPI 3.0 document (package data)."""
    text = resources.files(__package__).joinpath("openapi.yaml").read_text(encoding="utf-8")
    return Response(text, mimetype="application/yaml")


@bp.get("/api/v1/status/models")
def models() -> Response:
    svc = current_app.extensions["promvae"]
    query = request.args.get("anomaly_query")
    state = request.args.get("state")
    with svc.registry.lock:
        data = [model_status(s) for s in svc.registry.all()
                if (query is None or s.query == query) and (state is None or s.state == state)]
    return jsonify(status="success", data=data)


@bp.get("/api/v1/status/models/<sid>")
def model(sid: str) -> Response | tuple[Response, int]:
    svc = current_app.extensions["promvae"]
    with svc.registry.lock:
        s = svc.registry.get(sid)
        if s is None:
            return _error(404, "not_found", f"no live series with id {sid!r}")
        data = model_status(s)
        recent = {k: v.copy() for k, v in s.recent.items()}
    names = ("timestamp", "observed", "score", "flag", "expected", "lower", "upper")
    n = len(recent.get("timestamp", []))
    data["recent"] = {"fields": list(names),
                      "values": [[_num(float(recent[k][i])) for k in names] for i in range(n)]}
    return jsonify(status="success", data=data)


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="30">
<title>promvae</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:14px}td,th{padding:3px 9px;border-bottom:1px solid #ddd;
text-align:left}th{background:#f4f4f4}.hot{background:#fdd;font-weight:bold}.num{text-align:right}
code{font-size:13px}.muted{color:#777}
</style></head><body>
<h1>promvae <small class="muted">{{ version }}</small></h1>
<p>Source: <b>{{ origin }}</b> &middot; {{ n }} series &middot;
{% for st, c in counts.items() %}{{ st }}: {{ c }}{% if not loop.last %}, {% endif %}{% endfor %}
&middot; {{ "ready" if ready else "not ready yet (loading or training the first models)" }}
&middot; {{ anomalous }} anomalous now</p>
<p>Last successful poll: {{ last_poll or "none yet" }}. Training: {{ training }}.</p>
<p><a href="/metrics">/metrics</a>
&middot; <a href="/api/v1/status/models">/api/v1/status/models</a>
&middot; <a href="/-/ready">/-/ready</a></p>
<table><tr><th>query</th><th>labels</th><th>state</th><th class="num">score</th><th>flag</th>
<th class="num">observed</th><th class="num">expected [lower, upper]</th><th>model trained</th></tr>
{% for r in rows %}<tr{% if r.hot %} class="hot"{% endif %}>
<td>{{ r.query }}</td><td><code>{{ r.labels }}</code></td><td>{{ r.state }}
{% if r.error %}<br><small class="muted">{{ r.error }}</small>{% endif %}</td>
<td class="num">{{ r.score }}</td><td>{{ r.flag }}</td><td class="num">{{ r.observed }}</td>
<td class="num">{{ r.band }}</td><td>{{ r.trained }}</td></tr>
{% endfor %}</table>
<p class="muted">Scores are normalised: 1.0 is the learned threshold of each series.
Rows with a score of 1 or more are highlighted. This page refreshes every 30 s.</p>
</body></html>"""


def _fmt(x: float | None) -> str:
    return "" if x is None or not math.isfinite(x) else f"{x:.4g}"


@bp.get("/")
def index() -> str:
    svc = current_app.extensions["promvae"]
    rows = []
    with svc.registry.lock:
        for s in svc.registry.all():
            last, m = s.last_result(), s.model
            score = last["score"] if last else math.nan
            band = ""
            if last and math.isfinite(last["expected"]):
                band = f"{_fmt(last['expected'])} [{_fmt(last['lower'])}, {_fmt(last['upper'])}]"
            rows.append({
                "query": s.query, "state": s.state, "error": s.last_error,
                "labels": ", ".join(f'{k}="{v}"' for k, v in sorted(s.exposed.items())
                                    if k != "anomaly_query"),
                "score": _fmt(score), "sort": score if math.isfinite(score) else -1.0,
                "hot": math.isfinite(score) and score >= 1.0,
                "flag": _fmt(last["flag"]) if last else "",
                "observed": _fmt(last["observed"]) if last else "", "band": band,
                "trained": _iso(m.trained_at) if m is not None else "",
            })
        counts = svc.registry.counts_by_state()
    rows.sort(key=lambda r: (-r["sort"], r["query"], r["labels"]))
    sample = svc.metrics_registry.get_sample_value
    last_poll = sample("promvae_last_successful_poll_timestamp_seconds") or 0.0
    progress = sample("promvae_training_progress_ratio") or 0.0
    batch = int(sample("promvae_training_batch_series") or 0)
    training = f"{batch} series, {progress:.0%} done" if batch else "idle"
    return render_template_string(
        _PAGE, version=__version__, origin=svc.source.describe(), n=len(rows), counts=counts,
        ready=svc.is_ready(), anomalous=sum(r["hot"] for r in rows),
        last_poll=_iso(last_poll) if last_poll else "", training=training, rows=rows)
