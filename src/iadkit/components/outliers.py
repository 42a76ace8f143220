"""Outlier scores of samples within groups: the noise discrimination of noisy-data methods.

SoftPatch (Jiang et al., NeurIPS 2022) decides which training patches are noise by comparing,
at each patch position, the features of all training images: a patch that is unlike the
patches of the other images at the same position is likely a defect hidden among the "good"
images. Every function here takes ``x [G, N, d]`` — G independent groups (positions) of N
samples (images) with d features — and returns ``[G, N]`` scores, larger = more outlying:

- `local_outlier_factor`: the LOF of Breunig et al. (SIGMOD 2000), exactly as scikit-learn's
  ``LocalOutlierFactor(n_neighbors=k).fit(x_g).negative_outlier_factor_`` negated, for every
  group at once. With N_k(a) the k nearest other samples of a and k-dist(b) the distance from
  b to its k-th nearest other sample:
  ``reach(a, b) = max(d(a, b), k-dist(b))``,
  ``lrd(a) = 1 / (mean_{b in N_k(a)} reach(a, b) + 1e-10)``,
  ``LOF(a) = mean_{b in N_k(a)} lrd(b) / lrd(a)`` (about 1 inside a cluster, > 1 outside).
  k is capped at N - 1, as scikit-learn does.
- `gaussian_outlier_scores`: ``1 + Mahalanobis distance`` to the group's Gaussian (mean and
  unbiased covariance of its N samples, + eps I), SoftPatch's "gaussian" variant.
- `nearest_neighbor_outlier_scores`: ``1 + distance to the nearest other sample``, SoftPatch's
  "nearest" variant.

Distances are computed in float64, and groups are processed in chunks so that the N x N
distance matrices of a chunk stay within `max_bytes`.
"""

from __future__ import annotations

import torch

from iadkit.components.gaussian import GaussianAccumulator, mahalanobis, whitening_matrices

OUTLIER_METHODS: tuple[str, ...] = ("lof", "gaussian", "nearest")
LRD_EPS = 1e-10  # scikit-learn's guard in the local reachability density


def _check(x: torch.Tensor, min_samples: int) -> None:
    if x.ndim != 3:
        raise ValueError(f"outlier scores need [groups, samples, dims] features, got {tuple(x.shape)}")
    if x.shape[1] < min_samples:
        raise ValueError(f"outlier scores need at least {min_samples} samples per group, got {x.shape[1]}")


def _group_step(x: torch.Tensor, max_bytes: int) -> int:
    """Groups per chunk so that their N x N float64 distance matrices (and sorted copies) fit."""
    n = int(x.shape[1])
    return max(1, int(max_bytes) // max(1, n * n * 8 * 3))


def _other_distances(x: torch.Tensor) -> torch.Tensor:
    """[g, N, N] float64 Euclidean distances, +inf on the diagonal (a sample is not its own neighbour)."""
    x = x.double()
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    d.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    return d


def local_outlier_factor(x: torch.Tensor, k: int = 5, *, max_bytes: int = 64 << 20) -> torch.Tensor:
    """LOF of every sample within its group: ``x [G, N, d] -> [G, N]`` (float32).

    Parameters
    ----------
    x
        Features, G groups of N samples.
    k
        Neighbourhood size (SoftPatch's ``lof_k``: 5); capped at N - 1 like scikit-learn.
    max_bytes
        Memory budget of the distance matrices processed at once.
    """
    _check(x, 2)
    k = min(int(k), int(x.shape[1]) - 1)
    if k < 1:
        raise ValueError(f"LOF needs k >= 1 neighbours, got {k}")
    out = torch.empty(x.shape[0], x.shape[1], dtype=torch.float64)
    step = _group_step(x, max_bytes)
    for s in range(0, int(x.shape[0]), step):
        d = _other_distances(x[s : s + step])
        knn_d, knn_i = torch.topk(d, k, dim=2, largest=False, sorted=True)  # [g, N, k]
        k_distance = knn_d[..., -1]  # [g, N]
        reach = torch.maximum(knn_d, torch.gather(k_distance[:, None, :].expand(-1, d.shape[1], -1), 2, knn_i))
        lrd = 1.0 / (reach.mean(2) + LRD_EPS)  # [g, N]
        neighbour_lrd = torch.gather(lrd[:, None, :].expand(-1, d.shape[1], -1), 2, knn_i)
        out[s : s + d.shape[0]] = neighbour_lrd.mean(2) / lrd
    return out.float()


def gaussian_outlier_scores(x: torch.Tensor, *, eps: float = 0.01) -> torch.Tensor:
    """``1 + Mahalanobis distance`` of every sample to its group's Gaussian: ``[G, N, d] -> [G, N]``.

    The Gaussian is the group's mean and unbiased covariance + `eps` I (SoftPatch's code takes
    anomalib's multivariate Gaussian, which regularises with 0.01 I).
    """
    _check(x, 2)
    acc = GaussianAccumulator()
    samples = x.transpose(0, 1)  # [N, G, d]: the accumulator's [batch, positions, dims]
    acc.add(samples)
    mean, cov = acc.finalize()
    w = whitening_matrices(cov, eps)
    return (1.0 + mahalanobis(samples.double(), mean, w)).T.float().contiguous()


def nearest_neighbor_outlier_scores(x: torch.Tensor, *, max_bytes: int = 64 << 20) -> torch.Tensor:
    """``1 + distance to the nearest other sample`` of the group: ``[G, N, d] -> [G, N]``."""
    _check(x, 2)
    out = torch.empty(x.shape[0], x.shape[1], dtype=torch.float64)
    step = _group_step(x, max_bytes)
    for s in range(0, int(x.shape[0]), step):
        d = _other_distances(x[s : s + step])
        out[s : s + d.shape[0]] = 1.0 + d.min(2).values
    return out.float()


def outlier_scores(x: torch.Tensor, method: str = "lof", *, k: int = 5) -> torch.Tensor:
    """Dispatch on `method` ("lof", "gaussian" or "nearest"); see the module docstring."""
    if method == "lof":
        return local_outlier_factor(x, k)
    if method == "gaussian":
        return gaussian_outlier_scores(x)
    if method == "nearest":
        return nearest_neighbor_outlier_scores(x)
    raise ValueError(f"unknown outlier method {method!r}; choose one of {', '.join(OUTLIER_METHODS)}")


__all__ = [
    "OUTLIER_METHODS",
    "gaussian_outlier_scores",
    "local_outlier_factor",
    "nearest_neighbor_outlier_scores",
    "outlier_scores",
]
