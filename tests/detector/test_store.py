import json
import os

import numpy as np
import pytest

from detector import FORMAT_VERSION, ModelFileError, fit_many, load_model, save_model, score_many
from detector.store import model_path
from detector.synthetic import seasonal_series


@pytest.fixture(scope="module")
def model_and_series():
    from detector import VAEConfig

    cfg = VAEConfig(window=16, hidden=(24, 24), latent=3, max_epochs=3, max_steps=30, batch_size=16, mc_samples=4, score_scales=(16, 8))
    s = seasonal_series(400, step=300.0, seed=3)
    (m,) = fit_many([s], 300.0, cfg)
    return m, s


def test_round_trip_gives_identical_scores_and_metadata(tmp_path, model_and_series):
    m, s = model_and_series
    path = save_model(m, tmp_path, "cpu_busy-abc")
    assert path.name == "cpu_busy-abc.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    back = load_model(tmp_path, "cpu_busy-abc")
    assert back.config == m.config
    assert (back.threshold_, back.baseline_, back.center, back.scale) == (m.threshold_, m.baseline_, m.center, m.scale)
    assert (back.trained_from, back.trained_to, back.n_train) == (m.trained_from, m.trained_to, m.n_train)
    r1, r2 = score_many([m, back], [s, s])
    np.testing.assert_array_equal(r1.score, r2.score)


def test_overwrite_is_atomic_replacement(tmp_path, model_and_series):
    m, _ = model_and_series
    save_model(m, tmp_path, "a")
    m2 = load_model(tmp_path, "a")
    m2.threshold_ = m.threshold_ * 2
    save_model(m2, tmp_path, "a")
    assert load_model(tmp_path, "a").threshold_ == m.threshold_ * 2
    assert len(list(tmp_path.iterdir())) == 1


def test_corrupt_file_error_names_the_file(tmp_path, model_and_series):
    m, _ = model_and_series
    path = save_model(m, tmp_path, "x")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=str(path)):
        load_model(tmp_path, "x")
    path.write_bytes(b"not a model at all")
    with pytest.raises(ModelFileError, match="corrupt"):
        load_model(tmp_path, "x")
    with pytest.raises(ModelFileError, match="cannot read"):
        load_model(tmp_path, "missing")


def _rewrite_meta(path, change):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["promvae"])
    change(meta)
    header["__metadata__"]["promvae"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


def test_incompatible_version_and_config_are_refused(tmp_path, model_and_series):
    m, _ = model_and_series
    path = save_model(m, tmp_path, "v")
    _rewrite_meta(path, lambda meta: meta.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ModelFileError, match="format version"):
        load_model(tmp_path, "v")
    path = save_model(m, tmp_path, "w")
    _rewrite_meta(path, lambda meta: meta["config"].update(window=32))
    with pytest.raises(ModelFileError, match="incompatible"):
        load_model(tmp_path, "w")


def test_failed_write_keeps_the_old_model(tmp_path, model_and_series, monkeypatch):
    m, _ = model_and_series
    save_model(m, tmp_path, "keep")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="could not write model file"):
        save_model(m, tmp_path, "keep")
    monkeypatch.undo()
    assert load_model(tmp_path, "keep").threshold_ == m.threshold_
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]


def test_model_names_cannot_escape_the_directory(tmp_path):
    with pytest.raises(ValueError):
        model_path(tmp_path, "../etc/passwd")
