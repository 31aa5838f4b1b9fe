"""The passes of one search on either backend: the fast pass, then exact mode's settling of the rows it leaves.

1. **Fast pass** (`first_pass`): best score, and second best in exact mode, for every row.
2. **Proof** (`exact.score_limits`): a row whose second-best score is above its limit is settled.
3. **Candidates** (`rescore="candidates"`, the default): a second pass over the unresolved rows only
   lists the codes at or below each row's limit, and those few are rescored in float64.
4. **Fallback**: rows whose set overflows `exact.CANDIDATE_CAP`, or every unresolved row with
   `rescore="codebook"`, are rescored in float64 against the whole codebook.

`VIT_VQ_RESCORE=candidates|codebook` picks step 3 or 4 when the caller does not; "codebook" is the
whole-codebook rescoring that came before the candidate sets, kept so that one run can compare both.
Both give the same indices (tests/test_backend_contract.py runs every case with each).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

from . import exact
from .torch_backend import Candidates, CandidateSets, candidate_sets_torch, search_torch, squared_norms

Rescore = Literal["candidates", "codebook"]


@dataclass
class ExactReport:
    """What exact mode did to one search.

    rows: N. unresolved: rows the bound could not settle. fallback: rows rescored against the whole
    codebook. candidates: codes rescored in float64 over the other unresolved rows, in total.
    """

    rows: int
    unresolved: int = 0
    fallback: int = 0
    candidates: int = 0

    @property
    def mean_candidates(self) -> float:
        """Mean candidate-set size over the unresolved rows that did not fall back (0 when none)."""
        listed = self.unresolved - self.fallback
        return self.candidates / listed if listed else 0.0


def resolve_rescore(rescore: Rescore | None) -> Rescore:
    """The argument, else `VIT_VQ_RESCORE`, else "candidates".

    Raises:
        ValueError: an unknown value.
    """
    source, choice = f"rescore={rescore!r}", rescore
    if choice is None:
        choice = os.environ.get("VIT_VQ_RESCORE") or "candidates"
        source = f"VIT_VQ_RESCORE={choice!r}"
    if choice not in ("candidates", "codebook"):
        raise ValueError(f"{source}: exact mode's rescoring must be 'candidates' or 'codebook'")
    return choice


def first_pass(
    z: torch.Tensor, codebook: torch.Tensor, backend: str, *, top2: bool, max_temp_bytes: int
) -> tuple[torch.Tensor, Candidates]:
    """`(e_sq float32 [K], Candidates)`: the squared code norms (computed on every call, never stale) and the pass."""
    if backend == "triton":
        from . import triton_backend, triton_rescore  # imports Triton only when it is used

        e_sq = triton_rescore.squared_norms_triton(codebook)
        return e_sq, triton_backend.search_triton(z, codebook, e_sq, top2=top2)
    e_sq = squared_norms(codebook, max_temp_bytes)
    c_in, accumulation = exact.torch_matmul_rounding(z.device)
    cand = search_torch(
        z.float(),
        codebook.float(),
        e_sq,
        top2=top2,
        max_temp_bytes=max_temp_bytes,
        input_rounding=c_in,
        accumulation=accumulation,
    )
    return e_sq, cand


def settle(
    z: torch.Tensor,
    codebook: torch.Tensor,
    e_sq: torch.Tensor,
    cand: Candidates,
    backend: str,
    rescore: Rescore,
    max_temp_bytes: int,
) -> ExactReport:
    """Make `cand.indices` the float64 optimum of every row (in place), lowest index among equals.

    Args:
        z: `[N, D]`, codebook `[K, D]`, e_sq float32 `[K]`: as given to the first pass.
        cand: the first pass, with `second` tracked.
        backend: "torch" or "triton", the backend of the first pass.
        rescore: "candidates" or "codebook" (see the module doc).
        max_temp_bytes: bound on the torch passes' temporaries.
    """
    z_norm = torch.linalg.vector_norm(z, dim=1, dtype=torch.float32)  # (N,)
    limit = exact.score_limits(cand, z_norm, e_sq.sqrt(), z.shape[1])  # (N,)
    rows = (cand.second <= limit).nonzero().squeeze(1)  # (R,) unresolved
    report = ExactReport(rows=z.shape[0], unresolved=rows.numel())
    if not rows.numel():
        return report
    if rescore == "candidates":
        if backend == "triton":
            from .triton_candidates import candidate_sets_triton

            sets = candidate_sets_triton(z, codebook, e_sq, rows, limit[rows], cap=exact.CANDIDATE_CAP)
        else:
            sets = candidate_sets_torch(
                z.float(), codebook.float(), e_sq, rows, limit[rows], cap=exact.CANDIDATE_CAP, max_temp_bytes=max_temp_bytes
            )
        fits = sets.counts <= exact.CANDIDATE_CAP  # (R,)
        if bool(fits.any()):
            listed = CandidateSets(sets.indices[fits], sets.counts[fits])
            cand.indices[rows[fits]] = exact.rescore_candidates(z, codebook, rows[fits], listed, max_temp_bytes)
            report.candidates = int(listed.counts.sum())
        rows = rows[~fits]
    report.fallback = rows.numel()
    if rows.numel() and backend == "triton":
        from .triton_rescore import rescore_triton

        cand.indices[rows] = rescore_triton(z, codebook, rows)
    elif rows.numel():
        cand.indices[rows] = exact.rescore(z, codebook, rows, max_temp_bytes)
    return report


def exact_search(
    z: torch.Tensor, codebook: torch.Tensor, backend: str, rescore: Rescore, max_temp_bytes: int
) -> tuple[Candidates, ExactReport]:
    """Both passes of an exact search: `(settled Candidates, ExactReport)`. For benchmarks and tests."""
    e_sq, cand = first_pass(z, codebook, backend, top2=True, max_temp_bytes=max_temp_bytes)
    return cand, settle(z, codebook, e_sq, cand, backend, rescore, max_temp_bytes)
