"""Diffusion components: schedules, q_sample statistics, the DDPM posterior, exact DDIM inversion
with the true noise, DDAD's conditioning and the timestep-conditioned U-Net."""

from __future__ import annotations

import math

import pytest
import torch

from iadkit.components.diffusion import (
    DenoisingUNet,
    NoiseSchedule,
    ddad_conditioned_noise,
    ddim_reconstruct,
    sinusoidal_embedding,
)


def test_linear_and_cosine_schedules() -> None:
    lin = NoiseSchedule.linear()
    assert lin.steps == 1000
    assert lin.betas[0].item() == pytest.approx(1e-4) and lin.betas[-1].item() == pytest.approx(0.02)
    assert lin.alpha_bar[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)  # prod(1 - beta) over 1000 steps
    assert lin.alpha_bar_at(-1).item() == 1.0 and lin.alpha_bar_at(0).item() == pytest.approx(1 - 1e-4)
    cos = NoiseSchedule.cosine(100)

    def f(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    for t in (0, 10, 50, 90):
        assert cos.alpha_bar[t].item() == pytest.approx(f((t + 1) / 100) / f(0), rel=1e-9)
    assert cos.betas.max().item() == pytest.approx(0.999)  # last beta clipped
    with pytest.raises(ValueError, match=r"\[-1, 999\]"):
        lin.alpha_bar_at(1000)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        NoiseSchedule(torch.tensor([0.0, 0.5]))


def test_q_sample_mean_and_variance() -> None:
    schedule = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).repeat(100_000, 1)
    t = torch.tensor([50, 300, 900]).repeat_interleave(x0.shape[0] // 3 + 1)[: x0.shape[0]]
    for step in (50, 300, 900):
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        xt = schedule.q_sample(x0, step, noise)
        a = schedule.alpha_bar_at(step).item()
        se = math.sqrt((1 - a) / x0.shape[0])
        assert torch.allclose(xt.mean(0), math.sqrt(a) * x0[0], atol=5 * se)
        assert torch.allclose(xt.var(0), torch.full((3,), 1 - a, dtype=torch.float64), rtol=0.02)
    # one timestep per sample
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    per_sample = schedule.q_sample(x0, t, noise)
    a = schedule.alpha_bar_at(t)[:, None]
    assert torch.allclose(per_sample, a.sqrt() * x0 + (1 - a).sqrt() * noise)


def test_ddim_step_with_the_true_noise_recovers_x0_exactly() -> None:
    schedule = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([250, 999])
    xt = schedule.q_sample(x0, t, noise)
    assert torch.allclose(schedule.ddim_step(xt, noise, t, -1), x0, atol=1e-10, rtol=0)
    assert torch.allclose(schedule.predict_x0(xt, t, noise), x0, atol=1e-10, rtol=0)
    # deterministic DDIM to an intermediate step lands on q_sample with the same noise
    assert torch.allclose(schedule.ddim_step(xt, noise, t, 100), schedule.q_sample(x0, 100, noise), atol=1e-10, rtol=0)
    # t_next = -1 even with eta = 1: no noise is added at the last step
    assert torch.allclose(schedule.ddim_step(xt, noise, t, -1, eta=1.0, generator=g), x0, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="backwards"):
        schedule.ddim_step(xt, noise, 100, 200)


def test_posterior_matches_ddpm_and_the_marginals() -> None:
    schedule = NoiseSchedule.linear()
    t = 400
    a_t, a_prev = schedule.alpha_bar_at(t).item(), schedule.alpha_bar_at(t - 1).item()
    beta = schedule.betas[t].item()
    x0 = torch.full((200_000, 1), 0.7, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    xt = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    mean, var = schedule.posterior(x0, xt, t)
    assert var.flatten()[0].item() == pytest.approx(beta * (1 - a_prev) / (1 - a_t))
    # sampling x_{t-1} from the posterior must reproduce the marginal q(x_{t-1} | x_0)
    x_prev = mean + var.sqrt() * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    assert x_prev.mean().item() == pytest.approx(math.sqrt(a_prev) * 0.7, abs=5 * math.sqrt((1 - a_prev) / 200_000))
    assert x_prev.var().item() == pytest.approx(1 - a_prev, rel=0.02)
    # DDIM with eta = 1 from t to t - 1 uses the posterior variance as its noise level
    zero_noise = torch.zeros(4, 1, dtype=torch.float64)
    stepped = schedule.ddim_step(xt[:4], zero_noise, t, t - 1, eta=1.0, generator=torch.Generator().manual_seed(0))
    z = torch.randn((4, 1), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base = math.sqrt(a_prev) * xt[:4] / math.sqrt(a_t)  # x0_pred with zero noise, then re-noised with zero noise
    assert torch.allclose(stepped - base, math.sqrt(beta * (1 - a_prev) / (1 - a_t)) * z, atol=1e-12)


def test_ddad_conditioning_by_hand() -> None:
    eps, x_t, y = torch.tensor([0.3]), torch.tensor([1.0]), torch.tensor([0.2])
    a = torch.tensor([0.64])
    y_t = 0.8 * 0.2 + 0.6 * 0.3
    expected = 0.3 - 0.6 * 2.0 * (y_t - 1.0)
    assert ddad_conditioned_noise(eps, x_t, y, a, 2.0).item() == pytest.approx(expected)
    assert torch.equal(ddad_conditioned_noise(eps, x_t, y, a, 0.0), eps)


class OracleDenoiser(torch.nn.Module):
    """The exact noise predictor for a data set of one image: eps = (x_t - sqrt(a) x*) / sqrt(1 - a)."""

    def __init__(self, good: torch.Tensor, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.good, self.schedule = good, schedule

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.schedule.alpha_bar_at(t).to(x_t).view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * self.good) / (1 - a).sqrt()


def test_ddim_reconstruct_repairs_an_image_with_a_perfect_model() -> None:
    schedule = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    good = torch.rand(1, 3, 8, 8, generator=g, dtype=torch.float64)
    defective = good.clone()
    defective[..., 2:4, 2:4] = 1.0
    oracle = OracleDenoiser(good, schedule)
    repaired = ddim_reconstruct(oracle, defective, schedule, t_start=250, skip=25, generator=g)
    assert torch.allclose(repaired, good, atol=1e-9)

    # DDAD's conditioning pulls the reconstruction towards the input
    def conditioned(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return ddim_reconstruct(oracle, defective, schedule, t_start=250, skip=25, weight=3.0, generator=g)

    pulled = conditioned(0)
    gap = (pulled - defective).abs()[..., 2:4, 2:4].mean()
    assert gap < (repaired - defective).abs()[..., 2:4, 2:4].mean()
    assert torch.equal(pulled, conditioned(0))


class ZeroDenoiser(torch.nn.Module):
    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x_t)


def test_ddim_reconstruct_target_and_shared_noise() -> None:
    """`target` conditions on another image (DDAD's domain adaptation); `shared_noise` makes a
    sample's reconstruction independent of the batch it comes in."""
    schedule = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(1)
    good = torch.rand(1, 3, 8, 8, generator=g, dtype=torch.float64)
    oracle = OracleDenoiser(good, schedule)
    batch = torch.rand(3, 3, 8, 8, generator=g, dtype=torch.float64)

    def run(x: torch.Tensor, model: torch.nn.Module = oracle, **kw) -> torch.Tensor:
        return ddim_reconstruct(
            model,
            x,
            schedule,
            t_start=250,
            skip=50,
            weight=2.0,
            eta=1.0,
            generator=torch.Generator().manual_seed(7),
            **kw,
        )

    assert torch.equal(run(batch), run(batch, target=batch))
    # conditioned on another image, the result moves towards that image
    other = torch.zeros_like(batch)
    assert (run(batch, target=other) - other).abs().mean() < (run(batch) - other).abs().mean()
    # shared noise: the second image alone gives what it gave inside the batch (a model that
    # predicts no noise leaves the drawn noise in the result, so any difference would show)
    blind = ZeroDenoiser()
    alone, inside = run(batch[1:2], blind, shared_noise=True), run(batch, blind, shared_noise=True)[1:2]
    torch.testing.assert_close(alone, inside, rtol=0, atol=1e-12)
    assert not torch.allclose(run(batch[1:2], blind), run(batch, blind)[1:2])  # per-sample draws differ
    with pytest.raises(ValueError, match="shape"):
        run(batch, target=batch[:1])


def test_sinusoidal_embedding_and_denoising_unet() -> None:
    emb = sinusoidal_embedding(torch.tensor([0, 7]), 8)
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    freqs = [10000 ** (-k / 4) for k in range(4)]
    expected = [math.sin(7 * f) for f in freqs] + [math.cos(7 * f) for f in freqs]
    assert emb[1].tolist() == pytest.approx(expected, abs=1e-6)
    torch.manual_seed(0)
    net = DenoisingUNet(3, base_width=8, channel_mults=(1, 2), attention_levels=(1,), groups=4)
    x = torch.randn(2, 3, 16, 16)
    out = net(x, torch.tensor([10, 900]))
    assert out.shape == x.shape
    assert net(x, torch.tensor(10)).shape == x.shape  # one timestep for the batch
    assert torch.all(out == 0)  # ADM's zero-initialised output conv
    with torch.no_grad():  # as after training: the zero-initialised convs get weights, t now matters
        for p in net.parameters():
            if torch.all(p == 0):
                p.normal_(0, 0.1)
    assert not torch.allclose(net(x, torch.tensor([10, 10])), net(x, torch.tensor([900, 900])))
