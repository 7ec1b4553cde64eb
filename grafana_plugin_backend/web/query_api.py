"""The Prometheus-compatible HTTP API Grafana's built-in Prometheus datasource talks to.

Parameters are read from the URL and the form body alike (Grafana POSTs forms, and may retry
as GET); repeated match[] values of both are merged. Errors use Prometheus' JSON shape with
400 bad_data, 422 execution or 503 unavailable; nothing here answers a 500.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import numpy as np
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from prometheus_client import Counter
from werkzeug.exceptions import HTTPException

from .. import __version__
from ..query.ondemand import OnDemandScorer
from ..query.params import fmt_time, fmt_value, parse_step, parse_time
from ..query.promql import (
    ALL_METRICS,
    Matrix,
    QueryError,
    Vector,
    evaluate,
    matches_all,
    parse_selector,
    valid_label_name,
)
from ..service.registry import ANOMALY_METRICS
from ..source.prometheus import MAX_POINTS

log = logging.getLogger(__name__)

API_VERSION = "2.53.0"  # the Prometheus HTTP API level answered (buildinfo "version")
HELP = {name: doc for name, (_, doc) in ANOMALY_METRICS.items()}  # as /metrics has them

bp = Blueprint("query_api", __name__)


class QueryAPI:
    """Per-app state of the query API: the on-demand scorer and the error counter."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.scorer = OnDemandScorer(service)
        # Queries beyond the limit wait in their own server thread (as Prometheus'
        # --query.max-concurrency does), leaving the CPU to the ones running.
        self.max_concurrency = service.cfg.query_max_concurrency
        self.slots = threading.BoundedSemaphore(self.max_concurrency)
        errors = getattr(service, "query_errors", None)  # one per registry, even for two apps
        if errors is None:
            errors = Counter("promvae_query_errors_total",
                             "Query API requests answered with an error, by errorType.",
                             ["type"], registry=service.metrics_registry)
            for error_type in ("bad_data", "execution", "timeout", "unavailable", "internal"):
                errors.labels(error_type)  # exposed at 0: rate() and alerts see them from start
            service.query_errors = errors
        self.errors = errors


def init_app(app: Flask) -> None:
    """Register the blueprint and attach a QueryAPI for the app's service."""
    app.extensions["promvae_query"] = QueryAPI(app.extensions["promvae"])
    app.register_blueprint(bp)


def _api() -> QueryAPI:
    return current_app.extensions["promvae_query"]


# ---- parameters ---------------------------------------------------------------------------

def _match_texts() -> list[str]:
    """The match[] values of the URL and the form body (even of a GET, unlike request.values)."""
    return request.args.getlist("match[]") + request.form.getlist("match[]")


def _now() -> float:
    return float(current_app.extensions["promvae"].clock())


# ---- formatting ---------------------------------------------------------------------------

def _success(data: Any, warnings: list[str] | None = None) -> Response:
    body: dict[str, Any] = {"status": "success", "data": data}
    if warnings:
        body["warnings"] = warnings
    return jsonify(body)


@bp.errorhandler(QueryError)
def _query_error(e: QueryError) -> tuple[Response, int]:
    _api().errors.labels(e.error_type).inc()
    return jsonify(status="error", errorType=e.error_type, error=str(e)), e.status


@bp.errorhandler(Exception)
def _unexpected(e: Exception) -> tuple[Response, int]:
    if isinstance(e, HTTPException):
        return jsonify(status="error", errorType="bad_data", error=e.description), e.code or 400
    log.exception("query API request %s failed", request.path)
    _api().errors.labels("internal").inc()
    return jsonify(status="error", errorType="execution",
                   error=f"internal error while answering the query ({type(e).__name__}); "
                         "see the promvae log"), 422


# ---- queries ------------------------------------------------------------------------------

def _max_series() -> int:
    default = current_app.extensions["promvae"].cfg.query_max_series
    return int(current_app.config.get("PROMVAE_QUERY_MAX_SERIES", default))


def _query_text() -> str:
    q = request.values.get("query")
    if q is None:
        raise QueryError("bad_data", "missing parameter 'query'")
    return q


def _evaluate(text: str, times: np.ndarray, step: float) -> Any:
    """promql.evaluate in one of the query_max_concurrency slots."""
    api = _api()
    if not api.slots.acquire(timeout=api.scorer.timeout):
        raise QueryError("timeout", f"query timed out waiting for one of the "
                         f"{api.max_concurrency} query slots (query_max_concurrency); "
                         "other queries are running")
    try:
        return evaluate(api.scorer.session(), text, times, step, _max_series())
    finally:
        api.slots.release()


