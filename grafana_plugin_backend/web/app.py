"""The application factory and the Service that owns state and background work."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Flask

from ..config.base import format_duration
from ..config.settings import Config, describe
from ..config.web import WebConfig, load_web_config
from ..service.feedback import FeedbackMetrics, FeedbackReader
from ..service.poller import Poller
from ..service.registry import PENDING, READY, Registry
from ..service.store import (
    CALIBRATION_FILE,
    ModelStore,
    index_of,
    read_calibration,
    restore,
    write_calibration,
)
from ..service.trainer import Trainer
from ..source.alertmanager import AlertmanagerClient
from ..source.demo import QUERIES as DEMO_QUERIES
from ..source.demo import DemoSource
from ..source.prometheus import PrometheusSource, Source
from . import access, feedback, query_api, remote_read, shard
from .explain import bp as explain_bp
from .exposition import AnomalyText, build_registry
from .exposition import bp as exposition_bp
from .status import bp as status_bp

log = logging.getLogger(__name__)

CALIBRATION_SAVE_EVERY = 300.0  # seconds between writes of the streaming thresholds
# The index is rewritten when series come, go or get a stored model, else at most this often:
# its positions only save re-pulling (a restart catches up from older ones), and a 10,000-
# series index written with two fsyncs every poll is I/O for nothing.
INDEX_SAVE_EVERY = 60.0


class Service:
    """Registry, model store, poller and trainer of one promvae process; start() / stop()."""

    def __init__(self, cfg: Config, source: Source | None = None, *,
                 clock: Callable[[], float] = time.time,
                 fit_fn: Callable | None = None, score_fn: Callable | None = None) -> None:
        self.cfg = cfg
        self.queries = list(cfg.queries) if not cfg.demo else list(DEMO_QUERIES)
        if source is None:
            source = DemoSource(clock=clock) if cfg.demo else PrometheusSource(cfg.prometheus)
        self.source = source
        self.clock = clock
        self.vae_config = cfg.vae_config()
        self.registry = Registry(cfg.max_series)
        self.shard = shard.Shard(cfg.shard.index, cfg.shard.count)
        if self.shard.count > 1:
            self.registry.owns = self.shard.owns
        self.metrics_registry, self.metrics = build_registry(self.registry)
        self.anomaly_text = AnomalyText(self.registry)  # the anomaly_* block of /metrics
        self.store = ModelStore(cfg.storage_path)
        self.ready = threading.Event()
        self.started_at = clock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._persist_lock = threading.Lock()
        self._calibration_saved = -math.inf
        self._index_saved, self._index_key = -math.inf, None
        self._opened = False
        extra: dict[str, Any] = {} if score_fn is None else {"score_fn": score_fn}
        self.poller = Poller(cfg, self.queries, source, self.registry, self.metrics,
                             self.vae_config, clock=clock, persist=self.persist, **extra)
        # The real fit_many pauses between its steps while a poll runs (fresh scores first);
        # a fit_fn given by a test may not take the keyword.
        extra = {"pause": self.poller.wait_idle} if fit_fn is None else {"fit_fn": fit_fn}
        self.trainer = Trainer(cfg, self.queries, source, self.registry, self.store, self.metrics,
                               self.vae_config, clock=clock, persist=self.persist,
                               on_trained=self.poller.wake, **extra)
        self.poller.on_new_series = self.trainer.wake
        self.poller.on_adapt = self.trainer.wake
        # Feedback: POST /api/v1/feedback, and Alertmanager's silences when a URL is set.
        self.feedback_metrics = FeedbackMetrics(self.metrics_registry)
        self.feedback_reader: FeedbackReader | None = None
        am = cfg.alertmanager
        if am.url:
            self.feedback_reader = FeedbackReader(
                AlertmanagerClient(am.url, am.timeout), self.registry, self.store,
                self.feedback_metrics, am.feedback_interval,
                lag=self.vae_config.smooth * cfg.step, clock=clock, on_feedback=self.trainer.wake)

    def init_app(self, app: Flask) -> None:
        app.extensions["promvae"] = self

    def is_ready(self) -> bool:
        """Ready (and stays so) once stored models are loaded and every known series has had
        its first training attempt (after a successful poll, or with loaded models)."""
        if not self.ready.is_set() and self.trainer.loaded_once:
            counts = self.registry.counts_by_state()
            if not counts[PENDING] and (counts[READY] or self.poller.polls_ok):
                self.ready.set()
        return self.ready.is_set()

    def open(self) -> int:
        """Prepare the storage path and register the series of the previous run's index."""
        if self._opened:
            return 0
        self._opened = True
        self.store.prepare()
        n = restore(self.registry, self.store.read_index(), self.clock())
        if n:
            log.info("restored %d series from %s", n, self.store.index_path)
            c = read_calibration(self.registry, self.store.root / CALIBRATION_FILE,
                                 self.poller.calibration)
            log.info("restored the streaming thresholds of %d series", c)
        if self.registry.disowned:  # shard.count changed: their new owners train them
            log.info("%d series of the previous run belong to other shards now (%s); "
                     "deleting their models here", len(self.registry.disowned),
                     self.shard.describe())
            for sid in self.registry.disowned:
                self.store.delete(sid)
            self.registry.disowned.clear()
            self.persist()
        return n

    def start(self) -> None:
        """Open the store and start the poller and trainer threads."""
        self.open()
        log.info("promvae starting: %s", describe(self.cfg))
        log.info("source: %s", self.source.describe())
        self._threads = [
            threading.Thread(target=self.trainer.run, args=(self._stop,),
                             name="promvae-trainer", daemon=True),
            threading.Thread(target=self.poller.run, args=(self._stop,),
                             name="promvae-poller", daemon=True),
        ]
        if self.feedback_reader is not None:
            log.info("feedback: reading silences of %s every %s",
                     self.feedback_reader.client.describe(),
                     format_duration(self.cfg.alertmanager.feedback_interval))
            self._threads.append(threading.Thread(target=self.feedback_reader.run,
                                                  args=(self._stop,), name="promvae-feedback",
                                                  daemon=True))
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop background work: a running training is cancelled, model writes finish."""
        self._stop.set()
        self.poller.wake()
        self.trainer.wake()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("%s did not stop within %.0f s", t.name, timeout)
        self.persist(final=True)
        self.source.close()
        if self.feedback_reader is not None:
            self.feedback_reader.client.close()

    def persist(self, final: bool = False) -> None:
        """Write the series index (labels, positions) when its series changed or every
        INDEX_SAVE_EVERY seconds, the streaming thresholds every CALIBRATION_SAVE_EVERY
        seconds, and both at stop; a failure is logged and counted."""
        with self._persist_lock:
            now = self.clock()
            with self.registry.lock:
                key = (self.registry.membership, len(self.registry.vanished),
                       sum(s.stored for s in self.registry.all()))
            if final or key != self._index_key or now - self._index_saved >= INDEX_SAVE_EVERY:
                try:
                    self.store.write_index(index_of(self.registry))
                    self._index_saved, self._index_key = now, key
                except OSError as e:
                    self.metrics.training_errors.labels("save").inc()
                    log.error("cannot write the series index %s: %s", self.store.index_path, e)
            now = time.monotonic()
            if final or now - self._calibration_saved >= CALIBRATION_SAVE_EVERY:
                self._calibration_saved = now
                path = self.store.root / CALIBRATION_FILE
                try:
                    write_calibration(self.registry, path)
                except OSError as e:
                    self.metrics.training_errors.labels("save").inc()
                    log.error("cannot write the streaming thresholds %s: %s", path, e)


def create_app(config: Config, *, service: Service | None = None,
               web_config: WebConfig | None = None,
               start_background: bool = False, **service_kwargs: Any) -> Flask:
    """A Flask app serving /metrics, status pages and health for `config`'s service.

    Basic auth, TLS settings and headers come from `web_config`, else from
    `config.web_config_file` (ConfigError if that file is bad).
    """
    if web_config is None and config.web_config_file:
        web_config = load_web_config(config.web_config_file)
    app = Flask(__name__, static_folder=None)  # no static files: no /static route
    app.config["PROMVAE"] = config
    service = service or Service(config, **service_kwargs)
    access.init_app(app, web_config, config.web_max_request_bytes, service.metrics_registry)
    service.init_app(app)
    app.register_blueprint(exposition_bp)
    app.register_blueprint(status_bp)
    app.register_blueprint(explain_bp)
    query_api.init_app(app)
    feedback.init_app(app)
    remote_read.init_app(app)
    shard.init_app(app, service.shard, service.registry, service.metrics_registry)
    if start_background:
        service.start()
    else:
        service.open()
    return app
