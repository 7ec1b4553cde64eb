"""K conditional VAEs as one tensor program: stacked weights, batched matmuls.

Every parameter carries a leading model axis K, so one `torch.baddbmm` runs the same layer of
all K models at once. Shapes: K models, B windows per model, W points per window, C time
features, Z latent dimensions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import rng
from .config import VAEConfig
from .series import N_TIME_FEATURES

Params = dict[str, torch.Tensor]

LOG_2PI = math.log(2 * math.pi)


def n_cond(config: VAEConfig) -> int:
    return N_TIME_FEATURES if config.seasonal else 0


def layer_shapes(config: VAEConfig) -> list[tuple[str, int, int]]:
    """(name, in, out) of every linear layer, encoder first."""
    c, w, z = n_cond(config), config.window, config.latent
    shapes = []
    dims = [w + c, *config.hidden]
    for i in range(len(config.hidden)):
        shapes.append((f"enc{i}", dims[i], dims[i + 1]))
    shapes += [("enc_mu", dims[-1], z), ("enc_std", dims[-1], z)]
    dims = [z + c, *config.hidden]
    for i in range(len(config.hidden)):
        shapes.append((f"dec{i}", dims[i], dims[i + 1]))
    shapes += [("dec_mu", dims[-1], w), ("dec_std", dims[-1], w)]
    return shapes


def init_params(config: VAEConfig, seeds: list[int]) -> Params:
    """nn.Linear's default init, drawn from each model's own stream: (K, in, out), (K, 1, out)."""
    keys = rng.model_keys(seeds, rng.INIT)
    params: Params = {}
    for i, (name, n_in, n_out) in enumerate(layer_shapes(config)):
        bound = 1.0 / math.sqrt(n_in)
        params[f"{name}.w"] = (2 * rng.uniform(keys, 2 * i, (n_in, n_out)) - 1) * bound
        params[f"{name}.b"] = (2 * rng.uniform(keys, 2 * i + 1, (1, n_out)) - 1) * bound
    return params


def flops_per_window(config: VAEConfig) -> int:
    """Multiply-adds x2 of one forward pass through encoder and decoder for one window."""
    return sum(2 * n_in * n_out for _, n_in, n_out in layer_shapes(config))


def _linear(p: Params, name: str, x: torch.Tensor) -> torch.Tensor:
    return torch.baddbmm(p[f"{name}.b"], x, p[f"{name}.w"])  # (K, B, in) @ (K, in, out)


def _mlp(p: Params, prefix: str, n_hidden: int, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """Hidden layers on [x, cond]. The input is concatenated, not the weight's rows split:
    the gradient of a split weight is two zero-filled full-size tensors added together (a
    fifth of a training step at 512 series), the concatenation one copy of a thin input."""
    if cond is not None:
        x = torch.cat([x, cond.expand(x.shape[:-1] + cond.shape[-1:])], dim=-1)
    h = F.relu(_linear(p, f"{prefix}0", x))
    for i in range(1, n_hidden):
        h = F.relu(_linear(p, f"{prefix}{i}", h))
    return h


def encode(p: Params, config: VAEConfig, x: torch.Tensor, cond: torch.Tensor | None):
    """q(z | x, c): x (K, B, W), cond (K, B, C) -> mean, std (K, B, Z)."""
    h = _mlp(p, "enc", len(config.hidden), x, cond)
    return _linear(p, "enc_mu", h), F.softplus(_linear(p, "enc_std", h)) + 1e-4


def decode(p: Params, config: VAEConfig, z: torch.Tensor, cond: torch.Tensor | None):
    """p(x | z, c): z (K, B, Z), cond (K, B, C) -> mean, std (K, B, W)."""
    mu, pre_std = _decode_pre(p, config, z, cond)
    return mu, F.softplus(pre_std) + config.std_min


def _decode_pre(p: Params, config: VAEConfig, z: torch.Tensor, cond: torch.Tensor | None):
    """The decoder's mean and its std before softplus (the loss takes the softplus itself)."""
    h = _mlp(p, "dec", len(config.hidden), z, cond)
    return _linear(p, "dec_mu", h), _linear(p, "dec_std", h)


