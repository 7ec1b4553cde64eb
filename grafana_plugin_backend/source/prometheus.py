"""The source of series: Prometheus through prometheus-api-client, chunked and bounded."""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import numpy as np
import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from ..config.base import redact_url
from ..config.settings import PrometheusConfig

log = logging.getLogger(__name__)

MAX_POINTS = 11_000  # Prometheus refuses range queries of more points per series


@dataclass
class RangeSeries:
    """One series of a range query: labels (incl. __name__ if any), timestamps (N,), values (N,)."""

    labels: dict[str, str]
    timestamps: np.ndarray
    values: np.ndarray


class SourceError(Exception):
    """A failed query; `reason` is a short label for promvae_poll_errors_total."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ResponseTooLarge(requests.RequestException):
    """An answer's body (decompressed) exceeded prometheus.max_response_bytes."""


class ResponseDeadline(requests.Timeout):
    """An answer's body was still arriving when the request's total time was up."""


class _BoundedBody:
    """A urllib3 response whose decoded body stops at `max_bytes` and at a deadline."""

    def __init__(self, raw: object, max_bytes: int, deadline: float) -> None:
        self._raw, self._max_bytes, self._deadline = raw, max_bytes, deadline

    def stream(self, amt: int = 2**16, decode_content: bool | None = None):
        """Like urllib3's stream(), but yields whatever has arrived (read1), so a body dripped
        a byte at a time still meets the deadline check."""
        raw, total = self._raw, 0
        if raw.chunked and raw.supports_chunked_reads():
            chunks = raw.read_chunked(amt, decode_content=decode_content)
        else:
            chunks = iter(lambda: raw.read1(amt, decode_content=decode_content), b"")
        for chunk in chunks:
            total += len(chunk)
            if total > self._max_bytes:
                raw.close()
                raise ResponseTooLarge(f"answer larger than {self._max_bytes} bytes")
            if time.monotonic() > self._deadline:
                raw.close()
                raise ResponseDeadline("answer still arriving when the timeout was up")
            yield chunk

    def __getattr__(self, name: str) -> object:
        return getattr(self._raw, name)


class BoundedAdapter(HTTPAdapter):
    """HTTPAdapter that refuses bodies over `max_bytes` (declared or read, after gzip) before
    they are parsed, and gives the body `timeout` seconds after the headers (no slow drip)."""

    def __init__(self, max_bytes: int, timeout: float, **kwargs: object) -> None:
        self.max_bytes, self.total_timeout = max_bytes, timeout
        super().__init__(**kwargs)

    def build_response(self, req, resp):  # type: ignore[no-untyped-def]
        declared = resp.headers.get("Content-Length", "")
        encoded = resp.headers.get("Content-Encoding", "identity") not in ("", "identity")
        if declared.isdigit() and not encoded and int(declared) > self.max_bytes:
            resp.close()
            raise ResponseTooLarge(f"answer of {declared} bytes is larger than "
                                   f"{self.max_bytes} bytes")
        response = super().build_response(req, resp)
        response.raw = _BoundedBody(resp, self.max_bytes,
                                    time.monotonic() + self.total_timeout)
        return response


class Source(Protocol):
    """What the poller and trainer read series from (Prometheus, or the built-in demo)."""

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[RangeSeries]:
        """Every series of `expr` on the grid start, start+step, ..., <= end."""
        ...

    def describe(self) -> str:
        """Where data comes from, for logs and the status page (no secrets)."""
        ...

    def close(self) -> None: ...


def grid_points(start: float, end: float, step: float) -> int:
    """Points of the grid start, start + step, ... up to `end` inclusive (float-tolerant)."""
    return math.floor((end - start) / step + 1e-9) + 1


def chunk_ranges(start: float, end: float, step: float,
                 max_points: int = MAX_POINTS) -> list[tuple[float, float]]:
    """Split the grid start..end (inclusive) into ranges of at most `max_points` points."""
    if end < start:
        return []
    n = grid_points(start, end, step)
    out = []
    for first in range(0, n, max_points):
        last = min(first + max_points, n) - 1
        out.append((start + first * step, start + last * step))
    return out


