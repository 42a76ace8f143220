"""Losses shared by the methods: feature matching, image similarity, segmentation, deviation.

Feature-matching losses of the distillation and hypersphere families:

- *Teacher–student feature matching* (STFPM, RD4AD). Both papers compare a frozen encoder's
  feature vector with a trained network's vector at every position of several pyramid levels,
  through a scale-free distance. STFPM writes it as ``½‖t̂ − ŝ‖²`` of the L2-normalised
  vectors, RD4AD as ``1 − cos(t, s)``. The two are the same number, because for unit vectors
  ``½‖t̂ − ŝ‖² = ½(2 − 2 t̂·ŝ) = 1 − cos(t, s)``; so both methods share `cosine_distance_map`
  (per position, also their anomaly map). The training losses differ in their constant and
  averaging, which set the effective step at a given learning rate:
  `multilevel_cosine_loss` = Σ_l mean_{b,h,w}(1 − cos) — the papers' per-position formulas
  averaged over the batch; `pyramid_matching_loss` = Σ_l mean_{b,h,w} ‖t̂ − ŝ‖² = 2x that —
  STFPM's authors' code (no ½); `flattened_cosine_loss` = Σ_l mean_b(1 − cos(vec t, vec s)) —
  RD4AD's official code and anomalib, the cosine of each whole C·H·W map.

- *Coupled hyperspheres* (CFA): a soft-boundary attraction of each adapted patch feature to
  its K nearest memory features and a repulsion from the next J (hard negatives).

Losses of the reconstruction and supervised families (FIELD.md §2):

- *SSIM* (Wang et al. 2004) with an 11x11 Gaussian window of sigma 1.5, C1 = (0.01 L)^2,
  C2 = (0.03 L)^2 for a data range L: `ssim_map` (the local map; 1 - map is SSIM-AE's anomaly
  map), `ssim` (its mean) and `ssim_loss` = 1 - `ssim` (SSIM-AE; DRAEM's L2 + SSIM loss).
- *Focal loss* (Lin et al. 2017): `focal_loss` is DRAEM's segmentation loss on the softmax of
  the discriminative network's 2 channels (gamma 2, no alpha, label smoothing 1e-5);
  `binary_focal_loss_with_logits` is open-iad's binary variant (alpha 1, gamma 2, on BCE).
- *Deviation loss* (DevNet, Pang et al. 2019): `deviation_loss`, scores standardised by a
  reference set drawn from N(0, 1), with margin a = 5 for the labelled anomalies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F


def cosine_distance_map(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-position ``1 − cos(a, b)`` over channels: [B, C, H, W] x2 -> [B, H, W] in [0, 2].

    Equal to STFPM's ``½‖â − b̂‖²`` of the L2-normalised vectors (see the module docstring).
    """
    if a.shape != b.shape:
        raise ValueError(f"feature maps to compare differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return 1.0 - F.cosine_similarity(a, b, dim=1, eps=eps)


def multilevel_cosine_loss(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Σ over levels of the mean (over batch and positions) of `cosine_distance_map`.

    `pairs` holds one (target, prediction) pair of [B, C_l, H_l, W_l] maps per pyramid level.
    Every level weighs the same whatever its resolution (the 1/(H_l W_l) of both papers).
    """
    if not pairs:
        raise ValueError("multilevel_cosine_loss needs at least one pair of feature maps")
    return torch.stack([cosine_distance_map(t, s).mean() for t, s in pairs]).sum()


def pyramid_matching_loss(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """STFPM as its authors' code trains it: Σ over levels of the mean over batch and positions
    of ``‖t̂ − ŝ‖²`` (squared distance of the channel-normalised vectors, without the paper's ½),
    i.e. 2x `multilevel_cosine_loss`."""
    if not pairs:
        raise ValueError("pyramid_matching_loss needs at least one pair of feature maps")
    return torch.stack([2.0 * cosine_distance_map(t, s).mean() for t, s in pairs]).sum()


def flattened_cosine_loss(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """RD4AD's official loss: per sample, 1 − cos between the whole flattened C·H·W maps, averaged
    over the batch and summed over levels. One similarity per map: positions with large feature
    norms dominate it, unlike the per-position form."""
    if not pairs:
        raise ValueError("flattened_cosine_loss needs at least one pair of feature maps")
    return torch.stack([(1.0 - F.cosine_similarity(t.flatten(1), s.flatten(1), dim=1)).mean() for t, s in pairs]).sum()


def coupled_hypersphere_loss(
    sq_dists: torch.Tensor,
    *,
    k: int,
    j: int,
    radius: torch.Tensor | float,
    alpha: float,
    nu: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CFA's L_att and L_rep from the squared distances of each feature to its nearest memory
    features, sorted ascending: [..., >= k + j].

    - ``L_att = 1/ν · mean max(0, D(φ(p), c^k) − r²)`` over the k nearest: pulls a normal
      feature inside the hypersphere of radius r around each of its k nearest memory features.
    - ``L_rep = 1/ν · mean max(0, r² − D(φ(p), c^j) − α)`` over the next j (the hard
      negatives, ranks k+1 … k+j): pushes those out of the hypersphere, with margin α.

    Both hinge terms are as in the paper (Lee et al. 2022, eqs. 3–4); the 1/ν scale (ν = 1e-3)
    comes from the Deep-SVDD soft-boundary objective CFA builds on and is the authors' value.
    Returns (L_att, L_rep); the training loss is their sum.
    """
    if sq_dists.shape[-1] < k + j:
        raise ValueError(f"need distances to at least k + j = {k + j} memory features, got {sq_dists.shape[-1]}")
    r2 = radius**2 if isinstance(radius, torch.Tensor) else float(radius) ** 2
    attract = sq_dists[..., :k] - r2
    repel = r2 - sq_dists[..., k : k + j] - alpha
    l_att = attract.clamp_min(0).mean() / nu
    l_rep = repel.clamp_min(0).mean() / nu
    return l_att, l_rep


# -- SSIM -----------------------------------------------------------------------------------------
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SsimPadding = Literal["symmetric", "zeros", "valid"]


def gaussian_window(
    size: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Normalised 1-D Gaussian of odd length `size` (taps at -size//2 .. size//2), sum 1.

    The 2-D SSIM window is its outer product; at the defaults it is the 11-tap filter of
    Wang et al. and of scikit-image (``truncate=3.5``: radius int(3.5 * 1.5 + 0.5) = 5).

    Parameters
    ----------
    size
        Number of taps, odd.
    sigma
        Standard deviation in pixels.
    dtype, device
        Of the returned tensor.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"the SSIM window size must be odd and positive, got {size}")
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def _pad_symmetric(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mirror padding that repeats the edge pixel (d c b a | a b c d), i.e. scipy's 'reflect'."""
    x = torch.cat([x[..., :r].flip(-1), x, x[..., -r:].flip(-1)], dim=-1)
    return torch.cat([x[..., :r, :].flip(-2), x, x[..., -r:, :].flip(-2)], dim=-2)


def _gaussian_filter(x: torch.Tensor, window: torch.Tensor, padding: SsimPadding) -> torch.Tensor:
    """Separable depthwise filtering of [B, C, H, W] with a 1-D window along both axes."""
    r = window.numel() // 2
    if padding == "symmetric":
        x = _pad_symmetric(x, r)
    elif padding == "zeros":
        x = F.pad(x, (r, r, r, r))
    c, k = int(x.shape[1]), window.numel()  # int: a concrete kernel shape for the ONNX exporter
    x = F.conv2d(x, window.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, window.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def ssim_map(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    data_range: float = 1.0,
    window_size: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
    k1: float = SSIM_K1,
    k2: float = SSIM_K2,
    padding: SsimPadding = "symmetric",
) -> torch.Tensor:
    """Local SSIM of two image batches, per channel: [B, C, H, W] x2 -> [B, C, H', W'].

    ``SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))`` with
    Gaussian-weighted local means, (population) variances and covariance, C1 = (k1 L)^2,
    C2 = (k2 L)^2 and L = `data_range`.

    Border handling (`padding`) is the only choice the definitions leave open:

    - ``"symmetric"`` (default): mirror the image (edge pixel repeated), as scikit-image's
      ``structural_similarity`` (scipy's 'reflect' mode); the map is H x W and equals
      scikit-image's full map everywhere.
    - ``"zeros"``: zero padding, as DRAEM's reference SSIM loss (and pytorch-ssim); H x W,
      values within `window_size // 2` of the border differ from the other two.
    - ``"valid"``: no padding (Wang et al.'s MATLAB code); (H - w + 1) x (W - w + 1).

    The three agree in the interior. scikit-image's mean SSIM is the mean of the symmetric
    map without its 5-pixel border; ``ssim_map(...)[..., 5:-5, 5:-5].mean()`` reproduces it.

    Parameters
    ----------
    x, y
        Image batches [B, C, H, W] of the same shape (any C; channels are compared separately).
    data_range
        L, the value range of the images (1 for [0, 1], 255 for 8-bit). DRAEM's reference
        infers it from the first image as (255 if max > 128 else 1) - (-1 if min < -0.5
        else 0), which changes with the content; we take it explicitly.
    window_size, sigma
        The Gaussian window (11, 1.5: Wang et al.).
    k1, k2
        The stabilising constants (0.01, 0.03).
    padding
        Border handling, see above.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"ssim needs two [B, C, H, W] batches of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if padding not in ("symmetric", "zeros", "valid"):
        raise ValueError(f"padding must be 'symmetric', 'zeros' or 'valid', got {padding!r}")
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"images of {tuple(x.shape[-2:])} px are smaller than the {window_size}-px SSIM window")
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    c = x.shape[1]
    window = gaussian_window(window_size, sigma, dtype=x.dtype, device=x.device)
    # one filtering pass over [x, y, x^2, y^2, xy], stacked along channels
    moments = _gaussian_filter(torch.cat([x, y, x * x, y * y, x * y], dim=1), window, padding)
    mu_x, mu_y, e_xx, e_yy, e_xy = moments.split(c, dim=1)
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov = e_xy - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    reduction: Literal["mean", "none"] = "mean",
    **kwargs: float | str,
) -> torch.Tensor:
    """Mean SSIM: over the whole batch (``reduction="mean"``, a scalar) or per image ([B]).

    Parameters
    ----------
    x, y
        Image batches [B, C, H, W].
    reduction
        ``"mean"``: one number; ``"none"``: one per image.
    **kwargs
        Passed to `ssim_map` (data_range, window_size, sigma, k1, k2, padding).
    """
    s = ssim_map(x, y, **kwargs)  # type: ignore[arg-type]
    if reduction == "mean":
        return s.mean()
    if reduction == "none":
        return s.flatten(1).mean(1)
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def ssim_loss(x: torch.Tensor, y: torch.Tensor, **kwargs: float | str) -> torch.Tensor:
    """``1 - ssim(x, y)`` (mean over the batch), the SSIM-AE / DRAEM reconstruction loss.

    Parameters
    ----------
    x, y
        Image batches [B, C, H, W] (reconstruction and target; SSIM is symmetric).
    **kwargs
        Passed to `ssim` / `ssim_map`. DRAEM's reference pads with zeros
        (``padding="zeros"``).
    """
    return 1.0 - ssim(x, y, **kwargs)  # type: ignore[arg-type]


# -- focal losses ----------------------------------------------------------------------------------
def focal_loss(
    probabilities: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: float | Sequence[float] | None = None,
    balance_index: int = 0,
    smooth: float = 1e-5,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """Multi-class focal loss on probabilities, as DRAEM's ``FocalLoss`` (from Hsuxu's Loss_ToolBox).

    For every element with true class t: the one-hot target is clamped to
    [smooth / (K - 1), 1 - smooth], ``p_t = <target, p> + smooth`` and
    ``FL = -alpha_t (1 - p_t)^gamma log p_t``. DRAEM applies it with the defaults (gamma 2, no
    alpha, smooth 1e-5) to the softmax of its 2-channel segmentation output against the mask.

    Parameters
    ----------
    probabilities
        [B, K, ...] class probabilities (each position sums to 1 over K >= 2).
    target
        [B, ...] or [B, 1, ...] class indices in [0, K) (a 0/1 anomaly mask for K = 2); float
        tensors must hold whole numbers.
    gamma
        Focusing parameter (2: the paper's and DRAEM's).
    alpha
        Class weights: None (all 1, DRAEM), a sequence of K weights (normalised to sum 1, as
        the reference does), or a float: `alpha` for class `balance_index`, 1 - alpha for the rest.
    balance_index
        The class a float `alpha` weighs.
    smooth
        Label smoothing of the one-hot target, also added to p_t so its log is finite.
    reduction
        ``"mean"`` over all elements, or ``"none"`` ([B, ...]).
    """
    k = probabilities.shape[1]
    if k < 2:
        raise ValueError(f"focal_loss needs [B, K>=2, ...] probabilities, got shape {tuple(probabilities.shape)}")
    if target.ndim == probabilities.ndim and target.shape[1] == 1:
        target = target.squeeze(1)
    if target.shape != probabilities.shape[:1] + probabilities.shape[2:]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match probabilities {tuple(probabilities.shape)}"
        )
    if target.is_floating_point() and bool((target != target.round()).any()):
        raise ValueError("focal_loss targets must be class indices (e.g. a 0/1 mask), not fractional values")
    index = target.long()
    if bool(((index < 0) | (index >= k)).any()):
        raise ValueError(f"focal_loss targets must lie in [0, {k}), got values outside")
    one_hot = F.one_hot(index, k).movedim(-1, 1).to(probabilities.dtype)
    if smooth:
        one_hot = one_hot.clamp(smooth / (k - 1), 1.0 - smooth)
    pt = (one_hot * probabilities).sum(1) + smooth
    loss = -((1.0 - pt) ** gamma) * pt.log()
    if alpha is not None:
        if isinstance(alpha, (int, float)):
            weights = torch.full((k,), 1.0 - float(alpha))
            weights[balance_index] = float(alpha)
        else:
            if len(alpha) != k:
                raise ValueError(f"alpha needs one weight per class ({k}), got {len(alpha)}")
            weights = torch.tensor([float(a) for a in alpha])
            weights = weights / weights.sum()
        loss = weights.to(loss)[index] * loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def binary_focal_loss_with_logits(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 1.0,
    gamma: float = 2.0,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """Binary focal loss on logits, open-iad's ``BinaryFocalLoss``: with BCE the per-element
    binary cross-entropy and ``p_t = exp(-BCE)``, ``FL = alpha (1 - p_t)^gamma BCE``.

    Parameters
    ----------
    logits
        Any shape; the pre-sigmoid scores.
    target
        Same shape, values in [0, 1].
    alpha, gamma
        Weight and focusing parameter (open-iad: 1 and 2).
    reduction
        ``"mean"`` or ``"none"``.
    """
    bce = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    loss = alpha * (1.0 - torch.exp(-bce)) ** gamma * bce
    if reduction == "mean":
        return loss.mean()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


# -- deviation loss ---------------------------------------------------------------------------------
DEVIATION_MARGIN = 5.0
DEVIATION_REFERENCE_SIZE = 5000


def deviation_loss(
    scores: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = DEVIATION_MARGIN,
    reference: torch.Tensor | None = None,
    reference_size: int = DEVIATION_REFERENCE_SIZE,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DevNet's deviation loss, mean over the batch.

    ``dev = (score - mean(R)) / std(R)`` for a reference set R of prior anomaly scores, and
    ``L = (1 - y) |dev| + y max(0, a - dev)``: normal scores are pulled to the prior's mean,
    labelled anomalies pushed at least `margin` standard deviations above it.

    ========================  =================================  ===============================
    paper (Pang et al. 2019)  reference (DevNet Keras; open-iad)  ours
    ========================  =================================  ===============================
    R: 5000 draws of N(0, 1)  Keras: drawn once per graph;       drawn anew per call from
                              open-iad: drawn anew per call      `generator`, or `reference`
    std(R)                    Keras: population; torch: sample   sample (torch.std, open-iad)
    a = 5                     confidence_margin = 5              ``margin=5``
    ========================  =================================  ===============================

    Parameters
    ----------
    scores
        [B] anomaly scores (the network's outputs).
    labels
        [B] 0 for normal, 1 for a labelled anomaly.
    margin
        a, the deviation anomalies must reach (5).
    reference
        The reference set R; if None, `reference_size` samples of N(0, 1) are drawn.
    reference_size
        Size of the drawn R (5000).
    generator
        Source of the drawn R.
    """
    if scores.shape != labels.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} differ in shape")
    if reference is None:
        reference = torch.randn(reference_size, generator=generator, dtype=torch.float32)
    reference = reference.to(device=scores.device, dtype=scores.dtype)
    if reference.numel() < 2:
        raise ValueError("the deviation loss needs a reference set of at least 2 scores")
    dev = (scores - reference.mean()) / reference.std()
    y = labels.to(scores.dtype)
    return ((1.0 - y) * dev.abs() + y * (margin - dev).clamp_min(0.0)).mean()


__all__ = [
    "DEVIATION_MARGIN",
    "DEVIATION_REFERENCE_SIZE",
    "binary_focal_loss_with_logits",
    "cosine_distance_map",
    "coupled_hypersphere_loss",
    "deviation_loss",
    "flattened_cosine_loss",
    "focal_loss",
    "gaussian_window",
    "multilevel_cosine_loss",
    "pyramid_matching_loss",
    "ssim",
    "ssim_loss",
    "ssim_map",
]
