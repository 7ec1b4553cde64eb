"""POST /api/v1/feedback: mark a range of one series as a false alarm (or as bad data).

Body (JSON): {"series": "<id or selector>" | {label: value, ...}, "start": t, "end": t,
"comment": "...", "kind": "normal" | "exclude"}; t is unix seconds or RFC 3339. The series
retrains soon and the range is honoured as detector.feedback says. Behind the same auth and
body size limit as the rest of the API (access.py); errors are Prometheus-style JSON.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from detector.feedback import KINDS, MAX_COMMENT, NORMAL, Feedback, FeedbackError, check_new

from ..query.explain import find_series
from ..query.params import parse_time
from ..query.promql import QueryError
from ..service.feedback import NoModelError, describe_feedback, submit

log = logging.getLogger(__name__)

bp = Blueprint("feedback", __name__)

FIELDS = {"series", "start", "end", "comment", "kind"}


@bp.errorhandler(QueryError)
def _query_error(e: QueryError) -> tuple[Response, int]:
    return jsonify(status="error", errorType=e.error_type, error=str(e)), e.status


@bp.errorhandler(Exception)
def _unexpected(e: Exception) -> tuple[Response, int]:
    if isinstance(e, HTTPException):
        return jsonify(status="error", errorType="bad_data", error=e.description), e.code or 400
    log.exception("feedback request failed")
    return jsonify(status="error", errorType="execution",
                   error=f"internal error while filing feedback ({type(e).__name__}); "
                         "see the promvae log"), 422


def _body() -> dict[str, Any]:
    raw = request.get_data(cache=False)  # the size limit is enforced before this (access.py)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise QueryError("bad_data", f"the body must be a JSON object: {e}") from None
    if not isinstance(body, dict):
        raise QueryError("bad_data", f"the body must be a JSON object, got a JSON {type(body).__name__}")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise QueryError("bad_data", f"unknown fields: {', '.join(u[:40] for u in unknown[:5])}; "
                         f"known: {', '.join(sorted(FIELDS))}")
    return body


def _selector(series: Any) -> str:
    """The `series` field as find_series reads it: a string, or labels as an exact selector."""
    if isinstance(series, str) and series:
        return series
    if isinstance(series, dict) and series and all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in series.items()):
        return "{" + ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(series.items())) + "}"
    raise QueryError("bad_data", "invalid field 'series': a series id, a selector like "
                     '{anomaly_query="cpu",instance="a:9100"}, or an object of label values')


def _time(body: dict[str, Any], name: str) -> float:
    v = body.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise QueryError("bad_data", f"invalid field {name!r}: unix seconds or an RFC 3339 time")
    return parse_time(name, str(v))


@bp.post("/api/v1/feedback")
def feedback_route() -> tuple[Response, int]:
    svc = current_app.extensions["promvae"]
    body = _body()
    s = find_series(svc, _selector(body.get("series")))
    start, end = _time(body, "start"), _time(body, "end")
    comment, kind = body.get("comment", ""), body.get("kind", NORMAL)
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        raise QueryError("bad_data", f"invalid field 'comment': a string of at most {MAX_COMMENT} characters")
    if kind not in KINDS:
        raise QueryError("bad_data", f"invalid field 'kind': one of {', '.join(KINDS)}")
    now = svc.clock()
    try:
        fb = check_new(Feedback(start=start, end=end, kind=kind, comment=comment, source="api",
                                created_at=now), now)
    except FeedbackError as e:
        raise QueryError("bad_data", str(e)) from None
    oldest = now - svc.cfg.history
    if fb.end < oldest:
        raise QueryError("bad_data", f"the range ends before the history the next training reads "
                         f"(history {svc.cfg.history:g} s): it would change nothing")
    try:
        added = submit(svc.registry, svc.store, s, fb, svc.feedback_metrics)
    except NoModelError as e:
        raise QueryError("execution", str(e), 422) from None
    if added:
        svc.trainer.wake()
    return jsonify(status="success", data={
        "series": s.id, "added": added, "feedback": describe_feedback([fb])[0],
        "retrain": "queued" if added else "already filed"}), 200


def init_app(app: Any) -> None:
    app.register_blueprint(bp)
