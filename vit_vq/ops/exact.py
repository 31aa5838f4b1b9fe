"""Exact mode: a proven error bound on fast-pass scores, candidate sets, and float64 rescoring.

A fast pass computes `s~_k = |e_k|^2 - 2 z.e_k` in float32 (possibly from rounded matmul inputs,
possibly with `|e_k|^2` as one more product term) and keeps the best and second-best score per row.
The exact scores are `s_k` (real arithmetic on the given float32 values).

**The bound, per code.** With `u = 2^-24` and `g(n) = n u / (1 - n u)`:

- `z.e_k` is a sum of D products. Summed in any order with IEEE round-to-nearest (CPU FMA or
  multiply-add units, cuBLAS sgemm, whatever the blocking), every term passes through at most D
  roundings: error <= g(D) sum|z_i e_ki| <= g(D) |z||e_k| (Cauchy-Schwarz). `addmm` then adds
  `|e_k|^2` (one more term, one more rounding): `c_acc = g(D + 2)` relative to the sum of the
  magnitudes `2 sum|z_i e_ki| + |e_k|^2 <= 2|z||e_k| + |e_k|^2`. Matrix units (tf32/bf16 tensor
  cores, CPU bf16 dot products) align and may truncate while accumulating: there
  `c_acc = (D + 16) 2^-22`, 4x the round-to-nearest bound (`Accumulation`).
- Rounding the matmul inputs (tf32, bf16, or a hi/lo split) errs by `c_in` relative to the same
  magnitudes (the constants below; exact float32 or 16-bit products have `c_in = 0`).
- `|e_k|^2` is itself a float32 sum of squares: `c_norm = g(D)` relative to `|e_k|^2`.

So `|s~_k - s_k| <= B_k = a |z||e_k| + b |e_k|^2` with `a = 2 (c_in + c_acc)` and
`b = c_in + c_acc + c_norm`, and `B_k <= B_max = a |z| M + b M^2`, `M = max_k |e_k|`. (The bound
this replaces used `2 (c_in + (D + 16) 2^-22) (|z| M + M^2)` for every code and every backend: at
D = 512 on a CPU it was about 4x wider.)

**The proof.** The reference is the float64 distance by direct differences, `d_k = sum (z_i - e_ki)^2`;
its own rounding is at most `E64 = 2 g64(D + 2) (|z| + M)^2` between two codes (`g64` with
`u = 2^-53`). Let `j` be the fast pass's best code. Every code the reference could prefer to the
true argmin `k*` (its own argmin, or an equal distance at a lower index) has
`s~_k <= s_k + B_k <= s_k* + E64 + B_k <= s_j + E64 + B_max <= s~_j + T` with

    T = B_j + B_max + E64        (per row; the limit `s~_j + T` is rounded up, and T gets 2^-10 slack)

So the reference's answer lies in the **candidate set** `C = {k : s~_k <= s~_j + T}`. If the
second-best score is above the limit, `C = {j}` and the row is settled. The other rows (near-ties,
duplicate codes) are *unresolved*: a second pass finds `C` (any pass whose scores obey the same
bound will do: the limit comes from the first), and `C` is rescored by direct float64 differences,
ties to the lowest index (`rescore_candidates`). A row whose `C` has more than `CANDIDATE_CAP` codes
(data a few ulps wide around a large offset: every code is a candidate) is rescored against the
whole codebook instead (`rescore` here, `triton_rescore.rescore_triton` on GPU). One contract for
both backends, tested side by side in tests/test_backend_contract.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_workers import row_spans, run_units
from .torch_backend import CPU_SCORE_BYTES, Accumulation, Candidates, CandidateSets, worker_count

U32 = 2.0**-24  # float32 unit roundoff (round to nearest)
U64 = 2.0**-53  # float64 unit roundoff
U_TF32 = 2.0**-10  # tf32 keeps 10 mantissa bits; truncation or rounding errs by at most 2^-10 relative
TF32_ROUNDING = 2 * U_TF32 + U_TF32**2  # both inputs of a product rounded to tf32
TF32X3_ROUNDING = 3.01 * U_TF32**2  # big/small tf32 split: the dropped small*small and residual terms
U_BF16 = 2.0**-8  # bfloat16 keeps 8 significant bits: rounding to nearest errs by at most 2^-8 relative
BF16_ROUNDING = 2 * U_BF16 + U_BF16**2  # both inputs rounded to bfloat16
BF16X3_ROUNDING = 3.01 * U_BF16**2  # hi/lo bfloat16 split: the dropped lo*lo and residual terms
_SLACK = 1 + 2.0**-10  # covers float32 rounding in evaluating the bound and the score difference
CANDIDATE_CAP = 64  # codes per candidate set; a row with more is rescored against the whole codebook


def _gamma(n: int, u: float = U32) -> float:
    """`n u / (1 - n u)`: the relative error of n rounded operations in a row."""
    return n * u / (1 - n * u)


def accumulation_rounding(dim: int, accumulation: Accumulation) -> float:
    """`c_acc`: accumulation error of a score relative to `2 sum |z_i e_i| + |e|^2` (see the module doc)."""
    if accumulation not in ("ieee", "matrix_unit"):
        raise ValueError(f"accumulation must be 'ieee' or 'matrix_unit', got {accumulation!r}")
    return _gamma(dim + 2) if accumulation == "ieee" else (dim + 16) * 2.0**-22


def torch_matmul_rounding(device: torch.device) -> tuple[float, Accumulation]:
    """`(c_in, accumulation)` for torch's own float32 matmul on `device` under the current precision settings."""
    setting = torch.get_float32_matmul_precision()
    backend = torch.backends.cuda.matmul if device.type == "cuda" else getattr(torch.backends.mkldnn, "matmul", None)
    fp32_precision = getattr(backend, "fp32_precision", "none")
    if setting == "medium" or fp32_precision == "bf16":
        return BF16_ROUNDING, "matrix_unit"
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    if setting == "high" or fp32_precision == "tf32" or tf32:
        return TF32_ROUNDING, "matrix_unit"  # also covers bf16x3, which "high" may use instead
    return 0.0, "ieee"


