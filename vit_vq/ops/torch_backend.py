"""Chunked nearest-code search in plain torch, with bounded temporaries (the CPU / no-Triton path).

Scores are `s_k = |e_k|^2 - 2 z.e_k` (the row constant `|z|^2` is left out). For a block of rows,
`torch.addmm` writes the `[codes, rows]` score block into a preallocated buffer (codes along dim 0
runs ~2x faster than `[rows, codes]` at small D on CPU, and reusing one buffer avoids the allocator
fragmentation that fresh per-chunk tensors cause). The minimum is then found in two cheap steps: a
vectorised `amin` over groups of `GROUP` codes, and an indexed `min` inside the winning group only
(`torch.min(dim)` with indices is ~15x slower than `amin` on CPU, so it never runs over all K codes).

Ties: `torch.min` returns the first minimum, the first group holding the minimum is taken, and
blocks of codes are merged with a strict `<`, so equal scores always go to the lowest index.

Big CPU searches hand whole units of row blocks to a few single-threaded worker threads
(`cpu_workers`), each with its own buffers, instead of running every small operation on all of
torch's threads: thousands of small parallel regions stall whenever another process holds a core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .cpu_workers import row_spans, run_units

DEFAULT_MAX_TEMP_BYTES = 64 * 2**20
GROUP = 256  # codes per group in the two-step minimum
CPU_SCORE_BYTES = 4 * 2**20  # score block kept cache-sized on CPU
MIN_BLOCK_ROWS = 32  # split the codebook only when fewer rows than this would fit
PARALLEL_MIN_SCORES = 2**22  # smaller searches run inline: a few ms, too short to be worth threads

Accumulation = Literal["ieee", "matrix_unit"]  # how a pass sums products: round to nearest, or matrix units


@dataclass
class Candidates:
    """Result of one search pass over (part of) a codebook, per row of z.

    indices: int64 `[N]`, the lowest-index code with the smallest computed score.
    best: float32 `[N]`, that score `|e|^2 - 2 z.e`.
    second: float32 `[N]`, the smallest score among all *other* codes (`+inf` if there are none;
        equal to `best` when the minimum is tied), or `None` when not tracked.
    input_rounding: bound on the relative rounding of each matmul input in this pass
        (0 when products were exact in float32); used by exact mode's error bound.
    accumulation: `"ieee"` when every sum was rounded to nearest (CPU, cuBLAS sgemm), `"matrix_unit"`
        when matrix units summed (they may truncate); selects exact mode's accumulation term.
    """

    indices: torch.Tensor
    best: torch.Tensor
    second: torch.Tensor | None
    input_rounding: float = 0.0
    accumulation: Accumulation = "ieee"


@dataclass
class CandidateSets:
    """Exact mode's candidate sets: per unresolved row, the codes scoring at or below its limit.

    indices: int64 `[R, W]`, a row's codes first (in any order), then -1; W <= the cap.
    counts: int64 `[R]`, the size of each set; a row with more codes than the cap overflowed and
        its `indices` are incomplete (it is rescored against the whole codebook).
    """

    indices: torch.Tensor
    counts: torch.Tensor


def merge_candidates(first: Candidates, later: Candidates) -> Candidates:
    """Combine two passes, where `later` searched only codes with higher indices than `first`."""
    better = later.best < first.best  # strict: ties keep the lower index
    second = None
    if first.second is not None and later.second is not None:
        second = torch.where(
            better, torch.minimum(first.best, later.second), torch.minimum(first.second, later.best)
        )
    return Candidates(
        indices=torch.where(better, later.indices, first.indices),
        best=torch.where(better, later.best, first.best),
        second=second,
        input_rounding=max(first.input_rounding, later.input_rounding),
        accumulation="matrix_unit" if "matrix_unit" in (first.accumulation, later.accumulation) else "ieee",
    )


def squared_norms(
    x: torch.Tensor, max_temp_bytes: int = DEFAULT_MAX_TEMP_BYTES, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """`[rows]` in `dtype`: the sum of squares of each row of `x`, in blocks of at most `max_temp_bytes`.

    A plain sum of squares (not a rounded norm squared), so equal rows, and integer-valued rows, get
    exactly equal values.
    """
    out = torch.empty(x.shape[0], dtype=dtype, device=x.device)
    step = max(1, max_temp_bytes // (dtype.itemsize * x.shape[1]))
    for r0 in range(0, x.shape[0], step):
        torch.sum(x[r0 : r0 + step].to(dtype).square(), dim=1, out=out[r0 : r0 + step])
    return out


def block_shape(n_rows: int, n_codes: int, max_temp_bytes: int, *, cpu: bool) -> tuple[int, int]:
    """`(rows, codes)` per block, so that a block's temporaries stay within `max_temp_bytes`.

    The whole codebook is one block unless `MIN_BLOCK_ROWS` rows of it would not fit. On CPU the
    score block is also held to `CPU_SCORE_BYTES` (cache-sized: the grouped `amin` slows ~10x once
    the block spills out of cache) and rows come in multiples of 32 (whole vectors for that `amin`).
    A block never goes below one row by one group of codes.
    """
    group = min(GROUP, n_codes)

    def padded(codes: int) -> int:
        return -(-codes // group) * group

    def bytes_per_row(codes: int) -> int:
        return 4 * padded(codes) + 8 * (padded(codes) // group) + 16 * group  # scores, group minima, a group

    min_rows = min(MIN_BLOCK_ROWS, n_rows)
    score_limit = min(max_temp_bytes, CPU_SCORE_BYTES) if cpu else max_temp_bytes
    codes = n_codes
    if bytes_per_row(codes) * min_rows > max_temp_bytes or 4 * padded(codes) * min_rows > score_limit:
        codes = min(n_codes, max(group, score_limit // (4 * min_rows) // group * group))
    rows = max_temp_bytes // bytes_per_row(codes)
    if cpu:
        rows = min(rows, CPU_SCORE_BYTES // (4 * padded(codes)))
    if rows >= 64:
        rows = rows // 32 * 32
    return max(1, min(n_rows, rows)), codes


def worker_count(z: torch.Tensor, n_codes: int, n_blocks: int) -> int:
    """Worker threads for a CPU search: torch's thread count for big searches, else 1 (run inline)."""
    if z.device.type != "cpu" or z.shape[0] * n_codes < PARALLEL_MIN_SCORES:
        return 1
    return max(1, min(torch.get_num_threads(), n_blocks))


