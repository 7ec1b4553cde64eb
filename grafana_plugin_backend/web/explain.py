"""GET /api/v1/explain: which points of a series' window drive its anomaly score at a time."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from ..query.explain import explain, find_series
from ..query.params import parse_time
from ..query.promql import QueryError

log = logging.getLogger(__name__)

bp = Blueprint("explain", __name__)


@bp.errorhandler(QueryError)
def _query_error(e: QueryError) -> tuple[Response, int]:
    errors = getattr(current_app.extensions["promvae"], "query_errors", None)
    if errors is not None:
        errors.labels(e.error_type).inc()
    return jsonify(status="error", errorType=e.error_type, error=str(e)), e.status


@bp.errorhandler(Exception)
def _unexpected(e: Exception) -> tuple[Response, int]:
    if isinstance(e, HTTPException):
        return jsonify(status="error", errorType="bad_data", error=e.description), e.code or 400
    log.exception("explain request %s failed", request.full_path)
    return jsonify(status="error", errorType="execution",
                   error=f"internal error while explaining ({type(e).__name__}); "
                         "see the promvae log"), 422


@bp.get("/api/v1/explain")
def explain_route() -> Response:
    svc = current_app.extensions["promvae"]
    text = request.args.get("series")
    if not text:
        raise QueryError("bad_data", "missing parameter 'series' (a series id or a selector)")
    s = find_series(svc, text)
    raw_t = request.args.get("time")
    t = parse_time("time", raw_t) if raw_t else None
    return jsonify(status="success", data=explain(svc, s, t))
