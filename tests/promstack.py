"""Real Prometheus / Alertmanager / promvae processes for integration tests (no mocks).

Everything here runs the Debian binaries (`/usr/bin/prometheus`, `/usr/bin/promtool`,
`/usr/bin/prometheus-alertmanager`) or `promvae serve` on loopback ports, in a caller-supplied
work directory, so several stacks can run side by side and every log ends up next to the test's
tmp files. `live_prometheus()` is the usual stack under a promvae test: backfilled history plus
a live exporter fed from the same functions of time.

Typical use::

    write_openmetrics(wd / "hist.om", [("cpu", {"instance": "a"}, ts, vals)])
    backfill(wd / "hist.om", wd / "prom-data")            # BEFORE starting Prometheus
    with LiveExporter() as exp, start_prometheus(
        wd, [exp.scrape_config("live")], data_dir=wd / "prom-data"
    ) as prom:
        exp.set("up_thing", {"instance": "a"}, 1.0)
        wait_until(lambda: prom.query("up_thing"), timeout=15, description="up_thing scraped")

Gotchas (verified against Prometheus 2.42 / promtool 2.42 / Alertmanager 0.25):

* Backfill into the data dir *before* starting Prometheus (or `restart()` it afterwards): blocks
  are read at startup. A running server only notices new block directories on its periodic block
  reload, measured at ~55 s, after which they are queryable (even blocks overlapping the head).
* promtool writes 2h blocks aligned to 2h wall-clock boundaries (2.42 has no block-duration flag);
  3 days at 60 s is ~37 small blocks, backfilled in ~1 s and loaded instantly. Overlapping blocks
  are allowed by default since 2.39, so backfilled data may reach into the scraped range.
* Retention is relative to the newest data; `--storage.tsdb.retention.time=30d` is set so
  backfilled history is not dropped at the first compaction. Keep backfilled data in the past.
* No flag is needed to query old data; the only limit is 11,000 points per series per
  `query_range` (3 days at 60 s = 4,321 points).
* The lookback delta (default 5m) fills gaps: a series whose samples stop keeps returning its last
  value for up to 5 minutes (instant queries and every range step) unless a staleness marker was
  written. A series that vanishes from a *scraped* target gets one on the next scrape (gone within
  a scrape interval). Backfilled gaps (NaN skipped by `write_openmetrics`) never do: OpenMetrics
  cannot express staleness markers, so a 1-step gap is invisible at a 60 s step. Pass
  `extra_args=["--query.lookback-delta=1m"]` if a test must see short backfilled gaps.
* No staleness markers across a restart: Prometheus does not write them on shutdown, and the new
  process only writes them for series it scraped itself. A series removed while Prometheus was
  down (or before the new process' first scrape) lingers for the 5m lookback after `restart()`.
* The first scrape comes ~5-7 s after (re)start, whatever scrape_interval is: the scrape manager
  applies discovered targets on a fixed 5 s tick. Target health is "unknown" until then, so use
  `wait_for_target_up(job)`; `up` alone is misleading right after a restart (lookback again).
* Without `honor_labels: true`, an exposed `instance`/`job` label is renamed `exported_instance`/
  `exported_job`; `LiveExporter.scrape_config()` therefore defaults to honor_labels=True.
* Samples with explicit timestamps (`LiveExporter.set(..., timestamp=)`) are honoured but get no
  staleness markers, and old ones are dropped as out of bounds / out of order by the head.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self, TypeVar

import numpy as np
import requests
import yaml

PROMETHEUS_BIN = os.environ.get("PROMVAE_TEST_PROMETHEUS", "/usr/bin/prometheus")
PROMTOOL_BIN = os.environ.get("PROMVAE_TEST_PROMTOOL", "/usr/bin/promtool")
ALERTMANAGER_BIN = os.environ.get("PROMVAE_TEST_ALERTMANAGER", "/usr/bin/prometheus-alertmanager")

T = TypeVar("T")

__all__ = [
    "ALERTMANAGER_BIN",
    "PROMETHEUS_BIN",
    "PROMTOOL_BIN",
    "AlertmanagerProcess",
    "Feeder",
    "LiveExporter",
    "PrometheusProcess",
    "PromvaeProcess",
    "QuietHandler",
    "Series",
    "ServerThread",
    "StackError",
    "WebhookReceiver",
    "backfill",
    "free_port",
    "live_prometheus",
    "require_binary",
    "start_alertmanager",
    "start_prometheus",
    "wait_until",
    "wave",
    "webhook_alertmanager_config",
    "write_openmetrics",
]


class StackError(RuntimeError):
    """A binary of the stack failed to start, exited, or refused our input."""


# --------------------------------------------------------------------------------------------
# small helpers


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    There is an unavoidable race between closing the probe socket and the child binding it;
    `PrometheusProcess`/`AlertmanagerProcess` retry with a fresh port when the bind fails.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.2,
    description: str | None = None,
    ignore_exceptions: tuple[type[BaseException], ...] = (Exception,),
) -> T:
    """Poll `predicate` until it returns something truthy and return that value.

    Exceptions listed in `ignore_exceptions` count as "not yet" (a server that is still starting
    refuses connections, an `assert` inside the predicate fails); the last one is shown, together
    with the last returned value, in the AssertionError raised on timeout.
    """
    deadline = time.monotonic() + timeout
    last_value: Any = None
    last_exc: BaseException | None = None
    while True:
        try:
            last_value = predicate()
            last_exc = None
            if last_value:
                return last_value
        except ignore_exceptions as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            what = description or getattr(predicate, "__name__", repr(predicate))
            msg = f"timed out after {timeout:.1f}s waiting for: {what}; last value: {last_value!r}"
            if last_exc is not None:
                msg += f"; last exception: {type(last_exc).__name__}: {last_exc}"
            raise AssertionError(msg) from last_exc
        time.sleep(interval)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no log>"
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# OpenMetrics + backfill

_METRIC_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

Series = tuple[str, Mapping[str, str], "np.ndarray | Sequence[float]", "np.ndarray | Sequence[float]"]


def _escape_label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fmt_value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    # repr() is the shortest string that round-trips, so tests can compare values exactly.
    return repr(float(v))


def _fmt_ts(ts: float) -> str:
    # Prometheus stores milliseconds; round here so promtool never has to.
    ms = round(float(ts) * 1000.0)
    sec, rem = divmod(ms, 1000)
    return str(sec) if rem == 0 else f"{sec}.{rem:03d}".rstrip("0")


def write_openmetrics(path: str | os.PathLike[str], series: Iterable[Series]) -> Path:
    """Write `series` as OpenMetrics text for `promtool tsdb create-blocks-from openmetrics`.

    Each item is `(metric_name, labels, timestamps_seconds, values)`. Every metric name becomes one
    gauge family (one `# TYPE` line, all its samples together, as the format requires); inside a
    family each series is written contiguously with ascending timestamps. NaN values are skipped,
    i.e. they become a gap (see the module docstring about lookback). Duplicate timestamps or a
    series listed twice raise ValueError because promtool would otherwise fail or drop samples.
    """
    families: dict[str, dict[tuple[tuple[str, str], ...], tuple[np.ndarray, np.ndarray]]] = {}
    for name, labels, ts, vals in series:
        if not _METRIC_NAME_RE.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for k in labels:
            if not _LABEL_NAME_RE.match(k) or k == "__name__":
                raise ValueError(f"invalid label name {k!r} on {name}")
        ts_arr = np.asarray(ts, dtype=np.float64).ravel()
        val_arr = np.asarray(vals, dtype=np.float64).ravel()
        if ts_arr.shape != val_arr.shape:
            raise ValueError(f"{name}{dict(labels)}: {ts_arr.size} timestamps vs {val_arr.size} values")
        if not np.all(np.isfinite(ts_arr)) or np.any(ts_arr < 0):
            raise ValueError(f"{name}{dict(labels)}: timestamps must be finite and >= 0")
        order = np.argsort(ts_arr, kind="stable")
        ts_arr, val_arr = ts_arr[order], val_arr[order]
        ms = np.round(ts_arr * 1000.0).astype(np.int64)
        if ms.size > 1 and np.any(np.diff(ms) == 0):
            raise ValueError(f"{name}{dict(labels)}: duplicate timestamps")
        key = tuple(sorted((str(k), str(v)) for k, v in labels.items()))
        fam = families.setdefault(name, {})
        if key in fam:
            raise ValueError(f"series {name}{dict(key)} given twice")
        fam[key] = (ts_arr, val_arr)

    out = Path(path)
    with out.open("w", encoding="utf-8") as f:
        for name, fam in families.items():
            f.write(f"# TYPE {name} gauge\n")
            for key, (ts_arr, val_arr) in fam.items():
                lbl = ",".join(f'{k}="{_escape_label_value(v)}"' for k, v in key)
                prefix = f"{name}{{{lbl}}}" if lbl else name
                keep = ~np.isnan(val_arr)
                f.writelines(
                    f"{prefix} {_fmt_value(v)} {_fmt_ts(t)}\n"
                    for t, v in zip(ts_arr[keep].tolist(), val_arr[keep].tolist())
                )
        f.write("# EOF\n")
    return out


def backfill(
    openmetrics_path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    timeout: float = 300.0,
) -> Path:
    """Turn an OpenMetrics file into TSDB blocks inside `data_dir` (a Prometheus data dir).

    Run it before the Prometheus that owns `data_dir` starts: blocks are read at startup (a running
    server only picks them up on its ~1 minute block reload). Raises StackError with promtool's
    output on failure.
    """
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [PROMTOOL_BIN, "tsdb", "create-blocks-from", "openmetrics", "--quiet",
         str(openmetrics_path), str(data)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise StackError(
            f"promtool backfill of {openmetrics_path} failed (exit {proc.returncode}):\n"
            f"{proc.stderr.strip()}\n{proc.stdout.strip()}"
        )
    return data


# --------------------------------------------------------------------------------------------
# processes

# Safety net: kill children still running when the interpreter exits (e.g. a test aborted
# between start and the finally block). Normal cleanup is explicit stop().
_LIVE: weakref.WeakSet[_ManagedProcess] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for p in list(_LIVE):
        with suppress(Exception):  # best effort at exit
            p.stop(timeout=2.0)


class _ManagedProcess:
    """A child process with a log file, a readiness URL and SIGTERM-then-SIGKILL stopping."""

    name = "process"
    binary = ""
    start_timeout = 30.0
    config_path: Path

    def __init__(
        self, workdir: str | os.PathLike[str], port: int | None, extra_args: Sequence[str]
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self.extra_args = list(extra_args)
        self._fixed_port = port is not None
        self.port: int = port if port is not None else free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    def _flags(self) -> list[str]:
        """The subclass' own flags (storage, features); the base adds config, port and log."""
        raise NotImplementedError

    def _cmd(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=info",
            *self._flags(),
            *self.extra_args,
        ]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def start(self) -> Self:
        """Start the binary and wait until it is ready; retry on a lost port race."""
        if self.running():
            raise StackError(f"{self.name} already running (pid {self.pid})")
        for attempt in range(3):
            with self.log_path.open("ab") as log:
                log.write(f"\n===== promstack: starting {self.name} on port {self.port} =====\n".encode())
                log.flush()
                # Own session so a Ctrl-C to pytest does not hit the child before we can stop it
                # cleanly; stop() signals the pid directly.
                self._proc = subprocess.Popen(
                    self._cmd(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=self.workdir,
                    start_new_session=True,
                )
            _LIVE.add(self)
            try:
                self.wait_ready(self.start_timeout)
                return self
            except StackError:
                tail = self.log_tail()
                self.stop()
                if not self._fixed_port and "address already in use" in tail and attempt < 2:
                    self.port = free_port()
                    continue
                raise
        raise AssertionError("unreachable")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll `/-/ready` until HTTP 200; raise StackError with the log tail otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise StackError(
                    f"{self.name} exited during startup (exit {code}); log {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            try:
                r = requests.get(f"{self.url}/-/ready", timeout=1.0)
                if r.status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise StackError(
            f"{self.name} not ready after {timeout:.0f}s; log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; always reaps. Safe to call twice."""
        proc, self._proc = self._proc, None
        _LIVE.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
            except ProcessLookupError:
                pass
        proc.wait()  # reap, even after kill()

    def kill(self) -> None:
        """SIGKILL without a clean shutdown (simulates a crash; the TSDB replays its WAL)."""
        proc, self._proc = self._proc, None
        _LIVE.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    def restart(self, down_for: float = 0.0) -> None:
        """Stop, stay down `down_for` seconds (an outage), start again on the same port/dirs."""
        self.stop()
        if down_for > 0:
            time.sleep(down_for)
        self._fixed_port = True  # clients hold the URL; never move to another port
        self.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:  # last resort; explicit stop() is the real cleanup
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


class PrometheusProcess(_ManagedProcess):
    """A real `/usr/bin/prometheus` on 127.0.0.1 with its own config file and data dir."""

    name = "prometheus"
    binary = PROMETHEUS_BIN

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        scrape_configs: list[dict[str, Any]] | None = None,
        rule_files: list[str | os.PathLike[str]] | None = None,
        alertmanager_url: str | None = None,
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        data_dir: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        super().__init__(workdir, port, extra_args)
        self.config_path = self.workdir / "prometheus.yml"
        self.data_dir = Path(data_dir) if data_dir is not None else self.workdir / "prometheus-data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.write_config(
            scrape_configs, rule_files, alertmanager_url, scrape_interval, evaluation_interval
        )

    def write_config(
        self,
        scrape_configs: list[dict[str, Any]] | None = None,
        rule_files: list[str | os.PathLike[str]] | None = None,
        alertmanager_url: str | None = None,
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
    ) -> None:
        """(Re)write prometheus.yml; call `reload()` afterwards if the server is running."""
        cfg: dict[str, Any] = {
            # scrape_timeout is left unset: Prometheus clamps its 10s default to scrape_interval.
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
            "scrape_configs": list(scrape_configs or []),
        }
        if rule_files:
            cfg["rule_files"] = [str(Path(p).resolve()) for p in rule_files]
        if alertmanager_url:
            hostport = re.sub(r"^https?://", "", alertmanager_url).rstrip("/")
            hostport, _, prefix = hostport.partition("/")
            am: dict[str, Any] = {
                "api_version": "v2",
                "scheme": "https" if alertmanager_url.startswith("https") else "http",
                "static_configs": [{"targets": [hostport]}],
            }
            if prefix:
                am["path_prefix"] = "/" + prefix
            cfg["alerting"] = {"alertmanagers": [am]}
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def _flags(self) -> list[str]:
        return [
            f"--storage.tsdb.path={self.data_dir}",
            # Keep backfilled history (default retention 15d would drop older blocks).
            "--storage.tsdb.retention.time=30d",
            # POST /-/reload and /-/quit, plus admin endpoints (delete_series, snapshot) for tests.
            "--web.enable-lifecycle",
            "--web.enable-admin-api",
        ]

    def reload(self) -> None:
        """Ask Prometheus to re-read prometheus.yml and rule files (POST /-/reload)."""
        r = requests.post(f"{self.url}/-/reload", timeout=10)
        if r.status_code != 200:
            raise StackError(f"reload failed: HTTP {r.status_code}: {r.text}\n{self.log_tail()}")

    def _api(self, path: str, params: Mapping[str, Any]) -> Any:
        r = requests.get(f"{self.url}{path}", params=params, timeout=10)
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            raise StackError(f"{path} {dict(params)} -> HTTP {r.status_code}: {body}")
        return body["data"]

    def query(self, expr: str, time: float | None = None) -> list[dict[str, Any]]:
        """Instant query; returns `data.result` (a list for vectors)."""
        params: dict[str, Any] = {"query": expr}
        if time is not None:
            params["time"] = time
        return self._api("/api/v1/query", params)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """Range query; returns `data.result` (a list of {"metric", "values"})."""
        return self._api(
            "/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": step}
        )["result"]

    def targets(self) -> list[dict[str, Any]]:
        return self._api("/api/v1/targets", {"state": "active"})["activeTargets"]

    def wait_for_target_up(self, job: str, timeout: float = 20.0) -> None:
        """Wait until every active target of `job` has been scraped successfully."""

        def up() -> bool:
            ts = [t for t in self.targets() if t["labels"].get("job") == job]
            return bool(ts) and all(t["health"] == "up" for t in ts)

        wait_until(up, timeout, description=f"targets of job {job!r} up")

    def client(self, **kwargs: Any) -> Any:
        """A `prometheus_api_client.PrometheusConnect` pointed at this server."""
        from prometheus_api_client import PrometheusConnect

        return PrometheusConnect(url=self.url, disable_ssl=True, **kwargs)


def start_prometheus(workdir: str | os.PathLike[str], *args: Any, **kwargs: Any) -> PrometheusProcess:
    """Write a config, start Prometheus, wait for `/-/ready` and return the running process.

    Takes the arguments of `PrometheusProcess`.
    """
    return PrometheusProcess(workdir, *args, **kwargs).start()


class AlertmanagerProcess(_ManagedProcess):
    """A real Alertmanager (clustering disabled) on 127.0.0.1."""

    name = "alertmanager"
    binary = ALERTMANAGER_BIN

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        config: str | os.PathLike[str],
        port: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir, port, extra_args)
        self.storage_path = self.workdir / "alertmanager-data"
        self.storage_path.mkdir(parents=True, exist_ok=True)
        # A str with a newline (or naming no existing file) is YAML text; otherwise a path.
        if isinstance(config, os.PathLike) or ("\n" not in config and os.path.isfile(config)):
            self.config_path = Path(config)
        else:
            self.config_path = self.workdir / "alertmanager.yml"
            self.config_path.write_text(str(config))

    def _flags(self) -> list[str]:
        return [
            f"--storage.path={self.storage_path}",
            # Empty value disables the gossip cluster: no extra port, and /-/ready does not
            # wait for cluster settling.
            "--cluster.listen-address=",
        ]

    def post_alerts(self, alerts: list[dict[str, Any]]) -> None:
        """POST /api/v2/alerts (what Prometheus does). Each alert needs at least `labels`."""
        r = requests.post(f"{self.url}/api/v2/alerts", json=alerts, timeout=10)
        if r.status_code != 200:
            raise StackError(f"POST /api/v2/alerts -> HTTP {r.status_code}: {r.text}")

    def alerts(self) -> list[dict[str, Any]]:
        """GET /api/v2/alerts: the alerts Alertmanager currently holds."""
        r = requests.get(f"{self.url}/api/v2/alerts", timeout=10)
        r.raise_for_status()
        return r.json()