def parse_matrix(result: object) -> list[RangeSeries]:
    """RangeSeries from a Prometheus `matrix` result (consumed: each item is freed once
    converted, so the JSON and the arrays never both peak); SourceError if it is not one."""
    if not isinstance(result, list):
        raise SourceError("bad_response", "query_range result is not a list")
    out = []
    result.reverse()
    try:
        while result:
            item = result.pop()
            pairs = item.get("values") or []
            ts = np.fromiter((float(p[0]) for p in pairs), dtype=np.float64, count=len(pairs))
            vals = np.fromiter((float(p[1]) for p in pairs), dtype=np.float64, count=len(pairs))
            labels = {str(k): str(v) for k, v in (item.get("metric") or {}).items()}
            out.append(RangeSeries(labels, ts, vals))
    except (AttributeError, TypeError, ValueError, IndexError) as e:
        raise SourceError("bad_response", f"malformed query_range result: {e}") from None
    return out


def merge_chunks(parts: list[list[RangeSeries]]) -> list[RangeSeries]:
    """Join the per-chunk results of one query into one RangeSeries per label set."""
    if len(parts) == 1:
        return parts[0]  # one answer holds each label set once, in time order: nothing to join
    merged: dict[tuple, list[RangeSeries]] = {}
    for part in parts:
        for s in part:
            merged.setdefault(tuple(sorted(s.labels.items())), []).append(s)
    out = []
    for pieces in merged.values():
        ts = np.concatenate([p.timestamps for p in pieces])
        vals = np.concatenate([p.values for p in pieces])
        order = np.argsort(ts, kind="stable")
        out.append(RangeSeries(pieces[0].labels, ts[order], vals[order]))
    return out


def only_series(expr: str, labelsets: Sequence[Mapping[str, str]]) -> str:
    """`expr` restricted to the series with these label sets (``__name__`` aside).

    PromQL has no filter on an expression's result labels, so the wanted label sets are built
    with label_replace on vector(1) and joined with `and on(...)`; Prometheus then sends only
    those series (an on-demand query for one series of a 1,000-series query pulls one).
    Series that differ only in ``__name__`` both pass: callers match results by labels.
    """
    names = sorted({k for lab in labelsets for k in lab if k != "__name__"})
    wanted = []
    for lab in labelsets:
        v = "vector(1)"
        for k in names:
            if lab.get(k):  # an absent label is the empty value, which vector(1) already has
                # `$` would expand regex groups in the replacement; `$$` is a literal `$`.
                value = json.dumps(lab[k].replace("$", "$$"), ensure_ascii=False)
                v = f'label_replace({v}, "{k}", {value}, "", "")'
        wanted.append(v)
    return f"({expr}) and on({', '.join(names)}) ({' or '.join(wanted)})"


