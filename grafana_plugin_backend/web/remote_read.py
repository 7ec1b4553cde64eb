"""Prometheus' remote-read endpoint: POST /api/v1/read answers selectors on the anomaly_* metrics.

A Prometheus with a `remote_read` block per promvae shard fans a query out to every shard and
merges the answers, so users get full PromQL over all shards' scores through the Prometheus
they already run. The body is a snappy-compressed (block format) protobuf ReadRequest; the
answer a snappy-compressed ReadResponse (the SAMPLES response type), with the points on the
model grid (the service's `step`) inside each query's range: live points where the poller has
them, on-demand scores (query/ondemand.py) for any past range, as the query API serves them.

The query API's limits apply (query_max_series, query_max_score_points, query_timeout,
query_max_concurrency, basic auth and body size from access.py). Errors are plain text, as
Prometheus' remote-read client expects: 400 for a malformed request (bad snappy, bad protobuf,
absurd times, a bad or huge regex), 422 for one over the limits, 503 for a timeout or an
unreachable source; never a 500.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import cramjam
import numpy as np
from flask import Blueprint, Flask, Response, current_app, request
from google.protobuf.message import DecodeError

from ..query.promql import LabelMatcher as Matcher
from ..query.promql import QueryError, grid_start
from ..service.poller import grid_floor
from .prompb import (
    Label,
    LabelMatcher,
    Query,
    QueryResult,
    ReadRequest,
    ReadResponse,
    Sample,
    TimeSeries,
)

log = logging.getLogger(__name__)

bp = Blueprint("remote_read", __name__)

CONTENT_TYPE = "application/x-protobuf"
# A ReadRequest is a few matchers: 16 MiB decompressed is far beyond any real one, and the
# bound is checked against the snappy header before any memory is taken for the body.
MAX_DECOMPRESSED = 16 * 2**20
MAX_QUERIES = 16        # Prometheus sends one per request
MAX_MATCHERS = 64       # per query
MAX_REGEX_CHARS = 4096  # Python's re has no time limit: long patterns are refused up front
MAX_ABS_MS = 2**53      # ms from 1970 (~285,000 years): exact as a float; int64 extremes are not
OPS = {LabelMatcher.EQ: "=", LabelMatcher.NEQ: "!=", LabelMatcher.RE: "=~",
       LabelMatcher.NRE: "!~"}


class ReadError(Exception):
    """A request remote read cannot answer: HTTP `status` and a plain-text reason."""

    def __init__(self, status: int, message: str, error_type: str = "bad_data") -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type


def init_app(app: Flask) -> None:
    """Register the blueprint (after query_api.init_app: it shares its slots and scorer)."""
    app.register_blueprint(bp)


def decode_request(body: bytes) -> ReadRequest:
    """The ReadRequest in a snappy block `body`; ReadError(400) saying what is wrong."""
    if not body:
        raise ReadError(400, "empty body: expected a snappy-compressed protobuf ReadRequest")
    try:
        size = cramjam.snappy.decompress_raw_len(body)
    except Exception as e:  # noqa: BLE001 - cramjam raises its own types for a bad header
        raise ReadError(400, f"body is not snappy block format: {e}") from None
    if size > MAX_DECOMPRESSED:
        raise ReadError(400, f"body decompresses to {size} bytes, more than the "
                        f"{MAX_DECOMPRESSED} a ReadRequest may take")
    try:
        raw = bytes(cramjam.snappy.decompress_raw(body))
    except Exception as e:  # noqa: BLE001
        raise ReadError(400, f"body is not valid snappy block format (Prometheus sends "
                        f"Content-Encoding: snappy, not framed): {e}") from None
    req = ReadRequest()
    try:
        req.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ReadError(400, f"body is not a protobuf ReadRequest: {e}") from None
    return req


def encode_response(resp: ReadResponse) -> bytes:
    return bytes(cramjam.snappy.compress_raw(resp.SerializeToString()))


def matchers_of(q: Query) -> list[Matcher]:
    """promql LabelMatchers of a remote-read Query; ReadError(400) for bad ones."""
    if len(q.matchers) > MAX_MATCHERS:
        raise ReadError(400, f"{len(q.matchers)} matchers in one query; at most "
                        f"{MAX_MATCHERS}")
    out = []
    for m in q.matchers:
        op = OPS.get(m.type)
        if op is None:
            raise ReadError(400, f"unknown matcher type {m.type} for label {m.name!r} "
                            "(known: EQ 0, NEQ 1, RE 2, NRE 3)")
        if not m.name:
            raise ReadError(400, "a matcher without a label name")
        if op in ("=~", "!~") and len(m.value) > MAX_REGEX_CHARS:
            raise ReadError(400, f"regex for label {m.name!r} has {len(m.value)} characters; "
                            f"at most {MAX_REGEX_CHARS}")
        try:
            out.append(Matcher(m.name, op, m.value))
        except QueryError as e:
            raise ReadError(400, str(e)) from None
    return out


def _time_range(q: Query, now: float) -> tuple[float, float]:
    """(start, end) in seconds of a query; the end is clipped to now (no scores after it)."""
    start_ms, end_ms = q.start_timestamp_ms, q.end_timestamp_ms
    for name, v in (("start_timestamp_ms", start_ms), ("end_timestamp_ms", end_ms)):
        if abs(v) > MAX_ABS_MS:
            raise ReadError(400, f"{name} {v} is out of range (at most {MAX_ABS_MS:g} ms "
                            "from 1970)")
    if end_ms < start_ms:
        raise ReadError(400, f"end_timestamp_ms {end_ms} is before start_timestamp_ms "
                        f"{start_ms}")
    return start_ms / 1000.0, min(end_ms / 1000.0, now)


def answer(q: Query) -> QueryResult:
    """The anomaly_* series matching `q` with their points inside its range."""
    api = current_app.extensions["promvae_query"]
    svc = current_app.extensions["promvae"]
    matchers = matchers_of(q)
    start, end = _time_range(q, float(svc.clock()))
    result = QueryResult()
    session = api.scorer.session()
    series = session.select(matchers)
    if not series:
        return result
    max_series = int(current_app.config.get("PROMVAE_QUERY_MAX_SERIES",
                                            svc.cfg.query_max_series))
    if len(series) > max_series:
        raise ReadError(422, f"the selector matches {len(series)} series, more than "
                        f"query_max_series ({max_series}); add matchers", "execution")
    if q.hints.func == "series":  # /api/v1/series through Prometheus: label sets, no samples
        result.timeseries.extend(_series(lab, np.empty(0, np.int64), np.empty(0))
                                 for lab in series)
        return result
    step = session.step
    g0, g1 = grid_start(start, step), grid_floor(end, step)
    points = math.floor((g1 - g0) / step + 1e-9) + 1 if g1 >= g0 else 0
    if points == 0:
        return result
    limit = api.scorer.max_score_points
    if points * len(series) > limit:
        raise ReadError(422, f"{len(series)} series x {points} points exceeds "
                        f"query_max_score_points ({limit}); narrow the time range or the "
                        "series", "execution")
    if not api.slots.acquire(timeout=api.scorer.timeout):
        raise ReadError(503, f"timed out waiting for one of the {api.max_concurrency} query "
                        "slots (query_max_concurrency)", "timeout")
    try:
        values = session.load(series, start, end)  # (S, points), NaN = no point
    finally:
        api.slots.release()
    times_ms = np.rint((g0 + step * np.arange(values.shape[1])) * 1000).astype(np.int64)
    for labels, row in zip(series, values):
        keep = ~np.isnan(row)
        if not keep.any():
            continue
        result.timeseries.append(_series(labels, times_ms[keep], row[keep]))
    return result


def _series(labels: dict[str, str], times_ms: np.ndarray, values: np.ndarray) -> TimeSeries:
    return TimeSeries(labels=[Label(name=k, value=v) for k, v in sorted(labels.items())],
                      samples=[Sample(value=v, timestamp=t)
                               for v, t in zip(values.tolist(), times_ms.tolist())])


def _wants_samples(types: Sequence[int]) -> bool:
    return not types or ReadRequest.SAMPLES in types


def _plain(status: int, message: str) -> Response:
    return Response(message + "\n", status=status, mimetype="text/plain")


@bp.post("/api/v1/read")
def read() -> Response:
    api = current_app.extensions["promvae_query"]
    started = time.monotonic()
    try:
        req = decode_request(request.get_data(cache=False))
        if not _wants_samples(req.accepted_response_types):
            raise ReadError(400, "promvae answers the SAMPLES response type only; accepted "
                            f"types asked: {list(req.accepted_response_types)}")
        if len(req.queries) > MAX_QUERIES:
            raise ReadError(400, f"{len(req.queries)} queries in one request; at most "
                            f"{MAX_QUERIES}")
        resp = ReadResponse(results=[answer(q) for q in req.queries])
    except ReadError as e:
        api.errors.labels(e.error_type).inc()
        log.info("remote read refused (%d): %s", e.status, e)
        return _plain(e.status, str(e))
    except QueryError as e:  # from the scorer: timeout, unavailable source, limits
        api.errors.labels(e.error_type).inc()
        status = 503 if e.error_type in ("timeout", "unavailable") else 422
        return _plain(status, f"{e.error_type}: {e}")
    except Exception as e:  # an HTTP boundary: log, count, answer without a 500
        log.exception("remote read failed")
        api.errors.labels("internal").inc()
        return _plain(422, f"internal error while answering the read ({type(e).__name__}); "
                      "see the promvae log")
    body = encode_response(resp)
    log.debug("remote read: %d queries, %d series, %d bytes in %.3f s", len(req.queries),
              sum(len(r.timeseries) for r in resp.results), len(body),
              time.monotonic() - started)
    out = Response(body, status=200, content_type=CONTENT_TYPE)
    out.headers["Content-Encoding"] = "snappy"
    return out
