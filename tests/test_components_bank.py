"""Memory banks: exact kNN, greedy k-center, the composable coreset's coverage, patch embedding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from iadkit.components.features import (
    ConcatEmbedding,
    PatchEmbedding,
    adaptive_pool_matrix,
    reference_patch_embedding,
)
from iadkit.components.memory_bank import (
    MemoryBankError,
    NearestNeighborIndex,
    StreamingCoreset,
    coverage_radius,
    greedy_kcenter,
    knn_exact,
    random_projection,
)


def clustered(n: int, d: int, seed: int = 0, clusters: int = 12) -> torch.Tensor:
    """Points from clusters of very different sizes and spreads, like patch features."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g) * 4
    weights = torch.linspace(1, 8, clusters)
    assign = torch.multinomial(weights / weights.sum(), n, replacement=True, generator=g)
    spread = torch.linspace(0.2, 1.5, clusters)[assign, None]
    return centres[assign] + spread * torch.randn(n, d, generator=g)


def naive_greedy(x: torch.Tensor, k: int, start: int) -> tuple[list[int], float]:
    """Gonzalez one pick at a time, in float64: the textbook loop."""
    x = x.double()
    mind = ((x - x[start]) ** 2).sum(1)
    picks = [start]
    mind[start] = -1
    while len(picks) < k:
        i = int(mind.argmax())
        picks.append(i)
        mind = torch.minimum(mind, ((x - x[i]) ** 2).sum(1))
        mind[picks] = -1
    return picks, float(mind.clamp_min(0).max().sqrt())


# -- exact nearest neighbours --------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 4])
def test_knn_exact_equals_brute_force(k):
    g = torch.Generator().manual_seed(1)
    queries, bank = torch.randn(300, 24, generator=g), torch.randn(5000, 24, generator=g)
    # Chunks smaller than the inputs, so running minima / top-k merges are exercised.
    d, i = knn_exact(queries, bank, k, query_chunk=64, bank_chunk=700)
    ref = torch.cdist(queries.double(), bank.double())
    rd, ri = ref.topk(k, largest=False)
    assert torch.equal(i, ri)
    assert torch.allclose(d.double(), rd, atol=1e-4)
    assert d.shape == (300, k) and (d[:, 1:] >= d[:, :-1]).all()


def test_knn_hand_computed():
    bank = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
    d, i = knn_exact(torch.tensor([[3.0, 0.0], [9.0, 1.0]]), bank, 2)
    assert i.tolist() == [[0, 1], [2, 1]]
    assert torch.allclose(d, torch.tensor([[3.0, 4.0], [math.sqrt(2), math.sqrt(45)]]))


def test_knn_rejects_bad_input():
    with pytest.raises(MemoryBankError, match="empty"):
        knn_exact(torch.zeros(2, 3), torch.zeros(0, 3))
    with pytest.raises(MemoryBankError, match="same d"):
        knn_exact(torch.zeros(2, 3), torch.zeros(4, 5))
    with pytest.raises(MemoryBankError, match="k=9"):
        knn_exact(torch.zeros(2, 3), torch.zeros(4, 3), 9)


def test_faiss_indexes():
    bank = clustered(4000, 32, seed=2)
    g = torch.Generator().manual_seed(3)
    queries = bank[torch.randint(4000, (500,), generator=g)] + 0.3 * torch.randn(500, 32, generator=g)
    exact_d, exact_i = NearestNeighborIndex(bank, "exact").search(queries, 1)
    flat_d, flat_i = NearestNeighborIndex(bank, "faiss_flat").search(queries, 1)
    assert (flat_i == exact_i).float().mean() > 0.99  # ties aside, the same answers
    assert torch.allclose(flat_d, exact_d, atol=1e-3)
    for method in ("ivf", "hnsw"):
        d, i = NearestNeighborIndex(bank, method, nprobe=16).search(queries, 1)
        assert (d >= exact_d - 1e-3).all()  # an approximate neighbour is never closer
        assert (i == exact_i).float().mean() > 0.9, method
        assert float((d / exact_d).mean()) < 1.02, method
    with pytest.raises(MemoryBankError, match="unknown"):
        NearestNeighborIndex(bank, "annoy")


# -- greedy k-center -----------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 7, 256])
def test_greedy_equals_one_at_a_time(batch):
    x = clustered(1500, 16, seed=4)
    res = greedy_kcenter(x, 150, start=11, batch=batch)
    ref, ref_radius = naive_greedy(x, 150, 11)
    assert res.indices.tolist() == ref
    assert res.radius == pytest.approx(ref_radius, rel=1e-5)
    assert res.radius == pytest.approx(coverage_radius(x, x[res.indices]), rel=1e-5)
    picks = res.pick_distances[1:]
    assert (picks[1:] <= picks[:-1] + 1e-4).all()  # greedy pick distances never increase
    assert res.radius <= float(picks[-1]) + 1e-4


