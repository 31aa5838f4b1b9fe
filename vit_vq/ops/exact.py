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
are rescored in float64 against the whole codebook, ties to the lowest index: `rescore` here (where
scores closer than float64's own error bound count as ties), `triton_rescore.rescore_triton` on GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .torch_backend import Candidates

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


def rescore(
    z: torch.Tensor, codebook: torch.Tensor, rows: torch.Tensor, e_norm_max: float, max_temp_bytes: int
) -> torch.Tensor:
    """Float64 argmin over the whole codebook for `z[rows]`; ties go to the lowest index.

    Distances are `sum((z - e)^2)` computed directly in float64 (no `|z|^2 - 2z.e + |e|^2`
    cancellation), so data with a large common offset or near-duplicate codes is still exact.

    Args:
        z: `[N, D]`, codebook `[K, D]` (any float dtype; converted block by block).
        rows: int64 `[R]`.
        e_norm_max: unused by the direct form; kept for the backends' common signature.
        max_temp_bytes: bound on the float64 `[rows, codes, D]` difference blocks.

    Returns:
        int64 `[R]`.
    """
    del e_norm_max
    device = z.device if z.device.type != "mps" else torch.device("cpu")  # MPS has no float64
    n_codes, dim = codebook.shape
    n_rows = rows.numel()
    # (rows x codes) per block, so that the (r, k, D) float64 difference takes half the bound
    budget = max(1, max_temp_bytes // (2 * 8 * dim))
    block_rows = max(1, min(n_rows, 64, budget))
    codes = max(1, min(n_codes, budget // block_rows))
    out = torch.empty(n_rows, dtype=torch.int64, device=device)
    zr_all = z[rows].to(device=device, dtype=torch.float64)  # (R, D)
    for r0 in range(0, n_rows, block_rows):
        zr = zr_all[r0 : r0 + block_rows]  # (r, D)
        best = torch.full((zr.shape[0],), float("inf"), dtype=torch.float64, device=device)
        arg = torch.zeros(zr.shape[0], dtype=torch.int64, device=device)
        for k0 in range(0, n_codes, codes):
            e = codebook[k0 : k0 + codes].to(device=device, dtype=torch.float64)  # (k, D)
            d = (zr.unsqueeze(1) - e.unsqueeze(0)).square_().sum(2)  # (r, k)
            block_min, first = d.min(dim=1)  # first minimum: lowest index within the block
            take = block_min < best  # strictly better than every earlier block
            arg = torch.where(take, first + k0, arg)
            best = torch.minimum(best, block_min)
        out[r0 : r0 + zr.shape[0]] = arg
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
