"""detector.model: the loss head's closed-form gradients equal autograd's chain."""

import torch
import torch.nn.functional as F

from detector.model import _gaussian_nll


def _reference(mu, pre_std, x, mask, std_min):
    std = F.softplus(pre_std) + std_min
    r = (x - mu) / std
    return ((0.5 * r * r + torch.log(std)) * mask).sum(-1)


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    shape = (3, 5, 7)
    mu = torch.randn(shape, generator=g, dtype=dtype, requires_grad=True)
    pre = (3 * torch.randn(shape, generator=g, dtype=dtype)).requires_grad_(True)
    x = 2 * torch.randn(shape, generator=g, dtype=dtype)
    mask = (torch.rand(shape, generator=g) > 0.2).to(dtype)
    return mu, pre, x, mask


def test_value_and_gradients_match_autograd():
    mu, pre, x, mask = _inputs()
    w = torch.randn(3, 5, dtype=torch.float64)
    out = _gaussian_nll(mu, pre, x, mask, 0.05)
    g_mu, g_pre = torch.autograd.grad((out * w).sum(), (mu, pre))
    ref = _reference(mu, pre, x, mask, 0.05)
    r_mu, r_pre = torch.autograd.grad((ref * w).sum(), (mu, pre))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g_mu, r_mu)
    torch.testing.assert_close(g_pre, r_pre)
    assert (g_mu[mask == 0] == 0).all() and (g_pre[mask == 0] == 0).all()  # missing points


def test_gradcheck():
    mu, pre, x, mask = _inputs()
    assert torch.autograd.gradcheck(lambda a, b: _gaussian_nll(a, b, x, mask, 0.05), (mu, pre))


def test_no_grad_path_gives_the_same_value():
    mu, pre, x, mask = _inputs(torch.float32)
    with torch.no_grad():
        plain = _gaussian_nll(mu, pre, x, mask, 0.05)
    torch.testing.assert_close(plain, _reference(mu, pre, x, mask, 0.05).detach())
