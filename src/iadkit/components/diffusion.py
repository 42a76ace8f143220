"""Denoising diffusion for reconstruction-based anomaly detection (DDAD / DiffusionAD style).

A diffusion model trained on good images only can *repair* a test image: noise it to an
intermediate step t (which drowns small defects but keeps the layout), then denoise. DDAD
(Mousakhan, Brox, Tayyub, "Anomaly Detection with Conditioned Denoising Diffusion Models",
2023) also conditions every denoising step on the input image, so the reconstruction stays
close to it where it is normal.

Pieces:

- `NoiseSchedule`: betas (DDPM's linear 1e-4 .. 0.02 over T = 1000 steps, or the cosine
  schedule of Nichol & Dhariwal 2021), alpha-bar, `q_sample` (x_t from x_0), the DDPM posterior
  q(x_{t-1} | x_t, x_0), and the DDIM step (Song et al. 2021) from step t to any earlier step.
- `ddad_conditioned_noise`: DDAD's conditioning of the predicted noise on the target image.
- `ddim_reconstruct`: noise an image to step t and walk back to x_0 with (conditioned) DDIM.
- `sinusoidal_embedding` and `DenoisingUNet`: a timestep-conditioned `iadkit.components.unet.UNet`.

Timesteps are 0-based, t = 0 .. T - 1, with alpha_bar[t] = prod_{s <= t} (1 - beta_s); the
step "t = -1" means the clean image (alpha_bar = 1), as in DDAD's and DDIM's code.

===============================  ====================================  ===================================
paper (DDAD)                     reference code (arimousa/DDAD)        ours
===============================  ====================================  ===================================
linear betas 1e-4 .. 0.02,       ``np.linspace(beta_start, beta_end,   `NoiseSchedule.linear` (T, beta
T = 1000                         trajectory_steps)``                   range as parameters)
noise the input to t, denoise    noised to alpha_bar[250], then steps  noised to alpha_bar[t_start], then
with DDIM in jumps of `skip`     t = 225, 200, ..., 0, -1 (the first   steps t_start, t_start - skip, ...,
                                 step's t is one jump below the        -1 (the step matches the noise
                                 noise level)                          level)
conditioning weight w            eps_hat = eps - sqrt(1-a) w (y_t -    `ddad_conditioned_noise`, the same
                                 x_t), y_t = sqrt(a) y + sqrt(1-a) eps
eta                              eta = 1 in the config                 ``eta`` parameter
ADM U-Net, base 64, mults        guided-diffusion ``UNetModel``        `DenoisingUNet` on `UNet` (same
(1,1,2,2,4,4), attention at                                            block types; widths, depth and
32/16/8 px, 4 heads                                                    attention are parameters)
===============================  ====================================  ===================================
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from iadkit.components.unet import UNet

DDPM_STEPS = 1000
DDPM_BETA_RANGE = (1e-4, 0.02)
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, ...] broadcastable against `like`, in its dtype and device."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class NoiseSchedule:
    """A diffusion noise schedule: ``betas[t]`` for t = 0 .. T - 1 (float64 on the CPU).

    Build it with `linear` or `cosine`. All methods take timesteps as an int or a [B] integer
    tensor (one step per sample) and work on any device and float dtype.

    Parameters
    ----------
    betas
        [T] variances of the forward steps, each in (0, 1).
    """

    betas: torch.Tensor

    def __post_init__(self) -> None:
        b = self.betas
        if b.ndim != 1 or b.numel() < 1 or not bool(((b > 0) & (b < 1)).all()):
            raise ValueError("betas must be a non-empty 1-D tensor with values in (0, 1)")
        object.__setattr__(self, "betas", b.to(torch.float64).cpu())

    @classmethod
    def linear(
        cls, steps: int = DDPM_STEPS, beta_start: float = DDPM_BETA_RANGE[0], beta_end: float = DDPM_BETA_RANGE[1]
    ) -> NoiseSchedule:
        """DDPM's schedule (Ho et al. 2020): betas evenly spaced from `beta_start` to `beta_end`.

        Parameters
        ----------
        steps
            T (1000 in DDPM and DDAD).
        beta_start, beta_end
            First and last beta (1e-4 and 0.02).
        """
        return cls(torch.linspace(beta_start, beta_end, steps, dtype=torch.float64))

    @classmethod
    def cosine(
        cls, steps: int = DDPM_STEPS, offset: float = COSINE_OFFSET, max_beta: float = COSINE_MAX_BETA
    ) -> NoiseSchedule:
        """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021): with
        ``f(u) = cos^2((u + s) / (1 + s) * pi / 2)``, ``beta_t = min(1 - f((t+1)/T) / f(t/T), max_beta)``,
        so alpha_bar[t] = f((t+1)/T) / f(0) wherever no beta is clipped.

        Parameters
        ----------
        steps
            T.
        offset
            s (0.008), keeps beta_0 from being vanishingly small.
        max_beta
            Upper clip of the betas (0.999), against the singularity at t = T.
        """
        u = torch.arange(steps + 1, dtype=torch.float64) / steps
        f = torch.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2
        return cls((1 - f[1:] / f[:-1]).clamp(max=max_beta))

    @property
    def steps(self) -> int:
        """T, the number of forward steps."""
        return self.betas.numel()

    @property
    def alpha_bar(self) -> torch.Tensor:
        """[T] cumulative products prod_{s <= t} (1 - beta_s): the signal fraction left at step t."""
        return torch.cumprod(1.0 - self.betas, dim=0)

    def alpha_bar_at(self, t: int | torch.Tensor) -> torch.Tensor:
        """alpha_bar at timesteps `t` (int or [B] integers in [-1, T - 1]; -1 gives 1), float64 [B]."""
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1).cpu()
        if bool(((t < -1) | (t >= self.steps)).any()):
            raise ValueError(f"timesteps must lie in [-1, {self.steps - 1}], got {t.tolist()}")
        padded = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar])
        return padded[t + 1]

    def q_sample(self, x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward noising ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise``.

        Parameters
        ----------
        x0
            Clean batch [B, ...].
        t
            Timestep(s), one per sample or one for all.
        noise
            Standard normal noise shaped like `x0`.
        """
        a = _per_sample(self.alpha_bar_at(t), x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Invert `q_sample` for x_0 given (predicted) noise: ``(x_t - sqrt(1 - a) eps) / sqrt(a)``.

        Parameters
        ----------
        x_t
            Noisy batch at step t.
        t
            Timestep(s).
        noise
            The (predicted) noise in `x_t`.
        """
        a = _per_sample(self.alpha_bar_at(t), x_t)
        return (x_t - (1 - a).sqrt() * noise) / a.sqrt()

    def posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DDPM posterior q(x_{t-1} | x_t, x_0) = N(mean, var) for t >= 1 (Ho et al. eq. 7).

        ``mean = beta_t sqrt(a_{t-1}) / (1 - a_t) x_0 + (1 - a_{t-1}) sqrt(1 - beta_t) / (1 - a_t) x_t``
        and ``var = beta_t (1 - a_{t-1}) / (1 - a_t)``, with a = alpha_bar. Returns (mean, var);
        var has shape [B, 1, ...].

        Parameters
        ----------
        x0
            Clean (or predicted clean) batch.
        x_t
            Noisy batch at step t.
        t
            Timestep(s) >= 1.
        """
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1)
        if bool((t < 1).any()):
            raise ValueError("the DDPM posterior is defined for t >= 1 (x_0 itself at t = 0)")
        a_t, a_prev = self.alpha_bar_at(t), self.alpha_bar_at(t - 1)
        beta = self.betas[t.cpu()]
        coef_x0 = beta * a_prev.sqrt() / (1 - a_t)
        coef_xt = (1 - a_prev) * (1 - beta).sqrt() / (1 - a_t)
        var = beta * (1 - a_prev) / (1 - a_t)
        mean = _per_sample(coef_x0, x0) * x0 + _per_sample(coef_xt, x_t) * x_t
        return mean, _per_sample(var, x_t)

    def ddim_step(
        self,
        x_t: torch.Tensor,
        noise: torch.Tensor,
        t: int | torch.Tensor,
        t_next: int | torch.Tensor,
        *,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        z: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One DDIM step from step t to an earlier step t_next (Song et al. 2021, eq. 12).

        With ``x0 = predict_x0(x_t, t, noise)`` and
        ``sigma = eta sqrt((1 - a_next) / (1 - a_t) (1 - a_t / a_next))``:
        ``x_next = sqrt(a_next) x0 + sqrt(1 - a_next - sigma^2) noise + sigma z``, z ~ N(0, I).
        eta = 0 is deterministic; eta = 1 with t_next = t - 1 is DDPM's ancestral step
        (sigma^2 equals the posterior variance). t_next = -1 returns x0.

        Parameters
        ----------
        x_t
            Batch at step t.
        noise
            The (predicted or conditioned) noise in `x_t`.
        t, t_next
            Current and target timesteps, t_next < t.
        eta
            Stochasticity (0: DDIM, 1: DDPM-like; DDAD uses 1).
        generator
            Source of z when eta > 0 (drawn on the CPU, then moved to x_t's device).
        z
            The standard normal draw to use when eta > 0, broadcastable to `x_t` (default:
            drawn from `generator`).
        """
        if bool((torch.as_tensor(t) < 0).any()):
            raise ValueError("ddim_step starts from a noisy step t >= 0")
        a_t = _per_sample(self.alpha_bar_at(t), x_t)
        a_next = _per_sample(self.alpha_bar_at(t_next), x_t)
        if bool((a_next < a_t).any()):
            raise ValueError("ddim_step goes backwards in time: t_next must be smaller than t")
        x0 = self.predict_x0(x_t, t, noise)
        sigma = eta * ((1 - a_next) / (1 - a_t) * (1 - a_t / a_next)).sqrt()
        out = a_next.sqrt() * x0 + (1 - a_next - sigma**2).clamp_min(0).sqrt() * noise
        if eta > 0:
            if z is None:
                z = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype).to(x_t.device)
            out = out + sigma * z.to(device=x_t.device, dtype=x_t.dtype)
        return out


def ddad_conditioned_noise(
    noise: torch.Tensor, x_t: torch.Tensor, target: torch.Tensor, alpha_bar_t: torch.Tensor, weight: float
) -> torch.Tensor:
    """DDAD's conditioning: pull the predicted noise towards the target image y.

    ``y_t = sqrt(a) y + sqrt(1 - a) eps`` (the target noised with the predicted noise) and
    ``eps_hat = eps - sqrt(1 - a) w (y_t - x_t)``; w = 0 is unconditioned denoising.

    Parameters
    ----------
    noise
        Predicted noise eps for `x_t`.
    x_t
        Current noisy batch.
    target
        The image to stay close to (the test image) y.
    alpha_bar_t
        alpha_bar at the current step, [B] or broadcastable.
    weight
        w (DDAD's config: 2 to 3 depending on the data set).
    """
    a = _per_sample(alpha_bar_t.reshape(-1), x_t) if alpha_bar_t.ndim <= 1 else alpha_bar_t
    y_t = a.sqrt() * target + (1 - a).sqrt() * noise
    return noise - (1 - a).sqrt() * weight * (y_t - x_t)


def sinusoidal_embedding(t: torch.Tensor, dim: int, *, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style timestep embedding [B] -> [B, dim]: ``[sin(t f_k), cos(t f_k)]`` with
    ``f_k = max_period^(-k / (dim/2))``, k = 0 .. dim/2 - 1 (DDPM / DDAD).

    Parameters
    ----------
    t
        [B] timesteps (int or float).
    dim
        Embedding size, even.
    max_period
        Longest wavelength (10000).
    """
    if dim % 2:
        raise ValueError(f"the sinusoidal embedding needs an even size, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float().reshape(-1, 1) * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class DenoisingUNet(nn.Module):
    """A noise-predicting U-Net eps(x_t, t): `UNet` conditioned on a timestep embedding.

    The timestep goes through `sinusoidal_embedding` (size `base_width`) and a 2-layer MLP
    with SiLU to 4 * `base_width` (as ADM), which every residual block adds to its features.

    Parameters
    ----------
    in_channels
        Image channels (the output predicts noise of the same shape).
    base_width, channel_mults, num_res_blocks, attention_levels, heads, dropout, groups
        See `UNet`. DDAD: 64, (1, 1, 2, 2, 4, 4), 2, the levels at 32/16/8 px, 4 heads.
        The defaults are CPU-sized.
    """

    def __init__(
        self,
        in_channels: int = 3,
        *,
        base_width: int = 32,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attention_levels: Sequence[int] = (2,),
        heads: int = 1,
        dropout: float = 0.0,
        groups: int = 32,
    ) -> None:
        super().__init__()
        if base_width % 2:
            raise ValueError(f"base_width must be even (it is the sinusoidal embedding size), got {base_width}")
        self.base_width = base_width
        embed_dim = 4 * base_width
        self.time_mlp = nn.Sequential(nn.Linear(base_width, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.unet = UNet(
            in_channels,
            in_channels,
            base_width=base_width,
            channel_mults=channel_mults,
            num_res_blocks=num_res_blocks,
            embed_dim=embed_dim,
            attention_levels=attention_levels,
            heads=heads,
            dropout=dropout,
            groups=groups,
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predicted noise [B, C, H, W] for the batch `x_t` at timesteps `t` ([B] or scalar)."""
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        emb = self.time_mlp(sinusoidal_embedding(t, self.base_width))
        return self.unet(x_t, emb)


@torch.no_grad()
def ddim_reconstruct(
    model: nn.Module,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    t_start: int,
    skip: int,
    weight: float = 0.0,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    target: torch.Tensor | None = None,
    shared_noise: bool = False,
) -> torch.Tensor:
    """Noise `x` to step `t_start`, then denoise back to step -1 in jumps of `skip`.

    Every step predicts the noise with ``model(x_t, t)``, conditions it on `target` (default:
    `x` itself) with `ddad_conditioned_noise` (weight w; 0 for plain DDIM) and takes a
    `NoiseSchedule.ddim_step`. Steps: t_start, t_start - skip, ... (while >= 0), then -1.

    Parameters
    ----------
    model
        Noise predictor eps(x_t, t) (e.g. `DenoisingUNet`), in eval mode.
    x
        Images to reconstruct [B, C, H, W], in the model's value range (DDAD: [-1, 1]).
    schedule
        The schedule the model was trained with.
    t_start
        Noise level to start from (DDAD: 250 of 1000).
    skip
        Steps per jump (DDAD: 25).
    weight
        DDAD's conditioning weight w.
    eta
        DDIM stochasticity (DDAD: 1).
    generator
        Source of the initial noise and of the per-step noise when eta > 0.
    target
        The image each step is conditioned on, shaped like `x` (DDAD's domain adaptation
        reconstructs one good image conditioned on another); None: `x`.
    shared_noise
        Draw every noise tensor for one sample and use it for the whole batch, so that a
        sample's reconstruction does not depend on which batch it comes in.
    """
    if not 0 <= t_start < schedule.steps or skip < 1:
        raise ValueError(f"need 0 <= t_start < {schedule.steps} and skip >= 1, got t_start={t_start}, skip={skip}")
    if target is None:
        target = x
    elif target.shape != x.shape:
        raise ValueError(f"target {tuple(target.shape)} must have the shape of x {tuple(x.shape)}")
    shape = (1, *x.shape[1:]) if shared_noise else tuple(x.shape)

    def draw() -> torch.Tensor:
        noise = torch.randn(shape, generator=generator, dtype=x.dtype)
        if torch.jit.is_tracing():
            # ONNX cannot hold a random generator: an exported graph keeps the seeded draws
            # as constants (batch-independent with shared_noise, so the same numbers as here)
            noise = torch.from_numpy(noise.numpy().copy())
        return noise.to(x.device).expand_as(x)

    x_t = schedule.q_sample(x, t_start, draw())
    times = [*range(t_start, -1, -skip), -1]
    n = x.shape[0]
    for t, t_next in itertools.pairwise(times):
        t_batch = torch.full((n,), t, device=x.device, dtype=torch.long)
        eps = model(x_t, t_batch)
        if weight:
            eps = ddad_conditioned_noise(eps, x_t, target, schedule.alpha_bar_at(t), weight)
        z = draw() if eta > 0 else None
        x_t = schedule.ddim_step(x_t, eps, t, t_next, eta=eta, z=z)
    return x_t


__all__ = [
    "DDPM_BETA_RANGE",
    "DDPM_STEPS",
    "DenoisingUNet",
    "NoiseSchedule",
    "ddad_conditioned_noise",
    "ddim_reconstruct",
    "sinusoidal_embedding",
]
