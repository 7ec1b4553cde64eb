"""Configuration: a YAML file, PROMVAE_* environment variables and flags build one object."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .base import (
    UNITS,
    ConfigError,
    format_duration,
    parse_duration,
    read_yaml_mapping,
    redact_url,
)

log = logging.getLogger(__name__)

ENV_PREFIX = "PROMVAE_"

_QUERY_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_:.\-]*$")
_LOG_LEVELS = ("debug", "info", "warn", "warning", "error")


@dataclass(frozen=True)
class BasicAuth:
    username: str = ""
    password: str = field(default="", repr=False)
    password_file: str = ""


@dataclass(frozen=True)
class TLSConfig:
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    insecure_skip_verify: bool = False


@dataclass(frozen=True)
class PrometheusConfig:
    url: str = field(default="", repr=False)  # may hold user:password@; __repr__ redacts it
    bearer_token_file: str = ""
    basic_auth: BasicAuth = field(default_factory=BasicAuth)
    tls_config: TLSConfig = field(default_factory=TLSConfig)
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    timeout: float = 30.0       # seconds per HTTP request
    retries: int = 2            # extra attempts on connection errors and 429/502/503/504
    method: str = "GET"
    # Bigger answers are refused before JSON parsing (which takes ~10x the bytes in memory);
    # a refused range is re-asked in halves, so big histories still load, in smaller pieces.
    max_response_bytes: int = 64 * 2**20

    def __repr__(self) -> str:
        shown = (f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.repr)
        return f"PrometheusConfig(url={redact_url(self.url)!r}, {', '.join(shown)})"


@dataclass(frozen=True)
class ShardConfig:
    count: int = 1   # instances the series are spread over (each series on exactly one)
    index: int = -1  # this instance's shard; -1: the ordinal of the pod name (promvae-2 -> 2)


@dataclass(frozen=True)
class AlertmanagerConfig:
    """Feedback from Alertmanager: silences whose comment starts with a promvae marker."""

    url: str = ""  # "" turns the reader off
    feedback_interval: float = 60.0  # between reads of its silences
    timeout: float = 10.0


@dataclass(frozen=True)
class QueryConfig:
    name: str
    expr: str
    unit: str = ""  # of the values, for the status page; "" = guessed from the metric names


@dataclass(frozen=True)
class Config:
    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)
    step: float = 60.0                 # resolution the models see
    history: float = 7 * 86400.0       # training range pulled from Prometheus
    window: int = 120                  # points per VAE window
    poll_every: float = 60.0
    retrain_every: float = 86400.0
    # A flag up this long is a change that stays: it becomes the new normal (its scores join
    # the calibration reference) and the series retrains early. 0 turns the policy off.
    adapt_after: float = 3 * 3600.0
    calibration_span: float = 14 * 86400.0  # recent normal scores the threshold is refitted on
    # An adopted change's scores hold the threshold up until a model trained this long after
    # the change began scores the series; 0: for the whole calibration_span.
    adapt_bridge: float = 2 * 86400.0
    # Series per training batch; 0: as many as training_memory holds at fit_many's measured
    # bytes per series (detector.memory: ~3.9 MB each with the default model and 7d at 60s).
    training_batch_series: int = 0
    training_memory: int = 2 * 2**30   # bytes a training batch may take (default 2 GiB)
    queries: tuple[QueryConfig, ...] = ()
    max_series: int = 20_000           # cardinality cap over all queries (sized for fleets)
    series_ttl: float = 900.0          # a series absent this long leaves /metrics
    model_retention: float = 7 * 86400.0  # a vanished series' model stays on disk this long
    max_catchup: float = 86400.0       # after downtime, score at most this much missed data
    # Scored points kept per series: the query API serves them without rescoring, so the
    # dashboards' default 6h range costs no on-demand scoring (20 KB per series).
    keep_scores: float = 6 * 3600.0
    # Poll up to now - poll_delay. Prometheus answers a time with the newest sample at or before
    # it, so a sample still being scraped (or a recording rule not yet evaluated) would read as
    # the previous one carried forward, and the next poll never asks for that time again.
    poll_delay: float = 30.0
    torch_threads: int = 1             # CPU threads per torch op; 1 keeps scoring responsive
    query_max_series: int = 20_000     # anomaly_* series one query may select
    query_max_score_points: int = 2_000_000  # points one query may score on demand (series x range)
    query_cache_values: int = 4_000_000  # scored values kept for repeated queries (8 bytes each)
    query_timeout: float = 120.0       # a query running longer is cancelled (Prometheus' default)
    query_max_concurrency: int = 4     # query API requests evaluated at once; others wait
    storage_path: str = "data"
    listen_address: str = ":8080"
    web_config_file: str = ""          # exporter-toolkit web config: TLS and basic auth users
    web_max_request_bytes: int = 1024 * 1024  # larger request bodies get 413
    log_level: str = "info"
    shard: ShardConfig = field(default_factory=ShardConfig)
    alertmanager: AlertmanagerConfig = field(default_factory=AlertmanagerConfig)
    grafana_url: str = ""              # links to the drill-down dashboard (status page, alerts)
    model: dict[str, Any] = field(default_factory=dict)  # VAEConfig overrides

    @property
    def demo(self) -> bool:
        """True when no Prometheus is configured: the built-in demo source is used."""
        return not self.prometheus.url

    @property
    def keep_points(self) -> int:
        """Scored points kept per series: keep_scores, plus 10 so that a range of exactly
        keep_scores (whose first step looks a little further back) is covered too."""
        return max(1, int(self.keep_scores // self.step)) + 10

    def vae_config(self) -> Any:
        """The detector's VAEConfig: `model:` overrides plus the top-level window.

        Sizes counted in points of a window (score_scales) follow `window` unless set.
        """
        from detector import VAEConfig

        return VAEConfig(**{**self.model, "window": self.window})

    def deployment(self) -> Any:
        """The retraining and calibration policy, for the service and its backtests alike."""
        from detector.deploy import Deployment

        return Deployment(retrain_every=self.retrain_every, history=self.history,
                          adapt_after=self.adapt_after or None,
                          calibration_span=self.calibration_span,
                          adapt_bridge=self.adapt_bridge or None)


# Keys that take a duration; every other scalar is converted by its default's type.
_DURATIONS = {"step", "history", "poll_every", "retrain_every", "adapt_after", "calibration_span",
              "adapt_bridge", "series_ttl", "model_retention",
              "max_catchup", "keep_scores", "poll_delay", "prometheus.timeout", "query_timeout",
              "alertmanager.feedback_interval", "alertmanager.timeout"}
_SECRETS = {"prometheus.basic_auth.password"}
_SIZES = {"training_memory"}  # bytes, or a size: 1.5GiB, 512MiB, 2GB
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_YAML_KEYS = {"queries", "prometheus.headers", "model"}  # env values parsed as YAML


def _vae_defaults() -> dict[str, Any]:
    from detector import VAEConfig

    return {f.name: getattr(VAEConfig(), f.name) for f in dataclasses.fields(VAEConfig)}


def _env_names(cls: type, prefix: str = "") -> dict[str, str]:
    """PROMVAE_* environment variable name -> dotted key, for every scalar field of `cls`."""
    names = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        sub = _dataclass_of(cls, f)
        if sub is not None:
            names.update(_env_names(sub, key + "."))
        else:
            names[ENV_PREFIX + key.replace(".", "_").upper()] = key
    return names


def _dataclass_of(cls: type, f: dataclasses.Field) -> type | None:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return type(default) if dataclasses.is_dataclass(default) else None


def _set_path(raw: dict, key: str, value: Any) -> None:
    node = raw
    *parents, last = key.split(".")
    for p in parents:
        child = node.get(p)
        if not isinstance(child, dict):
            child = node[p] = {}
        node = child
    node[last] = value


def parse_size(value: Any) -> int:
    """Bytes from an integer or a size such as "1.5GiB", "512MiB", "2GB"; ValueError if not."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")  # noqa: TRY004 - reported as a bad key
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", str(value))
        if m is None or m.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(f"not a size (bytes, or e.g. 512MiB, 2GiB): {value!r}")
        number, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"not a size: {value!r}")
    return int(number * _SIZE_UNITS[unit])


