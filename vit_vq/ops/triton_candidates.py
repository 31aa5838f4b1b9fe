"""Exact mode's second pass in Triton: list, for each unresolved row, the codes scoring at or below its limit.

Each program owns BLOCK_R unresolved rows (gathered through their row numbers) and walks its split
of the codebook in tiles of BLOCK_K codes, scoring `s = |e|^2 - 2 z.e` with the same matrix-unit
products as the search (`triton_backend._matmul_t`, same `input_precision`), so the scores obey the
search's error bound. Hits (`s <= limit`) are compacted with a running count and a prefix sum along
the tile and written in increasing code order into the row's `CAP` slots; a row with more hits only
has them counted. Splits of the codebook write their own slots and counts, merged afterwards.

Twin: `torch_backend.candidate_sets_torch` (the same sets wherever no score sits within rounding of
a limit; tests/triton_interpreter_cases.py compares both with a float64 reference). The sets are
rescored by `exact.rescore_candidates` (plain torch, on any device). Under `TRITON_INTERPRET=1`
the kernel runs on CPU tensors with one small fixed config.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .torch_backend import CandidateSets
from .triton_backend import CODE_ALIGN, INTERPRETED, _dot, _matmul_t, _precision, sm_count

CONFIG = {"BLOCK_R": 32, "BLOCK_K": 128, "BLOCK_D": 32, "num_warps": 4}
INTERPRETER_CONFIG = {"BLOCK_R": 16, "BLOCK_K": 16, "BLOCK_D": 16}
PROGRAMS_PER_SM = 2


@triton.jit
def _candidates_kernel(
    # pointers: z [N, D], the unresolved rows [R], codes [K, D], |e|^2 [K], limits [R]; outputs [splits, R, CAP]
    # and [splits, R]
    z_ptr, rows_ptr, e_ptr, e_sq_ptr, limit_ptr, out_idx_ptr, out_count_ptr,
    # sizes
    R, K, codes_per_split, D: tl.constexpr,
    # strides
    stride_zn, stride_zd, stride_ek, stride_ed,
    # meta
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, CAP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    split = tl.program_id(1)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    row = tl.load(rows_ptr + r, mask=r_ok, other=0)
    limit = tl.load(limit_ptr + r, mask=r_ok, other=float("-inf"))  # padding rows list nothing
    z_rows = z_ptr + row.to(tl.int64)[:, None] * stride_zn  # (BLOCK_R, 1)
    cols = tl.arange(0, BLOCK_K)
    dims = tl.arange(0, BLOCK_D)
    k_begin = split * codes_per_split
    k_end = tl.minimum(K, k_begin + codes_per_split)
    out_rows = out_idx_ptr + (split.to(tl.int64) * R + r)[:, None] * CAP  # (BLOCK_R, 1)
    count = tl.zeros([BLOCK_R], tl.int32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        codes = k0 + cols
        code_ok = codes < k_end
        e_rows = e_ptr + codes.to(tl.int64)[:, None] * stride_ek  # (BLOCK_K, 1)
        dot = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + dims
            zc = tl.load(z_rows + dd[None, :] * stride_zd, mask=r_ok[:, None] & (dd[None, :] < D), other=0.0)
            ec = tl.load(e_rows + dd[None, :] * stride_ed, mask=code_ok[:, None] & (dd[None, :] < D), other=0.0)
            if UPCAST:
                zc = zc.to(tl.float32)
                ec = ec.to(tl.float32)
            if PRECISION == "tf32x3" or PRECISION == "bf16x3":
                dot += _matmul_t(zc, ec, PRECISION)
            else:
                dot = _dot(zc, tl.trans(ec), dot, PRECISION)
        e_sq = tl.load(e_sq_ptr + codes, mask=code_ok, other=float("inf"))  # codes past the split never hit
        s = e_sq[None, :] - 2.0 * dot  # (BLOCK_R, BLOCK_K)
        hit = (s <= limit[:, None]).to(tl.int32)
        slot = count[:, None] + tl.cumsum(hit, axis=1) - 1  # hits keep their code order
        tl.store(out_rows + slot, codes[None, :].to(tl.int64), mask=(hit != 0) & (slot < CAP))
        count += tl.sum(hit, axis=1)
    tl.store(out_count_ptr + split.to(tl.int64) * R + r, count.to(tl.int64), mask=r_ok)


def candidate_sets_triton(
    z: torch.Tensor,
    codebook: torch.Tensor,
    e_sq: torch.Tensor,
    rows: torch.Tensor,
    limit: torch.Tensor,
    *,
    cap: int,
    splits: int | None = None,
) -> CandidateSets:
    """For each of `z[rows]`, the codes whose score is at most its `limit`, in one kernel.

    Args:
        z: `[N, D]` float32/bfloat16/float16, on CUDA (or CPU under TRITON_INTERPRET=1).
        codebook: `[K, D]`, same device; a dtype different from z's runs both in float32.
        e_sq: float32 `[K]` squared code norms.
        rows: int64 `[R]`, R >= 1.
        limit: float32 `[R]`, each row's score limit (`exact.score_limits`).
        cap: W, the most codes listed per row.
        splits: parts of the codebook run as separate programs (default: enough to fill the GPU).
    """
    n_rows, (n_codes, dim) = rows.numel(), codebook.shape
    upcast = z.dtype != codebook.dtype
    precision, _ = _precision(torch.float32 if upcast else z.dtype, dim, True, z.device)
    cfg = dict(INTERPRETER_CONFIG if INTERPRETED else CONFIG)
    row_blocks = triton.cdiv(n_rows, cfg["BLOCK_R"])
    if splits is None:
        splits = 1
        if z.device.type == "cuda":
            wanted = triton.cdiv(PROGRAMS_PER_SM * sm_count(z.device.index or 0), row_blocks)
            splits = max(1, min(wanted, n_codes // 1024))
    codes_per_split = triton.cdiv(triton.cdiv(n_codes, splits), CODE_ALIGN) * CODE_ALIGN
    splits = triton.cdiv(n_codes, codes_per_split)  # no empty split
    out_idx = torch.full((splits, n_rows, cap), -1, dtype=torch.int64, device=z.device)
    out_count = torch.empty(splits, n_rows, dtype=torch.int64, device=z.device)
    _candidates_kernel[(row_blocks, splits)](
        z, rows, codebook, e_sq, limit, out_idx, out_count,
        n_rows, n_codes, codes_per_split, dim,
        z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1),
        PRECISION=precision, UPCAST=upcast, CAP=cap, **cfg,
    )  # fmt: skip
    return merge_splits(out_idx, out_count)


def merge_splits(indices: torch.Tensor, counts: torch.Tensor) -> CandidateSets:
    """One set per row from per-split sets `[S, R, W]` and counts `[S, R]`: listed codes first, split by split."""
    n_splits, n_rows, cap = indices.shape
    total = counts.sum(dim=0)  # (R,)
    if n_splits == 1:
        return CandidateSets(indices[0], total)
    listed = torch.arange(cap, device=indices.device) < counts.unsqueeze(2)  # (S, R, W)
    flat = indices.permute(1, 0, 2).reshape(n_rows, n_splits * cap)  # (R, S*W)
    keep = listed.permute(1, 0, 2).reshape(n_rows, n_splits * cap)
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :cap]  # listed slots first
    merged = flat.gather(1, order).masked_fill_(~keep.gather(1, order), -1)
    return CandidateSets(merged, total)
