"""Property tests of model files: bit-identical round trips, and corrupt files -> ModelFileError.

No training: models are built from init_params with hypothesis-drawn metadata, so each example
costs one small file write.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from detector import FORMAT_VERSION, ModelFileError, SeriesModel, VAEConfig, load_model, save_model
from detector.model import init_params
from detector.store import _metadata, load_model_file

SETTINGS = settings(max_examples=80, deadline=None)
CONFIG = VAEConfig(window=8, hidden=(4,), latent=2, score_scales=(8, 4))

finite = st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def models(draw) -> SeriesModel:
    cfg = draw(st.sampled_from([CONFIG, VAEConfig(window=4, hidden=(3, 2), latent=1, seasonal=False)]))
    params = init_params(cfg, [draw(st.integers(0, 2**31 - 1))])
    if draw(st.booleans()):  # extreme but finite weights
        scale = draw(st.sampled_from([1e-30, 1e30, 3e38]))
        params = {k: (v * scale).clamp(-3e38, 3e38) for k, v in params.items()}
    return SeriesModel(
        config=cfg, params=params, step=draw(st.floats(1e-3, 1e6)),
        center=draw(finite), scale=draw(st.floats(1e-300, 1e300)),
        threshold_=draw(finite), baseline_=draw(finite),
        threshold_method=draw(st.sampled_from(["spot", "quantile"])), seed=draw(st.integers(0, 2**63 - 1)),
        trained_from=draw(finite), trained_to=draw(finite), trained_at=draw(finite),
        n_train=draw(st.integers(0, 2**62)), train_loss=draw(st.floats()),
        seasonality=(draw(st.booleans()), draw(st.booleans())),
        scale_stats=[(draw(finite), draw(st.floats(1e-9, 1e300))) for _ in cfg.score_scales],
        extra=draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3)),
    )


def same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict):  # JSON with NaN in it: compare the text
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    return a == b


@SETTINGS
@given(models(), st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=12))
def test_round_trip_is_bit_identical(model, name):
    with tempfile.TemporaryDirectory() as d:
        save_model(model, d, name)
        back = load_model(d, name)
        assert sorted(p.name for p in Path(d).iterdir()) == [f"{name}.safetensors"]
    for f in fields(SeriesModel):
        if f.name == "params":
            continue
        assert same(getattr(back, f.name), getattr(model, f.name)), f.name
    assert back.params.keys() == model.params.keys()
    for k, v in model.params.items():
        assert back.params[k].dtype == torch.float32
        assert torch.equal(back.params[k].view(torch.int32), v.float().view(torch.int32)), k


@pytest.fixture(scope="module")
def blob() -> bytes:
    model = SeriesModel(CONFIG, init_params(CONFIG, [1]), 60.0, 1.0, 2.0, 3.0, 0.5, "spot", 1,
                        0.0, 600.0, 700.0, 10, scale_stats=[(0.0, 1.0), (0.0, 1.0)])
    with tempfile.TemporaryDirectory() as d:
        return save_model(model, d, "m").read_bytes()


def load_bytes(data: bytes) -> SeriesModel:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        path.write_bytes(data)
        return load_model_file(path)


def loads_or_refuses(data: bytes) -> SeriesModel | None:
    """Load `data` as a model file: a usable model, or None after a ModelFileError naming it."""
    try:
        m = load_bytes(data)
    except ModelFileError as e:
        assert "m.safetensors" in str(e)
        return None
    assert all(torch.isfinite(v).all() for v in m.params.values())
    assert math.isfinite(m.center) and math.isfinite(m.scale) and m.scale > 0
    assert math.isfinite(m.threshold_) and math.isfinite(m.baseline_) and m.step > 0
    assert len(m.scale_stats) == len(m.config.score_scales)
    return m


@SETTINGS
@given(st.data())
def test_truncated_files_are_refused(blob, data):
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(ModelFileError, match="corrupt|cannot read"):
        load_bytes(blob[:cut])


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_are_refused(junk):
    with pytest.raises(ModelFileError):
        load_bytes(junk)


@SETTINGS
@given(st.data())
def test_any_flipped_byte_loads_a_usable_model_or_is_refused(blob, data):
    i = data.draw(st.integers(0, len(blob) - 1))
    b = data.draw(st.integers(0, 255))
    loads_or_refuses(blob[:i] + bytes([b]) + blob[i + 1 :])


@SETTINGS
@given(st.binary(max_size=200) | st.text(max_size=60).map(str.encode))
def test_a_garbage_header_is_refused(blob, header):
    n = int.from_bytes(blob[:8], "little")
    for h in (header, header.ljust(n)[:n]):  # garbage of any length, and of the right length
        with pytest.raises(ModelFileError):
            load_bytes(len(h).to_bytes(8, "little") + h + blob[8 + n :])


@SETTINGS
@given(json_values, st.sampled_from(["", "config", "normalisation", "threshold", "training", "step",
                                     "seasonality", "seed", "format_version", "scale"]))
def test_hostile_metadata_loads_a_usable_model_or_is_refused(value, key):
    """The JSON under "promvae" replaced whole, or one of its entries replaced, by any JSON."""
    model = SeriesModel(CONFIG, init_params(CONFIG, [1]), 60.0, 1.0, 2.0, 3.0, 0.5, "spot", 1,
                        0.0, 600.0, 700.0, 10, scale_stats=[(0.0, 1.0), (0.0, 1.0)])
    meta = _metadata(model)
    if key == "":
        meta = value
    elif key == "scale":
        meta["normalisation"]["scale"] = value
    else:
        meta[key] = value
    tensors = {k: v.contiguous() for k, v in model.params.items()}
    loads_or_refuses(st_save(tensors, metadata={"promvae": json.dumps(meta)}))


@pytest.mark.parametrize("edit", [
    lambda m: m["normalisation"].update(scale=0.0),
    lambda m: m["normalisation"].update(scale=float("nan")),
    lambda m: m["normalisation"].update(center=float("inf")),
    lambda m: m["threshold"].update(raw=float("nan")),
    lambda m: m["threshold"].update(scale_stats=[]),
    lambda m: m["threshold"].update(scale_stats=[[0.0, 0.0], [0.0, 1.0]]),
    lambda m: m.update(step=-60.0),
    lambda m: m.update(format_version=FORMAT_VERSION + 1),
])
def test_metadata_a_model_cannot_score_with_is_refused(edit):
    model = SeriesModel(CONFIG, init_params(CONFIG, [1]), 60.0, 1.0, 2.0, 3.0, 0.5, "spot", 1,
                        0.0, 600.0, 700.0, 10, scale_stats=[(0.0, 1.0), (0.0, 1.0)])
    meta = _metadata(model)
    edit(meta)
    tensors = {k: v.contiguous() for k, v in model.params.items()}
    with pytest.raises(ModelFileError, match="m.safetensors"):
        load_bytes(st_save(tensors, metadata={"promvae": json.dumps(meta)}))
