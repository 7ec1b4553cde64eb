"""Storage under crashes and a full disk: `promvae serve` (built-in demo) killed with SIGKILL.

The demo's 12 series train models of about 5 MB each (two hidden layers of 768), so saving a
batch takes a second or more and a kill can land inside it. Every kill is followed by the same
checks: each model file on disk loads (old or new version, never a torn one), the index is
valid JSON, and a restarted service removes the temp files, loads what the index names without
a load error, and becomes ready without manual repair.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import resource
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from detector.store import load_model_file
from tests.promstack import PromvaeProcess, wait_until

pytestmark = pytest.mark.integration

DEMO_SERIES = 12
# ~5 MB per model file: a batch of 12 saves takes about a second, training stays quick
MODEL = {"hidden": [768, 768], "latent": 4, "max_steps": 2, "max_epochs": 1, "mc_samples": 1,
         "batch_size": 16, "score_scales": [32]}
CONFIG = {"step": "60s", "history": "12h", "window": 32, "poll_every": "2s",
          "retrain_every": "10s", "torch_threads": 1, "model": MODEL}


class DemoPromvae(PromvaeProcess):
    """`promvae serve` on the built-in demo, started and killed by the test."""

    def __init__(self, workdir: Path, **config: object) -> None:
        super().__init__(workdir, {**CONFIG, **config}, storage=workdir / "data")
        self.models = self.storage / "models"

    def start(self, max_file_bytes: int | None = None) -> None:  # type: ignore[override]
        """Start; with `max_file_bytes`, writes past that size fail with EFBIG (RLIMIT_FSIZE)."""
        def limit() -> None:
            if max_file_bytes is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails instead of a kill
                resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

        super().start(preexec_fn=limit)  # safe: the test process runs no other threads here

    def temp_files(self) -> list[Path]:
        return sorted([*self.models.glob(".*"), *self.storage.glob(".*")])

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """Every file under models/ (temp files too): name -> (size, mtime_ns)."""
        out = {}
        for e in os.scandir(self.models) if self.models.exists() else ():
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            out[e.name] = (st.st_size, st.st_mtime_ns)
        return out


def check_storage(pv: DemoPromvae) -> dict:
    """Every model file loads, the index is valid; returns the index (or {} if none yet)."""
    files = sorted(pv.models.glob("*.safetensors"))
    for path in files:
        load_model_file(path)  # ModelFileError on a torn or partial file
    index = {}
    if (pv.storage / "index.json").exists():
        index = json.loads((pv.storage / "index.json").read_text())
        assert index["format"] == 1
        names = {p.name for p in files}
        for s in index["series"]:
            if s["stored"]:  # the index only claims a model once its file is complete
                assert f"{s['id']}.safetensors" in names, s
    return index


def assert_complete(path: Path) -> None:
    """The file is as long as its safetensors header says (cheap; a torn write fails it)."""
    with path.open("rb") as f:
        head = f.read(8)
        assert len(head) == 8, f"{path.name}: {len(head)} bytes"
        n = int.from_bytes(head, "little")
        header = json.loads(f.read(n))
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert path.stat().st_size == 8 + n + end, f"{path.name}: torn file"


def all_stopped(pid: int) -> bool:
    tasks = Path(f"/proc/{pid}/task")
    return all((t / "stat").read_text().rsplit(")", 1)[1].split()[0] in "tT"
               for t in tasks.iterdir())


def crash_probes(pv: DemoPromvae, seconds: float, rng: random.Random) -> int:
    """For `seconds`: freeze the process (SIGSTOP: what a kill right now would leave on disk),
    check every model file is complete, resume; at random moments. Returns the probes taken."""
    assert pv.proc is not None
    pid, n = pv.proc.pid, 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_until(lambda: all_stopped(pid), timeout=10, interval=0.0005,
                       description="process stopped")
            for path in pv.models.glob("*.safetensors"):
                assert_complete(path)
            if (pv.storage / "index.json").exists():
                json.loads((pv.storage / "index.json").read_text())
        finally:
            os.kill(pid, signal.SIGCONT)
        n += 1
        time.sleep(rng.uniform(0, 0.004))
    return n


def kill_inside_a_save(pv: DemoPromvae, rng: random.Random, timeout: float = 120) -> int:
    """Freeze the process (SIGSTOP) again and again until it is frozen with a model write
    under way (a temp file exists), then SIGKILL it frozen: the kill lands inside a save by
    construction, not by luck of timing. Returns the probes taken."""
    assert pv.proc is not None
    pid, n = pv.proc.pid, 0
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"no model write caught in {n} probes"
        os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: all_stopped(pid), timeout=10, interval=0.0005,
                   description="process stopped")
        n += 1
        if any(p.parent == pv.models for p in pv.temp_files()):  # a model file, not the index
            pv.kill()  # SIGKILL works on a stopped process; it never runs again
            return n
        for path in pv.models.glob("*.safetensors"):
            assert_complete(path)
        os.kill(pid, signal.SIGCONT)
        time.sleep(rng.uniform(0, 0.002))


def kill_when(pv: DemoPromvae, trigger: Callable[[], bool], delay: float,
              probe: random.Random | None = None, timeout: float = 120,
              inside_a_save: bool = False) -> None:
    """SIGKILL `delay` seconds after `trigger()` first holds (polled every 2 ms); with
    `probe`, spend the delay in crash probes; with `inside_a_save`, probe until a model
    write is caught and kill it there."""
    deadline = time.monotonic() + timeout
    while not trigger():
        assert pv.proc is not None and pv.proc.poll() is None, pv.log_text()[-3000:]
        assert time.monotonic() < deadline, "the awaited moment never came"
        time.sleep(0.002)
    if inside_a_save:
        assert probe is not None
        print(f"killed inside a save after {kill_inside_a_save(pv, probe)} probes")
        return
    if probe is not None:
        print(f"{crash_probes(pv, delay, probe)} crash probes in {delay:.2f} s")
    else:
        time.sleep(delay)
    pv.kill()


def files_change(pv: DemoPromvae) -> Callable[[], bool]:
    """Trigger: a file under models/ appeared or changed (a save is being written)."""
    before = pv.snapshot()
    return lambda: pv.snapshot() != before and any(
        v != before.get(k) for k, v in pv.snapshot().items())


def retraining_started(pv: DemoPromvae) -> Callable[[], bool]:
    """Trigger: a batch retraining models that already exist has begun."""
    return lambda: re.search(r"\(0 new, \d+ retraining\)", pv.log_text()) is not None


def test_sigkill_during_saves_and_retraining_never_leaves_a_torn_model(tmp_path):
    seed = 14  # fixed: the same delays on every run (the kill inside a save is by construction)
    rng = random.Random(seed)
    pv = DemoPromvae(tmp_path)
    hit_a_save = 0  # kills that left a temp file: the kill landed inside a model write
    try:
        rounds = [("first save", 0.0), ("retraining", rng.uniform(0, 4)),
                  ("a retraining save", rng.uniform(0.5, 2)), ("inside a retraining save", 0.0)]
        index: dict = {}
        for i, (moment, delay) in enumerate(rounds):
            pv.start()
            if i:
                pv.wait_ready()
                assert not pv.temp_files(), "temp files of the killed run were not removed"
                assert pv.value("promvae_training_errors_total", reason="load") == 0
                stored = sum(1 for s in index["series"] if s["stored"])
                wait_until(lambda n=stored: pv.value("promvae_models_loaded_total") == n,
                           timeout=30, description=f"{stored} stored models loaded")
            trigger = retraining_started(pv) if moment == "retraining" else files_change(pv)
            if moment == "inside a retraining save":  # probe from the start of retraining
                kill_when(pv, retraining_started(pv), 0.0, probe=rng, inside_a_save=True)
            else:
                kill_when(pv, trigger, delay,
                          probe=rng if moment == "a retraining save" else None)
            hit_a_save += any(p.parent == pv.models for p in pv.temp_files())
            index = check_storage(pv)
            print(f"seed {seed} round {i}: killed {delay:.2f} s after {moment}; "
                  f"{len(list(pv.models.glob('*.safetensors')))} model files, "
                  f"temp files {[p.name for p in pv.temp_files()]}")
        pv.start()
        pv.wait_ready()
        assert not pv.temp_files()
        assert pv.value("promvae_training_errors_total", reason="load") == 0
        wait_until(lambda: pv.value("promvae_models", state="ready") == DEMO_SERIES,
                   timeout=120, description="every demo series has a model again")
        assert pv.stop() == 0
        check_storage(pv)
    finally:
        pv.stop()
    # without this the test proved nothing: no kill landed inside a model write
    assert hit_a_save >= 1, f"seed {seed}: no kill hit a save"


def test_disk_full_while_saving_keeps_the_old_model_and_the_service(tmp_path):
    pv = DemoPromvae(tmp_path, retrain_every="2s", step="10s", history="2h")
    try:
        pv.start()
        pv.wait_ready()
        wait_until(lambda: len(list(pv.models.glob("*.safetensors"))) == DEMO_SERIES
                   and pv.value("promvae_models", state="ready") == DEMO_SERIES,
                   timeout=120, description="12 models saved")
        assert pv.stop() == 0
        old = {p: hashlib.sha256(p.read_bytes()).hexdigest()
               for p in pv.models.glob("*.safetensors")}
        size = min(p.stat().st_size for p in old)
        # files may not grow past 1 MiB: the ~5 MB model files cannot be written (EFBIG, as a
        # full disk gives ENOSPC), the index and the log can
        pv.start(max_file_bytes=2**20)
        wait_until(lambda: pv.value("promvae_training_errors_total", reason="save")
                   >= DEMO_SERIES, timeout=120, description="failed saves counted")
        log = pv.log_text()
        failed = [line for line in log.splitlines() if "cannot save the model" in line]
        assert failed, log[-3000:]
        assert str(pv.models) in failed[0] and "File too large" in failed[0], failed[0]
        assert pv.get("/-/healthy").status_code == 200
        assert pv.get("/-/ready").status_code == 200
        assert pv.value("promvae_models", state="ready") == DEMO_SERIES
        wait_until(lambda: pv.value("anomaly_score"), timeout=60,
                   description="scores from the models kept in memory")
        assert pv.value("promvae_models_trained_total") >= DEMO_SERIES  # serving from memory
        assert not [p for p in pv.temp_files() if p.suffix == ".tmp"]
        for path, digest in old.items():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, path
            load_model_file(path)
        assert size > 2**20  # the limit really was below a model file's size
        assert pv.stop() == 0
    finally:
        pv.stop()
