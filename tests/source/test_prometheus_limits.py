"""Bounds on what Prometheus may send: body size (declared, streamed, gzip), drip-fed bodies,
and big ranges re-asked in halves."""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest

from grafana_plugin_backend.config.settings import PrometheusConfig
from grafana_plugin_backend.source.prometheus import PrometheusSource, SourceError
from tests.promstack import QuietHandler, ServerThread

LIMIT = 64 * 1024


def matrix(start: float, end: float, step: float) -> bytes:
    n = round((end - start) / step) + 1
    values = [[start + i * step, "1"] for i in range(n)]
    return json.dumps({"status": "success", "data": {"resultType": "matrix", "result": [
        {"metric": {"instance": "a"}, "values": values}]}}).encode()


class Server(ServerThread):
    """Loopback server whose answer is `answer(params, handler)`; records the params."""

    def __init__(self) -> None:
        self.params: list[dict[str, float]] = []
        self.answer: Callable[[dict[str, float], BaseHTTPRequestHandler], None] = \
            lambda p, h: None
        owner = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                q = {k: float(v[0]) for k, v in parse_qs(urlparse(self.path).query).items()
                     if k in ("start", "end", "step")}
                owner.params.append(q)
                try:
                    owner.answer(q, self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self._serve(Handler)


@pytest.fixture
def server() -> Iterator[Server]:
    with Server() as s:
        yield s


def source(url: str, timeout: float = 5.0) -> PrometheusSource:
    return PrometheusSource(PrometheusConfig(url=url, retries=0, timeout=timeout,
                                             max_response_bytes=LIMIT))


def send(h: BaseHTTPRequestHandler, body: bytes, length: bool = True,
         encoding: str = "") -> None:
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    if length:
        h.send_header("Content-Length", str(len(body)))
    if encoding:
        h.send_header("Content-Encoding", encoding)
    h.end_headers()
    h.wfile.write(body)


def big_body() -> bytes:
    return b'{"status":"success","data":{"resultType":"matrix","result":[' + b" " * (4 * LIMIT)


@pytest.mark.parametrize("how", ["declared", "streamed", "gzip"])
def test_an_answer_over_the_limit_is_refused(server, how):
    body = big_body()
    if how == "declared":
        server.answer = lambda p, h: send(h, body)
    elif how == "streamed":  # no Content-Length: HTTP/1.0, the body ends with the connection
        server.answer = lambda p, h: send(h, body, length=False)
    else:  # small on the wire, four times the limit once decompressed
        server.answer = lambda p, h: send(h, gzip.compress(body), encoding="gzip")
    with pytest.raises(SourceError) as info:
        source(server.url).query_range("m", 0, 0, 60)
    assert info.value.reason == "too_large"
    assert "max_response_bytes" in str(info.value)


def test_a_drip_fed_answer_times_out_before_it_is_complete(server):
    body = matrix(0, 0, 60)
    sent: list[int] = []
    finished = threading.Event()

    def drip(p: dict[str, float], h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        try:
            for i in range(len(body)):  # a byte every 50 ms: each read is quick, the whole not
                h.wfile.write(body[i:i + 1])
                h.wfile.flush()
                sent.append(i)
                time.sleep(0.05)
        finally:
            finished.set()

    server.answer = drip
    with pytest.raises(SourceError) as info:
        source(server.url, timeout=0.5).query_range("m", 0, 0, 60)
    assert info.value.reason == "timeout"
    assert finished.wait(30)
    assert len(sent) < len(body)  # the client hung up mid-body, not after the whole drip


def test_a_range_too_large_for_one_answer_is_re_asked_in_halves(server):
    def answer(p: dict[str, float], h: BaseHTTPRequestHandler) -> None:
        body = matrix(p["start"], p["end"], p["step"])
        send(h, big_body() if len(body) > LIMIT else body)

    server.answer = answer
    got = source(server.url).query_range("m", 0, 599_940, 60)  # 10,000 points, ~200 kB
    assert len(got) == 1
    np.testing.assert_array_equal(got[0].timestamps, np.arange(0, 600_000, 60.0))
    refused = sum(1 for p in server.params
                  if len(matrix(p["start"], p["end"], p["step"])) > LIMIT)
    assert refused <= 11  # each refusal halves the size for the rest: log2(11,000) at most


def test_a_single_point_too_large_is_an_error_not_a_loop(server):
    server.answer = lambda p, h: send(h, big_body())
    with pytest.raises(SourceError) as info:
        source(server.url).query_range("m", 0, 600_000, 60)
    assert info.value.reason == "too_large"
    assert len(server.params) <= 15  # halved down to one point, then given up
