"""UniAD pieces: the neighbour mask (counted by hand; a query gets exactly zero weight on its
neighbours), layers that cannot see their own neighbourhood, jitter statistics, position embeddings."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from iadkit.components.transformer import (
    LearnedPositionEmbedding,
    NeighborMaskedTransformer,
    QueryDecoderLayer,
    SinePositionEmbedding,
    TransformerEncoderLayer,
    feature_jitter,
    init_uniad_weights,
    neighbor_mask,
)


def _token(r: int, c: int, w: int = 14) -> int:
    return r * w + c


def test_neighbor_mask_blocks_the_7x7_window_clipped_at_the_borders() -> None:
    mask = neighbor_mask((14, 14), (7, 7))
    assert mask.shape == (196, 196) and mask.dtype == torch.bool and torch.equal(mask, mask.T)
    centre = mask[_token(7, 7)].view(14, 14)
    assert centre.sum() == 49 and centre[4:11, 4:11].all()
    corner = mask[_token(0, 0)].view(14, 14)
    assert corner.sum() == 16 and corner[:4, :4].all()  # rows/cols 0..3
    assert mask[_token(7, 7), _token(7, 10)] and not mask[_token(7, 7), _token(7, 11)]
    # per axis, sum over positions of the clipped window length: 14 * 7 - 2 * (3 + 2 + 1) = 86
    assert mask.sum() == 86 * 86
    with pytest.raises(ValueError, match="odd"):
        neighbor_mask((14, 14), (6, 6))
    with pytest.raises(ValueError, match="nothing to attend to"):
        neighbor_mask((3, 3), (5, 5))


def test_masked_attention_gives_exactly_zero_weight_to_neighbours() -> None:
    torch.manual_seed(0)
    mask = neighbor_mask((14, 14), (7, 7))
    attn = nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 196, 32)
    _, weights = attn(x, x, x, attn_mask=mask, need_weights=True, average_attn_weights=False)
    assert weights.shape == (2, 4, 196, 196)
    blocked = mask.expand_as(weights)
    assert torch.all(weights[blocked] == 0)
    assert torch.all(weights[~blocked] > 0)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 196))


def test_encoder_layer_output_does_not_depend_on_the_neighbours() -> None:
    torch.manual_seed(0)
    layer = TransformerEncoderLayer(32, heads=4, ff_dim=64).eval()
    mask = neighbor_mask((8, 8), (3, 3))
    pos = torch.randn(64, 32)
    x = torch.randn(1, 64, 32)
    q = _token(4, 4, 8)
    near = x.clone()
    near[0, _token(3, 5, 8)] += 5.0  # inside q's 3x3 window
    far = x.clone()
    far[0, _token(0, 0, 8)] += 5.0
    base = layer(x, pos, mask)
    assert torch.allclose(layer(near, pos, mask)[0, q], base[0, q], atol=1e-6)
    assert not torch.allclose(layer(far, pos, mask)[0, q], base[0, q], atol=1e-3)
    assert not torch.allclose(layer(near, pos, None)[0, q], base[0, q], atol=1e-3)  # unmasked: it does


def test_query_decoder_layer_never_sees_its_own_position() -> None:
    torch.manual_seed(0)
    layer = QueryDecoderLayer(32, num_queries=64, heads=4, ff_dim=64).eval()
    mask = neighbor_mask((8, 8), (3, 3))
    pos = torch.randn(64, 32)
    memory, previous = torch.randn(1, 64, 32), torch.randn(1, 64, 32)
    q = _token(2, 6, 8)
    base = layer(previous, memory, pos, mask, mask)[0, q]
    for changed in (memory, previous):  # the token itself changes, in either input
        saved = changed[0, q].clone()
        changed[0, q] += 5.0
        assert torch.allclose(layer(previous, memory, pos, mask, mask)[0, q], base, atol=1e-6)
        changed[0, q] = saved
    memory[0, _token(7, 0, 8)] += 5.0
    assert not torch.allclose(layer(previous, memory, pos, mask, mask)[0, q], base, atol=1e-3)


def test_feature_jitter_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    c = 64
    tokens = torch.randn(4, 196, c, generator=g) * torch.linspace(0.5, 3.0, 196)[None, :, None]
    jittered = feature_jitter(tokens, scale=20.0, prob=1.0, generator=g)
    noise = jittered - tokens
    unit = noise / (tokens.norm(dim=-1, keepdim=True) / c)  # should be 20 * N(0, 1)
    assert unit.mean().item() == pytest.approx(0.0, abs=0.1)
    assert unit.std().item() == pytest.approx(20.0, rel=0.02)
    # noise grows in proportion to the token norm (tokens scaled 0.5 .. 3 along the sequence)
    norms = tokens.norm(dim=-1)
    ratio = noise[:, -20:].pow(2).mean().sqrt() / noise[:, :20].pow(2).mean().sqrt()
    expected = norms[:, -20:].pow(2).mean().sqrt() / norms[:, :20].pow(2).mean().sqrt()
    assert expected > 4 and ratio.item() == pytest.approx(expected.item(), rel=0.05)
    assert feature_jitter(tokens, prob=0.0, generator=g) is tokens
    a = feature_jitter(tokens, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, feature_jitter(tokens, generator=torch.Generator().manual_seed(3)))


def test_sine_position_embedding_by_hand() -> None:
    h, w, dim = 4, 6, 16
    table = SinePositionEmbedding((h, w), dim)()
    assert table.shape == (h * w, dim)
    f = dim // 2
    r, c = 2, 5
    y = (r + 1) / h * 2 * math.pi
    x = (c + 1) / w * 2 * math.pi
    row = table[r * w + c]
    for j in range(f // 2):
        period = 10000 ** (2 * j / f)
        assert row[2 * j].item() == pytest.approx(math.sin(y / period), abs=1e-5)
        assert row[2 * j + 1].item() == pytest.approx(math.cos(y / period), abs=1e-5)
        assert row[f + 2 * j].item() == pytest.approx(math.sin(x / period), abs=1e-5)
        assert row[f + 2 * j + 1].item() == pytest.approx(math.cos(x / period), abs=1e-5)


def test_learned_position_embedding_layout() -> None:
    emb = LearnedPositionEmbedding((3, 5), 8)
    table = emb()
    assert table.shape == (15, 8)
    assert torch.equal(table[1 * 5 + 4], torch.cat([emb.col_embed.weight[4], emb.row_embed.weight[1]]))
    assert emb.row_embed.weight.min() >= 0 and emb.row_embed.weight.max() < 1
    table.sum().backward()
    assert emb.row_embed.weight.grad is not None


def test_transformer_reconstructs_token_shapes_and_initialises_like_uniad() -> None:
    torch.manual_seed(0)
    net = NeighborMaskedTransformer(
        32, (6, 6), heads=4, encoder_layers=2, decoder_layers=2, ff_dim=64, neighbor_size=(3, 3)
    )
    init_uniad_weights(net, torch.Generator().manual_seed(0))
    lin = net.encoder[0].linear1
    bound = math.sqrt(6 / (lin.in_features + lin.out_features))
    assert lin.weight.abs().max() <= bound and torch.all(lin.bias == 0)
    net.eval()
    x = torch.randn(2, 36, 32)
    out = net(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.allclose(net(x[:1]), out[:1], atol=1e-5)
    sine = NeighborMaskedTransformer(
        32, (6, 6), heads=4, encoder_layers=1, decoder_layers=1, ff_dim=64, neighbor_size=(3, 3), position="sine"
    )
    assert sine.eval()(x).shape == x.shape
    with pytest.raises(ValueError, match="nothing to attend to"):
        NeighborMaskedTransformer(32, (6, 6), heads=4)  # UniAD's 7x7 window on a 6x6 grid
    with pytest.raises(ValueError, match="36"):
        net(torch.randn(1, 35, 32))
    # the paper's size (4 + 4 layers, 256-d, 8 heads, FFN 1024, 14 x 14 tokens), counted by hand
    full = NeighborMaskedTransformer()
    d, ff, n = 256, 1024, 196
    attention = 3 * d * d + 3 * d + d * d + d
    ffn = d * ff + ff + ff * d + d
    encoder_layer = attention + ffn + 2 * 2 * d
    decoder_layer = n * d + 2 * attention + ffn + 3 * 2 * d
    positions = 14 * d // 2 + 14 * d // 2
    expected = 4 * encoder_layer + 4 * decoder_layer + 2 * d + positions
    assert sum(p.numel() for p in full.parameters()) == expected == 7_577_600
    assert full.mask.shape == (196, 196)