@bp.route("/api/v1/query", methods=["GET", "POST"])
def query() -> Response:
    text = _query_text()
    t = parse_time("time", request.values.get("time"), _now())
    value = _evaluate(text, np.array([t]), 0.0)
    if isinstance(value, Matrix):
        result = [{"metric": lab, "values": [[fmt_time(a), fmt_value(b)] for a, b in zip(ts, vs)]}
                  for lab, ts, vs in value.series]
        return _success({"resultType": "matrix", "result": result})
    if isinstance(value, Vector):
        result = [{"metric": lab, "value": [fmt_time(t), fmt_value(row[0])]}
                  for lab, row in zip(value.labels, value.values) if not math.isnan(row[0])]
        return _success({"resultType": "vector", "result": result})
    return _success({"resultType": "scalar", "result": [fmt_time(t), fmt_value(value[0])]})


@bp.route("/api/v1/query_range", methods=["GET", "POST"])
def query_range() -> Response:
    text = _query_text()
    start = parse_time("start", request.values.get("start"))
    end = parse_time("end", request.values.get("end"))
    step = parse_step(request.values.get("step"))
    if end < start:
        raise QueryError("bad_data", "invalid parameter 'end': end timestamp must not be "
                         "before start time")
    points = math.floor((end - start) / step + 1e-9) + 1
    if points > MAX_POINTS:
        raise QueryError("bad_data", "exceeded maximum resolution of 11,000 points per "
                         f"timeseries ({points} asked). Try decreasing the query resolution "
                         "(?step=XX)")
    times = start + step * np.arange(points)
    value = _evaluate(text, times, step)
    if isinstance(value, Matrix):
        raise QueryError("bad_data", "invalid expression type \"range vector\" for range query, "
                         "must be Scalar or instant Vector")
    if isinstance(value, Vector):
        labels, rows = value.labels, value.values
    else:
        labels, rows = [{}], value[None, :]
    result = []
    for lab, row in zip(labels, rows):
        keep = ~np.isnan(row) if isinstance(value, Vector) else np.ones(len(row), dtype=bool)
        if keep.any():
            result.append({"metric": lab, "values": [[fmt_time(a), fmt_value(b)]
                                                      for a, b in zip(times[keep], row[keep])]})
    return _success({"resultType": "matrix", "result": result})


# ---- metadata endpoints -------------------------------------------------------------------

def _limit() -> int | None:
    text = request.values.get("limit")
    if not text:
        return None
    try:
        n = int(text)
    except ValueError:
        raise QueryError("bad_data", f"invalid parameter 'limit': {text!r} is not an "
                         "integer") from None
    if n < 0:
        raise QueryError("bad_data", "invalid parameter 'limit': must not be negative")
    return n or None


def _matching_labelsets() -> list[dict[str, str]]:
    """Label sets of every anomaly_* series matching any match[] (all without match[])."""
    for name in ("start", "end"):  # accepted and checked; the series set is the live one
        if request.values.get(name):
            parse_time(name, request.values.get(name))
    groups = [parse_selector(t) for t in _match_texts()]
    out = []
    for labels, _ in _api().scorer.labelsets():
        if not groups or any(matches_all(labels, g) for g in groups):
            out.append(labels)
    return out


@bp.route("/api/v1/labels", methods=["GET", "POST"])
def labels() -> Response:
    names = sorted({k for lab in _matching_labelsets() for k in lab} | {"__name__"})
    limit = _limit()
    return _success(names[:limit] if limit else names)


@bp.get("/api/v1/label/<name>/values")
def label_values(name: str) -> Response:
    if not valid_label_name(name):
        raise QueryError("bad_data", f"invalid label name: {name!r}")
    sets = _matching_labelsets()
    values = sorted({lab[name] for lab in sets if name in lab})
    if name == "__name__" and not _match_texts() and not sets:
        values = sorted(ALL_METRICS)
    limit = _limit()
    return _success(values[:limit] if limit else values)


@bp.route("/api/v1/series", methods=["GET", "POST"])
def series() -> Response:
    if not _match_texts():
        raise QueryError("bad_data", "no match[] parameter provided")
    sets = sorted(_matching_labelsets(), key=lambda lab: sorted(lab.items()))
    limit = _limit()
    return _success(sets[:limit] if limit else sets)


@bp.get("/api/v1/metadata")
def metadata() -> Response:
    metric = request.values.get("metric")
    data = {name: [{"type": "gauge", "help": HELP[name], "unit": ""}]
            for name in ALL_METRICS if metric in (None, "", name)}
    limit = _limit()
    if limit:
        data = dict(list(data.items())[:limit])
    return _success(data)


@bp.get("/api/v1/status/buildinfo")
def buildinfo() -> Response:
    # No "features": a non-empty one makes Grafana treat the backend as Mimir.
    return _success({"version": API_VERSION, "revision": "", "branch": "",
                     "buildUser": "promvae", "buildDate": "",
                     "goVersion": "", "application": "promvae", "promvaeVersion": __version__})


@bp.get("/api/v1/rules")
def rules() -> Response:
    return _success({"groups": []})


@bp.route("/api/v1/query_exemplars", methods=["GET", "POST"])
def query_exemplars() -> Response:
    return _success([])
