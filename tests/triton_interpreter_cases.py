"""The Triton kernel under TRITON_INTERPRET=1, on CPU tensors, against float64.

Not collected directly (the name does not match test_*.py): tests/test_ops_triton.py runs this file
in a subprocess with the interpreter switched on before Triton is imported. The interpreter ignores
`input_precision`, so this checks indexing, masking, ties and the merging of tiles and splits;
exact-versus-fast numerics are checked on a GPU by benchmarks/bench_lookup.py.
"""

from __future__ import annotations

import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_ops_triton.py"

from vit_vq.ops import exact, nearest_code  # noqa: E402
from vit_vq.ops.torch_backend import squared_norms  # noqa: E402
from vit_vq.ops.triton_backend import search_reference, search_triton  # noqa: E402
from vit_vq.ops.triton_rescore import rescore_triton, squared_norms_triton  # noqa: E402

ELEMENTWISE = {"BLOCK_N": 16, "BLOCK_K": 16, "PER_ELEMENT": True}
PER_TILE = {"BLOCK_N": 16, "BLOCK_K": 32, "PER_ELEMENT": False}
# D < 16 folds |e|^2 into the product (a spare padding column); D = 16 does not; D > 16 loops over D
SHAPES = [(1, 1, 1), (1, 5, 3), (7, 1, 8), (9, 40, 16), (33, 70, 17), (20, 300, 64), (40, 100, 8), (5, 600, 3)]


def _data(n, k, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed + 31 * n + 7 * k + d)
    return torch.randn(n, d, generator=gen).to(dtype), torch.randn(k, d, generator=gen).to(dtype)


def _check(cand, ref, top2, z, codebook):
    """Same indices; scores within the error bound the kernel reports (float32 sums, split inputs)."""
    assert torch.equal(cand.indices, ref.indices)
    m, zn = codebook.double().norm(dim=1).max(), z.double().norm(dim=1).max()
    atol = float((1e-5 + 2 * cand.input_rounding) * (2 * zn * m + m * m))
    torch.testing.assert_close(cand.best.double(), ref.best, rtol=0, atol=atol)
    if top2:
        finite = torch.isfinite(ref.second)
        assert torch.equal(torch.isfinite(cand.second), finite)
        torch.testing.assert_close(cand.second.double()[finite], ref.second[finite], rtol=0, atol=atol)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("config", [ELEMENTWISE, PER_TILE], ids=["elementwise", "per_tile"])
@pytest.mark.parametrize("top2", [True, False], ids=["exact", "fast"])
def test_kernel_matches_float64_twin(shape, config, top2):
    n, k, d = shape
    z, codebook = _data(n, k, d)
    e_sq = codebook.square().sum(1)
    block_d = {"BLOCK_D": 16} if d > 16 else {}  # D > 16 runs the loop over D chunks
    for splits in (1, 3):
        cand = search_triton(z, codebook, e_sq, top2=top2, splits=splits, config={**config, **block_d})
        _check(cand, search_reference(z, codebook, top2=top2), top2, z, codebook)


@pytest.mark.parametrize(
    ("z_dtype", "e_dtype"),
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32)],
)
def test_16bit_and_mixed_inputs(z_dtype, e_dtype):
    z, codebook = _data(40, 90, 24)
    z, codebook = z.to(z_dtype), codebook.to(e_dtype)
    e_sq = codebook.float().square().sum(1)
    for config in (ELEMENTWISE, {**PER_TILE, "BLOCK_D": 16}):
        cand = search_triton(z, codebook, e_sq, top2=True, config=config)
        _check(cand, search_reference(z, codebook, top2=True), True, z, codebook)


def test_large_d_uses_the_bf16_split():
    z, codebook = _data(20, 50, 80)
    cand = search_triton(z, codebook, codebook.square().sum(1), top2=True)
    assert cand.input_rounding > 1e-5  # bf16x3, not tf32x3
    _check(cand, search_reference(z, codebook, top2=True), True, z, codebook)


@pytest.mark.parametrize("d", [5, 16])
def test_masked_tails_never_win(d):
    """Queries at the origin and codes far from it: a padded code scored as 0 would win everywhere."""
    gen = torch.Generator().manual_seed(1)
    z = torch.zeros(20, d)  # 20 rows: a partial second block of 16
    codebook = 10 + torch.rand(37, d, generator=gen)  # 37 codes: a partial last tile
    for config in (ELEMENTWISE, PER_TILE):
        for top2 in (True, False):
            cand = search_triton(z, codebook, codebook.square().sum(1), top2=top2, config=config)
            assert (cand.indices < 37).all()
            assert torch.equal(cand.indices, codebook.square().sum(1).argmin().expand(20))


