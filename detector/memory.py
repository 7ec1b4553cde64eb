"""What one series costs fit_many in memory, so a caller can size its training batches.

Measured, not derived: peak RSS of fit_many batches of K series minus that of a smaller K,
per added series (benchmarks/fit_memory.py prints the figures these constants come from).
Per series fit_many holds the weights and their gradients, two Adam moments, the initial
and the best weights (about 6 copies of the weights, in float32), the packed history (z, m
float32 and t float64: 16 bytes a point), its training and validation window ends, and the
raw scores of the windows its threshold is fitted on; the fitted model (one more copy of
the weights) is the caller's.
"""

from __future__ import annotations

from .config import VAEConfig
from .model import layer_shapes

# Peak RSS growth per added series, fit_many of 100 and 300 series of the default model
# (59,856 weights), 2 steps: 3.55 MB at 1 d of 60 s history, 3.83 MB at 7 d. Per weight
# (weights, gradients, Adam moments, best snapshot, a flattened copy at each validation,
# the returned model, the training step's activations that scale with the layers): 56
# bytes; per point (packed z, m, t, window masks and ends, plus the caller's regularised
# input, 16 bytes a point): 50 bytes; the rest is a fixed share.
BYTES_PER_WEIGHT = 56
BYTES_PER_POINT = 50
FIXED_BYTES = 128 * 1024


def n_weights(config: VAEConfig) -> int:
    """Weights and biases of one model."""
    return sum((n_in + 1) * n_out for _, n_in, n_out in layer_shapes(config))


def fit_bytes_per_series(config: VAEConfig, points: int) -> int:
    """Peak bytes fit_many holds per series of `points` history points (default model, 7 d
    at 60 s: about 3.9 MB). Divide a memory budget by it to get series per batch."""
    return BYTES_PER_WEIGHT * n_weights(config) + BYTES_PER_POINT * max(0, points) + FIXED_BYTES
