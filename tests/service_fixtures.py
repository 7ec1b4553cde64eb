"""Fakes and fixtures for the service's unit tests (grafana_plugin_backend).

Import what a test module needs: `from tests.service_fixtures import FakeClock, ...`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from grafana_plugin_backend.config.settings import Config, load_config
from grafana_plugin_backend.source.prometheus import RangeSeries, SourceError

T0 = 1_700_006_400.0  # a multiple of 60 s (and of a day), so grids line up

# A VAE small enough to train in a second or two.
TINY_MODEL = {"hidden": [8], "latent": 2, "score_scales": [4], "max_epochs": 2, "max_steps": 8,
              "mc_samples": 2, "batch_size": 16, "patience": 1}
TINY_WINDOW = 16


class FakeClock:
    """A settable wall clock: call it for the time, advance() to move it."""

    def __init__(self, t: float = T0) -> None:
        self.t = float(t)

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


ValueFn = Callable[[np.ndarray], np.ndarray]


class FakeSource:
    """A Source answering each expr with series defined as functions of time.

    `series[expr]` maps a label tuple to fn(t: (N,)) -> (N,) values (NaN = no sample there).
    Set `fail` to a reason string to make every query raise SourceError.
    """

    def __init__(self, clock: FakeClock, start: float = -math.inf) -> None:
        self.clock = clock
        self.start = start  # no data before this time
        self.series: dict[str, dict[tuple[tuple[str, str], ...], ValueFn]] = {}
        self.calls: list[tuple[str, float, float, float]] = []
        self.fail: str | None = None

    def set(self, expr: str, labels: Mapping[str, str], fn: ValueFn) -> None:
        self.series.setdefault(expr, {})[tuple(sorted(labels.items()))] = fn

    def remove(self, expr: str, labels: Mapping[str, str]) -> None:
        self.series.get(expr, {}).pop(tuple(sorted(labels.items())), None)

    def describe(self) -> str:
        return "fake source"

    def close(self) -> None:
        pass

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[RangeSeries]:
        self.calls.append((expr, start, end, step))
        if self.fail:
            raise SourceError(self.fail, f"fake failure: {self.fail}")
        end = min(end, self.clock())
        grid = start + step * np.arange(max(0, math.floor((end - start) / step + 1e-9) + 1))
        grid = grid[grid >= self.start]
        out = []
        for key, fn in self.series.get(expr, {}).items():
            vals = np.asarray(fn(grid), dtype=np.float64)
            present = ~np.isnan(vals) | self._keeps_nan(fn)
            if present.any():
                out.append(RangeSeries(dict(key), grid[present], vals[present]))
        return out

    @staticmethod
    def _keeps_nan(fn: ValueFn) -> bool:
        return bool(getattr(fn, "keep_nan", False))


def nan_series(t: np.ndarray) -> np.ndarray:
    """A series that is present but always NaN (Prometheus returns "NaN" samples)."""
    return np.full(len(t), np.nan)


nan_series.keep_nan = True  # type: ignore[attr-defined]


def seasonal(level: float = 10.0, noise: float = 0.3, seed: int = 0) -> ValueFn:
    """A smooth periodic series with hashed noise: a pure function of time."""
    def fn(t: np.ndarray) -> np.ndarray:
        rng_noise = np.sin(t * 12.9898 + seed * 78.233) * 43758.5453
        frac = rng_noise - np.floor(rng_noise) - 0.5
        return level + 2.0 * np.sin(2 * np.pi * t / 3600.0) + noise * frac
    return fn


def make_config(tmp_path: Path, queries: list[dict[str, str]] | None = None,
                **overrides: Any) -> Config:
    """A validated Config for tests: tiny model, fake Prometheus URL, storage in tmp_path."""
    raw: dict[str, Any] = {
        "prometheus.url": "http://prometheus.invalid:9090",
        "queries": queries or [{"name": "q", "expr": "metric_a"}],
        "step": "60s", "history": "12h", "window": TINY_WINDOW, "poll_every": "60s",
        "storage_path": str(tmp_path / "storage"), "model": dict(TINY_MODEL),
        # The fake source answers exactly at once: tests reason about grid times without the
        # default delay (tests/service/test_poller.py checks the default against late samples).
        "poll_delay": "0s",
    }
    raw.update(overrides)
    return load_config(None, environ={}, overrides=raw)


class FakeModel:
    """Stands in for detector.SeriesModel in unit tests that need no real VAE."""

    def __init__(self, config: Any, step: float, trained_to: float, trained_at: float,
                 n_train: int = 100, tag: str = "") -> None:
        self.config, self.step = config, step
        self.threshold_ = 10.0
        self.trained_from, self.trained_to = trained_to - n_train * step, trained_to
        self.trained_at, self.n_train, self.tag = trained_at, n_train, tag


def fake_score_many(models: list[Any], series: list[Any]) -> list[Any]:
    """score = value / 10 (1.0 at value 10), NaN during warm-up (lead-in) and for NaN values."""
    from detector import ScoreResult, lead_in_points

    out = []
    for m, s in zip(models, series):
        v = np.asarray(s.values, dtype=float)
        score = v / 10.0
        score[: lead_in_points(m.config)] = np.nan
        flag = np.where(np.isnan(score), np.nan, (score >= 1).astype(float))
        out.append(ScoreResult(timestamps=s.timestamps.copy(), observed=v.copy(), raw=score.copy(),
                               score=score, flag=flag, expected=np.full(len(v), 5.0),
                               lower=np.full(len(v), 2.0), upper=np.full(len(v), 8.0)))
    return out


class FakeFit:
    """A fit_many stand-in: records its calls; `fail` maps a value level to an exception."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[int] = []
        self.fail_if: Callable[[Any], Exception | None] = lambda s: None

    def __call__(self, series: list[Any], step: float, config: Any,
                 progress: Callable[[int, int], None] | None = None) -> list[Any]:
        self.calls.append(len(series))
        out: list[Any] = []
        for i, s in enumerate(series):
            err = self.fail_if(s)
            n_obs = int(np.isfinite(s.values).sum())
            out.append(err if err is not None else FakeModel(
                config, step, float(s.timestamps[-1]), self.clock(), n_obs,
                tag=f"fit{len(self.calls)}"))
            if progress is not None:
                progress(i + 1, len(series))
        return out


