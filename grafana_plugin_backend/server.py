"""Production serving with waitress; SIGTERM stops cleanly after model writes finish."""

from __future__ import annotations

import logging
import signal
import types

from waitress import create_server

from .app import Service, create_app
from .config import Config

log = logging.getLogger(__name__)

THREADS = 8  # one process (the state lives in it), a few threads for scrapes and API calls
STOP_TIMEOUT = 120.0  # seconds to wait for a running save to finish on shutdown


def parse_listen_address(address: str) -> tuple[str, int]:
    """(host, port) from "host:port", ":port" (all IPv4 interfaces) or "[v6]:port"."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def _raise_exit(signum: int, frame: types.FrameType | None) -> None:
    raise SystemExit(0)  # waitress' run() catches it and stops accepting requests


def serve(cfg: Config, service: Service | None = None) -> int:
    """Run promvae until SIGTERM or SIGINT; returns the process exit code."""
    try:
        service = service or Service(cfg)
        app = create_app(cfg, service=service)
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
    host, port = parse_listen_address(cfg.listen_address)
    try:
        server = create_server(app, host=host, port=port, threads=THREADS, ident="promvae",
                               clear_untrusted_proxy_headers=True)
    except OSError as e:
        log.error("cannot listen on %s: %s", cfg.listen_address, e.strerror or e)
        return 1
    if cfg.torch_threads:
        import torch

        # Training and scoring run in separate threads; several intra-op threads per torch
        # call oversubscribe small machines (measured 30x slower bmm on 2 busy cores).
        torch.set_num_threads(cfg.torch_threads)
    previous = signal.signal(signal.SIGTERM, _raise_exit)
    service.start()
    log.info("listening on http://%s:%s (status page /, metrics /metrics)",
             "localhost" if host in ("0.0.0.0", "::") else host, server.effective_port)
    try:
        server.run()
    finally:
        log.info("shutting down: stopping the poller and trainer, writing the index")
        signal.signal(signal.SIGTERM, previous)
        service.stop(timeout=STOP_TIMEOUT)
        server.close()
        log.info("promvae stopped")
    return 0