def _convert(key: str, value: Any, default: Any) -> Any:
    """`value` (from YAML, an env var or a flag) as the type of `default`; ValueError if not."""
    if key in _DURATIONS:
        return parse_duration(value)
    if key in _SIZES:
        return parse_size(value)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"not an integer: {value!r}")
        try:
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise ValueError(f"not an integer: {value!r}") from None
    if isinstance(default, float):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"not a number: {value!r}") from None
        if isinstance(value, bool) or not math.isfinite(number):
            raise ValueError(f"not a finite number: {value!r}")
        return number
    if isinstance(default, tuple):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"not a list: {value!r}")  # noqa: TRY004 - reported as a bad key
        try:
            return tuple(type(default[0])(str(v).strip()) if default else v for v in items)
        except ValueError:
            raise ValueError(f"not a list of {type(default[0]).__name__}: {value!r}") from None
    if isinstance(default, str):
        if isinstance(value, (dict, list)) or value is None:
            raise ValueError(f"not a string: {value!r}")
        return str(value)
    return value


class _Builder:
    """Walks the raw mapping against the dataclasses, collecting every error."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def build(self, cls: type, raw: Any, prefix: str = "") -> Any:
        if not isinstance(raw, Mapping):
            self.errors.append(f"{prefix.rstrip('.') or 'config'}: must be a mapping, "
                               f"got {type(raw).__name__}")
            raw = {}
        known = {f.name: f for f in dataclasses.fields(cls)}
        for k in raw:
            if k not in known:
                self.errors.append(f"{prefix}{k}: unknown key")
        values = {}
        for name, f in known.items():
            if name not in raw:
                continue
            key, value = f"{prefix}{name}", raw[name]
            sub = _dataclass_of(cls, f)
            if sub is not None:
                values[name] = self.build(sub, value if value is not None else {}, key + ".")
            elif name == "queries":
                values[name] = self.queries(value)
            elif name in ("headers", "model"):
                if not isinstance(value, Mapping):
                    self.errors.append(f"{key}: must be a mapping")
                else:
                    values[name] = dict(value)
            else:
                try:
                    values[name] = _convert(key, value, f.default)
                except ValueError as e:
                    self.errors.append(f"{key}: must be a string" if key in _SECRETS
                                       else f"{key}: {e}")
        return cls(**values)

    def queries(self, raw: Any) -> tuple[QueryConfig, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            self.errors.append("queries: must be a list of {name, expr}")
            return ()
        out = []
        for i, item in enumerate(raw):
            if not isinstance(item, Mapping):
                self.errors.append(f"queries[{i}]: must be a mapping with name and expr")
                continue
            for k in item:
                if k not in ("name", "expr", "unit"):
                    self.errors.append(f"queries[{i}].{k}: unknown key")
            name, expr = item.get("name"), item.get("expr")
            if not isinstance(name, str) or not _QUERY_NAME.match(name):
                self.errors.append(f"queries[{i}].name: must be a name like cpu_busy, got {name!r}")
                continue
            if not isinstance(expr, str) or not expr.strip():
                self.errors.append(f"queries[{i}].expr: must be a PromQL expression")
                continue
            unit = item.get("unit", "")
            if unit and unit not in UNITS:
                self.errors.append(f"queries[{i}].unit: must be one of {', '.join(UNITS)}, "
                                   f"got {unit!r}")
                continue
            out.append(QueryConfig(name=name, expr=expr.strip(), unit=unit or ""))
        return tuple(out)


def _tls_file_errors(tls: TLSConfig) -> list[str]:
    """Load the CA and the client pair as the TLS library will, so a readable file holding no
    certificate (or a key of another certificate) is refused at start, not at the first poll."""
    out: list[str] = []
    if tls.ca_file and os.access(tls.ca_file, os.R_OK):
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=tls.ca_file)
        except (ssl.SSLError, ValueError, OSError) as e:
            out.append(f"prometheus.tls_config.ca_file: {tls.ca_file!r} holds no PEM "
                       f"certificate ({e})")
    pair = (tls.cert_file, tls.key_file)
    if all(pair) and all(os.access(f, os.R_OK) for f in pair):
        try:  # the password callback keeps OpenSSL from prompting for an encrypted key
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(*pair, password=lambda: b"")
        except (ssl.SSLError, ValueError, OSError) as e:
            out.append(f"prometheus.tls_config: cert_file {tls.cert_file!r} and key_file "
                       f"{tls.key_file!r} must be a PEM certificate and its unencrypted PEM "
                       f"private key ({e})")
    return out


def _validate(cfg: Config, errors: list[str]) -> None:
    """Cross-field checks; appends one sentence per bad key."""
    p = cfg.prometheus
    if p.url and not re.match(r"^https?://[^/\s]+", p.url):
        errors.append("prometheus.url: must start with http:// or https://, "
                      f"got {redact_url(p.url)!r}")
    if p.url and not cfg.queries:
        errors.append("queries: at least one query is needed when prometheus.url is set")
    if cfg.queries and not p.url:
        errors.append("prometheus.url: required when queries are configured "
                      "(leave both out to run the built-in demo)")
    if p.bearer_token_file and (p.basic_auth.username or p.basic_auth.password):
        errors.append("prometheus.bearer_token_file: cannot be combined with basic_auth")
    for key, path in (("prometheus.bearer_token_file", p.bearer_token_file),
                      ("prometheus.basic_auth.password_file", p.basic_auth.password_file),
                      ("prometheus.tls_config.ca_file", p.tls_config.ca_file),
                      ("prometheus.tls_config.cert_file", p.tls_config.cert_file),
                      ("prometheus.tls_config.key_file", p.tls_config.key_file)):
        if path and not os.access(path, os.R_OK):
            errors.append(f"{key}: cannot read file {path!r}")
    if bool(p.tls_config.cert_file) != bool(p.tls_config.key_file):
        errors.append("prometheus.tls_config: cert_file and key_file go together")
    errors.extend(_tls_file_errors(p.tls_config))
    if p.basic_auth.password and p.basic_auth.password_file:
        errors.append("prometheus.basic_auth: set password or password_file, not both")
    if p.method.upper() not in ("GET", "POST"):
        errors.append(f"prometheus.method: must be GET or POST, got {p.method!r}")
    if p.timeout <= 0:
        errors.append("prometheus.timeout: must be positive")
    if p.retries < 0:
        errors.append("prometheus.retries: must not be negative")
    if p.max_response_bytes < 1024:
        errors.append("prometheus.max_response_bytes: must be at least 1024")
    if cfg.step < 1 or not float(cfg.step).is_integer():
        errors.append(f"step: must be a whole number of seconds >= 1s, got {cfg.step:g}s")
    if cfg.window < 2:
        errors.append(f"window: must be at least 2 points, got {cfg.window}")
    elif cfg.step >= 1 and cfg.history < cfg.window * cfg.step:
        errors.append(f"history: {format_duration(cfg.history)} holds fewer points than one "
                      f"window ({cfg.window} x {format_duration(cfg.step)})")
    for key in ("poll_every", "retrain_every", "series_ttl", "calibration_span"):
        if getattr(cfg, key) <= 0:
            errors.append(f"{key}: must be positive")
    for key in ("adapt_after", "adapt_bridge"):
        if getattr(cfg, key) < 0:
            errors.append(f"{key}: must not be negative")
    if cfg.torch_threads < 0:
        errors.append("torch_threads: must be 0 (torch's default) or a positive count")
    if cfg.max_series < 1:
        errors.append("max_series: must be at least 1")
    if cfg.training_batch_series < 0:
        errors.append("training_batch_series: must be 0 (from training_memory) or positive")
    if cfg.training_memory < 2**20:
        errors.append("training_memory: must be at least 1MiB")
    for key in ("query_max_series", "query_max_score_points", "query_max_concurrency"):
        if getattr(cfg, key) < 1:
            errors.append(f"{key}: must be at least 1")
    if cfg.query_cache_values < 0:
        errors.append("query_cache_values: must not be negative (0 turns the cache off)")
    if cfg.query_timeout <= 0:
        errors.append("query_timeout: must be positive")
    names = [q.name for q in cfg.queries]
    for name in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"queries: duplicate name {name!r}")
    if cfg.queries:
        import promql_parser

        for i, q in enumerate(cfg.queries):
            try:
                promql_parser.parse(q.expr)
            except ValueError as e:
                errors.append(f"queries[{i}].expr ({q.name}): PromQL parse error: {e}")
    if not re.match(r"^(\[[0-9a-fA-F:.]+\]|[^:\s]*):\d{1,5}$", cfg.listen_address):
        errors.append(f"listen_address: must be host:port or :port, got {cfg.listen_address!r}")
    if cfg.web_max_request_bytes < 1024:
        errors.append("web_max_request_bytes: must be at least 1024")
    if cfg.web_config_file:
        from .web import load_web_config

        try:  # quietly: the app loads it again to use it, and warns then
            load_web_config(cfg.web_config_file, warn=False)
        except ConfigError as e:
            errors.extend(f"web_config_file {cfg.web_config_file}: {m}" for m in e.errors)
    if cfg.grafana_url and not re.match(r"^https?://[^/\s]+", cfg.grafana_url):
        errors.append("grafana_url: must start with http:// or https://, "
                      f"got {redact_url(cfg.grafana_url)!r}")
    am = cfg.alertmanager
    if am.url and not re.match(r"^https?://[^/\s]+", am.url):
        errors.append(f"alertmanager.url: must start with http:// or https://, got {redact_url(am.url)!r}")
    if not am.feedback_interval > 0 or not am.timeout > 0:
        errors.append("alertmanager.feedback_interval and alertmanager.timeout: must be positive")
    if cfg.shard.count < 1:
        errors.append("shard.count: must be at least 1")
    elif not -1 <= cfg.shard.index < cfg.shard.count:
        errors.append(f"shard.index: must be -1 (from the pod name) or 0..{cfg.shard.count - 1} "
                      f"(shard.count {cfg.shard.count}), got {cfg.shard.index}")
    if cfg.log_level.lower() not in _LOG_LEVELS:
        errors.append(f"log_level: must be one of {', '.join(_LOG_LEVELS)}")


def _validate_model(cfg: Config, errors: list[str]) -> dict[str, Any]:
    """`model:` overrides converted to VAEConfig's field types; appends errors."""
    defaults = _vae_defaults()
    model = {}
    for k, v in cfg.model.items():
        if k == "window":
            errors.append("model.window: set the top-level key window instead")
        elif k not in defaults:
            errors.append(f"model.{k}: unknown key (known: {', '.join(sorted(defaults))})")
        else:
            try:
                model[k] = _convert(f"model.{k}", v, defaults[k])
            except ValueError as e:
                errors.append(f"model.{k}: {e}")
    if cfg.window >= 2 and not any(e.startswith(("model.", "window:")) for e in errors):
        try:
            dataclasses.replace(cfg, model=model).vae_config()
        except (TypeError, ValueError) as e:
            errors.append(f"model: {e}")
    return model


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults < YAML file < PROMVAE_* environment < `overrides` (dotted keys, from flags)."""
    environ = os.environ if environ is None else environ
    errors: list[str] = []
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = f"config file {path}"
        raw = read_yaml_mapping(path, source)
    names = _env_names(Config)
    model_keys = None
    for env, value in environ.items():
        if not env.startswith(ENV_PREFIX):
            continue
        if env in names and names[env] not in _YAML_KEYS:
            _set_path(raw, names[env], value)
        elif env in names:
            try:
                _set_path(raw, names[env], yaml.safe_load(value))
            except yaml.YAMLError:
                errors.append(f"{env}: not valid YAML")
        elif env.startswith(ENV_PREFIX + "MODEL_"):
            model_keys = model_keys if model_keys is not None else _vae_defaults()
            field_name = env[len(ENV_PREFIX + "MODEL_"):].lower()
            if field_name not in model_keys:
                errors.append(f"{env}: unknown model key {field_name!r}")
            else:
                _set_path(raw, f"model.{field_name}", value)
        else:  # other tools use the prefix too (e.g. PROMVAE_TEST_*): warn, do not refuse
            log.warning("ignoring environment variable %s: it names no config key", env)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_path(raw, key, value)
    builder = _Builder()
    cfg = builder.build(Config, raw)
    errors.extend(builder.errors)
    cfg = dataclasses.replace(cfg, model=_validate_model(cfg, errors))
    _validate(cfg, errors)
    cfg = _resolve_shard(cfg, environ, errors)
    if errors:
        raise ConfigError(errors, source)
    return cfg


def _resolve_shard(cfg: Config, environ: Mapping[str, str], errors: list[str]) -> Config:
    """shard.index -1 taken from a StatefulSet pod name (POD_NAME, else the host name)."""
    count, index = cfg.shard.count, cfg.shard.index
    if index >= 0 or count < 1 or any(e.startswith("shard.") for e in errors):
        return cfg
    if count > 1:
        from .pod import index_from_environment

        hostname = None if environ is os.environ else environ.get("HOSTNAME", "")
        index, where = index_from_environment(environ, hostname)
        if index is None or index >= count:
            errors.append(f"shard.index: not set and not found in the pod name ({where}"
                          f"{'' if index is None else f' gives {index}'}); with shard.count "
                          f"{count} set --shard.index 0..{count - 1} or POD_NAME like promvae-0")
            return cfg
        log.info("shard index %d of %d taken from %s", index, count, where)
    return dataclasses.replace(cfg, shard=ShardConfig(count=count, index=max(index, 0)))


def describe(cfg: Config) -> str:
    """A one-line, secret-free summary of `cfg` for logs."""
    src = ("built-in demo with its own queries" if cfg.demo
           else f"prometheus {redact_url(cfg.prometheus.url)}, {len(cfg.queries)} queries")
    return (f"{src}, step {format_duration(cfg.step)}, "
            f"history {format_duration(cfg.history)}, window {cfg.window}, "
            f"poll every {format_duration(cfg.poll_every)}, retrain every "
            f"{format_duration(cfg.retrain_every)}, storage {cfg.storage_path}"
            + (f", shard {cfg.shard.index} of {cfg.shard.count}" if cfg.shard.count > 1 else ""))
