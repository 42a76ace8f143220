"""Feature-matching losses shared by the distillation and hypersphere methods.

Two families of the field meet here:

- *Teacher–student feature matching* (STFPM, RD4AD). Both papers compare a frozen encoder's
  feature vector with a trained network's vector at every position of several pyramid levels,
  through a scale-free distance. STFPM writes it as ``½‖t̂ − ŝ‖²`` of the L2-normalised
  vectors, RD4AD as ``1 − cos(t, s)``. The two are the same number, because for unit vectors
  ``½‖t̂ − ŝ‖² = ½(2 − 2 t̂·ŝ) = 1 − cos(t, s)``; so both methods share `cosine_distance_map`
  (per position, also their anomaly map) and `multilevel_cosine_loss` (the training loss:
  the per-position distance averaged over positions, summed over levels — STFPM's
  ``Σ_l 1/(H_l W_l) Σ_ij ½‖t̂ − ŝ‖²`` and RD4AD's ``Σ_k 1/(H_k W_k) Σ_hw (1 − cos)``,
  each also averaged over the batch).

- *Coupled hyperspheres* (CFA): a soft-boundary attraction of each adapted patch feature to
  its K nearest memory features and a repulsion from the next J (hard negatives).
"""

from __future__ import annotations

from typing import Sequence

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


__all__ = ["cosine_distance_map", "coupled_hypersphere_loss", "multilevel_cosine_loss"]
