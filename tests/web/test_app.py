"""The whole service in-process with the real detector (tiny models) over a fake source.

Covers what DESIGN.md asks of bad input: a series full of NaN, a constant series, a gap of
hours and a value of 1e300, plus restarts that load models instead of retraining.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from grafana_plugin_backend.service.registry import INSUFFICIENT, READY
from grafana_plugin_backend.web.app import Service, create_app
from tests.service_fixtures import T0, FakeClock, FakeSource, make_config, nan_series, seasonal

HOUR = 3600.0


def scores(app) -> dict[str, float]:
    text = app.test_client().get("/metrics").get_data(as_text=True)
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    fam = fams.get("anomaly_score")
    return {s.labels["i"]: s.value for s in fam.samples} if fam else {}


def sample(app, name: str, **labels: str) -> float | None:
    return app.extensions["promvae"].metrics_registry.get_sample_value(name, labels)


class World:
    """A fake Prometheus with a day of history and a clock the test moves."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.source = FakeSource(self.clock, start=T0 - 24 * HOUR)
        self.events: dict[str, list[tuple[float, float, float]]] = {}

    def add(self, name: str, fn) -> None:
        def with_events(t: np.ndarray) -> np.ndarray:
            v = np.array(fn(t), dtype=float)
            for start, end, value in self.events.get(name, []):
                v[(t >= start) & (t < end)] = value
            return v
        with_events.keep_nan = getattr(fn, "keep_nan", False)
        self.source.set("metric_a", {"i": name}, with_events)

    def event(self, name: str, start: float, end: float, value: float) -> None:
        self.events.setdefault(name, []).append((start, end, value))

    def app(self, tmp_path):
        cfg = make_config(tmp_path, series_ttl="12h")
        return create_app(cfg, service=Service(cfg, source=self.source, clock=self.clock))

    def run(self, app, minutes: int, every: int = 1) -> None:
        """Let `minutes` pass, polling every `every` minutes."""
        svc = app.extensions["promvae"]
        for _ in range(minutes // every):
            self.clock.advance(60 * every)
            svc.poller.poll_once()


@pytest.fixture
def world() -> World:
    w = World()
    w.add("normal", seasonal(seed=1))
    w.add("spike", seasonal(seed=2))
    w.add("constant", lambda t: np.full(len(t), 42.0))
    w.add("nan", nan_series)
    w.add("gappy", seasonal(seed=3))
    w.add("huge", seasonal(seed=4))
    return w


def test_lifecycle_with_bad_input_and_restart(world, tmp_path):
    app = world.app(tmp_path)
    svc = app.extensions["promvae"]
    svc.poller.poll_once()
    assert svc.trainer.run_once() == 5  # everything but the NaN series, in one batch
    svc.poller.poll_once()
    assert app.test_client().get("/-/ready").status_code == 200
    first = scores(app)
    assert set(first) == {"normal", "spike", "constant", "gappy", "huge"}  # NaN: no sample
    assert all(math.isfinite(v) for v in first.values())
    nan = svc.registry.get_by_labels("q", {"i": "nan"})
    assert nan.state == INSUFFICIENT
    assert svc.registry.get_by_labels("q", {"i": "constant"}).state == READY

    # An anomaly, a gap of hours and a huge value, all while polling every minute.
    now = world.clock()
    world.event("spike", now + 60, now + 10 * HOUR, 60.0)
    world.event("gappy", now + 60, now + 3 * HOUR, math.nan)
    world.event("huge", now + 60, now + 120, 1e300)
    world.run(app, 3)
    live = scores(app)
    assert live["spike"] > 1 and live["normal"] < 1
    huge = svc.registry.get_by_labels("q", {"i": "huge"})
    assert 1e300 in huge.recent["observed"]
    assert np.isfinite(huge.recent["score"][huge.recent["observed"] == 1e300]).all()
    assert app.test_client().get("/-/healthy").status_code == 200
    world.run(app, 20, every=5)
    assert "gappy" not in scores(app)  # window lacks data: not exposed rather than NaN
    assert svc.registry.get_by_labels("q", {"i": "gappy"}) is not None

    world.run(app, int(3 * HOUR / 60), every=30)  # the gap ends, the window refills
    assert "gappy" in scores(app)
    assert sample(app, "promvae_models_trained_total") == 5

    # Restart: a new service on the same storage loads the models and scores the missed points.
    svc.persist(final=True)  # as stop() does
    last = svc.registry.get_by_labels("q", {"i": "normal"}).scored_to
    world.clock.advance(30 * 60)
    app2 = world.app(tmp_path)
    svc2 = app2.extensions["promvae"]
    svc2.trainer.run_once()
    assert sample(app2, "promvae_models_loaded_total") == 5
    assert sample(app2, "promvae_models_trained_total") == 0
    assert app2.test_client().get("/-/ready").status_code == 200
    svc2.poller.poll_once()
    normal = svc2.registry.get_by_labels("q", {"i": "normal"})
    missed = normal.recent["timestamp"]
    # The last point scored before the restart is scored again (nothing was exposed yet).
    assert missed[0] == last and missed[1] == last + 60
    assert missed[-1] == world.clock() // 60 * 60
    assert np.isfinite(normal.recent["score"]).all()
    assert set(scores(app2)) >= {"normal", "spike", "constant", "huge"}
    assert scores(app2)["spike"] > 1


def test_corrupt_model_file_is_retrained(world, tmp_path):
    app = world.app(tmp_path)
    svc = app.extensions["promvae"]
    svc.poller.poll_once()
    svc.trainer.run_once()
    svc.persist()
    victim = svc.registry.get_by_labels("q", {"i": "normal"}).id
    for path in svc.store.models_dir.glob(f"{victim}.*"):
        path.write_bytes(b"garbage")
    app2 = world.app(tmp_path)
    svc2 = app2.extensions["promvae"]
    svc2.trainer.run_once()
    assert sample(app2, "promvae_models_loaded_total") == 4
    assert sample(app2, "promvae_training_errors_total", reason="load") == 1
    assert svc2.registry.get(victim).model_origin == "trained"


def test_a_hanging_prometheus_never_blocks_serving(tmp_path):
    import threading

    clock = FakeClock()
    release = threading.Event()
    entered = threading.Event()

    class Hanging(FakeSource):
        def query_range(self, expr, start, end, step):
            entered.set()
            release.wait(30)  # a Prometheus that does not answer
            return []

    cfg = make_config(tmp_path)
    app = create_app(cfg, service=Service(cfg, source=Hanging(clock), clock=clock),
                     start_background=True)
    svc = app.extensions["promvae"]
    try:
        assert entered.wait(10)  # the poller (or trainer) is stuck inside the source
        for path in ("/metrics", "/-/healthy", "/", "/api/v1/status/models"):
            codes: list[int] = []
            t = threading.Thread(target=lambda p=path, out=codes: out.append(
                app.test_client().get(p).status_code), daemon=True)
            t.start()
            t.join(10)  # the source hangs for 30 s: a request waiting on it would time out here
            assert codes == [200], path
    finally:
        release.set()
        svc.stop(timeout=10)


def test_the_index_is_written_when_series_change_and_on_a_timer_not_every_poll(world, tmp_path,
                                                                                monkeypatch):
    app = world.app(tmp_path)
    svc = app.extensions["promvae"]
    writes: list[int] = []
    real = svc.store.write_index

    def counting(data):
        writes.append(len(data["series"]))
        real(data)

    monkeypatch.setattr(svc.store, "write_index", counting)
    svc.poller.poll_once()  # discovers the six series
    assert writes == [6]
    for _ in range(5):  # 10 s apart: nothing new, the 60 s timer not yet due
        world.clock.advance(10)
        svc.poller.poll_once()
    assert writes == [6]
    world.clock.advance(15)
    svc.poller.poll_once()  # 65 s since the last write: positions are saved
    assert writes == [6, 6]
    svc.trainer.run_once()  # models stored: the index must name them now
    assert len(writes) == 3
    world.add("newcomer", seasonal(seed=9))
    world.clock.advance(60)  # the next step: the newcomer's first point
    svc.poller.poll_once()
    assert writes[-1] == 7, writes
    svc.stop()  # and at stop, always
    assert len(writes) == 5
