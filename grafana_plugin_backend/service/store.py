"""The model store: model files under --storage.path plus an index of labels and positions."""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from detector import load_model, save_model
from detector.store import atomic_write

from .registry import Registry

log = logging.getLogger(__name__)

INDEX_FORMAT = 1


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


class ModelStore:
    """Models as <storage>/models/<series id>.*, the series index as <storage>/index.json."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.models_dir = self.root / "models"
        self.index_path = self.root / "index.json"

    def prepare(self) -> None:
        """Create the storage directories and remove temp files a crash left behind;
        OSError with a sentence if the storage path is not writable."""
        try:
            self.models_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe."):
                pass
        except OSError as e:
            raise OSError(e.errno, f"storage path {self.root} is not writable: "
                                   f"{e.strerror or e}") from e
        leftovers = [*self.models_dir.glob(".*.tmp"), *self.root.glob(".index.*.tmp"),
                     *self.root.glob(".probe.*")]
        for path in leftovers:
            try:
                path.unlink()
            except OSError as e:
                log.warning("could not remove leftover temp file %s: %s", path, e.strerror)
        if leftovers:
            log.info("removed %d temp files left by an interrupted write", len(leftovers))

    def save(self, sid: str, model: Any) -> None:
        save_model(model, self.models_dir, sid)

    def load(self, sid: str) -> Any:
        """The stored model of series `sid`; detector.ModelFileError if missing or unusable."""
        return load_model(self.models_dir, sid)

    def delete(self, sid: str) -> None:
        for path in self.models_dir.glob(f"{sid}.*"):
            try:
                path.unlink()
            except OSError as e:
                log.warning("could not delete model file %s: %s", path, e.strerror)

    def read_index(self) -> dict[str, Any]:
        """The index of the previous run; empty if there is none or it is unreadable."""
        try:
            data = json.loads(self.index_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.error("index %s is unreadable (%s); starting without it, models retrain",
                      self.index_path, e)
            return {}
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            log.error("index %s has an unknown format; starting without it", self.index_path)
            return {}
        return data

    def write_index(self, data: dict[str, Any]) -> None:
        """Write the index atomically (temp file, fsync, rename, directory fsync)."""
        blob = json.dumps({"format": INDEX_FORMAT, **data}, separators=(",", ":"))
        atomic_write(self.index_path, blob.encode(), prefix=".index.")


def index_of(registry: Registry) -> dict[str, Any]:
    """The registry as index data: series labels, scored positions, vanished series."""
    with registry.lock:
        series = [{"id": s.id, "query": s.query, "labels": s.labels,
                   "scored_to": _num(s.scored_to), "last_present": _num(s.last_present),
                   "stored": s.stored}
                  for s in registry.all()]
        return {"written_at": time.time(), "positions": dict(registry.positions),
                "series": series, "vanished": dict(registry.vanished)}


def restore(registry: Registry, data: dict[str, Any], now: float) -> int:
    """Register the series of a previous run's index (state pending, models on disk).

    A series without a known last sample counts as present `now`, so its TTL still runs.
    """
    n = 0
    with registry.lock:
        for entry in data.get("series", []):
            try:
                query, labels = str(entry["query"]), dict(entry["labels"])
                scored = entry.get("scored_to")
                present = entry.get("last_present")
            except (KeyError, TypeError, ValueError):
                continue
            s = registry.restore(query, labels,
                                 float(scored) if scored is not None else math.nan,
                                 float(present) if present is not None else now)
            if s is not None:
                s.stored = bool(entry.get("stored", True))
                n += 1
        for sid, info in (data.get("vanished") or {}).items():
            if registry.get(sid) is None and isinstance(info, dict):
                labels = info.get("labels")
                if registry.owns is not None and not registry.owns(
                        str(info.get("query", "")), labels if isinstance(labels, dict) else {}):
                    registry.disowned.append(sid)  # another shard's now
                    continue
                registry.vanished[sid] = info
        for q, pos in (data.get("positions") or {}).items():
            if isinstance(pos, (int, float)):
                registry.positions[str(q)] = float(pos)
    return n


def collect_garbage(registry: Registry, store: ModelStore, retention: float, now: float) -> int:
    """Delete model files of series vanished longer than `retention` ago; returns how many."""
    with registry.lock:
        old = [sid for sid, info in registry.vanished.items()
               if now - float(info.get("vanished_at", now)) > retention]
        for sid in old:
            del registry.vanished[sid]
    for sid in old:
        store.delete(sid)
    return len(old)


CALIBRATION_FILE = "calibration.npz"


def write_calibration(registry: Registry, path: Path) -> int:
    """Every series' streaming threshold in one file (npz: state JSON + reference arrays),
    written atomically; returns how many series it holds."""
    import io

    import numpy as np

    with registry.lock:
        items = [(s.id, s.calibrator.state(), np.asarray(s.calibrator.reference, np.float32))
                 for s in registry.all() if s.calibrator is not None]
    meta = {sid: st for sid, st, _ in items}
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
             **{f"ref_{i}": ref for i, (_, _, ref) in enumerate(items)},
             ids=np.frombuffer(json.dumps([sid for sid, _, _ in items]).encode(), dtype=np.uint8))
    atomic_write(path, buf.getvalue(), prefix=".calibration.")
    return len(items)


def read_calibration(registry: Registry, path: Path, config: Any) -> int:
    """Restore the streaming thresholds written by `write_calibration`; a missing or
    unreadable file restores none (the thresholds start again from the models')."""
    import numpy as np

    from detector.calibration import Calibrator

    if not path.exists():
        return 0
    try:
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            ids = json.loads(bytes(z["ids"]).decode())
            refs = {sid: z[f"ref_{i}"] for i, sid in enumerate(ids)}
    except (OSError, ValueError, KeyError) as e:
        log.warning("cannot read %s, calibration starts afresh: %s", path, e)
        return 0
    n = 0
    with registry.lock:
        for sid, st in meta.items():
            s = registry.get(sid)
            if s is None or sid not in refs:
                continue
            try:
                s.calibrator = Calibrator.restore(config, refs[sid], st)
            except (KeyError, TypeError, ValueError):
                continue
            n += 1
    return n
