"""Production serving with cheroot (TLS from the web config); SIGTERM stops after model writes."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import ssl
import types

import cheroot.errors
import cheroot.wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter
from flask import Flask

from .config.base import ConfigError
from .config.settings import Config
from .config.web import TLSServerConfig, WebConfig
from .service import allocator
from .web.app import Service, create_app

log = logging.getLogger(__name__)

# One process (the state lives in it). Threads are cheap and mostly wait: heavy query API
# requests beyond query_max_concurrency wait for a slot in their own thread, so enough
# threads must stay free for /metrics scrapes and probes (with 8, a burst of dashboard
# queries held scrapes for seconds in benchmarks/load.py).
THREADS = 48
STOP_TIMEOUT = 120.0  # seconds to wait for a running save to finish on shutdown
MAX_HEADER_BYTES = 64 * 1024  # request line + headers; cheroot answers 414/413 above it
LISTEN_BACKLOG = 128  # cheroot's default of 5 drops connections when scrapes and panels burst
CONNECTION_TIMEOUT = 10.0  # seconds a client may stall mid-request (or mid-handshake)


def parse_listen_address(address: str) -> tuple[str, int]:
    """(host, port) from "host:port", ":port" (all IPv4 interfaces) or "[v6]:port"."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def _raise_exit(signum: int, frame: types.FrameType | None) -> None:
    raise SystemExit(0)  # leaves cheroot's serve() loop in the main thread


class _Server(cheroot.wsgi.Server):
    """cheroot's WSGI server logging through `logging` (it writes to stderr by default)."""

    def error_log(self, msg: str = "", level: int = logging.INFO,
                  traceback: bool = False) -> None:
        logging.getLogger("cheroot").log(level, "%s", msg, exc_info=traceback)


_PLAIN_HTTP_BODY = b"This server speaks HTTPS only: use https://.\n"
_PLAIN_HTTP_ANSWER = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
                      b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(_PLAIN_HTTP_BODY), _PLAIN_HTTP_BODY))


class _LazyTLSSocket(ssl.SSLSocket):
    """An SSLSocket that shakes hands on first use, in a worker thread.

    cheroot's builtin adapter shakes hands in its accept loop: one client that connects and
    stays silent would stall every new connection for the whole connection timeout.
    """

    _handshaken = False

    def _handshake(self) -> None:
        if self._handshaken:
            return
        try:
            self.do_handshake()
        except ssl.SSLError as e:
            log.debug("TLS handshake failed: %s", e.reason or e)  # e.g. no client certificate
            if "http request" in str(e).lower():  # plain HTTP to the TLS port: say so in plain
                with contextlib.suppress(OSError):
                    socket.socket.send(self, _PLAIN_HTTP_ANSWER)  # unencrypted, on purpose
            raise cheroot.errors.FatalSSLAlert(*e.args) from e  # cheroot closes quietly
        except OSError as e:  # timeout or reset mid-handshake
            raise cheroot.errors.FatalSSLAlert(*e.args) from e
        self._handshaken = True

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        self._handshake()
        return super().recv(buflen, flags)

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:  # type: ignore[no-untyped-def]
        self._handshake()
        return super().recv_into(buffer, nbytes, flags)

    def send(self, data, flags: int = 0) -> int:  # type: ignore[no-untyped-def]
        self._handshake()
        return super().send(data, flags)

    def sendall(self, data, flags: int = 0) -> None:  # type: ignore[no-untyped-def]
        self._handshake()
        super().sendall(data, flags)


class _LazyTLSAdapter(BuiltinSSLAdapter):
    """cheroot's builtin adapter, handshake deferred to the worker (see _LazyTLSSocket)."""

    def wrap(self, sock: socket.socket) -> tuple[ssl.SSLSocket, dict]:
        tls = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return tls, {}  # no SSL_* environ: the app does not use them


def ssl_adapter(tls: TLSServerConfig) -> BuiltinSSLAdapter:
    """cheroot's TLS adapter using `tls`' context (client verification, versions)."""
    adapter = _LazyTLSAdapter(tls.cert_file, tls.key_file)
    context = tls.ssl_context()
    context.sslsocket_class = _LazyTLSSocket
    adapter.context = context
    return adapter


def make_server(cfg: Config, app: Flask, web: WebConfig | None = None) -> _Server:
    """An unbound cheroot server for `app` on cfg.listen_address, with TLS if `web` has it."""
    server = _Server(parse_listen_address(cfg.listen_address), app, numthreads=THREADS,
                     request_queue_size=LISTEN_BACKLOG, timeout=CONNECTION_TIMEOUT)
    server.software = "promvae"  # the Server header; no version to fingerprint
    server.max_request_header_size = MAX_HEADER_BYTES
    server.max_request_body_size = cfg.web_max_request_bytes
    if web is not None and web.tls is not None:
        server.ssl_adapter = ssl_adapter(web.tls)
    return server


def serve(cfg: Config, service: Service | None = None) -> int:
    """Run promvae until SIGTERM or SIGINT; returns the process exit code."""
    try:
        service = service or Service(cfg)
        app = create_app(cfg, service=service)
        web = app.extensions["promvae_web"]
        server = make_server(cfg, app, web)
    except (OSError, ConfigError) as e:
        log.error("cannot start: %s", e)
        return 1
    try:
        server.prepare()  # binds the port
    except OSError as e:
        log.error("cannot listen on %s: %s", cfg.listen_address, e.strerror or e)
        return 1
    host, port = server.bind_addr[:2]
    if cfg.torch_threads:
        import torch

        # Training and scoring run in separate threads; several intra-op threads per torch
        # call oversubscribe small machines (measured 30x slower bmm on 2 busy cores).
        torch.set_num_threads(cfg.torch_threads)
    allocator.tune_for_training()
    previous = signal.signal(signal.SIGTERM, _raise_exit)
    try:
        service.start()
        log.info("listening on %s://%s:%s (status page /, metrics /metrics%s)",
                 web.scheme if web is not None else "http",
                 "localhost" if host in ("0.0.0.0", "::") else host, port,
                 "; basic auth required except /-/healthy and /-/ready"
                 if web is not None and web.users else "")
        server.serve()
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        log.info("shutting down: stopping the poller and trainer, writing the index")
        signal.signal(signal.SIGTERM, previous)
        server.stop()
        service.stop(timeout=STOP_TIMEOUT)
        log.info("promvae stopped")
    return 0
