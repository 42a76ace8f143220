"""Normalizing-flow building blocks shared by FastFlow (2-D flows on feature maps) and
CFLOW-AD (conditional flows on feature vectors).

A flow maps features x to latents z = f(x) with a tractable Jacobian, so the exact density
of x under a standard normal prior on z is (change of variables)

    log p(x) = -1/2 ||z||^2 - D/2 log(2 pi) + log |det df/dx|.

The blocks here are affine couplings (RealNVP / Glow): split the channels into (x1, x2), keep
x1, and transform x2 <- x2 * exp(s(x1, c)) + t(x1, c), where s, t come from an arbitrary
sub-network of x1 and an optional condition c. The Jacobian is triangular, so
log|det J| = sum(s). Scales are soft-clamped, s = (2 a / pi) * atan(s_raw / a), as in the
invertible-network literature (Ardizzone et al. 2019), because unbounded scales make flow
training diverge. Between couplings a fixed channel mixing (a permutation or a random
rotation, |det| = 1) lets every channel be transformed.

Tensors may be vectors [N, C] or maps [N, C, H, W]; channels are always dimension 1 and the
log-determinant is summed over all other non-batch dimensions, so it is per sample.
Sub-networks end in a zero-initialised layer so that every coupling starts as the identity
(as in Glow), which keeps the first iterations stable.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

SubnetFactory = Callable[[int, int], nn.Module]
"""`factory(in_channels, out_channels) -> module` building a coupling's sub-network."""

LOG_2PI = math.log(2.0 * math.pi)


def soft_clamp(s: torch.Tensor, clamp: float) -> torch.Tensor:
    """(2 a / pi) * atan(s / a): smooth, monotone, bounded by +-a (a <= 0 disables)."""
    if clamp <= 0:
        return s
    return (2.0 * clamp / math.pi) * torch.atan(s / clamp)