def test_greedy_hand_computed():
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0], [5.0]])
    res = greedy_kcenter(x, 3, start=0)
    # farthest from 0 is 11 (index 3); then the point farthest from {0, 11} is 5 (index 4)
    assert res.indices.tolist() == [0, 3, 4]
    assert res.radius == pytest.approx(1.0)


def test_greedy_duplicates_and_all_points():
    x = torch.zeros(10, 3)
    res = greedy_kcenter(x, 4, start=0)
    assert len(set(res.indices.tolist())) == 4 and res.radius == 0.0
    assert greedy_kcenter(x, 20).indices.tolist() == list(range(10))


def test_composable_coreset_coverage_vs_plain_greedy():
    """Composable (chunked) selection covers the training patches almost as well as plain greedy.

    Certificate (module docstring): R_composable <= max_i r_i + r_U, with r_U <= 2 OPT <= 2 R_greedy.
    Stated factor for the default oversampling 2: R_composable <= 2 R_greedy (measured ~1.1-1.3).
    """
    x = clustered(6000, 48, seed=5)
    ratio = 0.1
    proj = random_projection(48, 16, seed=0)

    def build(method):
        b = StreamingCoreset(ratio, method=method, projection_dim=16, chunk_size=1000, seed=0)
        for s in range(0, x.shape[0], 250):  # streamed like batches of images
            b.add(x[s : s + 250])
        return b, b.result()

    b_c, comp = build("composable")
    b_g, plain = build("greedy")
    assert torch.equal(b_c._proj, proj) and torch.equal(b_g._proj, proj)
    assert comp.bank.shape == plain.bank.shape == (600, 48)
    assert comp.n_chunks == 6 and comp.n_union == 6 * 200  # 24 batches of 250 -> 6 chunks of 1000
    xp = x @ proj
    r_comp = coverage_radius(xp, comp.bank @ proj)
    r_plain = coverage_radius(xp, plain.bank @ proj)
    assert r_plain == pytest.approx(plain.radius_bound, rel=1e-4)
    assert r_comp <= comp.radius_bound * (1 + 1e-5)
    assert comp.final_radius <= 2 * r_plain  # r_U <= 2 OPT <= 2 R_greedy
    assert r_comp <= 2.0 * r_plain, (r_comp, r_plain)
    # and far better than a random subset of the same size
    rand = StreamingCoreset(ratio, method="random", seed=0)
    rand.add(x)
    assert coverage_radius(xp, rand.result().bank @ proj) > r_comp


def test_min_keep_widens_the_union_for_tiny_coresets():
    x = clustered(4000, 8, seed=7)
    sizes = {}
    for min_keep in (0.0, 0.05):
        b = StreamingCoreset(0.001, chunk_size=1000, min_keep=min_keep)
        b.add(x)  # one call, split into chunks of 1000
        r = b.result()
        assert r.n_chunks == 4
        sizes[min_keep] = r.n_union
        assert r.bank.shape == (4, 8)
    assert sizes == {0.0: 4 * 2, 0.05: 4 * 50}  # 4 chunks x ceil(2 * 0.001 * 1000) vs 5 % of 1000


def test_composable_in_one_chunk_is_plain_greedy():
    x = clustered(800, 8, seed=6)
    a = StreamingCoreset(0.1, method="composable", chunk_size=10_000)
    b = StreamingCoreset(0.1, method="greedy")
    a.add(x)
    b.add(x)
    assert torch.equal(a.result().bank, b.result().bank)


@pytest.mark.parametrize("method", ["composable", "greedy", "random", "none"])
def test_coreset_result_names_the_chosen_patches(method):
    """`indices` points every bank row back at the patch it copies, counted over all `add` calls
    (what SoftPatch uses to carry each chosen patch's outlier factor into the bank)."""
    x = clustered(2500, 8, seed=8)
    b = StreamingCoreset(0.05, method=method, chunk_size=600, seed=1)
    for s in range(0, x.shape[0], 170):  # uneven batches across chunk boundaries
        b.add(x[s : s + 170])
    r = b.result()
    assert r.indices is not None and r.indices.dtype == torch.long
    assert r.indices.shape == (r.bank.shape[0],) and r.indices.unique().numel() == r.bank.shape[0]
    assert torch.equal(r.bank, x[r.indices])


def test_coreset_errors_and_sizes():
    with pytest.raises(MemoryBankError, match="ratio"):
        StreamingCoreset(0.0)
    with pytest.raises(MemoryBankError, match="unknown coreset"):
        StreamingCoreset(0.1, method="kmeans")
    with pytest.raises(MemoryBankError, match="no patch features"):
        StreamingCoreset(0.1).result()
    b = StreamingCoreset(0.001)
    b.add(torch.randn(50, 4))
    assert b.result().bank.shape == (1, 4)  # at least one feature
    n = StreamingCoreset(0.5, method="none")
    n.add(torch.randn(30, 4))
    assert n.result().bank.shape == (30, 4)


