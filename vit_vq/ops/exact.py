"""Exact mode: a proven error bound on fast-pass scores, and float64 rescoring of the rows it cannot settle.

A fast pass computes `s~_k = |e_k|^2 - 2 z.e_k` in float32 (possibly from rounded matmul inputs, possibly
with `|e_k|^2` as one more product term). For every code k,

    |s~_k - s_k| <= B = 2 (c_in + c_acc) (|z| M + M^2),      M = max_k |e_k|,

where `c_in` bounds the relative rounding of the matmul inputs (see the constants below; products of
float32 or 16-bit inputs computed exactly in float32 have c_in = 0) and `c_acc = (D + 16) 2^-22` bounds
float32 accumulation of the D products plus the norm (itself a float32 sum of squares) and the final
subtraction: every term is at most `2 |z| M + M^2` in total. The classic bound for round-to-nearest
is `D 2^-24`; this is 4x that, 2x the truncating one, to cover tensor cores that truncate while
accumulating.

If the second-best score exceeds the best by more than 2B, every other code has
`s_k >= s~_k - B >= s~_2 - B > s~_1 + B >= s_1`: the best code *is* the exact argmin. The other rows
(near-ties, duplicate codes: typically well under 1% of random rows at D <= 32, a few % at D = 512)
are rescored against the whole codebook by direct float64 differences `sum((z - e)^2)`, ties to the
lowest index: `rescore` here, `triton_rescore.rescore_triton` on GPU (one contract, tested side by
side in tests/test_backend_contract.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_workers import row_spans, run_units
from .torch_backend import CPU_SCORE_BYTES, Candidates, worker_count

U_TF32 = 2.0**-10  # tf32 keeps 10 mantissa bits; truncation or rounding errs by at most 2^-10 relative
TF32_ROUNDING = 2 * U_TF32 + U_TF32**2  # both inputs of a product rounded to tf32
TF32X3_ROUNDING = 3.01 * U_TF32**2  # big/small tf32 split: the dropped small*small and residual terms
U_BF16 = 2.0**-8  # bfloat16 keeps 8 significant bits: rounding to nearest errs by at most 2^-8 relative
BF16_ROUNDING = 2 * U_BF16 + U_BF16**2  # both inputs rounded to bfloat16
BF16X3_ROUNDING = 3.01 * U_BF16**2  # hi/lo bfloat16 split: the dropped lo*lo and residual terms
_SLACK = 1 + 2.0**-10  # covers float32 rounding in evaluating the bound itself


def accumulation_rounding(dim: int) -> float:
    """`c_acc`: bound on float32 accumulation error relative to `sum |z_i e_i| + |e|^2`."""
    return (dim + 16) * 2.0**-22


def torch_matmul_rounding(device: torch.device) -> float:
    """`c_in` for torch's own float32 matmul on `device` under the current precision settings."""
    setting = torch.get_float32_matmul_precision()
    backend = torch.backends.cuda.matmul if device.type == "cuda" else getattr(torch.backends.mkldnn, "matmul", None)
    fp32_precision = getattr(backend, "fp32_precision", "none")
    if setting == "medium" or fp32_precision == "bf16":
        return BF16_ROUNDING
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    if setting == "high" or fp32_precision == "tf32" or tf32:
        return TF32_ROUNDING  # also covers bf16x3, which "high" may use instead
    return 0.0


def unresolved_rows(cand: Candidates, z_norm: torch.Tensor, e_norm_max: torch.Tensor, dim: int) -> torch.Tensor:
    """Bool `[N]`: rows whose best two scores are too close for the bound to prove the winner.

    Args:
        cand: a fast pass with `second` tracked.
        z_norm: float32 `[N]`, `|z|` per row.
        e_norm_max: float32 scalar tensor, `max_k |e_k|`.
        dim: D.
    """
    two_b = 4 * (cand.input_rounding + accumulation_rounding(dim)) * _SLACK
    threshold = (z_norm + e_norm_max) * (two_b * e_norm_max)  # 2B
    return (cand.second - cand.best) <= threshold


