"""benchmarks/accuracy.py's command line: deployed-mode overrides for A/B runs."""

import pytest

from benchmarks import accuracy


def test_deployment_overrides_parse_to_deployment_fields() -> None:
    assert accuracy.parse_overrides("calibrate=false,adapt_after=none,history=86400") == {
        "calibrate": False, "adapt_after": None, "history": 86400}


def test_unknown_deployment_key_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown --deployment keys \\['adapt_afterr'\\]"):
        accuracy.make_promvae_detectors({}, deployment_overrides={"adapt_afterr": 3600})


def test_deployment_overrides_refused_with_train_once(tmp_path) -> None:
    with pytest.raises(SystemExit, match="no effect with --train-once"):
        accuracy.main(["--data", str(tmp_path), "--train-once", "--deployment", "calibrate=false"])