# -- patch embedding -----------------------------------------------------------------------------
@pytest.mark.parametrize("n_in,n_out", [(10, 3), (7, 7), (5, 12), (360, 384), (1008, 384)])
def test_adaptive_pool_matrix_matches_torch(n_in, n_out):
    v = torch.randn(3, 1, n_in, dtype=torch.float64)
    ref = F.adaptive_avg_pool1d(v, n_out)[:, 0]
    assert torch.allclose(v[:, 0] @ adaptive_pool_matrix(n_in, n_out).T, ref, atol=1e-12)


@pytest.mark.parametrize("aggregation", ["unfold", "average"])
@pytest.mark.parametrize("dims", [(1024, 1024), (384, 384), (64, 40), (None, None), (None, 16), (12, None)])
def test_patch_embedding_equals_patchcore_reference(dims, aggregation):
    """Our convolution form computes exactly the literal unfold/average -> upsample -> pool -> pool."""
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 5, 8, 8, generator=g), torch.randn(2, 7, 4, 4, generator=g)]
    emb = PatchEmbedding([5, 7], pretrain_dim=dims[0], target_dim=dims[1], aggregation=aggregation)
    out = emb(feats)
    ref = reference_patch_embedding(feats, pretrain_dim=dims[0], target_dim=dims[1], aggregation=aggregation)
    per_layer = (5 * 9, 7 * 9) if aggregation == "unfold" else (5, 7)
    expected = dims[1] or (2 * dims[0] if dims[0] else sum(per_layer))
    assert out.shape == ref.shape == (2, expected, 8, 8) and emb.target_dim == expected
    assert torch.allclose(out, ref, atol=1e-5)


def test_average_concat_is_anomalib_embedding():
    """aggregation='average' without projection: AvgPool2d(3, 1, 1) per layer, bilinear upsampling, concatenation."""
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 4, 4, generator=g)]
    out = PatchEmbedding([4, 6], pretrain_dim=None, target_dim=None, aggregation="average")(feats)
    pool = torch.nn.AvgPool2d(3, 1, 1)
    ref = torch.cat([pool(feats[0]), F.interpolate(pool(feats[1]), size=(8, 8), mode="bilinear")], 1)
    assert torch.allclose(out, ref, atol=1e-6)


def test_patch_embedding_hand_computed():
    # One layer, one channel, constant 1 map, 3x3 neighbourhoods, dims 9 -> 9: each output is
    # one neighbourhood entry, which is 0 where the zero padding enters.
    x = torch.ones(1, 1, 3, 3)
    out = PatchEmbedding([1], pretrain_dim=9, target_dim=9, aggregation="unfold")([x])
    centre = out[0, :, 1, 1]
    corner = out[0, :, 0, 0]
    assert torch.equal(centre, torch.ones(9))
    assert corner.tolist() == [0, 0, 0, 0, 1, 1, 0, 1, 1]


def test_concat_embedding_subset():
    feats = [torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4), torch.randn(2, 2, 2, 2)]
    full = ConcatEmbedding([3, 2])(feats)
    assert full.shape == (2, 5, 4, 4)
    assert torch.equal(full[:, 3:], F.interpolate(feats[1], size=(4, 4), mode="nearest"))
    sub = ConcatEmbedding([3, 2], torch.tensor([4, 0, 2]))(feats)
    assert torch.equal(sub, full[:, [0, 2, 4]])
    assert np.isclose(float(sub[0, 0, 0, 0]), 0.0)


@pytest.mark.parametrize("k", [1, 4])
def test_knn_traced_path_equals_chunked_search(k):
    """Under a tracer (ONNX export) knn_exact searches all queries in one block; same answers."""
    from iadkit.components.memory_bank import _knn_one_query_block

    g = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(300, 16, generator=g), torch.randn(1000, 16, generator=g)
    d_ref, i_ref = knn_exact(queries, bank, k, query_chunk=64, bank_chunk=256)
    d, i = _knn_one_query_block(queries, bank, k, (bank * bank).sum(1), 256)
    torch.testing.assert_close(d, d_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(i, i_ref)

    class Search(torch.nn.Module):
        def forward(self, q):
            return knn_exact(q, bank, k, query_chunk=64, bank_chunk=256)

    traced = torch.jit.trace(Search(), (queries[:10],), check_trace=False)  # the tracer saw 10 queries
    d_t, i_t = traced(queries)  # and answers 300 (a query-chunk loop would have been unrolled at 10)
    torch.testing.assert_close(d_t, d_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(i_t, i_ref)