def rescore(z: torch.Tensor, codebook: torch.Tensor, rows: torch.Tensor, max_temp_bytes: int) -> torch.Tensor:
    """Float64 argmin over the whole codebook for `z[rows]`; ties go to the lowest index.

    Distances are `sum((z - e)^2)` computed directly in float64 (no `|z|^2 - 2z.e + |e|^2`
    cancellation), so data with a large common offset or near-duplicate codes is still exact.
    The Triton twin `triton_rescore.rescore_triton` keeps the same contract. Many rows on a CPU
    run on single-threaded worker threads, like the search (`cpu_workers`).

    Args:
        z: `[N, D]`, codebook `[K, D]` (any float dtype; converted block by block).
        rows: int64 `[R]`.
        max_temp_bytes: bound on each worker's float64 `[rows, codes, D]` difference block.

    Returns:
        int64 `[R]`.
    """
    device = z.device if z.device.type != "mps" else torch.device("cpu")  # MPS has no float64
    n_codes, dim = codebook.shape
    n_rows = rows.numel()
    # (rows x codes) per block, so that the (r, k, D) float64 difference takes half the bound
    # (on CPU at most a cache-sized block: the three passes over it run ~2x faster in cache)
    limit = min(max_temp_bytes, CPU_SCORE_BYTES) if device.type == "cpu" else max_temp_bytes
    budget = max(1, limit // (2 * 8 * dim))
    block_rows = max(1, min(n_rows, 64, budget))
    codes = max(1, min(n_codes, budget // block_rows))
    out = torch.empty(n_rows, dtype=torch.int64, device=device)
    zr_all = z[rows].to(device=device, dtype=torch.float64)  # (R, D)

    def make_buffer() -> torch.Tensor:
        return torch.empty(block_rows * codes * dim, dtype=torch.float64, device=device)

    def rescore_span(buffer: torch.Tensor, span: tuple[int, int]) -> None:
        for r0 in range(span[0], span[1], block_rows):
            zr = zr_all[r0 : min(r0 + block_rows, span[1])]  # (r, D)
            best = torch.full((zr.shape[0],), float("inf"), dtype=torch.float64, device=device)
            arg = torch.zeros(zr.shape[0], dtype=torch.int64, device=device)
            for k0 in range(0, n_codes, codes):
                e = codebook[k0 : k0 + codes].to(device=device, dtype=torch.float64)  # (k, D)
                diff = buffer[: zr.shape[0] * e.shape[0] * dim].view(zr.shape[0], e.shape[0], dim)
                d = torch.sub(zr.unsqueeze(1), e.unsqueeze(0), out=diff).square_().sum(2)  # (r, k)
                block_min, first = d.min(dim=1)  # first minimum: lowest index within the block
                take = block_min < best  # strictly better than every earlier block
                arg = torch.where(take, first + k0, arg)
                best = torch.minimum(best, block_min)
            out[r0 : r0 + zr.shape[0]] = arg

    workers = worker_count(zr_all, n_codes * dim, -(-n_rows // block_rows))
    if workers <= 1:
        rescore_span(make_buffer(), (0, n_rows))
    else:
        run_units(row_spans(n_rows, block_rows, workers), workers, make_buffer, rescore_span)
    return out.to(z.device)


def exact_distances(
    z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, max_temp_bytes: int
) -> torch.Tensor:
    """float32 `[N]`: `|z - e_idx|^2` computed directly (no cancellation), in row blocks."""
    n_rows, dim = z.shape
    block_rows = max(1, max_temp_bytes // (3 * 4 * dim))
    out = torch.empty(n_rows, dtype=torch.float32, device=z.device)
    for r0 in range(0, n_rows, block_rows):
        e = F.embedding(indices[r0 : r0 + block_rows], codebook).float()  # (r, D)
        out[r0 : r0 + e.shape[0]] = e.sub_(z[r0 : r0 + block_rows]).square_().sum(1)
    return out