@dataclass
class _Scratch:
    """One worker's preallocated buffers, reused for every block it scores."""

    scores: torch.Tensor
    group_min: torch.Tensor
    arange: torch.Tensor

    @classmethod
    def allocate(cls, rows: int, codes: int, group: int, device: torch.device) -> _Scratch:
        padded = -(-codes // group) * group
        return cls(
            scores=torch.empty(padded * rows, dtype=torch.float32, device=device),
            group_min=torch.empty(padded // group * rows, dtype=torch.float32, device=device),
            arange=torch.arange(rows, device=device),
        )


def search_torch(
    z: torch.Tensor,
    codebook: torch.Tensor,
    e_sq: torch.Tensor,
    *,
    top2: bool,
    max_temp_bytes: int = DEFAULT_MAX_TEMP_BYTES,
    input_rounding: float = 0.0,
    accumulation: Accumulation = "ieee",
    workers: int | None = None,
) -> Candidates:
    """Smallest score (and second smallest if `top2`) for every row of `z`.

    On CPU, big searches run on a few single-threaded worker threads (`cpu_workers`), each with
    its own buffers: coarse units of rows hold up when other processes share the cores, where
    thousands of small multi-threaded operations stall. Every row is scored by the same operations
    whichever thread runs it, so the result does not depend on the worker count.

    Args:
        z: float32 `[N, D]`, N >= 1.
        codebook: float32 `[K, D]`, K >= 1.
        e_sq: float32 `[K]`, the squared code norms (computed per call by the caller).
        top2: also track the second-best score (exact mode).
        max_temp_bytes: bound on each worker's temporaries (score block, group minima, gathered groups).
        input_rounding, accumulation: recorded in the result (torch's fp32 matmul setting, see `exact`).
        workers: worker threads (default: `worker_count`); 1 runs inline on the caller's thread
            with its own torch threads.
    """
    n_rows, n_codes = z.shape[0], codebook.shape[0]
    rows, codes = block_shape(n_rows, n_codes, max_temp_bytes, cpu=z.device.type == "cpu")
    group = min(GROUP, n_codes)
    out = Candidates(
        indices=torch.empty(n_rows, dtype=torch.int64, device=z.device),
        best=torch.empty(n_rows, dtype=torch.float32, device=z.device),
        second=torch.empty(n_rows, dtype=torch.float32, device=z.device) if top2 else None,
        input_rounding=input_rounding,
        accumulation=accumulation,
    )
    n_blocks = -(-n_rows // rows)
    workers = worker_count(z, n_codes, n_blocks) if workers is None else min(workers, n_blocks)

    def make_scratch() -> _Scratch:
        return _Scratch.allocate(rows, codes, group, z.device)

    def search_rows(scratch: _Scratch, span: tuple[int, int]) -> None:
        for r0 in range(span[0], span[1], rows):
            _search_rows(z[r0 : min(r0 + rows, span[1])], codebook, e_sq, codes, group, top2, scratch, out, r0)

    if workers <= 1:
        search_rows(make_scratch(), (0, n_rows))
        return out
    run_units(row_spans(n_rows, rows, workers), workers, make_scratch, search_rows)
    return out


def _search_rows(
    zb: torch.Tensor,
    codebook: torch.Tensor,
    e_sq: torch.Tensor,
    codes: int,
    group: int,
    top2: bool,
    scratch: _Scratch,
    out: Candidates,
    r0: int,
) -> None:
    """One block of rows against the whole codebook (in blocks of `codes`), written into `out` at `r0`."""
    result = None
    for k0 in range(0, codebook.shape[0], codes):
        part = _search_block(zb, codebook[k0 : k0 + codes], e_sq[k0 : k0 + codes], scratch, group, top2)
        if k0:
            part.indices += k0
        result = part if result is None else merge_candidates(result, part)
    r1 = r0 + zb.shape[0]
    out.indices[r0:r1] = result.indices
    out.best[r0:r1] = result.best
    if top2:
        out.second[r0:r1] = result.second


def _search_block(
    zb: torch.Tensor, cb: torch.Tensor, e_sq: torch.Tensor, scratch: _Scratch, group: int, top2: bool
) -> Candidates:
    """One block of rows against one block of codes, in the preallocated buffers."""
    scores, group_min, arange = scratch.scores, scratch.group_min, scratch.arange
    r, k = zb.shape[0], cb.shape[0]
    n_groups = -(-k // group)
    s = scores[: n_groups * group * r].view(n_groups * group, r)  # (k_padded, r): codes along dim 0
    torch.addmm(e_sq.unsqueeze(1), cb, zb.t(), beta=1.0, alpha=-2.0, out=s[:k])
    if s.shape[0] > k:
        s[k:].fill_(float("inf"))  # padding codes never win
    s3 = s.view(n_groups, group, r)
    gmin = torch.amin(s3, dim=1, out=group_min[: n_groups * r].view(n_groups, r))  # (n_groups, r)
    best, g = gmin.min(dim=0)  # (r,): first group holding the minimum
    rows = arange[:r]
    block = s3[g, :, rows]  # (r, group): each row's winning group (a copy)
    j = block.argmin(dim=1)  # first position holding the minimum
    second = None
    if top2:
        block[rows, j] = float("inf")
        gmin[g, rows] = float("inf")
        second = torch.minimum(block.amin(dim=1), gmin.amin(dim=0))
    return Candidates(g * group + j, best, second)


def candidate_sets_torch(
    z: torch.Tensor,
    codebook: torch.Tensor,
    e_sq: torch.Tensor,
    rows: torch.Tensor,
    limit: torch.Tensor,
    *,
    cap: int,
    max_temp_bytes: int = DEFAULT_MAX_TEMP_BYTES,
) -> CandidateSets:
    """Exact mode's second pass: for each of `z[rows]`, the codes whose score is at most its `limit`.

    Scores are `|e|^2 - 2 z.e` from `addmm` into a preallocated `[rows, codes]` block, compared
    with the limit in place; only the hits are gathered. Big passes (many unresolved rows) run on
    worker threads like `search_torch`.

    Args:
        z: float32 `[N, D]`; codebook float32 `[K, D]`; e_sq float32 `[K]`.
        rows: int64 `[R]`, R >= 1.
        limit: float32 `[R]`, each row's score limit (`exact.score_limits`).
        cap: W, the most codes listed per row (a row with more only has them counted).
        max_temp_bytes: bound on each worker's score block (half of it) and the hits.
    """
    n_rows, n_codes = rows.numel(), codebook.shape[0]
    zr = z[rows]  # (R, D)
    cpu = z.device.type == "cpu"
    score_limit = max_temp_bytes // 2  # the other half for the hits and per-row temporaries
    score_limit = min(score_limit, CPU_SCORE_BYTES) if cpu else score_limit
    codes = max(1, min(n_codes, score_limit // (4 * min(MIN_BLOCK_ROWS, n_rows))))
    block = max(1, min(n_rows, score_limit // (4 * codes)))
    counts = torch.zeros(n_rows, dtype=torch.int64, device=z.device)
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (row, code) of every listed hit

    def make_scratch() -> torch.Tensor:
        return torch.empty(block * codes, dtype=torch.float32, device=z.device)

    def find(scores: torch.Tensor, span: tuple[int, int]) -> None:
        for r0 in range(span[0], span[1], block):
            r1 = min(r0 + block, span[1])
            count = counts[r0:r1]  # a view: updated in place
            for k0 in range(0, n_codes, codes):
                k = min(codes, n_codes - k0)
                s = scores[: (r1 - r0) * k].view(r1 - r0, k)  # (r, k)
                torch.addmm(e_sq[k0 : k0 + k].unsqueeze(0), zr[r0:r1], codebook[k0 : k0 + k].t(), alpha=-2.0, out=s)
                hit = s.le_(limit[r0:r1, None])  # 1.0 where listed, in place (a bool sum would copy the block)
                new = hit.sum(dim=1).long()  # (r,)
                hit[count + new > cap] = 0  # overflowing rows are counted, not listed
                r, c = hit.nonzero(as_tuple=True)  # (row, code) pairs
                pairs.append((r + r0, c + k0))  # list.append is atomic across worker threads
                count += new

    n_blocks = -(-n_rows // block)
    workers = worker_count(zr, n_codes, n_blocks)
    if workers <= 1:
        find(make_scratch(), (0, n_rows))
    else:
        run_units(row_spans(n_rows, block, workers), workers, make_scratch, find)
    return _dense_sets(pairs, counts, cap)


def _dense_sets(pairs: list[tuple[torch.Tensor, torch.Tensor]], counts: torch.Tensor, cap: int) -> CandidateSets:
    """`CandidateSets` as narrow as the biggest set that fits `cap`, from (row, code) pairs in any order."""
    row = torch.cat([p[0] for p in pairs])
    code = torch.cat([p[1] for p in pairs])
    keep = counts[row] <= cap  # drop the partial lists of rows that overflowed later
    row, code = row[keep], code[keep]
    order = torch.argsort(row * (int(code.max()) + 1 if code.numel() else 1) + code)  # by row, then code
    row, code = row[order], code[order]
    fits = counts[counts <= cap]
    width = int(fits.max()) if fits.numel() else 0
    listed = torch.zeros_like(counts).index_add_(0, row, torch.ones_like(row))
    first = torch.cumsum(listed, 0) - listed  # (R,) each row's first pair
    indices = torch.full((counts.numel(), width), -1, dtype=torch.int64, device=counts.device)
    indices[row, torch.arange(row.numel(), device=row.device) - first[row]] = code
    return CandidateSets(indices, counts)
