"""Triton kernels for the steps around the search: per-code squared norms, and exact mode's float64 rescoring.

Both have torch twins: `torch_backend.squared_norms` and `exact.rescore`. The rescoring shares one
contract with its twin (direct float64 differences, ties to the lowest index), enforced for both by
tests/test_backend_contract.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .torch_backend import Candidates, merge_candidates
from .triton_backend import sm_count

# Tile and programs per SM from benchmarks/bench_rescore.py on an H200 (docs/benchmarks.md): 16 x 128 tiles
# were fastest at D = 8, 32 and 512; more codebook splits pay only when each program has a long D loop.
RESCORE_CONFIG = {"BLOCK_R": 16, "BLOCK_K": 128, "num_warps": 4}
LONG_D, PROGRAMS_PER_SM_LONG_D, PROGRAMS_PER_SM = 256, 8, 2


@triton.jit
def _squared_norms_kernel(x_ptr, out_ptr, R, stride_r, stride_c, D: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """out[r] = sum_d x[r, d]^2, accumulated in out's dtype; the same reduction order for every row."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    dims = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_R], out_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + dims
        x = tl.load(x_ptr + r.to(tl.int64)[:, None] * stride_r + dd[None, :] * stride_c,
                    mask=r_ok[:, None] & (dd[None, :] < D), other=0.0).to(out_ptr.dtype.element_ty)
        acc += tl.sum(x * x, axis=1)
    tl.store(out_ptr + r, acc, mask=r_ok)


def squared_norms_triton(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`[rows]` in `dtype`: each row's sum of squares, in one kernel with no temporaries (twin:
    `torch_backend.squared_norms`). Equal rows get exactly equal values."""
    out = torch.empty(x.shape[0], dtype=dtype, device=x.device)
    block_d = min(64, max(16, triton.next_power_of_2(x.shape[1])))
    _squared_norms_kernel[(triton.cdiv(x.shape[0], 64),)](
        x, out, x.shape[0], x.stride(0), x.stride(1), x.shape[1], BLOCK_R=64, BLOCK_D=block_d
    )
    return out


@triton.jit
def _rescore_kernel(
    # pointers: float32 rows to rescore [R, D], float32 codes [K, D], outputs [splits, R]
    z_ptr, e_ptr, out_idx_ptr, out_best_ptr,
    # sizes
    R, K, codes_per_split, D,
    # strides
    stride_zn, stride_zd, stride_ek, stride_ed,
    # meta
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Float64 distances sum_d (z_d - e_d)^2 by direct differences; lowest index among equal minima.

    No `|e|^2 - 2 z.e` form: that cancels catastrophically for data with a large common offset,
    even in float64. One dimension at a time keeps every temporary two-dimensional.
    """
    split = tl.program_id(1)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    z_rows = z_ptr + r.to(tl.int64) * stride_zn  # (BLOCK_R,)
    cols = tl.arange(0, BLOCK_K)
    k_begin = split * codes_per_split
    k_end = tl.minimum(K, k_begin + codes_per_split)
    best = tl.full([BLOCK_R], float("inf"), tl.float64)
    best_idx = tl.zeros([BLOCK_R], tl.int32) + k_begin
    for k0 in range(k_begin, k_end, BLOCK_K):
        codes = k0 + cols
        code_ok = codes < k_end
        e_rows = e_ptr + codes.to(tl.int64) * stride_ek  # (BLOCK_K,)
        dist = tl.zeros([BLOCK_R, BLOCK_K], tl.float64)
        for d in range(0, D):
            zc = tl.load(z_rows + d * stride_zd, mask=r_ok, other=0.0).to(tl.float64)  # (BLOCK_R,)
            ec = tl.load(e_rows + d * stride_ed, mask=code_ok, other=0.0).to(tl.float64)  # (BLOCK_K,)
            diff = zc[:, None] - ec[None, :]
            dist += diff * diff
        dist = tl.where(code_ok[None, :], dist, float("inf"))  # codes past the split never win
        tile_best = tl.min(dist, axis=1)
        tile_arg = tl.min(tl.where(dist == tile_best[:, None], cols[None, :], BLOCK_K), axis=1)
        better = tile_best < best
        best_idx = tl.where(better, k0 + tile_arg, best_idx)
        best = tl.where(better, tile_best, best)
    out = split.to(tl.int64) * R + r
    tl.store(out_idx_ptr + out, best_idx.to(tl.int64), mask=r_ok)
    tl.store(out_best_ptr + out, best, mask=r_ok)


def rescore_triton(z: torch.Tensor, codebook: torch.Tensor, rows: torch.Tensor, *, splits: int | None = None) -> torch.Tensor:
    """Float64 argmin over the whole codebook for `z[rows]` (exact mode's rescoring), in one kernel.

    The same contract as its torch twin `exact.rescore`: distances by direct float64 differences,
    equal distances to the lowest index.

    Args:
        z: `[N, D]`, codebook `[K, D]` (any float dtypes; float32 into the kernel, float64 inside it).
        rows: int64 `[R]`, R >= 1.
        splits: parts of the codebook run as separate programs (default: enough to fill the GPU).

    Returns:
        int64 `[R]`.
    """
    n_rows, n_codes, dim = rows.numel(), codebook.shape[0], codebook.shape[1]
    zr = z[rows].float()  # (R, D)
    codebook = codebook.float()  # a copy only for 16-bit codebooks (float32 -> float64 is exact)
    cfg = dict(RESCORE_CONFIG)
    row_blocks = triton.cdiv(n_rows, cfg["BLOCK_R"])
    if splits is None:
        splits = 1
        if z.device.type == "cuda":
            per_sm = PROGRAMS_PER_SM_LONG_D if dim >= LONG_D else PROGRAMS_PER_SM
            splits = max(1, min(triton.cdiv(per_sm * sm_count(z.device.index or 0), row_blocks), n_codes // 1024))
    codes_per_split = triton.cdiv(triton.cdiv(n_codes, splits), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    splits = triton.cdiv(n_codes, codes_per_split)
    out_idx = torch.empty(splits, n_rows, dtype=torch.int64, device=z.device)
    out_best = torch.empty(splits, n_rows, dtype=torch.float64, device=z.device)
    _rescore_kernel[(row_blocks, splits)](
        zr, codebook, out_idx, out_best,
        n_rows, n_codes, codes_per_split, dim,
        zr.stride(0), zr.stride(1), codebook.stride(0), codebook.stride(1),
        **cfg,
    )  # fmt: skip
    result = Candidates(out_idx[0], out_best[0], None)
    for i in range(1, splits):
        result = merge_candidates(result, Candidates(out_idx[i], out_best[i], None))
    return result.indices
