"""Model files: safetensors tensors with the JSON metadata in the same file, written atomically.

One file per model keeps weights and metadata from ever disagreeing: a crash mid-save leaves
either the old file or the new one (temp file + fsync + rename), never a mix. The metadata is
a JSON document in the safetensors header under the key "promvae".
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import VAEConfig
from .feedback import Feedback
from .fitted import SeriesModel
from .model import layer_shapes

FORMAT_VERSION = 1
SUFFIX = ".safetensors"
LIBRARY_VERSION = "0.1.0"


class ModelFileError(ValueError):
    """A model file is missing, corrupt or incompatible; the message names the file."""


def model_path(directory: str | Path, name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid model name {name!r}: use a plain file name")
    return Path(directory) / f"{name}{SUFFIX}"


def _metadata(model: SeriesModel) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "library_version": LIBRARY_VERSION,
        "torch_version": torch.__version__,
        "config": model.config.to_dict(),
        "step": model.step,
        "normalisation": {"center": model.center, "scale": model.scale, "method": "median/iqr"},
        "threshold": {
            "raw": model.threshold_,
            "baseline": model.baseline_,
            "method": model.threshold_method,
            "scale_stats": [list(s) for s in model.scale_stats],
        },
        "seed": model.seed,
        "seasonality": {"daily": model.seasonality[0], "weekly": model.seasonality[1]},
        "training": {
            "from": model.trained_from,
            "to": model.trained_to,
            "at": model.trained_at,
            "points": model.n_train,
            "loss": model.train_loss,
        },
        "extra": model.extra,
        # Optional: a file without it (written before feedback existed) has none.
        "feedback": [fb.to_dict() for fb in model.feedback],
    }


def save_model(model: SeriesModel, directory: str | Path, name: str) -> Path:
    """Write `model` to directory/name.safetensors atomically; returns the path.

    On any failure (disk full included) the previous file, if any, is left untouched and an
    OSError naming the file is raised.
    """
    path = model_path(directory, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.params.items()}
    blob = st_save(tensors, metadata={"promvae": json.dumps(_metadata(model))})
    try:
        atomic_write(path, blob, prefix=f".{name}.")
    except OSError as e:
        raise OSError(e.errno, f"could not write model file {path}: {e.strerror or e}") from e
    return path


def atomic_write(path: Path, blob: bytes, prefix: str) -> None:
    """Replace `path` by `blob` so that a crash leaves the old or the new content, never a mix.

    Temp file `<prefix>*.tmp` beside it, fsync, rename, fsync of the directory (best effort:
    some filesystems refuse). On failure the temp file is removed and the OSError raised.
    """
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def load_model(directory: str | Path, name: str) -> SeriesModel:
    """Read a model written by `save_model`; ModelFileError naming the file if unusable."""
    return load_model_file(model_path(directory, name))


def load_model_file(path: str | Path) -> SeriesModel:
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise ModelFileError(f"cannot read model file {path}: {e.strerror or e}") from e
    try:
        tensors = st_load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"]["promvae"])
        if not isinstance(meta, dict):
            raise TypeError(f"metadata is a JSON {type(meta).__name__}, not an object")
    except (SafetensorError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"model file {path} is corrupt or not a promvae model: {e}") from e
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"model file {path} has format version {version}, this promvae reads {FORMAT_VERSION}; "
            "retrain or delete it"
        )
    try:
        config = VAEConfig.from_dict(meta["config"])
        expected = {}
        for lname, n_in, n_out in layer_shapes(config):
            expected[f"{lname}.w"] = (1, n_in, n_out)
            expected[f"{lname}.b"] = (1, 1, n_out)
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != expected:
            raise ValueError(f"tensors {sorted(got)} do not match the config's layers")
        bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"non-finite weights in {', '.join(sorted(bad))}")
        norm, thr, tr = meta["normalisation"], meta["threshold"], meta["training"]
        model = SeriesModel(
            config=config,
            params=tensors,
            step=float(meta["step"]),
            center=float(norm["center"]),
            scale=float(norm["scale"]),
            threshold_=float(thr["raw"]),
            baseline_=float(thr["baseline"]),
            threshold_method=str(thr["method"]),
            seed=int(meta["seed"]),
            trained_from=float(tr["from"]),
            trained_to=float(tr["to"]),
            trained_at=float(tr["at"]),
            n_train=int(tr["points"]),
            train_loss=float(tr.get("loss", float("nan"))),
            seasonality=(bool(meta["seasonality"]["daily"]), bool(meta["seasonality"]["weekly"])),
            scale_stats=[(float(a), float(b)) for a, b in thr["scale_stats"]],
            extra=dict(meta.get("extra") or {}),
            feedback=[Feedback.from_dict(d) for d in (meta.get("feedback") or [])],
        )
        _check_numbers(model)
        return model
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"model file {path} is incompatible: {e}") from e


def _check_numbers(m: SeriesModel) -> None:
    """ValueError unless the model can score: finite numbers, positive scales and step."""
    nums = [m.center, m.threshold_, m.baseline_] + [a for a, _ in m.scale_stats]
    positive = [m.scale, m.step] + [b for _, b in m.scale_stats]
    if not all(math.isfinite(x) for x in nums) or not all(math.isfinite(x) and x > 0 for x in positive):
        raise ValueError("normalisation, threshold, scale_stats and step must be finite numbers "
                         "(scales and step positive)")
    if len(m.scale_stats) != len(m.config.score_scales):
        raise ValueError(f"{len(m.scale_stats)} scale_stats for {len(m.config.score_scales)} score scales")
