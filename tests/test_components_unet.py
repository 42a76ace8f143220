"""DRAEM's sub-networks (parameter counts recounted by hand, reference key names, size checks)
and the generic U-Net used by the diffusion model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from iadkit.components.unet import (
    DiscriminativeSubNetwork,
    InputSizeError,
    ReconstructiveSubNetwork,
    UNet,
    init_draem_weights,
)
from iadkit.errors import IadkitError


def conv(cin: int, cout: int) -> int:
    return 9 * cin * cout + cout  # 3x3 kernel + bias


def bn(c: int) -> int:
    return 2 * c  # weight and bias (running statistics are buffers)


def double(cin: int, cout: int, mid: int | None = None) -> int:
    mid = cout if mid is None else mid
    return conv(cin, mid) + bn(mid) + conv(mid, cout) + bn(cout)


def up(cin: int, cout: int) -> int:
    return conv(cin, cout) + bn(cout)


def reconstructive_count(b: int, cin: int = 3, cout: int = 3) -> int:
    encoder = double(cin, b) + double(b, 2 * b) + double(2 * b, 4 * b) + double(4 * b, 8 * b) + double(8 * b, 8 * b)
    decoder = (
        up(8 * b, 8 * b)
        + double(8 * b, 4 * b, 8 * b)
        + up(4 * b, 4 * b)
        + double(4 * b, 2 * b, 4 * b)
        + up(2 * b, 2 * b)
        + double(2 * b, b, 2 * b)
        + up(b, b)
        + double(b, b)
        + conv(b, cout)
    )
    return encoder + decoder


def discriminative_count(b: int, cin: int = 6, cout: int = 2) -> int:
    encoder = (
        double(cin, b)
        + double(b, 2 * b)
        + double(2 * b, 4 * b)
        + double(4 * b, 8 * b)
        + double(8 * b, 8 * b)
        + double(8 * b, 8 * b)
    )
    decoder = (
        up(8 * b, 8 * b)
        + double(16 * b, 8 * b)
        + up(8 * b, 4 * b)
        + double(12 * b, 4 * b)
        + up(4 * b, 2 * b)
        + double(6 * b, 2 * b)
        + up(2 * b, b)
        + double(3 * b, b)
        + up(b, b)
        + double(2 * b, b)
        + conv(b, cout)
    )
    return encoder + decoder


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_at_the_papers_widths() -> None:
    with torch.device("meta"):  # no memory for 97 M parameters
        rec = ReconstructiveSubNetwork()
        disc = DiscriminativeSubNetwork(in_channels=6, out_channels=2)
    assert _count(rec) == reconstructive_count(128) == 69_048_579
    assert _count(disc) == discriminative_count(64) == 28_374_146
    small = ReconstructiveSubNetwork(base_width=4)
    assert _count(small) == reconstructive_count(4)


def test_parameter_names_follow_the_reference() -> None:
    with torch.device("meta"):
        rec = ReconstructiveSubNetwork().state_dict()
        disc = DiscriminativeSubNetwork().state_dict()
    expected_rec = {
        "encoder.block1.0.weight": (128, 3, 3, 3),
        "encoder.block1.1.running_mean": (128,),
        "encoder.block5.3.weight": (1024, 1024, 3, 3),
        "decoder.up1.1.weight": (1024, 1024, 3, 3),
        "decoder.db1.3.weight": (512, 1024, 3, 3),
        "decoder.db3.4.bias": (128,),
        "decoder.fin_out.0.weight": (3, 128, 3, 3),
    }
    expected_disc = {
        "encoder_segment.block6.3.weight": (512, 512, 3, 3),
        "decoder_segment.up_b.1.weight": (512, 512, 3, 3),
        "decoder_segment.db_b.0.weight": (512, 1024, 3, 3),
        "decoder_segment.db3.0.weight": (64, 192, 3, 3),
        "decoder_segment.db4.0.weight": (64, 128, 3, 3),
        "decoder_segment.fin_out.0.weight": (2, 64, 3, 3),
    }
    for state, expected in ((rec, expected_rec), (disc, expected_disc)):
        for key, shape in expected.items():
            assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith(("encoder.mp", "encoder.block6")) for k in rec)


def test_draem_networks_run_at_small_widths_and_reject_bad_sizes() -> None:
    torch.manual_seed(0)
    rec = ReconstructiveSubNetwork(base_width=4).eval()
    disc = DiscriminativeSubNetwork(base_width=4).eval()
    x = torch.rand(2, 3, 32, 64)
    r = rec(x)
    assert r.shape == x.shape
    assert disc(torch.cat([r, x], dim=1)).shape == (2, 2, 32, 64)
    with pytest.raises(InputSizeError, match="divisible by 16") as err:
        rec(torch.rand(1, 3, 40, 64))
    assert isinstance(err.value, IadkitError) and "got 40x64" in str(err.value)
    with pytest.raises(InputSizeError, match="divisible by 32"):
        disc(torch.rand(1, 6, 48, 64))


def test_discriminative_network_uses_its_skip_connections() -> None:
    # a change in one input pixel reaches the output at full resolution through block1's skip:
    # the output 1 px away moves, far more than it could through the 32x down-sampled path alone
    torch.manual_seed(0)
    disc = DiscriminativeSubNetwork(base_width=4).eval()
    x = torch.rand(1, 6, 64, 64)
    y = x.clone()
    y[0, :, 30, 30] += 1.0
    delta = (disc(y) - disc(x)).abs()[0].sum(0)
    assert delta[30, 31] > 0 and delta[30, 31] > 10 * delta[30, 60]


def test_init_draem_weights_is_seeded_and_has_the_reference_statistics() -> None:
    a = init_draem_weights(ReconstructiveSubNetwork(base_width=8), torch.Generator().manual_seed(0))
    b = init_draem_weights(ReconstructiveSubNetwork(base_width=8), torch.Generator().manual_seed(0))
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), key
    conv_w = torch.cat([m.weight.flatten() for m in a.modules() if isinstance(m, nn.Conv2d)])
    bn_w = torch.cat([m.weight for m in a.modules() if isinstance(m, nn.BatchNorm2d)])
    bn_b = torch.cat([m.bias for m in a.modules() if isinstance(m, nn.BatchNorm2d)])
    assert conv_w.std().item() == pytest.approx(0.02, rel=0.02) and abs(conv_w.mean().item()) < 1e-3
    first = a.encoder.block1[0]  # conv biases: PyTorch's default range for fan-in 3 * 3 * 3
    assert first.bias.abs().max() <= 1 / 27**0.5 and first.bias.std() > 0
    assert bn_w.mean().item() == pytest.approx(1.0, abs=0.01) and torch.all(bn_b == 0)


# -- generic U-Net ------------------------------------------------------------------------------
def _randomise_zero_layers(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if torch.all(p == 0):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def test_unet_shapes_and_embedding_conditioning() -> None:
    torch.manual_seed(0)
    net = UNet(
        3, 2, base_width=8, channel_mults=(1, 2, 2), num_res_blocks=2, embed_dim=16, attention_levels=(1, 2), groups=4
    )
    x = torch.rand(2, 3, 16, 24)
    emb = torch.randn(2, 16)
    assert torch.all(net(x, emb) == 0)  # zero-initialised output conv, as ADM
    _randomise_zero_layers(net)
    out = net(x, emb)
    assert out.shape == (2, 2, 16, 24)
    other = net(x, torch.randn(2, 16))
    assert not torch.allclose(out, other)  # the embedding reaches the output
    assert torch.allclose(net(x[:1], emb[:1]), out[:1], atol=1e-5)  # samples are independent
    with pytest.raises(ValueError, match="emb"):
        net(x)
    with pytest.raises(InputSizeError, match="divisible by 4"):
        net(torch.rand(1, 3, 18, 24), emb[:1])
    plain = UNet(1, 1, base_width=4, channel_mults=(1,), groups=2)
    assert plain(torch.rand(1, 1, 5, 7)).shape == (1, 1, 5, 7)  # one level: any size