@pytest.mark.parametrize("config", [ELEMENTWISE, PER_TILE], ids=["elementwise", "per_tile"])
def test_ties_across_tiles_and_splits(config):
    """Two copies of every code, 300 apart: copies sit in different tiles and different splits."""
    gen = torch.Generator().manual_seed(2)
    base = torch.randint(-8, 8, (300, 4), generator=gen).float()  # integers: exact arithmetic
    z = torch.randint(-8, 8, (24, 4), generator=gen).float()
    codebook = torch.cat([base, base])
    d64 = (z.double()[:, None] - codebook.double()[None]).square().sum(-1)
    best = d64.min(dim=1).values
    assert ((d64 == best[:, None]).sum(dim=1) > 1).all()  # every row tied
    lowest = (d64 == best[:, None]).double().argmax(dim=1)
    for top2 in (True, False):
        for splits in (1, 3):
            cand = search_triton(z, codebook, codebook.square().sum(1), top2=top2, splits=splits, config=config)
            assert torch.equal(cand.indices, lowest)
            if top2:
                assert torch.equal(cand.second, cand.best)  # a tie is never proven: it goes to rescoring


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_api_on_the_interpreter(metric, dtype):
    z, codebook = _data(30, 200, 12, dtype)
    out = nearest_code(z, codebook, metric=metric, backend="triton", return_distances=True)
    z64, e64 = z.double(), codebook.double()
    if metric == "cosine":
        d = 1 - torch.nn.functional.normalize(z64, dim=1) @ torch.nn.functional.normalize(e64, dim=1).T
    else:
        d = (z64[:, None] - e64[None]).square().sum(-1)
    assert torch.equal(out.indices, d.argmin(dim=1))
    torch.testing.assert_close(out.distances.double(), d.min(dim=1).values, rtol=1e-5, atol=1e-5)


def test_exact_mode_rescores_ties_to_the_lowest_index(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    base, z = torch.randn(150, 6, generator=gen), torch.randn(40, 6, generator=gen)  # floats this time
    monkeypatch.setenv("VIT_VQ_BACKEND", "triton")
    idx = nearest_code(z, torch.cat([base, base]))
    d64 = (z.double()[:, None] - base.double()[None]).square().sum(-1)
    assert torch.equal(idx, d64.argmin(dim=1))


@pytest.mark.parametrize("d", [3, 16, 40])
def test_float64_rescoring_matches_its_torch_twin(d):
    gen = torch.Generator().manual_seed(4)
    base, z = torch.randn(100, d, generator=gen), torch.randn(50, d, generator=gen)
    codebook = torch.cat([base, base, base[:37]])  # every code tied with a later copy; K = 237
    rows = torch.tensor([0, 3, 4, 17, 49])
    truth = (z[rows].double()[:, None] - base.double()[None]).square().sum(-1).argmin(dim=1)
    twin = exact.rescore(z, codebook, rows, 2**20)
    assert torch.equal(twin, truth)
    for splits in (1, 3):
        got = rescore_triton(z, codebook, rows, splits=splits)
        assert torch.equal(got, truth)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_squared_norms_kernel(dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(150, 70, generator=gen)
    x[100:] = x[:50]  # equal rows must get bit-identical norms (ties depend on it)
    got = squared_norms_triton(x, dtype)
    assert got.dtype == dtype and torch.equal(got[100:], got[:50])
    torch.testing.assert_close(got.double(), x.double().square().sum(1), rtol=1e-6, atol=0)
    got16 = squared_norms_triton(x.bfloat16(), dtype).double()
    torch.testing.assert_close(got16, squared_norms(x.bfloat16(), dtype=torch.float64), rtol=1e-6, atol=0)


def _limits_between_scores(z, codebook, rows, nth):
    """Limits halfway between a row's nth and (nth+1)th float64 score: no score is near a limit."""
    s = (codebook.double().square().sum(1)[None, :] - 2 * z[rows].double() @ codebook.double().T).sort(dim=1).values
    return ((s.gather(1, nth[:, None] - 1) + s.gather(1, nth[:, None])) / 2).squeeze(1).float()


@pytest.mark.parametrize(
    ("d", "dtype"), [(8, torch.float32), (40, torch.float32), (24, torch.bfloat16)], ids=["d8", "d40", "bf16"]
)
def test_candidate_sets_match_a_float64_reference_and_the_torch_twin(d, dtype):
    from vit_vq.ops.torch_backend import candidate_sets_torch
    from vit_vq.ops.triton_candidates import candidate_sets_triton

    z, codebook = _data(50, 600, d, dtype)
    gen = torch.Generator().manual_seed(6)
    rows = torch.randperm(50, generator=gen)[:37]  # a partial second block of rows
    nth = torch.randint(1, 8, (37,), generator=gen)
    nth[:3] = torch.tensor([9, 30, 599])  # past a cap of 8
    nth[3] = 8  # exactly at the cap
    limit = _limits_between_scores(z, codebook, rows, nth)
    e_sq = codebook.float().square().sum(1)
    twin = candidate_sets_torch(z.float(), codebook.float(), e_sq, rows, limit, cap=8)
    assert torch.equal(twin.counts, nth)
    for splits in (1, 3):  # 3 splits of 256 codes: a set spread over several splits is merged in order
        sets = candidate_sets_triton(z, codebook, e_sq, rows, limit, cap=8, splits=splits)
        assert torch.equal(sets.counts, nth)
        for i in range(3, 37):
            got = sets.indices[i][sets.indices[i] >= 0]
            assert torch.equal(got, twin.indices[i][: int(nth[i])].sort().values), (splits, i)
            assert torch.equal(got, got.sort().values)  # listed in code order


def test_exact_mode_candidate_path_on_the_interpreter():
    """Every code twice, 300 apart: every row unresolved, sets of two across tiles, rescored in float64."""
    from vit_vq.ops.search import exact_search

    gen = torch.Generator().manual_seed(7)
    base, z = torch.randn(300, 6, generator=gen), torch.randn(30, 6, generator=gen)
    cand, report = exact_search(z, torch.cat([base, base]), "triton", "candidates", 2**20)
    assert report.unresolved == 30 and report.fallback == 0 and report.mean_candidates == 2.0
    d64 = (z.double()[:, None] - base.double()[None]).square().sum(-1)
    assert torch.equal(cand.indices, d64.argmin(dim=1))
