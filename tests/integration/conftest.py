"""Fixtures for integration tests against real Prometheus/Alertmanager binaries.

Processes are started through factories that remember them, so the fixture finalizer stops every
one of them even when the test body fails half-way. When a test fails, the finalizer prints each
process' log tail; pytest shows it under "Captured stdout teardown".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.promstack import (
    ALERTMANAGER_BIN,
    PROMETHEUS_BIN,
    PROMTOOL_BIN,
    AlertmanagerProcess,
    LiveExporter,
    PrometheusProcess,
    WebhookReceiver,
    require_binary,
)

P = TypeVar("P", PrometheusProcess, AlertmanagerProcess)


def _require(path: str, package: str) -> str:
    return require_binary(path, package)  # skips, or fails under CI=true


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    """Path of the prometheus binary; skips the test if it is not installed."""
    return _require(PROMETHEUS_BIN, "prometheus")


@pytest.fixture(scope="session")
def promtool_bin() -> str:
    return _require(PROMTOOL_BIN, "prometheus")


@pytest.fixture(scope="session")
def alertmanager_bin() -> str:
    return _require(ALERTMANAGER_BIN, "prometheus-alertmanager")


@pytest.fixture
def tmp_workdir(tmp_path: Path) -> Path:
    """A per-test directory for configs, data dirs and logs (pytest keeps the last few runs)."""
    wd = tmp_path / "stack"
    wd.mkdir()
    return wd


@pytest.fixture
def live_exporter() -> Iterator[LiveExporter]:
    with LiveExporter() as exp:
        yield exp


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as rec:
        yield rec


def _report_and_stop(request: pytest.FixtureRequest, procs: list[Any]) -> None:
    failed = getattr(getattr(request.node, "rep_call", None), "failed", False)
    for p in procs:
        if failed:
            print(f"--- {p.name} log tail ({p.log_path}) ---\n{p.log_tail(60)}")
        p.stop()


def _process_factory(
    request: pytest.FixtureRequest, tmp_workdir: Path, cls: type[P]
) -> Iterator[Callable[..., P]]:
    started: list[P] = []

    def start(*args: Any, workdir: Path | None = None, **kwargs: Any) -> P:
        wd = workdir or tmp_workdir / f"{cls.name}{len(started)}"
        # Register before starting so a server that fails wait_ready is still cleaned up.
        proc = cls(wd, *args, **kwargs)
        started.append(proc)
        return proc.start()

    try:
        yield start
    finally:
        _report_and_stop(request, started)


@pytest.fixture
def prometheus_factory(
    request: pytest.FixtureRequest, prometheus_bin: str, tmp_workdir: Path
) -> Iterator[Callable[..., PrometheusProcess]]:
    """`start(workdir=None, **start_prometheus_kwargs)`; every started server is stopped."""
    yield from _process_factory(request, tmp_workdir, PrometheusProcess)


@pytest.fixture
def alertmanager_factory(
    request: pytest.FixtureRequest, alertmanager_bin: str, tmp_workdir: Path
) -> Iterator[Callable[..., AlertmanagerProcess]]:
    """`start(config_yaml_text_or_path, workdir=None, **kwargs)`; every one started is stopped."""
    yield from _process_factory(request, tmp_workdir, AlertmanagerProcess)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # Expose the call-phase report to fixtures (request.node.rep_call) so teardown knows whether
    # to print log tails.
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