def start_alertmanager(
    workdir: str | os.PathLike[str],
    config_yaml_text_or_path: str | os.PathLike[str],
    port: int | None = None,
    extra_args: Sequence[str] = (),
) -> AlertmanagerProcess:
    """Start Alertmanager with the given config (YAML text or a file path) and wait for ready."""
    return AlertmanagerProcess(workdir, config_yaml_text_or_path, port, extra_args).start()


def webhook_alertmanager_config(
    webhook_url: str,
    group_by: Sequence[str] = ("alertname",),
    group_wait: str = "1s",
    group_interval: str = "1s",
    repeat_interval: str = "1h",
    send_resolved: bool = True,
) -> str:
    """Alertmanager YAML routing everything to one webhook, with test-friendly short timers."""
    cfg = {
        "route": {
            "receiver": "webhook",
            "group_by": list(group_by),
            "group_wait": group_wait,
            "group_interval": group_interval,
            "repeat_interval": repeat_interval,
        },
        "receivers": [
            {
                "name": "webhook",
                "webhook_configs": [{"url": webhook_url, "send_resolved": send_resolved}],
            }
        ],
    }
    return yaml.safe_dump(cfg, sort_keys=False)


# --------------------------------------------------------------------------------------------
# promvae itself


class PromvaeProcess:
    """`promvae serve` as a child process on a free loopback port, in `workdir`.

    It logs to `workdir/promvae.log`; `config` (if any) is written to `workdir/promvae.yml`. The
    child gets this process' environment without PROMVAE_* variables (a developer's settings must
    not leak in), plus `env`. Unlike `_ManagedProcess`, start() does not wait: tests time the
    start-up themselves, and some kill it half-way.
    """

    def __init__(
        self,
        workdir: Path,
        config: Mapping[str, Any] | None = None,
        storage: Path | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        scheme: str = "http",
    ) -> None:
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.log = workdir / "promvae.log"
        self.storage = storage or workdir / "storage"
        self.args = ["--storage.path", str(self.storage), *args]
        if config is not None:
            self.config = workdir / "promvae.yml"
            self.config.write_text(yaml.safe_dump(dict(config)))
            self.args += ["--config.file", str(self.config)]
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_from = 0

    def start(self, **popen: Any) -> None:
        """Start (same port every time) without waiting; `popen` goes to subprocess.Popen."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROMVAE_")}
        self.log_from = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "grafana_plugin_backend.cli", "serve",
                 "--web.listen-address", f"127.0.0.1:{self.port}", *self.args],
                stdout=log, stderr=subprocess.STDOUT, env={**env, **self.env}, **popen)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, SIGKILL after `timeout`; the exit code, or None if killed or not running."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None

    def kill(self) -> None:
        """SIGKILL: a crash, leaving the storage as it was at that instant."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None

    def log_text(self) -> str:
        """What the current run logged."""
        with self.log.open() as f:
            f.seek(self.log_from)
            return f.read()

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        assert self.alive(), f"promvae exited:\n{self.log_text()[-3000:]}"
        return requests.get(f"{self.url}{path}", **{"timeout": 10, **kwargs})

    def wait_ready(self, timeout: float = 120.0, path: str = "/-/ready", **kwargs: Any) -> None:
        """Wait until `path` answers 200 (`kwargs` go to requests); fail at once if it exits."""
        wait_until(lambda: self.get(path, **kwargs).status_code == 200, timeout=timeout,
                   description=f"promvae {path}", ignore_exceptions=(requests.RequestException,))

    def families(self) -> dict[str, Any]:
        """/metrics parsed: family name -> prometheus_client Metric."""
        from prometheus_client.parser import text_string_to_metric_families

        return {f.name: f for f in text_string_to_metric_families(self.get("/metrics").text)}

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` (a counter with or without _total) matching `labels`."""
        family = name.removesuffix("_total")
        fam = self.families().get(family)
        return sum(s.value for s in fam.samples
                   if s.name in (family, f"{family}_total")
                   and all(s.labels.get(k) == v for k, v in labels.items())) if fam else 0.0

    def samples(self, name: str) -> dict[str, float]:
        """instance -> value of one family (an anomaly_* metric)."""
        fam = self.families().get(name)
        return {s.labels.get("instance", ""): s.value for s in fam.samples} if fam else {}


# --------------------------------------------------------------------------------------------
# in-process HTTP helpers


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that does not log every request to stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest output clean


class ServerThread:
    """An HTTP server of the test process, serving from a thread until stop() (or `with` ends).

    A subclass defines its handler class (usually a QuietHandler) and calls
    `self._serve(Handler)` in its constructor.
    """

    _server: Any  # a socketserver.BaseServer
    _thread: threading.Thread

    def _serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        """Serve `handler` on a free loopback port (`self.port`) from a daemon thread."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # daemon handler threads
        self.port: int = int(self._server.server_port)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _LiveCollector:
    """prometheus_client collector that renders the exporter's current state at scrape time."""

    def __init__(self, owner: LiveExporter) -> None:
        self._owner = owner

    def describe(self) -> list[Any]:
        # Empty: otherwise registering would call collect() to discover names.
        return []

    def collect(self) -> Iterable[Any]:
        from prometheus_client.metrics_core import Metric

        with self._owner._lock:
            snapshot = {n: dict(s) for n, s in self._owner._values.items()}
            self._owner._scrapes += 1
        for name, samples in snapshot.items():
            # Metric + add_sample (not GaugeMetricFamily) so label *names* may differ per series.
            fam = Metric(name, f"test gauge {name}", "gauge")
            for key, (value, ts) in samples.items():
                fam.add_sample(name, dict(key), value, timestamp=ts)
            yield fam


class LiveExporter(ServerThread):
    """A scrape target whose gauges the test sets (thread-safe), on a free loopback port."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple[tuple[str, str], ...], tuple[float, float | None]]] = {}
        self._scrapes = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_LiveCollector(self))  # type: ignore[arg-type]
        # Port 0: the OS picks the port at bind time, so there is no race.
        self._server, self._thread = start_http_server(0, addr="127.0.0.1", registry=self.registry)
        self.port: int = int(self._server.server_port)

    @property
    def target(self) -> str:
        """`host:port` as a Prometheus static_config target."""
        return f"127.0.0.1:{self.port}"

    def scrape_config(
        self, job_name: str = "live", honor_labels: bool = True, **extra: Any
    ) -> dict[str, Any]:
        """A scrape_configs entry for this exporter; `extra` is merged in.

        honor_labels defaults to True so exposed `instance`/`job` labels are kept as set by the
        test; with False Prometheus renames them to `exported_instance`/`exported_job` and puts
        the target's own (`127.0.0.1:PORT`, job name) in their place.
        """
        return {
            "job_name": job_name,
            "honor_labels": honor_labels,
            "static_configs": [{"targets": [self.target]}],
            **extra,
        }

    @staticmethod
    def _key(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((str(k), str(v)) for k, v in labels.items()))

    def set(
        self,
        metric_name: str,
        labels: Mapping[str, str],
        value: float,
        timestamp: float | None = None,
    ) -> None:
        """Set a gauge sample. `timestamp` (seconds) is exposed explicitly if given."""
        if not _METRIC_NAME_RE.match(metric_name):
            raise ValueError(f"invalid metric name {metric_name!r}")
        with self._lock:
            self._values.setdefault(metric_name, {})[self._key(labels)] = (float(value), timestamp)

    def remove(self, metric_name: str, labels: Mapping[str, str]) -> None:
        """Stop exposing one series (Prometheus then writes a staleness marker for it)."""
        with self._lock:
            fam = self._values.get(metric_name)
            if fam is not None:
                fam.pop(self._key(labels), None)
                if not fam:
                    del self._values[metric_name]

    def clear(self) -> None:
        with self._lock:
            self._values.clear()

    @property
    def scrapes(self) -> int:
        """How many times /metrics has been rendered (to wait for a scrape after a change)."""
        with self._lock:
            return self._scrapes

    def wait_for_scrapes(self, n: int = 1, timeout: float = 15.0) -> None:
        """Block until `n` more scrapes happened (a `set` made before is then in Prometheus)."""
        target = self.scrapes + n
        wait_until(lambda: self.scrapes >= target, timeout, interval=0.05,
                   description=f"{n} scrape(s) of {self.url}")



SeriesFn = Callable[[np.ndarray], np.ndarray]


def wave(level: float, amp: float, seed: int, step: float) -> SeriesFn:
    """An hourly sine around `level` plus 10 % of `amp` in hashed noise that is constant within
    each `step`: a pure function of time, so backfilled history and live values agree."""

    def fn(t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=float)
        x = np.sin(np.floor(t / step) * 12.9898 + seed * 78.233) * 43758.5453
        noise = (x - np.floor(x) - 0.5) * 3.4  # in about [-1.7, 1.7]
        return level + amp * np.sin(2 * np.pi * t / 3600.0) + 0.1 * amp * noise

    return fn


class Feeder:
    """Sets one gauge of a LiveExporter from functions of time, twice a second, in a thread.

    `series` maps a name to `(labels, fn)`, fn(t: (N,)) -> (N,); the first values are set before
    the constructor returns.
    """

    def __init__(
        self,
        exporter: LiveExporter,
        metric: str,
        series: Mapping[str, tuple[Mapping[str, str], SeriesFn]],
    ) -> None:
        self.exporter, self.metric = exporter, metric
        self.live = dict(series)
        self._override: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._tick()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        now = np.array([time.time()])
        with self._lock:
            for name, (labels, fn) in self.live.items():
                value = self._override.get(name, float(fn(now)[0]))
                self.exporter.set(self.metric, labels, value)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._tick()

    def add(self, name: str, spec: tuple[Mapping[str, str], SeriesFn]) -> None:
        with self._lock:
            self.live[name] = spec

    def remove(self, name: str) -> None:
        """Stop feeding a series and stop exposing it (Prometheus marks it stale)."""
        with self._lock:
            labels, _ = self.live.pop(name)
        self.exporter.remove(self.metric, labels)

    def set_override(self, name: str, value: float | None) -> None:
        """Expose `value` instead of the function's (an injected anomaly); None to go back."""
        with self._lock:
            if value is None:
                self._override.pop(name, None)
            else:
                self._override[name] = value

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@contextmanager
def live_prometheus(
    workdir: Path,
    history: Iterable[Series],
    metric: str,
    series: Mapping[str, tuple[Mapping[str, str], SeriesFn]],
) -> Iterator[tuple[PrometheusProcess, Feeder]]:
    """A started Prometheus over backfilled `history`, scraping (job "live", up) a LiveExporter
    that a Feeder fills with `series`; everything is stopped on exit."""
    backfill(write_openmetrics(workdir / "history.om", history), workdir / "prom-data")
    with LiveExporter() as exporter:
        feeder = Feeder(exporter, metric, series)
        prom = PrometheusProcess(workdir / "prometheus", [exporter.scrape_config("live")],
                                 data_dir=workdir / "prom-data")
        try:
            prom.start()
            prom.wait_for_target_up("live", timeout=30)
            yield prom, feeder
        finally:
            prom.stop()
            feeder.stop()


class WebhookReceiver(ServerThread):
    """Records Alertmanager webhook POSTs (JSON bodies) on a free loopback port."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._payloads: list[dict[str, Any]] = []
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                    status = 200
                except ValueError:
                    body = {"_invalid_json": raw.decode(errors="replace")}
                    status = 400
                with receiver._lock:
                    receiver._payloads.append(body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._serve(Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def payloads(self) -> list[dict[str, Any]]:
        """The raw webhook bodies received so far (copies, oldest first)."""
        with self._lock:
            return list(self._payloads)

    def alerts(self) -> list[dict[str, Any]]:
        """Every alert of every payload, flattened (each has status, labels, annotations...)."""
        return [a for p in self.payloads() for a in p.get("alerts", [])]

    def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool] = lambda a: True,
        timeout: float = 30.0,
        min_count: int = 1,
    ) -> list[dict[str, Any]]:
        """Wait until at least `min_count` received alerts satisfy `predicate`; return them."""

        def matches() -> list[dict[str, Any]] | None:
            found = [a for a in self.alerts() if predicate(a)]
            return found if len(found) >= min_count else None

        try:
            return wait_until(matches, timeout, interval=0.1,
                              description=f">= {min_count} matching webhook alert(s)")
        except AssertionError as exc:
            # Show what did arrive: usually a label mismatch or a not-yet-resolved alert.
            raise AssertionError(f"{exc}; received alerts: {self.alerts()!r}") from None

    def clear(self) -> None:
        with self._lock:
            self._payloads.clear()


def require_binary(path: str, package: str) -> str:
    """`path` if it is an executable; else skip the test, or fail it when CI=true: CI installs
    every Debian package the tests need (.ci/run), so a missing binary there means a broken
    CI image or .ci/run, which must not pass as a green run of skipped tests."""
    import pytest

    if os.access(path, os.X_OK):
        return path
    message = f"{path} not found: install the Debian package '{package}' (.ci/run does)"
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)
