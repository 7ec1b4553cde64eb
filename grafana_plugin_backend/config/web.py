"""The --web.config.file of Prometheus exporters: TLS and bcrypt basic auth for the HTTP server.

Same format as the exporter toolkit (docs/web-configuration.md in prometheus/exporter-toolkit):
`tls_server_config`, `http_server_config` and `basic_auth_users`. Parsed once at start; every
bad key is reported in one ConfigError, and the certificate and key are loaded to check them.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import ConfigError, read_yaml_mapping

log = logging.getLogger(__name__)

TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
# client_auth_type -> verify mode. Python's ssl cannot accept a client certificate without
# verifying it, so RequireAnyClientCert is refused; RequestClientCert never uses the certificate
# (the toolkit does not verify it either) and so behaves as NoClientCert.
CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "RequestClientCert": ssl.CERT_NONE,
               "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
               "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
# Security headers the toolkit allows in http_server_config.headers.
ALLOWED_HEADERS = ("Content-Security-Policy", "X-Frame-Options", "X-Content-Type-Options",
                   "X-XSS-Protection", "Strict-Transport-Security")
_BCRYPT_HASH = re.compile(r"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$")
_TLS_KEYS = ("cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
             "max_version")
# Toolkit keys whose absence only changes defaults Python already keeps strong: warn, go on.
_TLS_IGNORED = ("cipher_suites", "curve_preferences", "prefer_server_cipher_suites")
HASH_HINT = ("""make one with: python -c 'import bcrypt; """
             """print(bcrypt.hashpw(b"PASSWORD", bcrypt.gensalt()).decode())'""")


@dataclass(frozen=True)
class TLSServerConfig:
    cert_file: str
    key_file: str
    client_auth_type: str = "NoClientCert"
    client_ca_file: str = ""
    min_version: str = "TLS12"
    max_version: str = "TLS13"

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side SSLContext with the certificate, client verification and versions."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        ctx.minimum_version = TLS_VERSIONS[self.min_version]
        ctx.maximum_version = TLS_VERSIONS[self.max_version]
        if self.client_ca_file:
            ctx.load_verify_locations(cafile=self.client_ca_file)
        ctx.verify_mode = CLIENT_AUTH[self.client_auth_type]
        return ctx


@dataclass(frozen=True)
class WebConfig:
    tls: TLSServerConfig | None = None
    headers: dict[str, str] = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=dict, repr=False)  # username -> bcrypt hash
    path: str = ""

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def describe(self) -> str:
        """A one-line, secret-free summary for logs and check-config."""
        parts = [self.scheme]
        if self.tls is not None:
            parts.append(f"{self.tls.min_version}-{self.tls.max_version}, client certificates: "
                         f"{self.tls.client_auth_type}")
        parts.append(f"{len(self.users)} basic auth users" if self.users else "no basic auth")
        if self.headers:
            parts.append(f"headers {', '.join(self.headers)}")
        return ", ".join(parts)


def load_web_config(path: str | Path, *, warn: bool = True) -> WebConfig:
    """Parse and check a web config file; ConfigError listing every bad key.

    Ignored keys are logged as warnings unless `warn` is false (a validation-only pass).
    """
    source = f"web config file {path}"
    raw = read_yaml_mapping(path, source)
    errors: list[str] = []
    for k in raw:
        if k not in ("tls_server_config", "http_server_config", "basic_auth_users"):
            errors.append(f"{k}: unknown key (known: basic_auth_users, http_server_config, "
                          "tls_server_config)")
    tls = _tls(raw.get("tls_server_config"), errors, warn)
    headers = _http(raw.get("http_server_config"), errors, warn)
    users = _users(raw.get("basic_auth_users"), errors)
    if errors:
        raise ConfigError(errors, source)
    return WebConfig(tls=tls, headers=headers, users=users, path=str(path))


def _mapping(raw: Any, key: str, errors: list[str]) -> Mapping:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        errors.append(f"{key}: must be a mapping, got {type(raw).__name__}")
        return {}
    return raw