def score_error_bound(
    z_norm: torch.Tensor, e_norm: torch.Tensor, dim: int, input_rounding: float, accumulation: Accumulation
) -> torch.Tensor:
    """`B = a |z||e| + b |e|^2`: the proven bound on `|s~ - s|` for norms that broadcast against each other.

    Args:
        z_norm: float32, `|z|` (e.g. `[N]` or `[N, 1]`).
        e_norm: float32, `|e_k|` (e.g. `[N]` or `[K]`).
        dim: D.
        input_rounding, accumulation: the pass's `Candidates.input_rounding` and `.accumulation`.
    """
    c = input_rounding + accumulation_rounding(dim, accumulation)
    return z_norm * (2 * c * e_norm) + (c + _gamma(dim)) * e_norm.square()


def score_limits(cand: Candidates, z_norm: torch.Tensor, e_norm: torch.Tensor, dim: int) -> torch.Tensor:
    """float32 `[N]`: `s~_j + T` per row, rounded up; codes scoring above it cannot be the answer.

    A row is settled when its second-best score is above its limit (`cand.second > limit`).

    Args:
        cand: a fast pass with `second` tracked.
        z_norm: float32 `[N]`, `|z|` per row.
        e_norm: float32 `[K]`, `|e_k|` per code.
        dim: D.
    """
    e_max = e_norm.max()
    t = score_error_bound(z_norm, e_norm[cand.indices], dim, cand.input_rounding, cand.accumulation)  # B_j
    t += score_error_bound(z_norm, e_max, dim, cand.input_rounding, cand.accumulation)  # B_max
    t += (2 * _gamma(dim + 2, U64)) * (z_norm + e_max).square()  # E64
    limit = cand.best + t * _SLACK
    return torch.nextafter(limit, torch.full_like(limit, float("inf")))


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


def rescore_candidates(
    z: torch.Tensor, codebook: torch.Tensor, rows: torch.Tensor, sets: CandidateSets, max_temp_bytes: int
) -> torch.Tensor:
    """Float64 argmin over each row's candidate set; equal distances go to the lowest index.

    The same direct differences as `rescore`, over a handful of codes per row instead of all K.
    Plain torch on any device: the Triton backend uses it too.

    Args:
        z: `[N, D]`, codebook `[K, D]` (any float dtypes).
        rows: int64 `[R]`, R >= 1, the rows of z that `sets` belongs to.
        sets: every row's set fits (`counts <= indices.shape[1]`), with at least one code.
        max_temp_bytes: bound on the float64 `[rows, codes, D]` difference block.

    Returns:
        int64 `[R]`.
    """
    device = z.device if z.device.type != "mps" else torch.device("cpu")  # MPS has no float64
    n_codes, dim = codebook.shape
    width = int(sets.counts.max())
    codes = sets.indices[:, :width].to(device)  # (R, w), -1 past each row's count
    block_rows = max(1, min(rows.numel(), max_temp_bytes // (2 * 8 * width * dim)))
    out = torch.empty(rows.numel(), dtype=torch.int64, device=device)
    for r0 in range(0, rows.numel(), block_rows):
        idx = codes[r0 : r0 + block_rows]  # (r, w)
        zr = z[rows[r0 : r0 + block_rows]].to(device=device, dtype=torch.float64)  # (r, D)
        e = F.embedding(idx.clamp(min=0), codebook).to(device=device, dtype=torch.float64)  # (r, w, D)
        d = e.sub_(zr.unsqueeze(1)).square_().sum(2)  # (r, w): (e - z)^2 == (z - e)^2 exactly
        d = d.masked_fill_(idx < 0, float("inf"))
        best = d.min(dim=1, keepdim=True).values  # (r, 1)
        out[r0 : r0 + idx.shape[0]] = torch.where(d == best, idx, n_codes).min(dim=1).values
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
