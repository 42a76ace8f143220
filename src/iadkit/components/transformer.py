"""UniAD's transformer pieces: neighbour-masked attention, a layer-wise query decoder, feature
jittering and 2-D position embeddings.

UniAD (You et al., "A Unified Model for Multi-class Anomaly Detection", NeurIPS 2022)
reconstructs frozen backbone features with a transformer and scores by the reconstruction
error. A plain transformer learns an "identical shortcut" (it copies its input, anomalies
included); UniAD blocks it three ways, all here:

- *Neighbour-masked attention* (`neighbor_mask`): a token may not attend to the k x k tokens
  around it (itself included), so it must be rebuilt from farther context.
- *Layer-wise query decoder* (`QueryDecoderLayer`): every decoder layer starts from its own
  learned query embedding, not from the input tokens, and reads the encoder output and the
  previous layer's output through (masked) attention only.
- *Feature jittering* (`feature_jitter`): during training, Gaussian noise proportional to each
  token's norm is added to the input features, and the network learns to denoise.

=============================  ==========================================  ==============================
paper                          reference code (zhiyuanyou/UniAD)           ours
=============================  ==========================================  ==============================
neighbour mask                 7x7 at 14x14 tokens, in the encoder and     `neighbor_mask`, same window
                               both decoder attentions (mask = [True,      (clipped at the borders);
                               True, True])                                `NeighborMaskedTransformer`
                                                                           ``mask_in`` flags
encoder layer                  DETR post-norm layer: q = k = x + pos,      `TransformerEncoderLayer`,
                               MHA, dropout, LayerNorm, FFN (ReLU),        same (pre-norm as option);
                               LayerNorm; 4 layers, 256-d, 8 heads,        tokens [B, N, C]
                               FFN 1024, dropout 0.1
query decoder layer            learned query embedding per layer; attn 1:  `QueryDecoderLayer`, same
                               q = query + pos, k = encoder out + pos;     order and residuals
                               attn 2: q = . + pos, k = previous layer
                               out + pos; FFN; LayerNorm after each; a
                               final LayerNorm after the stack
feature jitter                 noise ~ N(0, (scale ||f|| / C)^2), scale    `feature_jitter`, same
                               20, applied with probability 1 at training
position embedding             learned (row/column tables, uniform init)   `LearnedPositionEmbedding`,
                               or DETR sine (normalised, 2 pi)             `SinePositionEmbedding`
initialisation                 xavier-uniform Linear weights, zero biases  `init_uniad_weights`
=============================  ==========================================  ==============================

Tokens are batch-first here, [B, N, C] with N = H * W in row-major order (the reference uses
[N, B, C]). Masks are bool [N, N], True where attention is *not* allowed (PyTorch's meaning).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

UNIAD_NEIGHBOR_SIZE = (7, 7)
UNIAD_JITTER_SCALE = 20.0
UNIAD_JITTER_PROB = 1.0


def neighbor_mask(
    feature_size: tuple[int, int],
    neighbor_size: tuple[int, int] = UNIAD_NEIGHBOR_SIZE,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """UniAD's neighbourhood mask, bool [H*W, H*W]: entry (q, k) is True (blocked) when token k
    lies in the ``neighbor_size`` window centred on token q (clipped at the borders).

    Parameters
    ----------
    feature_size
        (H, W) of the token grid (UniAD: 14 x 14).
    neighbor_size
        (h, w) of the blocked window, odd (UniAD: 7 x 7).
    device
        Where the mask lives.
    """
    h, w = feature_size
    hm, wm = neighbor_size
    if hm % 2 == 0 or wm % 2 == 0 or hm < 1 or wm < 1:
        raise ValueError(f"neighbor_size must be odd and positive, got {neighbor_size}")
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    near_rows = (rows[:, None] - rows[None, :]).abs() <= hm // 2
    near_cols = (cols[:, None] - cols[None, :]).abs() <= wm // 2
    mask = near_rows & near_cols
    if bool(mask.all(dim=1).any()):  # softmax over no keys would give NaN
        raise ValueError(f"a {hm}x{wm} neighbourhood leaves some tokens of the {h}x{w} grid nothing to attend to")
    return mask


def feature_jitter(
    tokens: torch.Tensor,
    *,
    scale: float = UNIAD_JITTER_SCALE,
    prob: float = UNIAD_JITTER_PROB,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """UniAD's feature jittering: ``f + eps``, eps ~ N(0, (scale * ||f|| / C)^2) per token.

    With probability `prob` (one draw for the whole batch, as the reference) the noise is
    added; otherwise `tokens` is returned as is. C is the channel count, ||f|| the token's L2
    norm over channels.

    Parameters
    ----------
    tokens
        [..., C] features (the last dim is channels).
    scale
        alpha (UniAD: 20).
    prob
        Probability of jittering (UniAD: 1).
    generator
        Source of randomness (drawn on the CPU, then moved to the tokens' device).
    """
    if float(torch.rand((), generator=generator)) >= prob:
        return tokens
    c = tokens.shape[-1]
    sigma = tokens.norm(dim=-1, keepdim=True) / c * scale
    noise = torch.randn(tokens.shape, generator=generator, dtype=tokens.dtype).to(tokens.device)
    return tokens + noise * sigma


class SinePositionEmbedding(nn.Module):
    """DETR's fixed 2-D sine embedding (normalised coordinates, scale 2 pi), [H*W, dim].

    For row r (1-based, divided by H, times 2 pi) = y and column c likewise = x, the first
    dim/2 entries encode y and the last dim/2 encode x, each as
    ``[sin(y / T^(0/F)), cos(y / T^(0/F)), sin(y / T^(2/F)), cos(y / T^(2/F)), ...]``, F = dim/2.

    Parameters
    ----------
    feature_size
        (H, W) of the token grid.
    dim
        Embedding size (the transformer width), divisible by 4.
    temperature
        T (10000).
    """

    table: torch.Tensor  # buffer: the [H*W, dim] embedding

    def __init__(self, feature_size: tuple[int, int], dim: int, temperature: float = 10000.0) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"the sine position embedding needs a size divisible by 4, got {dim}")
        h, w = feature_size
        f = dim // 2
        eps = 1e-6
        y = torch.arange(1, h + 1, dtype=torch.float32)[:, None].expand(h, w) / (h + eps) * 2 * math.pi
        x = torch.arange(1, w + 1, dtype=torch.float32)[None, :].expand(h, w) / (w + eps) * 2 * math.pi
        freqs = temperature ** (2 * (torch.arange(f) // 2).float() / f)

        def encode(v: torch.Tensor) -> torch.Tensor:
            angles = v[..., None] / freqs
            return torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1).flatten(-2)

        self.register_buffer("table", torch.cat([encode(y), encode(x)], dim=-1).reshape(h * w, dim), persistent=False)

    def forward(self) -> torch.Tensor:
        """The [H*W, dim] embedding, row-major."""
        return self.table


class LearnedPositionEmbedding(nn.Module):
    """UniAD's learned 2-D embedding: a column table and a row table of dim/2 each, [H*W, dim];
    token (r, c) gets ``[col[c], row[r]]``. Both tables start uniform in [0, 1) (the reference).

    Parameters
    ----------
    feature_size
        (H, W) of the token grid.
    dim
        Embedding size, even.
    """

    def __init__(self, feature_size: tuple[int, int], dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"the learned position embedding needs an even size, got {dim}")
        self.feature_size = (feature_size[0], feature_size[1])
        self.row_embed = nn.Embedding(feature_size[0], dim // 2)
        self.col_embed = nn.Embedding(feature_size[1], dim // 2)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self) -> torch.Tensor:
        """The [H*W, dim] embedding, row-major."""
        h, w = self.feature_size
        cols = self.col_embed.weight[None, :, :].expand(h, w, -1)
        rows = self.row_embed.weight[:, None, :].expand(h, w, -1)
        return torch.cat([cols, rows], dim=-1).reshape(h * w, -1)


def _activation(name: str):
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    raise ValueError(f"activation must be 'relu' or 'gelu', got {name!r}")


class TransformerEncoderLayer(nn.Module):
    """A DETR-style encoder layer: self-attention with the position embedding added to queries
    and keys (not values), then a 2-layer feed-forward network; residual + LayerNorm around each
    (post-norm, UniAD's setting) or LayerNorm first (``normalize_before=True``).

    Parameters
    ----------
    dim
        Token width (UniAD: 256).
    heads
        Attention heads (8).
    ff_dim
        Hidden width of the feed-forward network (1024).
    dropout
        Dropout on attention weights and after each sub-layer (0.1).
    activation
        'relu' (UniAD) or 'gelu'.
    normalize_before
        Pre-norm instead of post-norm.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        ff_dim: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ff_dim)
        self.linear2 = nn.Linear(ff_dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout, self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def _attend(self, x: torch.Tensor, pos: torch.Tensor | float, mask: torch.Tensor | None) -> torch.Tensor:
        # the position embedding goes into queries and keys only (DETR)
        return self.self_attn(x + pos, x + pos, x, attn_mask=mask, need_weights=False)[0]

    def forward(
        self, src: torch.Tensor, pos: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """src [B, N, C], pos [N, C] or [B, N, C], mask bool [N, N] (True = blocked) -> [B, N, C]."""
        pos_: torch.Tensor | float = 0.0 if pos is None else pos
        if self.normalize_before:
            src = src + self.dropout1(self._attend(self.norm1(src), pos_, mask))
            return src + self.dropout2(self._ffn(self.norm2(src)))
        src = self.norm1(src + self.dropout1(self._attend(src, pos_, mask)))
        return self.norm2(src + self.dropout2(self._ffn(src)))


class QueryDecoderLayer(nn.Module):
    """UniAD's decoder layer: a learned query per token position, refined by two attentions.

    1. queries (learned + pos) attend to the encoder output (`memory`, keys + pos);
    2. the result (+ pos) attends to the previous decoder layer's output (`previous`; the
       encoder output for the first layer);
    3. a feed-forward network. Residual + dropout + LayerNorm after each (post-norm), or
       LayerNorm before each (``normalize_before=True``).

    The input tokens never enter through a residual path: that is what stops the decoder from
    copying its input.

    Parameters
    ----------
    dim
        Token width.
    num_queries
        Number of token positions H * W (one learned query each).
    heads, ff_dim, dropout, activation, normalize_before
        As `TransformerEncoderLayer`.
    """

    def __init__(
        self,
        dim: int,
        num_queries: int,
        heads: int = 8,
        ff_dim: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        self.learned_embed = nn.Embedding(num_queries, dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)  # reads `memory`
        self.multihead_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)  # reads `previous`
        self.linear1 = nn.Linear(dim, ff_dim)
        self.linear2 = nn.Linear(ff_dim, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def forward(
        self,
        previous: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        previous_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """previous, memory [B, N, C]; pos [N, C]; masks bool [N, N] (True = blocked) -> [B, N, C].

        `memory_mask` applies to attention 1 (UniAD's ``tgt_mask``), `previous_mask` to
        attention 2 (UniAD's ``memory_mask``).
        """
        pos_: torch.Tensor | float = 0.0 if pos is None else pos

        def read_memory(q: torch.Tensor) -> torch.Tensor:
            return self.self_attn(q + pos_, memory + pos_, memory, attn_mask=memory_mask, need_weights=False)[0]

        def read_previous(q: torch.Tensor) -> torch.Tensor:
            return self.multihead_attn(
                q + pos_, previous + pos_, previous, attn_mask=previous_mask, need_weights=False
            )[0]

        def ffn(q: torch.Tensor) -> torch.Tensor:
            return self.linear2(self.dropout(self.activation(self.linear1(q))))

        query = self.learned_embed.weight[None].expand(memory.shape[0], -1, -1)
        if self.normalize_before:
            query = query + self.dropout1(read_memory(self.norm1(query)))
            query = query + self.dropout2(read_previous(self.norm2(query)))
            return query + self.dropout3(ffn(self.norm3(query)))
        query = self.norm1(query + self.dropout1(read_memory(query)))
        query = self.norm2(query + self.dropout2(read_previous(query)))
        return self.norm3(query + self.dropout3(ffn(query)))


class NeighborMaskedTransformer(nn.Module):
    """UniAD's reconstruction transformer: masked encoder stack + layer-wise query decoder stack.

    Input and output are tokens of the same width [B, H*W, dim] (UniAD projects the backbone
    features to `dim` before and back after; that projection belongs to the method).

    Parameters
    ----------
    dim
        Token width (UniAD: 256).
    feature_size
        (H, W) token grid (UniAD: 14 x 14).
    heads, ff_dim, dropout, activation, normalize_before
        Layer settings (UniAD: 8, 1024, 0.1, relu, post-norm).
    encoder_layers, decoder_layers
        Stack depths (UniAD: 4 and 4).
    neighbor_size
        Blocked window (UniAD: 7 x 7); None disables masking.
    mask_in
        Whether to mask (encoder, decoder attention 1, decoder attention 2); UniAD: all three.
    position
        'learned' (UniAD's MVTec config) or 'sine'.
    """

    mask: torch.Tensor | None  # buffer: the neighbour mask, None without masking

    def __init__(
        self,
        dim: int = 256,
        feature_size: tuple[int, int] = (14, 14),
        *,
        heads: int = 8,
        encoder_layers: int = 4,
        decoder_layers: int = 4,
        ff_dim: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
        neighbor_size: tuple[int, int] | None = UNIAD_NEIGHBOR_SIZE,
        mask_in: tuple[bool, bool, bool] = (True, True, True),
        position: str = "learned",
    ) -> None:
        super().__init__()
        self.feature_size = (feature_size[0], feature_size[1])
        n = feature_size[0] * feature_size[1]
        if position == "learned":
            self.pos_embed: nn.Module = LearnedPositionEmbedding(feature_size, dim)
        elif position == "sine":
            self.pos_embed = SinePositionEmbedding(feature_size, dim)
        else:
            raise ValueError(f"position must be 'learned' or 'sine', got {position!r}")
        enc = TransformerEncoderLayer(dim, heads, ff_dim, dropout, activation, normalize_before)
        dec = QueryDecoderLayer(dim, n, heads, ff_dim, dropout, activation, normalize_before)
        self.encoder = nn.ModuleList([copy.deepcopy(enc) for _ in range(encoder_layers)])
        self.encoder_norm = nn.LayerNorm(dim) if normalize_before else None
        self.decoder = nn.ModuleList([copy.deepcopy(dec) for _ in range(decoder_layers)])
        self.decoder_norm = nn.LayerNorm(dim)
        mask = neighbor_mask(self.feature_size, neighbor_size) if neighbor_size is not None else None
        self.register_buffer("mask", mask, persistent=False)
        self.mask_in = tuple(mask_in)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, H*W, dim] -> reconstructed tokens [B, H*W, dim]."""
        n = self.feature_size[0] * self.feature_size[1]
        if tokens.ndim != 3 or tokens.shape[1] != n:
            raise ValueError(f"expected tokens [B, {n}, C] for a {self.feature_size} grid, got {tuple(tokens.shape)}")
        pos = self.pos_embed()
        m = self.mask
        enc_mask, dec_mask1, dec_mask2 = (m if use and m is not None else None for use in self.mask_in)
        memory = tokens
        for layer in self.encoder:
            memory = layer(memory, pos, enc_mask)
        if self.encoder_norm is not None:
            memory = self.encoder_norm(memory)
        out = memory
        for layer in self.decoder:
            out = layer(out, memory, pos, memory_mask=dec_mask1, previous_mask=dec_mask2)
        return self.decoder_norm(out)


@torch.no_grad()
def init_uniad_weights(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """UniAD's initialisation: xavier-uniform weights and zero biases for every Linear and Conv2d
    (attention output projections included); other parameters keep their defaults. Returns `module`.

    Parameters
    ----------
    module
        Network to initialise in place.
    generator
        Source of randomness.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight, generator=generator)
            if m.bias is not None:
                m.bias.zero_()
    return module


__all__ = [
    "UNIAD_JITTER_PROB",
    "UNIAD_JITTER_SCALE",
    "UNIAD_NEIGHBOR_SIZE",
    "LearnedPositionEmbedding",
    "NeighborMaskedTransformer",
    "QueryDecoderLayer",
    "SinePositionEmbedding",
    "TransformerEncoderLayer",
    "feature_jitter",
    "init_uniad_weights",
    "neighbor_mask",
]