def _tls(raw: Any, errors: list[str], warn: bool) -> TLSServerConfig | None:
    raw = _mapping(raw, "tls_server_config", errors)
    if not raw:
        return None
    n = len(errors)
    values: dict[str, str] = {}
    for k, v in raw.items():
        key = f"tls_server_config.{k}"
        if k in _TLS_IGNORED:
            if warn:
                log.warning("%s: not supported by promvae, ignored (Python's TLS defaults "
                            "apply)", key)
        elif k in ("cert", "key", "client_ca"):
            errors.append(f"{key}: inline PEM is not supported; use {k}_file")
        elif k == "client_allowed_sans":
            errors.append(f"{key}: not supported by promvae (ignoring it would let in every "
                          "client with a certificate from client_ca_file)")
        elif k not in _TLS_KEYS:
            errors.append(f"{key}: unknown key (known: {', '.join(_TLS_KEYS)})")
        elif v is not None and not isinstance(v, str):
            errors.append(f"{key}: must be a string")
        elif v:
            values[k] = v
    for k in ("cert_file", "key_file"):
        if k not in values:
            errors.append(f"tls_server_config.{k}: required when tls_server_config is set")
    auth = values.get("client_auth_type", "NoClientCert")
    if auth in ("RequireAnyClientCert", "RequireClientCert"):
        errors.append(f"tls_server_config.client_auth_type: {auth} is not supported (Python "
                      "cannot accept unverified client certificates); use "
                      "RequireAndVerifyClientCert with client_ca_file")
    elif auth not in CLIENT_AUTH:
        errors.append(f"tls_server_config.client_auth_type: must be one of "
                      f"{', '.join(CLIENT_AUTH)}, got {auth!r}")
    elif auth.startswith(("Verify", "RequireAnd")) and "client_ca_file" not in values:
        errors.append(f"tls_server_config.client_ca_file: required with client_auth_type {auth}")
    elif CLIENT_AUTH[auth] == ssl.CERT_NONE and "client_ca_file" in values:
        errors.append("tls_server_config.client_ca_file: set, but client_auth_type "
                      f"{auth} does not verify client certificates (use "
                      "RequireAndVerifyClientCert)")
    for k, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        if values.get(k, default) not in TLS_VERSIONS:
            errors.append(f"tls_server_config.{k}: must be one of {', '.join(TLS_VERSIONS)}, "
                          f"got {values[k]!r}")
    if len(errors) > n:
        return None
    cfg = TLSServerConfig(**values)
    if TLS_VERSIONS[cfg.min_version] > TLS_VERSIONS[cfg.max_version]:
        errors.append(f"tls_server_config: min_version {cfg.min_version} is above max_version "
                      f"{cfg.max_version}")
        return None
    for k in ("cert_file", "key_file", "client_ca_file"):
        path = getattr(cfg, k)
        if not path:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            errors.append(f"tls_server_config.{k}: cannot read {path!r}: {e.strerror}")
    if len(errors) > n:
        return None
    # OpenSSL's messages name a reason, never key material.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cfg.cert_file, cfg.key_file)
    except ssl.SSLError as e:
        reason = ("the key does not belong to the certificate"
                  if e.reason == "KEY_VALUES_MISMATCH" else f"not PEM ({e.reason or e})")
        errors.append(f"tls_server_config: cannot use cert_file {cfg.cert_file!r} with key_file "
                      f"{cfg.key_file!r}: {reason}")
        return None
    try:
        cfg.ssl_context()
    except ssl.SSLError as e:
        errors.append(f"tls_server_config.client_ca_file: cannot use {cfg.client_ca_file!r}: "
                      f"not PEM certificates ({e.reason or e})")
        return None
    return cfg


def _http(raw: Any, errors: list[str], warn: bool) -> dict[str, str]:
    raw = _mapping(raw, "http_server_config", errors)
    headers: dict[str, str] = {}
    for k, v in raw.items():
        key = f"http_server_config.{k}"
        if k == "http2":
            if warn:
                log.warning("%s: ignored, promvae serves HTTP/1.1 only", key)
        elif k != "headers":
            errors.append(f"{key}: unknown key (known: headers, http2)")
        else:
            for name, value in _mapping(v, key, errors).items():
                if name not in ALLOWED_HEADERS:
                    errors.append(f"{key}.{name}: not allowed (allowed: "
                                  f"{', '.join(ALLOWED_HEADERS)})")
                elif not isinstance(value, str) or "\n" in value or "\r" in value:
                    errors.append(f"{key}.{name}: must be a one-line string")
                else:
                    headers[name] = value
    return headers


def _users(raw: Any, errors: list[str]) -> dict[str, str]:
    raw = _mapping(raw, "basic_auth_users", errors)
    users: dict[str, str] = {}
    for name, hashed in raw.items():
        if not isinstance(name, str) or not name or ":" in name:
            errors.append(f"basic_auth_users: user name {name!r} must be a non-empty string "
                          "without ':'")
        elif not isinstance(hashed, str) or not _BCRYPT_HASH.match(hashed):
            # The value is a secret (or a password pasted by mistake): never echo it.
            errors.append(f"basic_auth_users.{name}: not a bcrypt hash; {HASH_HINT}")
        else:
            users[name] = hashed
    return users
