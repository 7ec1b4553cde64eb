"""HTTP guards of the Flask app: basic auth from the web config, request size limits, headers."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
from collections import OrderedDict
from collections.abc import Mapping

import bcrypt
from flask import Flask, Response, jsonify, request
from prometheus_client import CollectorRegistry, Counter
from werkzeug.exceptions import RequestEntityTooLarge

from ..config.web import WebConfig

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/-/healthy", "/-/ready"})  # probes (kubelet, compose) send no password
MAX_URL_BYTES = 32 * 1024  # path + query string; long PromQL belongs in a POST body
REALM = "promvae"
# The exporter toolkit's hash of "fakepassword": unknown users cost one bcrypt check too, so
# response times do not tell which user names exist.
_FAKE_HASH = b"$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi"


class BasicAuthChecker:
    """bcrypt checks of user/password pairs, remembering the successful ones.

    bcrypt is slow on purpose (~0.3 s); a Prometheus scraping every 15 s must not pay it each
    time. The cache holds a keyed SHA-256 of (user, hash, password), never the password.
    """

    def __init__(self, users: Mapping[str, str], cache_size: int = 256) -> None:
        self._users = [(u.encode(), h.encode()) for u, h in users.items()]
        self._cache: OrderedDict[bytes, None] = OrderedDict()
        self._cache_size = cache_size
        self._key = secrets.token_bytes(32)  # per process: cache entries are useless elsewhere
        self._lock = threading.Lock()
        self.bcrypt_checks = 0  # how often bcrypt ran (tests read it; no timing needed)

    def check(self, username: str, password: str) -> bool:
        """True if `username` is configured and `password` matches its bcrypt hash."""
        user = username.encode("utf-8", "surrogateescape")
        hashed, known = _FAKE_HASH, False
        for u, h in self._users:  # every name compared in constant time, no early exit
            if hmac.compare_digest(u, user):
                hashed, known = h, True
        pw = password.encode("utf-8", "surrogateescape")
        key = hmac.new(self._key, b"\0".join((user.hex().encode(), hashed, pw.hex().encode())),
                       hashlib.sha256).digest()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return known
            self.bcrypt_checks += 1
        try:
            ok = bcrypt.checkpw(pw, hashed) and known
        except ValueError:  # longer than 72 bytes, or a malformed hash
            ok = False
        if ok:
            with self._lock:
                self._cache[key] = None
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return ok


def _refuse(status: int, error_type: str, message: str) -> Response:
    """An error answer: Prometheus-style JSON under /api/, plain text elsewhere (and for
    remote read, whose clients show a plain-text body)."""
    if request.path.startswith("/api/") and request.path != "/api/v1/read":
        resp = jsonify(status="error", errorType=error_type, error=message)
    else:
        resp = Response(message + "\n", mimetype="text/plain")
    resp.status_code = status
    return resp


REFUSALS = ("unauthorized", "too_large", "uri_too_long")


def init_app(app: Flask, web: WebConfig | None, max_request_bytes: int,
             registry: CollectorRegistry | None = None) -> None:
    """Register the size limits, basic auth (if `web` has users) and `web`'s response headers.

    Refused requests are counted in promvae_http_requests_refused_total{reason} of `registry`:
    a rising `unauthorized` is a misconfigured scraper or someone guessing passwords.
    """
    refused = Counter("promvae_http_requests_refused_total",
                      "HTTP requests refused before reaching an endpoint, by reason.",
                      ["reason"], registry=registry)
    for reason in REFUSALS:
        refused.labels(reason)
    app.config["MAX_CONTENT_LENGTH"] = max_request_bytes
    app.config["MAX_FORM_MEMORY_SIZE"] = max_request_bytes  # werkzeug's own 500 kB form cap
    checker = BasicAuthChecker(web.users) if web is not None and web.users else None
    headers = dict(web.headers) if web is not None else {}
    app.extensions["promvae_web"] = web  # the server takes TLS settings from here

    @app.before_request
    def guard() -> Response | None:
        if len(request.path) + len(request.query_string) > MAX_URL_BYTES:
            refused.labels("uri_too_long").inc()
            return _refuse(414, "bad_data", f"URL too long: at most {MAX_URL_BYTES} bytes of "
                           "path and query string; send long queries as a POST form")
        if checker is not None and request.path not in OPEN_PATHS:
            auth = request.authorization
            if (auth is None or auth.type != "basic"
                    or not checker.check(auth.username or "", auth.password or "")):
                log.debug("unauthorized %s %s from %s", request.method, request.path,
                          request.remote_addr)
                refused.labels("unauthorized").inc()
                resp = _refuse(401, "unauthorized", "Unauthorized")
                resp.headers["WWW-Authenticate"] = f'Basic realm="{REALM}"'
                return resp
        if request.content_length is not None and request.content_length > max_request_bytes:
            refused.labels("too_large").inc()
            return _too_large(max_request_bytes)
        return None

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(e: RequestEntityTooLarge) -> Response:  # a body read past the limit
        refused.labels("too_large").inc()
        return _too_large(max_request_bytes)

    if headers:
        @app.after_request
        def add_headers(resp: Response) -> Response:
            resp.headers.update(headers)
            return resp


def _too_large(limit: int) -> Response:
    return _refuse(413, "bad_data", f"request body too large: at most {limit} bytes "
                   "(web_max_request_bytes)")