def _sum_except_batch(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(dim=1)


def _broadcast_condition(cond: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [N, Cc] condition is broadcast over the spatial dims of a [N, C, H, W] input."""
    if cond.ndim == 2 and like.ndim > 2:
        cond = cond.reshape(*cond.shape, *([1] * (like.ndim - 2))).expand(-1, -1, *like.shape[2:])
    return cond


class AffineCoupling(nn.Module):
    """One affine coupling: x2 -> x2 * exp(s) + t with (s, t) = subnet([x1, cond]).

    `channels` is split into the first ``channels // 2`` (kept, fed to the sub-network) and
    the rest (transformed). `cond_channels` > 0 makes it conditional (CFLOW-AD): the
    condition is concatenated to x1 along the channel dimension before the sub-network.
    """

    def __init__(
        self,
        channels: int,
        subnet_factory: SubnetFactory,
        *,
        cond_channels: int = 0,
        clamp: float = 2.0,
    ) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"an affine coupling needs at least 2 channels, got {channels}")
        self.channels = int(channels)
        self.split = self.channels // 2
        self.cond_channels = int(cond_channels)
        self.clamp = float(clamp)
        self.subnet = subnet_factory(self.split + self.cond_channels, 2 * (self.channels - self.split))

    def _scale_shift(self, x1: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cond_channels:
            if cond is None:
                raise ValueError("this coupling is conditional: pass cond")
            cond = _broadcast_condition(cond, x1)
            if cond.shape[1] != self.cond_channels:
                raise ValueError(f"condition has {cond.shape[1]} channels, expected {self.cond_channels}")
            x1 = torch.cat([x1, cond.to(x1.dtype)], dim=1)
        h = self.subnet(x1)
        s_raw, t = h.chunk(2, dim=1)
        return soft_clamp(s_raw, self.clamp), t

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (y, log|det dy/dx|) with the log-det per sample [N]."""
        x1, x2 = x[:, : self.split], x[:, self.split :]
        s, t = self._scale_shift(x1, cond)
        y2 = x2 * torch.exp(s) + t
        return torch.cat([x1, y2], dim=1), _sum_except_batch(s)

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        y1, y2 = y[:, : self.split], y[:, self.split :]
        s, t = self._scale_shift(y1, cond)
        return torch.cat([y1, (y2 - t) * torch.exp(-s)], dim=1)


class FixedChannelMix(nn.Module):
    """A fixed (not learned) invertible channel mixing with |det| = 1: log-det is 0.

    ``kind="permutation"`` shuffles channels (FastFlow's channel permutation);
    ``kind="orthogonal"`` applies a random rotation (a "soft" permutation that mixes every
    channel into every other). Drawn from `seed`, stored as a buffer so a saved model
    reloads exactly.
    """

    # buffers: `perm`/`inv_perm` for a permutation, `weight` for a rotation
    perm: torch.Tensor
    inv_perm: torch.Tensor
    weight: torch.Tensor

    def __init__(self, channels: int, *, kind: str = "permutation", seed: int = 0) -> None:
        super().__init__()
        if kind not in ("permutation", "orthogonal"):
            raise ValueError(f"kind must be 'permutation' or 'orthogonal', got {kind!r}")
        self.kind = kind
        g = torch.Generator().manual_seed(int(seed))
        if kind == "permutation":
            perm = torch.randperm(channels, generator=g)
            self.register_buffer("perm", perm)
            self.register_buffer("inv_perm", torch.argsort(perm))
        else:
            q, r = torch.linalg.qr(torch.randn(channels, channels, generator=g, dtype=torch.float64))
            q = q * torch.sign(torch.diagonal(r))[None]  # unique (Haar-distributed) rotation
            # float64, cast at use: a float32-rounded rotation is orthogonal only to ~1e-7,
            # which would make "log-det = 0" and the transpose-inverse inexact.
            self.register_buffer("weight", q)

    def _mix(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,nc...->no...", w.to(x.dtype), x)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        zero = x.new_zeros(x.shape[0])
        if self.kind == "permutation":
            return x[:, self.perm], zero
        return self._mix(x, self.weight), zero

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "permutation":
            return y[:, self.inv_perm]
        return self._mix(y, self.weight.t())


class Flow(nn.Module):
    """A chain of invertible blocks; `forward` returns (z, total log-det) per sample."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for block in self.blocks:
            x, ld = block(x, cond)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        for block in reversed(self.blocks):
            inverse = cast(Callable[..., torch.Tensor], block.inverse)  # every block of a flow has one
            z = inverse(z, cond)
        return z


def coupling_flow(
    channels: int,
    steps: int,
    subnet_factory: Callable[[int, int, int], nn.Module],
    *,
    cond_channels: int = 0,
    clamp: float = 2.0,
    mixing: str = "permutation",
    seed: int = 0,
) -> Flow:
    """`steps` x (affine coupling, fixed channel mixing).

    `subnet_factory(step, in_channels, out_channels)` gets the step index so sub-networks
    may alternate by step (FastFlow alternates 3x3 and 1x1 kernels).
    """
    blocks: list[nn.Module] = []
    for k in range(steps):
        blocks.append(
            AffineCoupling(
                channels,
                functools.partial(subnet_factory, k),  # (cin, cout) -> subnet_factory(k, cin, cout)
                cond_channels=cond_channels,
                clamp=clamp,
            )
        )
        blocks.append(FixedChannelMix(channels, kind=mixing, seed=seed * 1000 + k))
    return Flow(blocks)


class AllInOneCoupling(nn.Module):
    """One flow step as FrEIA's ``AllInOneBlock`` computes it — the step of the FastFlow
    reference implementation (gathierry/FastFlow, which anomalib copies), with its defaults
    (hard permutation, softplus global affine, no GIN, no Householder):

    1. split: x1 = the first ⌈C/2⌉ channels (kept), x2 = the other ⌊C/2⌋;
    2. a = 0.1 · subnet(x1) (the whole output scaled down, for stability);
       s = clamp · tanh(a_s), x2 ← x2 · exp(s) + a_t; log-det += Σ s;
    3. a learned per-channel global affine y = x · γ + β with γ = 0.1 · softplus_{β=0.5}(g),
       initialised to γ = 1, β = 0; log-det += H·W · Σ_c log γ_c;
    4. a fixed random permutation of the channels (seeded; log-det 0).

    Unlike `AffineCoupling`, the sub-network keeps its default initialisation (the 0.1 factor
    makes the step start near the identity).
    """

    perm: torch.Tensor  # buffer: the fixed channel permutation

    def __init__(self, channels: int, subnet_factory: SubnetFactory, *, clamp: float = 2.0, seed: int = 0) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling needs at least 2 channels, got {channels}")
        self.channels = int(channels)
        self.split = self.channels - self.channels // 2
        self.clamp = float(clamp)
        self.subnet = subnet_factory(self.split, 2 * (self.channels - self.split))
        init = 2.0 * math.log(math.exp(0.5 * 10.0 * 1.0) - 1.0)  # softplus^-1 of gamma = 1
        self.global_scale = nn.Parameter(torch.full((1, self.channels, 1, 1), init))
        self.global_offset = nn.Parameter(torch.zeros(1, self.channels, 1, 1))
        g = torch.Generator().manual_seed(int(seed))
        self.register_buffer("perm", torch.randperm(self.channels, generator=g))

    def _gamma(self) -> torch.Tensor:
        return 0.1 * F.softplus(self.global_scale, beta=0.5)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = x[:, : self.split], x[:, self.split :]
        a = 0.1 * self.subnet(x1)
        c2 = x2.shape[1]
        s = self.clamp * torch.tanh(a[:, :c2])
        y = torch.cat([x1, x2 * torch.exp(s) + a[:, c2:]], dim=1)
        gamma = self._gamma()
        y = y * gamma + self.global_offset
        n_pixels = y[0, :1].numel()
        logdet = _sum_except_batch(s) + n_pixels * torch.log(gamma).sum()
        return y[:, self.perm], logdet

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        y = y[:, torch.argsort(self.perm)]
        y = (y - self.global_offset) / self._gamma()
        x1, y2 = y[:, : self.split], y[:, self.split :]
        a = 0.1 * self.subnet(x1)
        c2 = y2.shape[1]
        s = self.clamp * torch.tanh(a[:, :c2])
        return torch.cat([x1, (y2 - a[:, c2:]) * torch.exp(-s)], dim=1)


class SampleLayerNorm(nn.Module):
    """``nn.LayerNorm`` over each sample's whole [C, H, W] map with an elementwise affine — the
    normalisation the FastFlow reference puts before each level's flow (trainable, and not part
    of the flow's Jacobian). The affine's shape is the feature map's, known only from the data:
    it is created at the first training batch (`initialise`), and a saved model restores it."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.empty(0))
        self.bias = nn.Parameter(torch.empty(0))

    def initialise(self, shape: Sequence[int]) -> None:
        self.weight = nn.Parameter(torch.ones(*shape, device=self.weight.device))
        self.bias = nn.Parameter(torch.zeros(*shape, device=self.bias.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(self.weight.shape) != tuple(x.shape[1:]):
            raise ValueError(
                f"the flow's layer norm was fitted on feature maps {tuple(self.weight.shape)}, got "
                f"{tuple(x.shape[1:])}: predict at the training image size"
            )
        # the affine's shape (equal to the map's, checked above) as the normalised shape: a
        # constant, where the map's own shape would be a traced value ONNX export cannot take
        return F.layer_norm(x, tuple(self.weight.shape), self.weight, self.bias, self.eps)


def level_flows(channels: Sequence[int], build: Callable[[int, int], Flow], seed: int) -> nn.ModuleList:
    """One flow per feature level, ``build(level_channels, seed + level)``.

    The flows are created under `seed` in a forked RNG, so the same seed always gives the
    same initial flows (reproducible fits) and the caller's global RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.ModuleList(build(c, seed + i) for i, c in enumerate(channels))


def zero_last_layer(module: nn.Module) -> nn.Module:
    """Zero the weights and bias of the last conv/linear layer (identity-start couplings)."""
    last = None
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            last = m
    if last is None:
        raise ValueError("sub-network has no Conv2d/Linear layer to zero-initialise")
    nn.init.zeros_(last.weight)
    if last.bias is not None:
        nn.init.zeros_(last.bias)
    return module


def conv_subnet(
    in_channels: int, out_channels: int, hidden_channels: int, kernel_size: int, *, zero_init: bool = True
) -> nn.Module:
    """FastFlow's sub-network: conv(k) -> ReLU -> conv(k), 'same' padding; the last conv starts
    at zero with `zero_init` (identity-start couplings) or keeps PyTorch's default initialisation
    (the reference's, whose `AllInOneCoupling` scales the output by 0.1 instead)."""
    pad = kernel_size // 2
    net = nn.Sequential(
        nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=pad),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=pad),
    )
    return zero_last_layer(net) if zero_init else net


def mlp_subnet(in_channels: int, out_channels: int, hidden_channels: int) -> nn.Module:
    """CFLOW-AD's sub-network on vectors: linear -> ReLU -> linear."""
    net = nn.Sequential(
        nn.Linear(in_channels, hidden_channels),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_channels, out_channels),
    )
    return zero_last_layer(net)


class ChannelStandardizer(nn.Module):
    """x -> (x - mean_c) / std_c with per-channel statistics fitted once on good training
    features (buffers, saved with the model).

    Used in front of a flow: a fixed invertible affine map has a constant Jacobian, so it
    does not change which inputs are more likely, but it puts features of any backbone on
    the unit scale the identity-initialised flow starts from, so short schedules converge.
    """

    mean: torch.Tensor  # buffers
    std: torch.Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> torch.Tensor:
        """Fit on x [N, C, ...] (channels in dimension 1) and return x standardised."""
        dims = [0, *range(2, x.ndim)]
        self.mean.copy_(x.mean(dim=dims))
        self.std.copy_(x.std(dim=dims).clamp_min(1e-6))
        return self(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)


FeatureFn = Callable[[torch.Tensor], dict[str, torch.Tensor]]
"""A frozen backbone: images [B, 3, H, W] -> feature maps by layer name."""


@torch.no_grad()
def standardized_features(
    backbone: FeatureFn, layers: Sequence[str], standardizers: Iterable[nn.Module], images: torch.Tensor
) -> list[torch.Tensor]:
    """The backbone's maps at `layers`, each through its level's fitted `ChannelStandardizer`:
    what the flows of FastFlow and CFLOW-AD see at test time."""
    feats = backbone(images)
    return [norm(feats[layer]) for norm, layer in zip(standardizers, layers)]


def gaussian_log_likelihood(z: torch.Tensor, logdet: torch.Tensor | None = None, *, dim: int = 1) -> torch.Tensor:
    """log N(z; 0, I) summed over `dim` (+ logdet): the exact log p(x) of a flow.

    For maps [N, C, H, W] with dim=1 this is the per-position log-likelihood [N, H, W]
    (pass a matching per-position logdet if any).
    """
    d = z.shape[dim]
    ll = -0.5 * (z**2).sum(dim=dim) - 0.5 * d * LOG_2PI
    return ll if logdet is None else ll + logdet


def flow_nll(z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1/2 ||z||^2 - log|det J| (constants dropped): the training loss."""
    return (0.5 * _sum_except_batch(z**2) - logdet).mean()


__all__ = [
    "LOG_2PI",
    "AffineCoupling",
    "AllInOneCoupling",
    "ChannelStandardizer",
    "FeatureFn",
    "FixedChannelMix",
    "Flow",
    "SampleLayerNorm",
    "SubnetFactory",
    "conv_subnet",
    "coupling_flow",
    "flow_nll",
    "gaussian_log_likelihood",
    "level_flows",
    "mlp_subnet",
    "soft_clamp",
    "standardized_features",
    "zero_last_layer",
]
