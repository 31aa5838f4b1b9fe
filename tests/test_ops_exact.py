"""Exact mode's pieces on the torch path, each against float64: the per-code bound, the limits, the
candidate sets, their rescoring, and the switch between candidate and whole-codebook rescoring.

The end-to-end contract (0 rows off the float64 optimum, on every backend) is tests/test_backend_contract.py.
"""

from __future__ import annotations

import pytest
import torch

from vit_vq.ops import exact, nearest_code
from vit_vq.ops.search import exact_search, resolve_rescore
from vit_vq.ops.torch_backend import CandidateSets, candidate_sets_torch, search_torch, squared_norms


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def adversarial(name: str, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(z [60, d], codebook [300, d]) float32, built to stress the score bound."""
    g = _gen(d)
    z, e = torch.randn(60, d, generator=g), torch.randn(300, d, generator=g)
    if name == "mixed_scales":  # code norms over four decades, queries far out
        return z * 10, e * torch.logspace(-2, 2, 300)[:, None]
    if name == "offset":  # a few float32 ulps of spread around a large common offset
        return 1000 + 1e-2 * z, 1000 + 1e-2 * e
    if name == "near_duplicates":  # every code next to a copy moved by ~1e-6
        return z, torch.cat([e[:150], e[:150] + 1e-6 * e[150:]])
    if name == "large_norms":
        return 3e4 * z, 3e4 * e
    if name == "same_sign_terms":  # every product positive: rounding errors cannot cancel
        return z.abs() + 1, e.abs() + 1
    if name in ("fp16", "bf16"):  # 16-bit inputs, as the torch path sees them (exactly in float32)
        dtype = torch.float16 if name == "fp16" else torch.bfloat16
        return z.to(dtype).float(), e.to(dtype).float()
    raise ValueError(name)


ADVERSARIAL = ["mixed_scales", "offset", "near_duplicates", "large_norms", "same_sign_terms", "fp16", "bf16"]


@pytest.mark.parametrize("d", [1, 3, 64, 300, 512])
@pytest.mark.parametrize("name", ADVERSARIAL)
def test_per_code_bound_holds_for_both_score_layouts(name, d, single_thread):
    """|s~_k - s_k| <= B_k for the first pass's [codes, rows] addmm and the second pass's [rows, codes] one."""
    z, e = adversarial(name, d)
    e_sq = squared_norms(e)
    first = torch.addmm(e_sq[:, None], e, z.t(), alpha=-2.0).t()  # (N, K), as search_torch forms it
    second = torch.addmm(e_sq[None, :], z, e.t(), alpha=-2.0)  # as candidate_sets_torch forms it
    s64 = e.double().square().sum(1)[None, :] - 2 * z.double() @ e.double().T  # float64: error ~D 2^-53
    z_norm = torch.linalg.vector_norm(z, dim=1)[:, None]
    bound = exact.score_error_bound(z_norm, e_sq.sqrt()[None, :], d, 0.0, "ieee").double()
    for scores in (first, second):
        ratio = ((scores.double() - s64).abs() / bound).max()
        assert ratio <= 1, f"error {float(ratio):.3f} x the bound"
    assert ratio >= 1e-4 or d == 1  # not vacuous: the bound is within a few decades of what happens


def test_bound_is_tighter_than_the_one_it_replaces():
    """At D = 512 on a CPU, 2B (best and worst code alike) is ~4x below 2 (D+16) 2^-22 (|z|M + M^2) x 2."""
    z_norm, m, d = torch.tensor(22.6), torch.tensor(25.0), 512
    old = 4 * (d + 16) * 2.0**-22 * (z_norm * m + m * m)
    new = 2 * exact.score_error_bound(z_norm, m, d, 0.0, "ieee")
    assert 3.5 <= float(old / new) <= 4.5
    matrix = 2 * exact.score_error_bound(z_norm, m, d, exact.BF16X3_ROUNDING, "matrix_unit")
    assert float(matrix) > float(new)  # matrix units keep the wide accumulation term


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_limits_keep_the_float64_answer_and_settled_rows_are_right(name, single_thread):
    z, e = adversarial(name, 24)
    e_sq = squared_norms(e)
    cand = search_torch(z, e, e_sq, top2=True)
    limit = exact.score_limits(cand, torch.linalg.vector_norm(z, dim=1), e_sq.sqrt(), 24)
    d64 = (z.double()[:, None] - e.double()[None]).square().sum(-1)
    truth = d64.argmin(dim=1)
    s = torch.addmm(e_sq[None, :], z, e.t(), alpha=-2.0)
    assert (s.gather(1, truth[:, None]).squeeze(1) <= limit).all()  # the answer is always a candidate
    settled = cand.second > limit
    assert torch.equal(cand.indices[settled], truth[settled])
    if name in ("near_duplicates", "offset"):
        assert (~settled).sum() >= 10  # the case leaves rows to the candidates, so it tests them


def _reference_sets(z, e, rows, limit, cap) -> tuple[list[set[int]], torch.Tensor]:
    s = e.double().square().sum(1)[None, :] - 2 * z[rows].double() @ e.double().T
    hits = s <= limit.double()[:, None]
    return [set(torch.nonzero(h).squeeze(1).tolist()) for h in hits], hits.sum(1)


def _limits_between_scores(z, e, rows, nth):
    """Limits halfway between a row's nth and (nth+1)th float64 score: no score is near a limit."""
    s = (e.double().square().sum(1)[None, :] - 2 * z[rows].double() @ e.double().T).sort(dim=1).values
    n = torch.as_tensor(nth)
    return ((s.gather(1, n[:, None] - 1) + s.gather(1, n[:, None])) / 2).squeeze(1).float()


@pytest.mark.parametrize("budget", [64 * 2**20, 20_000], ids=["one_block", "row_and_code_blocks"])
@pytest.mark.parametrize("workers", [1, 2])
def test_candidate_sets_match_a_float64_reference(budget, workers, monkeypatch):
    from vit_vq.ops import torch_backend

    monkeypatch.setattr(torch_backend, "worker_count", lambda z, n_codes, n_blocks: min(workers, n_blocks))
    g = _gen(3)
    z, e = torch.randn(200, 16, generator=g), torch.randn(1500, 16, generator=g)
    rows = torch.randperm(200, generator=g)[:90]
    nth = torch.randint(1, 12, (90,), generator=g)
    nth[:5] = torch.tensor([20, 30, 200, 1500, 9])  # five rows past a cap of 12, one listed in full
    nth[8] = 12  # exactly at the cap: listed
    limit = _limits_between_scores(z, e, rows, nth.clamp(max=1499))
    limit[3] = float("inf")  # every code
    sets = candidate_sets_torch(z, e, squared_norms(e), rows, limit, cap=12, max_temp_bytes=budget)
    want, counts = _reference_sets(z, e, rows, limit, 12)
    assert torch.equal(sets.counts, counts)
    assert int((counts > 12).sum()) == 4 and sets.indices.shape[1] == 12
    for i in range(90):
        if counts[i] <= 12:
            got = sets.indices[i][sets.indices[i] >= 0].tolist()
            assert set(got) == want[i] and len(got) == len(want[i]), i


def test_rescore_candidates_takes_the_lowest_index_among_float64_ties():
    g = _gen(4)
    base, z = torch.randint(-5, 5, (40, 4), generator=g).float(), torch.randint(-5, 5, (30, 4), generator=g).float()
    e = torch.cat([base, base])  # code i and i + 40 are equal
    rows = torch.arange(30)
    d64 = (z.double()[:, None] - e.double()[None]).square().sum(-1)
    best = d64.min(dim=1).values
    tied = d64 == best[:, None]
    assert (tied.sum(1) > 1).all()  # every row tied
    lists = []
    for i in range(30):  # every minimum, later copies first, and one code that is not a minimum
        codes = torch.nonzero(tied[i]).squeeze(1).flip(0).tolist() + [int(d64[i].argmax())]
        lists.append(codes + [-1] * (9 - len(codes)))
    sets = CandidateSets(torch.tensor(lists), (torch.tensor(lists) >= 0).sum(1))
    got = exact.rescore_candidates(z, e, rows, sets, max_temp_bytes=2000)  # small: several row blocks
    assert torch.equal(got, tied.double().argmax(dim=1))


def _paths_case(kind: str):
    g = _gen(5)
    if kind == "duplicates":  # every code twice: every row unresolved, sets of two
        e = torch.randn(500, 8, generator=g)
        return torch.randn(300, 8, generator=g), torch.cat([e, e])
    if kind == "crowd":  # codes twice, and 80 copies of 0: sets past the cap for the rows nearest to 0
        e, z = torch.randn(500, 8, generator=g), torch.randn(300, 8, generator=g)
        return torch.cat([z[:100] * 0.1, z[100:]]), torch.cat([e, e, torch.zeros(80, 8)])
    return 1000 + 1e-2 * torch.randn(300, 8, generator=g), 1000 + 1e-2 * torch.randn(500, 8, generator=g)


@pytest.mark.parametrize("kind", ["duplicates", "crowd", "offset"])
def test_both_rescoring_ways_agree_and_report_their_paths(kind, single_thread):
    z, e = _paths_case(kind)
    truth = (z.double()[:, None] - e.double()[None]).square().sum(-1)
    truth = (truth == truth.min(dim=1, keepdim=True).values).double().argmax(dim=1)  # lowest index among ties
    cand, report = exact_search(z, e, "torch", "candidates", 2**20)
    whole, whole_report = exact_search(z, e, "torch", "codebook", 2**20)
    assert torch.equal(cand.indices, truth) and torch.equal(whole.indices, truth)
    assert report.unresolved == whole_report.unresolved > 0
    assert whole_report.fallback == whole_report.unresolved and whole_report.candidates == 0
    if kind == "duplicates":
        assert report.fallback == 0 and report.mean_candidates == 2.0
    elif kind == "crowd":
        assert 0 < report.fallback < report.unresolved and report.mean_candidates >= 1
    else:  # a few ulps of spread: the bound cannot tell any code apart
        assert report.fallback == report.unresolved


def test_rescore_switch(monkeypatch):
    z, e = _paths_case("duplicates")
    monkeypatch.delenv("VIT_VQ_RESCORE", raising=False)
    assert resolve_rescore(None) == "candidates"
    monkeypatch.setenv("VIT_VQ_RESCORE", "codebook")
    assert resolve_rescore(None) == "codebook" and resolve_rescore("candidates") == "candidates"
    assert torch.equal(nearest_code(z, e), nearest_code(z, e, rescore="candidates"))
    monkeypatch.setenv("VIT_VQ_RESCORE", "all")
    with pytest.raises(ValueError, match="VIT_VQ_RESCORE='all'"):
        nearest_code(z, e)
    with pytest.raises(ValueError, match="rescore must be"):
        nearest_code(z, e, rescore="whole")
