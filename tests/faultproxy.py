"""A loopback HTTP proxy in front of a real Prometheus whose faults a test switches at run time.

    proxy = FaultProxy(prom.url)      # starts serving on 127.0.0.1:<free port>
    proxy.mode = "reset"              # every following request meets this fault
    wait_until(lambda: proxy.count("reset") > 0)  # until at least one request met it

Modes: "pass" (forward unchanged), "500" and "503" (Prometheus-shaped error body), "truncate"
(a well-formed HTTP answer whose JSON body is cut in half), "slow" (answers after
`slow_seconds`, longer than the client's timeout), "reset" (status line, headers and part of
the body, then a TCP RST: SO_LINGER 0 and close), "many_series" (a matrix of `many_series`
series, one point each, at the query's end time; __name__ "faultproxy_series").
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlparse

from tests.promstack import QuietHandler, ServerThread

MODES = ("pass", "500", "503", "truncate", "slow", "reset", "many_series")


class FaultProxy(ServerThread):
    """Threaded HTTP proxy on 127.0.0.1 forwarding to `upstream` unless `mode` says otherwise."""

    def __init__(self, upstream: str, slow_seconds: float = 5.0,
                 many_series: int = 100_000) -> None:
        up = urlparse(upstream)
        self.upstream = (up.hostname or "127.0.0.1", up.port or 80)
        self.slow_seconds, self.many_series = slow_seconds, many_series
        self._mode = "pass"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.counts: dict[str, int] = dict.fromkeys(MODES, 0)
        owner = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                owner._handle(self, b"")

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                owner._handle(self, self.rfile.read(n))

        self._serve(Handler)
        self._server.handle_error = lambda request, address: None  # "reset" closes under it

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"unknown fault mode {value!r} (known: {', '.join(MODES)})")
        self._mode = value

    def count(self, mode: str) -> int:
        with self._lock:
            return self.counts[mode]

    def stop(self) -> None:
        self._stop.set()
        super().stop()

    # --- request handling -------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        mode = self._mode
        with self._lock:
            self.counts[mode] += 1
        try:
            if mode in ("500", "503"):
                err = {"status": "error", "errorType": "internal", "error": "injected fault"}
                self._send(h, int(mode), json.dumps(err).encode())
            elif mode == "many_series":
                self._send(h, 200, self._many(h.path, body))
            elif mode == "slow":
                self._stop.wait(self.slow_seconds)
                self._send(h, *self._forward(h, body))
            else:
                status, payload = self._forward(h, body)
                if mode == "truncate":
                    self._send(h, status, payload[: len(payload) // 2])
                elif mode == "reset":
                    self._reset(h, status, payload)
                else:
                    self._send(h, status, payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first (e.g. its timeout during "slow")

    def _forward(self, h: BaseHTTPRequestHandler, body: bytes) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            headers = {k: v for k, v in h.headers.items()
                       if k.lower() not in ("host", "accept-encoding", "connection")}
            conn.request(h.command, h.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def _send(self, h: BaseHTTPRequestHandler, status: int, payload: bytes) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(payload)
        h.wfile.flush()
        h.close_connection = True

    def _reset(self, h: BaseHTTPRequestHandler, status: int, payload: bytes) -> None:
        """Promise the whole body, send a third of it, then abort the connection with RST."""
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload[: max(1, len(payload) // 3)])
        h.wfile.flush()
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.connection.close()
        h.close_connection = True

    def _many(self, path: str, body: bytes) -> bytes:
        """A success answer with `many_series` series, one sample each at the query's end."""
        params = {k: v[0] for k, v in parse_qs(urlparse(path).query).items()}
        params.update({k: v[0] for k, v in parse_qs(body.decode()).items()})
        end = float(params.get("end") or params.get("time") or 0)
        point = f'"values":[[{end:.3f},"1"]]'
        items = ",".join(f'{{"metric":{{"__name__":"faultproxy_series","n":"{i}"}},{point}}}'
                         for i in range(self.many_series))
        return ('{"status":"success","data":{"resultType":"matrix","result":['
                + items + "]}}").encode()