class PrometheusSource:
    """Range queries against one Prometheus, with auth, TLS, timeouts and bounded retries."""

    narrowable = True  # expressions are PromQL: only_series() may restrict them

    def __init__(self, cfg: PrometheusConfig, max_points: int = MAX_POINTS) -> None:
        self._cfg = cfg
        self._max_points = max_points
        self._auth = None
        if cfg.basic_auth.username:
            password = cfg.basic_auth.password
            if cfg.basic_auth.password_file:
                password = Path(cfg.basic_auth.password_file).read_text().strip()
            self._auth = (cfg.basic_auth.username, password)
        # One client (and requests.Session) per thread: the poller, the trainer and the query
        # threads all pull, and requests does not promise a Session is safe to share.
        self._local = threading.local()
        self._clients: list[PrometheusConnect] = []
        self._clients_lock = threading.Lock()
        self._client_for_thread()  # fail here, at start, on a bad URL or TLS setting

    def _client_for_thread(self) -> PrometheusConnect:
        client = getattr(self._local, "client", None)
        if client is not None:
            return client
        cfg = self._cfg
        session = requests.Session()
        tls = cfg.tls_config
        session.verify = False if tls.insecure_skip_verify else (tls.ca_file or True)
        if tls.cert_file:
            session.cert = (tls.cert_file, tls.key_file)
        retry = Retry(total=cfg.retries, connect=cfg.retries, read=False, status=cfg.retries,
                      backoff_factor=0.5, status_forcelist=(429, 502, 503, 504),
                      allowed_methods=None, raise_on_status=False)
        client = PrometheusConnect(url=cfg.url.rstrip("/"), headers=dict(cfg.headers),
                                   retry=retry, auth=self._auth, session=session,
                                   timeout=cfg.timeout, method=cfg.method.upper())
        # replaces the client's plain adapter: bounded body size and total request time
        session.mount(client.url, BoundedAdapter(cfg.max_response_bytes, cfg.timeout,
                                                 max_retries=retry))
        self._local.client = client
        with self._clients_lock:
            self._clients.append(client)
        return client

    @property
    def _client(self) -> PrometheusConnect:
        """This thread's client."""
        return self._client_for_thread()

    def describe(self) -> str:
        return f"prometheus {redact_url(self._cfg.url)}"

    def close(self) -> None:
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()

    def _refresh_token(self) -> None:
        """Re-read the bearer token file on every request so rotated tokens are picked up."""
        if not self._cfg.bearer_token_file:
            return
        try:
            token = Path(self._cfg.bearer_token_file).read_text().strip()
        except OSError as e:
            raise SourceError("auth", f"cannot read bearer token file: {e.strerror}") from None
        self._client.headers = {**self._cfg.headers, "Authorization": f"Bearer {token}"}

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[RangeSeries]:
        """Chunked under max_points; a chunk refused as too large is retried in halves, and
        the smaller size is kept for the rest of the range (at most log2(max_points) refusals)."""
        parts = []
        pending = chunk_ranges(start, end, step, self._max_points)
        while pending:
            s, e = pending.pop(0)
            try:
                parts.append(self._query_chunk(expr, s, e, step))
            except SourceError as err:
                n = grid_points(s, e, step)
                if err.reason != "too_large" or n < 2:
                    raise
                log.info("answer for %d points per series too large; asking for %d", n, n // 2)
                pending = chunk_ranges(s, end, step, n // 2)
        return merge_chunks(parts)

    def _query_chunk(self, expr: str, start: float, end: float, step: float) -> list[RangeSeries]:
        self._refresh_token()
        t0 = datetime.fromtimestamp(start, tz=UTC)
        t1 = datetime.fromtimestamp(end, tz=UTC)
        try:
            result = self._client.custom_query_range(expr, t0, t1, f"{step:g}")
        except requests.JSONDecodeError as e:
            raise SourceError("bad_response", f"Prometheus answered with bad JSON: {e}") from None
        except ResponseTooLarge as e:
            raise SourceError("too_large", f"Prometheus {e} (prometheus.max_response_bytes); "
                                           "refused before parsing") from None
        except requests.Timeout as e:
            raise SourceError("timeout", f"Prometheus timed out: {type(e).__name__}") from None
        except requests.exceptions.SSLError as e:  # a ConnectionError: say it is TLS, and why
            raise SourceError("connection", f"TLS with Prometheus at {redact_url(self._cfg.url)} "
                              f"failed ({_tls_reason(e)}); check prometheus.tls_config") from None
        except requests.ConnectionError as e:
            if "timed out" in str(e).lower():
                raise SourceError("timeout", "Prometheus timed out") from None
            raise SourceError("connection",
                              f"cannot reach Prometheus at {redact_url(self._cfg.url)}") from None
        except requests.exceptions.ChunkedEncodingError:
            raise SourceError("connection", "connection to Prometheus broke mid-answer") from None
        except requests.RequestException as e:
            raise SourceError("http", f"request to Prometheus failed: {type(e).__name__}") from None
        except PrometheusApiClientException as e:
            raise _http_error(str(e)) from None
        except (KeyError, TypeError):
            raise SourceError("bad_response", "Prometheus answer lacks data.result") from None
        return parse_matrix(result)


def _tls_reason(e: Exception) -> str:
    """The OpenSSL reason inside requests' wrapped error, e.g. "certificate verify failed:
    unable to get local issuer certificate"; the rest (pool, URL, retries) is noise."""
    m = re.search(r"\[SSL: \w+\] ([^'\"(]+)", str(e))
    return m.group(1).strip() if m else "handshake failed"


def _http_error(message: str) -> SourceError:
    """SourceError for a non-200 answer, naming the status; 400/422 mean the query is bad."""
    code = message.split("HTTP Status Code ", 1)[-1].split(" ", 1)[0]
    if code in ("400", "422"):
        reason = "bad_query"
    elif code in ("401", "403"):
        reason = "auth"
    elif code.startswith("5"):
        reason = "http_5xx"
    else:
        reason = "http"
    return SourceError(reason, f"Prometheus answered HTTP {code}: {message[:300]}")
