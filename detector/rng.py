"""Counter-based random numbers: one independent stream per model, vectorised over models.

A model's random draws depend only on (its seed, the purpose, a counter, a position), never on
which other models share the batch. That is what makes K models trained together give the same
result as each trained alone, without a Python loop over K generators per step.
"""

from __future__ import annotations

import torch

_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64 constants as signed int64
_M2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_COUNTER_STRIDE = 1 << 32  # positions per counter value; draws never overlap below this

# Purposes, so the streams for different uses never collide.
INIT, BATCH, LATENT, MISSING, SCORE = 1, 2, 3, 4, 5


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch shifts arithmetically)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser, elementwise on int64 (overflow wraps)."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def model_keys(seeds: torch.Tensor | list[int], purpose: int) -> torch.Tensor:
    """(K,) int64 base keys for K models and one purpose."""
    s = torch.as_tensor(seeds, dtype=torch.int64)
    return _mix(_mix(s) ^ purpose)


def uniform(keys: torch.Tensor, counter: torch.Tensor | int, shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform floats in (0, 1): keys (K,), counter () or (K, *batch) -> (K, *batch, *shape).

    Each (model, counter) pair is its own stream of prod(shape) draws, so a draw never depends
    on which other counters are computed beside it.
    """
    n = 1
    for d in shape:
        n *= d
    c = torch.as_tensor(counter, dtype=torch.int64)
    if c.ndim == 0:
        c = c.expand(keys.shape[0])
    k = keys.reshape(keys.shape + (1,) * (c.ndim - 1))
    base = (k + c * _COUNTER_STRIDE).reshape(c.shape + (1,) * len(shape))
    pos = torch.arange(n, dtype=torch.int64).reshape(shape)
    h = _mix(base + pos)
    bits = _shr(h, 40).to(torch.float32)  # top 24 bits: exact in float32
    return (bits + 0.5) / float(1 << 24)


def normal(keys: torch.Tensor, counter: torch.Tensor | int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal draws by Box-Muller, same contract as `uniform`."""
    u = uniform(keys, counter, (2,) + tuple(shape))  # (K, *batch, 2, *shape)
    axis = u.ndim - len(shape) - 1
    u1, u2 = u.select(axis, 0), u.select(axis, 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)