class FakeStore:
    """A ModelStore stand-in keeping models in a dict."""

    def __init__(self) -> None:
        self.models: dict[str, Any] = {}
        self.models_dir = Path("/fake")
        self.fail_save = False

    def save(self, sid: str, model: Any) -> None:
        if self.fail_save:
            raise OSError(28, "No space left on device")
        self.models[sid] = model

    def load(self, sid: str) -> Any:
        from detector import ModelFileError

        if sid not in self.models:
            raise ModelFileError(f"model file /fake/{sid}.safetensors does not exist")
        return self.models[sid]

    def delete(self, sid: str) -> None:
        self.models.pop(sid, None)


def write_server_pki(directory: Path) -> tuple[Any, dict[str, Path]]:
    """A trustme CA and its certificate for 127.0.0.1 and localhost, written as PEM files.

    Returns the CA (to issue more certificates) and the paths under "ca", "cert" and "key".
    """
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": directory / "ca.pem", "cert": directory / "cert.pem",
             "key": directory / "key.pem"}
    ca.cert_pem.write_to_path(files["ca"])
    server.cert_chain_pems[0].write_to_path(files["cert"])
    server.private_key_pem.write_to_path(files["key"])
    return ca, files


def started_service(cfg: Config, source: FakeSource, clock: FakeClock) -> tuple[Any, Any]:
    """A Flask app and its Service over `source` with fake fit and scoring, brought to the
    live state /metrics shows: a poll discovers the series, a batch trains them (fake
    models, kept in memory), a second poll scores the newest points."""
    from grafana_plugin_backend.web.app import Service, create_app

    svc = Service(cfg, source=source, clock=clock, fit_fn=FakeFit(clock),
                  score_fn=fake_score_many)
    app = create_app(cfg, service=svc)
    svc.poller.poll_once()
    svc.trainer.run_once()
    svc.poller.poll_once()
    return app, svc