def _nll_terms(mu: torch.Tensor, pre_std: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
               std_min: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sum over W of mask · (r²/2 + log std), std = softplus(pre_std) + std_min, r = (x - mu)/std;
    also r and mask / std, from which the gradients follow."""
    std = F.softplus(pre_std).add_(std_min)
    inv = torch.reciprocal(std)
    r = torch.sub(x, mu).mul_(inv)
    out = torch.log_(std).addcmul_(r, r, value=0.5).mul_(mask).sum(-1)
    return out, r, inv.mul_(mask)


class _GaussianNLL(torch.autograd.Function):
    """The decoder's Gaussian NLL with its gradients in closed form, computed in the forward:
    d/dmu = -mask · r / std, d/dpre_std = mask · (1 - r²) / std · sigmoid(pre_std). Autograd's
    chain through softplus, division, square and log made ~25 passes over the (K, B, W)
    tensors in forward and backward; this makes ~12 (half the loss head's time)."""

    @staticmethod
    def forward(ctx, mu, pre_std, x, mask, std_min):  # type: ignore[override]
        out, r, mi = _nll_terms(mu, pre_std, x, mask, std_min)
        g_mu = torch.mul(r, mi).neg_()
        g_std = r.mul_(r).sub_(1.0).mul_(mi).mul_(torch.sigmoid(pre_std)).neg_()
        ctx.save_for_backward(g_mu, g_std)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        g_mu, g_std = ctx.saved_tensors
        grad = grad[..., None]
        return g_mu * grad, g_std * grad, None, None, None


def _gaussian_nll(mu: torch.Tensor, pre_std: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                  std_min: float) -> torch.Tensor:
    """-log N(x; mu, softplus(pre_std) + std_min) without its constant, summed over observed
    points: (K, B, W) -> (K, B). Differentiable in mu and pre_std only (x, mask are data)."""
    if torch.is_grad_enabled() and (mu.requires_grad or pre_std.requires_grad):
        return _GaussianNLL.apply(mu, pre_std, x, mask, std_min)
    return _nll_terms(mu, pre_std, x, mask, std_min)[0]


def m_elbo_windows(
    p: Params,
    config: VAEConfig,
    x: torch.Tensor,
    mask: torch.Tensor,
    cond: torch.Tensor | None,
    eps: torch.Tensor | None,
) -> torch.Tensor:
    """Donut's modified ELBO, negated, per window: -> (K, B).

    x, mask (K, B, W): missing points (mask 0) are zeroed in the input and left out of the
    likelihood; the KL term is scaled by the observed share (Donut's beta). eps (K, B, Z) draws
    z; None uses the posterior mean (deterministic validation).
    """
    xin = x * mask
    mu_z, std_z = encode(p, config, xin, cond)
    z = mu_z if eps is None else mu_z + std_z * eps
    mu_x, pre_std = _decode_pre(p, config, z, cond)
    # -log N summed over observed points, with the constant pulled out of the elementwise part.
    nll = _gaussian_nll(mu_x, pre_std, x, mask, config.std_min) + 0.5 * LOG_2PI * mask.sum(-1)  # (K, B)
    kl = 0.5 * (mu_z**2 + std_z**2 - 1.0 - 2.0 * torch.log(std_z)).sum(-1)  # (K, B)
    beta = mask.mean(-1)
    return (nll + beta * kl) / config.window  # (K, B)


def m_elbo_loss(
    p: Params,
    config: VAEConfig,
    x: torch.Tensor,
    mask: torch.Tensor,
    cond: torch.Tensor | None,
    eps: torch.Tensor | None,
) -> torch.Tensor:
    """Training loss: the negated M-ELBO averaged over each model's minibatch, -> (K,)."""
    return m_elbo_windows(p, config, x, mask, cond, eps).mean(-1)


def select(p: Params, idx: torch.Tensor | int) -> Params:
    """Parameters of some models: index along K."""
    if isinstance(idx, int):
        return {k: v[idx : idx + 1] for k, v in p.items()}
    return {k: v[idx] for k, v in p.items()}


def as_float32(p: Params) -> Params:
    """The weights in float32 for computing (served weights may be stored in float16)."""
    return {k: v if v.dtype == torch.float32 else v.to(torch.float32) for k, v in p.items()}


def stack(params: list[Params]) -> Params:
    """Concatenate single- or multi-model parameter sets along K."""
    return {k: torch.cat([q[k] for q in params], dim=0) for k in params[0]}


def layout(config: VAEConfig) -> list[tuple[str, tuple[int, ...], int, int]]:
    """Where each parameter lives in a flat (K, P) buffer: (name, shape, start, end)."""
    out, pos = [], 0
    for lname, n_in, n_out in layer_shapes(config):
        for name, shape in ((f"{lname}.w", (n_in, n_out)), (f"{lname}.b", (1, n_out))):
            size = shape[0] * shape[1]
            out.append((name, shape, pos, pos + size))
            pos += size
    return out


def flatten(p: Params, config: VAEConfig) -> torch.Tensor:
    """Params -> one (K, P) tensor, so one fused optimiser kernel updates all K models."""
    k = next(iter(p.values())).shape[0]
    return torch.cat([p[name].reshape(k, -1) for name, _, _, _ in layout(config)], dim=1)


def unflatten(flat: torch.Tensor, config: VAEConfig) -> Params:
    """(K, P) -> Params of views (differentiable: gradients land in the flat tensor)."""
    k = flat.shape[0]
    return {name: flat[:, a:b].reshape((k,) + shape) for name, shape, a, b in layout(config)}
