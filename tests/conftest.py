"""Shared fixtures: small, fast detector configs (tests never need Donut-size models)."""

from __future__ import annotations

import pytest
import torch

from detector import VAEConfig

# Two threads keep test timings stable on the 2-core CI machine.
torch.set_num_threads(2)


@pytest.fixture
def tiny_config() -> VAEConfig:
    """A model small enough to train in well under a second per series."""
    return VAEConfig(window=16, hidden=(24, 24), latent=3, max_epochs=4, max_steps=40, batch_size=16, mc_samples=4, score_scales=(16, 8))
