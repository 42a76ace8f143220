"""Flow blocks: exact invertibility and log-determinants checked against autograd Jacobians."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from iadkit.components.flows import (
    AffineCoupling,
    ChannelStandardizer,
    FixedChannelMix,
    conv_subnet,
    coupling_flow,
    flow_nll,
    gaussian_log_likelihood,
    mlp_subnet,
    soft_clamp,
)


def _randomise(module: nn.Module, scale: float = 0.5) -> nn.Module:
    """Flows start as the identity (zero last layer); give them non-trivial weights to test."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def _conv_flow(channels: int = 4, steps: int = 3) -> nn.Module:
    return coupling_flow(
        channels, steps, lambda k, cin, cout: conv_subnet(cin, cout, 6, 3 if k % 2 == 0 else 1), clamp=2.0
    )


def _cond_flow(channels: int = 5, cond: int = 3, steps: int = 3) -> nn.Module:
    return coupling_flow(
        channels, steps, lambda k, cin, cout: mlp_subnet(cin, cout, 8), cond_channels=cond, mixing="orthogonal"
    )


def test_flow_starts_as_identity() -> None:
    flow = _conv_flow()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    z, logdet = flow.double()(x)
    # identity couplings, so z is x with channels permuted and log|det| = 0
    assert torch.allclose(z.pow(2).sum(), x.pow(2).sum())
    assert torch.allclose(logdet, torch.zeros(2, dtype=torch.float64))


def test_conv_flow_inverts_exactly() -> None:
    flow = _randomise(_conv_flow()).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    z, _ = flow(x)
    assert not torch.allclose(z, x)
    assert torch.allclose(flow.inverse(z), x, atol=1e-10)


def test_conditional_flow_inverts_exactly_and_depends_on_condition() -> None:
    flow = _randomise(_cond_flow()).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    c = torch.randn(7, 3, dtype=torch.float64)
    z, _ = flow(x, c)
    assert torch.allclose(flow.inverse(z, c), x, atol=1e-10)
    z_other, _ = flow(x, c + 1.0)
    assert not torch.allclose(z, z_other)


def _jacobian_logdet(fn, x: torch.Tensor) -> float:
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.reshape(x.shape)).reshape(-1), x.reshape(-1))
    sign, logabs = torch.linalg.slogdet(jac)
    assert sign != 0
    return float(logabs)


def test_conv_flow_logdet_matches_autograd_jacobian() -> None:
    flow = _randomise(_conv_flow(channels=4, steps=4)).double()
    x = torch.randn(1, 4, 2, 3, dtype=torch.float64)  # D = 24
    _, logdet = flow(x)
    expected = _jacobian_logdet(lambda v: flow(v)[0], x)
    assert float(logdet[0].detach()) == pytest.approx(expected, abs=1e-8)
    assert abs(expected) > 0.1  # the check is not trivially 0 == 0


def test_conditional_flow_logdet_matches_autograd_jacobian() -> None:
    flow = _randomise(_cond_flow(channels=5, cond=3, steps=4)).double()
    x = torch.randn(1, 5, dtype=torch.float64)
    c = torch.randn(1, 3, dtype=torch.float64)
    _, logdet = flow(x, c)
    expected = _jacobian_logdet(lambda v: flow(v, c)[0], x)
    assert float(logdet[0].detach()) == pytest.approx(expected, abs=1e-8)
    assert abs(expected) > 0.1


def test_orthogonal_mix_has_unit_determinant_and_inverts() -> None:
    mix = FixedChannelMix(6, kind="orthogonal", seed=3)
    w = mix.weight
    assert torch.allclose(w @ w.t(), torch.eye(6, dtype=torch.float64), atol=1e-12)
    x = torch.randn(4, 6, 2, 2)
    y, ld = mix(x)
    assert torch.allclose(mix.inverse(y), x, atol=1e-5)
    assert torch.equal(ld, torch.zeros(4))


def test_soft_clamp_bounds_scales() -> None:
    s = torch.tensor([-1e6, -1.0, 0.0, 1e-3, 1e6])
    out = soft_clamp(s, 2.0)
    assert out.abs().max() <= 2.0
    assert out[2] == 0 and out[3] == pytest.approx(2 / math.pi * 1e-3, rel=1e-5)  # slope 2/pi at 0
    assert torch.all(out[1:] >= out[:-1])  # monotone
    assert torch.equal(soft_clamp(s, 0.0), s)  # disabled


def test_coupling_needs_condition_when_conditional() -> None:
    block = AffineCoupling(4, lambda i, o: mlp_subnet(i, o, 4), cond_channels=2)
    with pytest.raises(ValueError, match="conditional"):
        block(torch.randn(2, 4))


def test_gaussian_log_likelihood_and_nll_by_hand() -> None:
    z = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    ll = gaussian_log_likelihood(z, torch.tensor([0.5, 0.0]))
    assert ll[0] == pytest.approx(-0.5 * 5 - math.log(2 * math.pi) + 0.5)
    assert ll[1] == pytest.approx(-math.log(2 * math.pi))
    # per-position log-likelihood of a map: channels reduced, spatial kept
    zmap = torch.zeros(1, 3, 2, 2)
    zmap[0, :, 0, 0] = 1.0
    llmap = gaussian_log_likelihood(zmap)
    assert llmap.shape == (1, 2, 2)
    assert llmap[0, 0, 0] == pytest.approx(-1.5 - 1.5 * math.log(2 * math.pi))
    assert flow_nll(z, torch.tensor([0.5, 0.0])) == pytest.approx(((2.5 - 0.5) + 0.0) / 2)


def test_channel_standardizer_fits_per_channel_statistics() -> None:
    x = torch.randn(50, 3, 4, 4) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1) + torch.tensor([0.0, 2.0, -3.0]).view(
        1, 3, 1, 1
    )
    norm = ChannelStandardizer(3)
    y = norm.fit(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-5)
    assert torch.allclose(norm(x[:2]), y[:2])  # the same fixed map afterwards
    vec = norm(x[:, :, 0, 0])  # also on vectors [N, C]
    assert torch.allclose(vec, y[:, :, 0, 0])


def test_sample_layer_norm_exports_with_the_same_numbers():
    """SampleLayerNorm normalises over its affine's shape (a constant for ONNX export): the
    same numbers as F.layer_norm over the map's own shape."""
    import torch.nn.functional as F

    from iadkit.components.flows import SampleLayerNorm

    norm = SampleLayerNorm()
    norm.initialise((4, 5, 6))
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(norm(x), F.layer_norm(x, tuple(x.shape[1:]), norm.weight, norm.bias, norm.eps))
    traced = torch.jit.trace(norm, (x[:1],), check_trace=False)
    assert torch.equal(traced(x), norm(x))
