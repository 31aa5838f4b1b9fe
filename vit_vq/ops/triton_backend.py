"""Fused nearest-code search in Triton: stream codebook tiles, keep a running minimum per row, O(N) memory.

Each program owns BLOCK_N rows of z and walks the codebook (or one split of it: small N splits the
codebook across programs, merged afterwards) in tiles of BLOCK_K codes, scoring `s = |e|^2 - 2 z.e`
with the matrix units and keeping the best (and in exact mode the second-best) score. Nothing of
size N x K is ever stored. Two ways to keep the running minimum are autotuned against each other:

- `PER_ELEMENT`: a `[BLOCK_N, BLOCK_K]` register array of per-column minima across tiles (3 ops per
  score, no reductions in the loop), reduced once at the end. Best when D is small and the loop is
  bound by these ops, not by the matmul.
- otherwise: reduce every tile to its row minimum and merge, which needs fewer registers and lets
  large-D configs use big matmul tiles.

Precision: fast mode takes one tf32 product of float32 inputs. Exact mode splits float32 inputs into
hi + lo parts and sums three products: tf32 parts for D <= 16, bfloat16 parts (twice the rate) above;
`exact` derives the error bound for each. 16-bit inputs use their native matrix units, whose
products are exact in float32. With float32 inputs and a spare padding column (D not a power of two,
or D < 16), `|e|^2` rides in the product as one more term, which saves an op per score.

Layout: `get_autotune_config()`, the kernel, the wrapper `search_triton` (checks -> allocates ->
launches), and `search_reference`, the float64 twin the tests compare against; `triton_rescore`
holds the norm and float64 rescoring kernels. Under `TRITON_INTERPRET=1` (read when this module is
imported) the kernels run on CPU tensors with one fixed config, because `@triton.autotune` cannot
run there.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from .exact import BF16X3_ROUNDING, TF32_ROUNDING, TF32X3_ROUNDING
from .torch_backend import Candidates, merge_candidates

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
INTERPRET = tl.constexpr(INTERPRETED)
SMALL_D = 64  # up to this D, a block of z stays in registers for the whole tile loop
TF32X3_MAX_D = 16  # exact mode splits float32 for tf32 up to this D, for bf16 above
INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 16, "PER_ELEMENT": True}
CODES_PER_SPLIT_MIN = 1024
CODE_ALIGN = 256  # splits start at, and e_sq is padded to, multiples of this (>= every BLOCK_K)


def get_autotune_config(small_d: bool) -> list[triton.Config]:
    """Configs tried per (K, D, dtypes, mode); kept short because every one is compiled on first use.

    Chosen from register and instruction counts of sm_90 builds (no spills where it matters):
    small D is bound by the per-score ops, so big elementwise tiles; large D by the matrix units.
    """
    if small_d:  # BLOCK_D is the padded D, set by the wrapper
        return [
            triton.Config({"BLOCK_N": 128, "BLOCK_K": 64, "PER_ELEMENT": True}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 256, "BLOCK_K": 64, "PER_ELEMENT": True}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "PER_ELEMENT": True}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "PER_ELEMENT": True}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "PER_ELEMENT": False}, num_warps=8, num_stages=3),
        ]
    return [
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "BLOCK_D": 32, "PER_ELEMENT": False}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 256, "BLOCK_D": 32, "PER_ELEMENT": False}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_D": 32, "PER_ELEMENT": False}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "BLOCK_D": 32, "PER_ELEMENT": False}, num_warps=4, num_stages=4),
    ]


@triton.jit
def _split_tf32(x):
    """x = hi + lo exactly, with `hi` truncated to tf32 (the top 10 mantissa bits)."""
    hi = (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def _round_bf16(x):
    """x rounded to the nearest bfloat16 (ties to even)."""
    if INTERPRET:  # the interpreter's conversion truncates: round with bit arithmetic instead
        bits = x.to(tl.int32, bitcast=True)
        x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return x.to(tl.bfloat16)


@triton.jit
def _split_bf16(x):
    """x ~ hi + lo in bfloat16: |x - hi - lo| <= 2^-16 |x|."""
    hi = _round_bf16(x)
    return hi, _round_bf16(x - hi.to(tl.float32))


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b in float32."""
    if INTERPRET:  # the interpreter multiplies bfloat16's raw bits; float32 gives the same exact products
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _matmul_t(z, e, PRECISION: tl.constexpr):
    """z @ e.T accumulated in float32: (BLOCK_N, BLOCK_D) x (BLOCK_K, BLOCK_D) -> (BLOCK_N, BLOCK_K).

    "tf32x3" / "bf16x3" split float32 inputs into hi + lo parts and sum three products, small terms
    first; otherwise one product with `input_precision=PRECISION`.
    """
    out = tl.zeros([z.shape[0], e.shape[0]], tl.float32)
    if PRECISION == "tf32x3":
        z_hi, z_lo = _split_tf32(z)
        e_hi, e_lo = _split_tf32(e)
    elif PRECISION == "bf16x3":
        z_hi, z_lo = _split_bf16(z)
        e_hi, e_lo = _split_bf16(e)
    if PRECISION == "tf32x3" or PRECISION == "bf16x3":
        e_hi = tl.trans(e_hi)
        out = _dot(z_lo, e_hi, out, "tf32")
        out = _dot(z_hi, tl.trans(e_lo), out, "tf32")
        return _dot(z_hi, e_hi, out, "tf32")
    else:
        return _dot(z, tl.trans(e), out, PRECISION)


@triton.jit
def _nearest_code_kernel(
    # pointers: inputs (e_sq padded with +inf to a multiple of BLOCK_K), then outputs of shape [splits, N].
    # AUGMENTED: e_ptr holds rows [-2 e, |e|^2, 0...] of width BLOCK_D, padded with rows [0, 2^120, 0...]
    # to a multiple of BLOCK_K, so that one product gives the score; e_sq_ptr is then unused.
    z_ptr, e_ptr, e_sq_ptr, out_idx_ptr, out_best_ptr, out_second_ptr,
    # sizes (D is compile-time: masks and the D loop resolve statically)
    N, K, codes_per_split, D: tl.constexpr,
    # strides
    stride_zn, stride_zd, stride_ek, stride_ed,
    # meta
    PRECISION: tl.constexpr, TOP2: tl.constexpr, UPCAST: tl.constexpr, SINGLE_D: tl.constexpr,
    AUGMENTED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PER_ELEMENT: tl.constexpr,
):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    dims = tl.arange(0, BLOCK_D)
    k_begin = split * codes_per_split
    k_end = tl.minimum(K, k_begin + codes_per_split)
    z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_zn  # (BLOCK_N, 1)

    if SINGLE_D:
        z = tl.load(z_rows + dims[None, :] * stride_zd, mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)
        if UPCAST:
            z = z.to(tl.float32)
        if AUGMENTED:
            z = tl.where(dims[None, :] == D, 1.0, z)  # this column picks up the codes' |e|^2

    inf = float("inf")
    best = tl.full([BLOCK_N], inf, tl.float32)
    second = tl.full([BLOCK_N], inf, tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int32) + k_begin
    if PER_ELEMENT:
        run_best = tl.full([BLOCK_N, BLOCK_K], inf, tl.float32)
        run_second = tl.full([BLOCK_N, BLOCK_K], inf, tl.float32)
        run_k0 = tl.zeros([BLOCK_N, BLOCK_K], tl.int32) + k_begin

    for tile in range(k_begin // BLOCK_K, tl.cdiv(k_end, BLOCK_K)):
        k0 = tile * BLOCK_K  # a multiple of BLOCK_K: the e_sq load below vectorises
        codes = k0 + cols
        code_ok = codes < K
        e_rows = e_ptr + codes.to(tl.int64)[:, None] * stride_ek  # (BLOCK_K, 1)
        if AUGMENTED:
            e = tl.load(e_rows + dims[None, :] * stride_ed)  # padded to whole tiles: no masks
            dot = _matmul_t(z, e, PRECISION)
        elif SINGLE_D:
            e = tl.load(e_rows + dims[None, :] * stride_ed, mask=code_ok[:, None] & (dims[None, :] < D), other=0.0)
            if UPCAST:
                e = e.to(tl.float32)
            dot = _matmul_t(z, e, PRECISION)
        else:
            dot = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + dims
                zc = tl.load(z_rows + dd[None, :] * stride_zd, mask=row_ok[:, None] & (dd[None, :] < D), other=0.0)
                ec = tl.load(e_rows + dd[None, :] * stride_ed, mask=code_ok[:, None] & (dd[None, :] < D), other=0.0)
                if UPCAST:
                    zc = zc.to(tl.float32)
                    ec = ec.to(tl.float32)
                if PRECISION == "tf32x3" or PRECISION == "bf16x3":
                    dot += _matmul_t(zc, ec, PRECISION)  # per-chunk sums keep the error bound at ~D terms
                else:
                    dot = _dot(zc, tl.trans(ec), dot, PRECISION)
        if AUGMENTED:
            s = dot  # (BLOCK_N, BLOCK_K) scores; padding codes score 2^120
        else:
            e_sq = tl.load(e_sq_ptr + codes)  # padded with +inf: codes past K never win
            s = e_sq[None, :] - 2.0 * dot  # (BLOCK_N, BLOCK_K)

        if PER_ELEMENT:
            if TOP2:
                run_second = tl.minimum(run_second, tl.maximum(run_best, s))
            # strict: an equal score from a later tile keeps the lower index. One use of the
            # predicate (min instead of a second select) keeps the compiler from spilling predicates.
            run_k0 = tl.where(s < run_best, k0, run_k0)
            run_best = tl.minimum(run_best, s)
        else:
            tile_best = tl.min(s, axis=1)
            tile_arg = tl.min(tl.where(s == tile_best[:, None], cols[None, :], BLOCK_K), axis=1)
            better = tile_best < best
            if TOP2:
                tile_second = tl.min(tl.where(cols[None, :] == tile_arg[:, None], inf, s), axis=1)
                second = tl.where(better, tl.minimum(best, tile_second), tl.minimum(second, tile_best))
            best_idx = tl.where(better, k0 + tile_arg, best_idx)
            best = tl.where(better, tile_best, best)

    if PER_ELEMENT:
        best = tl.min(run_best, axis=1)
        run_codes = run_k0 + cols[None, :]
        best_idx = tl.min(tl.where(run_best == best[:, None], run_codes, K), axis=1)  # lowest index among ties
        best_idx = tl.minimum(best_idx, K - 1)  # a valid index even for NaN inputs
        if TOP2:
            second = tl.min(tl.where(run_codes == best_idx[:, None], run_second, run_best), axis=1)

    if AUGMENTED and TOP2:
        second = tl.where(second >= 2.0**119, inf, second)  # only padding codes left: no second code

    out = split.to(tl.int64) * N + rows
    tl.store(out_idx_ptr + out, best_idx.to(tl.int64), mask=row_ok)
    tl.store(out_best_ptr + out, best, mask=row_ok)
    if TOP2:
        tl.store(out_second_ptr + out, second, mask=row_ok)


@triton.jit
def _pack_codebook_kernel(e_ptr, e_sq_ptr, out_ptr, K, stride_ek, stride_ed,
                          D: tl.constexpr, WIDTH: tl.constexpr, AUGMENTED: tl.constexpr, BLOCK_R: tl.constexpr):
    """The search kernel's view of the codebook, rows [0, K_padded): |e|^2 padded with +inf, or
    (AUGMENTED) rows [-2 e, |e|^2, 0...] of width WIDTH padded with rows [0, 2^120, 0...]."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    real = r < K
    e_sq = tl.load(e_sq_ptr + r, mask=real, other=0.0)
    if AUGMENTED:
        cols = tl.arange(0, WIDTH)
        e = tl.load(e_ptr + r.to(tl.int64)[:, None] * stride_ek + cols[None, :] * stride_ed,
                    mask=real[:, None] & (cols[None, :] < D), other=0.0).to(tl.float32)
        norm = tl.where(real, e_sq, 2.0**120)
        row = tl.where(cols[None, :] == D, norm[:, None], -2.0 * e)
        tl.store(out_ptr + r.to(tl.int64)[:, None] * WIDTH + cols[None, :], row)
    else:
        tl.store(out_ptr + r, tl.where(real, e_sq, float("inf")))


def _bench(kernel_call, quantiles):
    return do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)  # short: every config is timed once


def _prune(configs, named_args, **kwargs):
    """Exact mode keeps more state per score: drop the tiles that spill registers there (sm_90 builds)."""
    if not kwargs.get("TOP2", named_args.get("TOP2")):
        return configs
    limit = {True: 32, False: 64}  # scores per thread, by PER_ELEMENT
    return [
        c
        for c in configs
        if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= limit[c.kwargs["PER_ELEMENT"]] * 32 * c.num_warps
    ]


@functools.cache
def _tuned_kernel(small_d: bool):
    key = ["K", "D", "PRECISION", "TOP2", "UPCAST", "AUGMENTED"]  # the autotuner adds the tensors' dtypes
    return triton.autotune(
        configs=get_autotune_config(small_d), key=key, prune_configs_by={"early_config_prune": _prune}, do_bench=_bench
    )(_nearest_code_kernel)


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_splits(n_rows: int, n_codes: int, device: torch.device) -> int:
    """Split the codebook across programs when there are too few row blocks to fill the GPU."""
    if device.type != "cuda":
        return 1
    row_blocks = triton.cdiv(n_rows, 128)
    wanted = triton.cdiv(2 * sm_count(device.index or 0), row_blocks)
    return max(1, min(wanted, n_codes // CODES_PER_SPLIT_MIN))


def _precision(dtype: torch.dtype, dim: int, top2: bool, device: torch.device) -> tuple[str, float]:
    """`input_precision` for tl.dot and the matching `c_in` of the exact-mode bound."""
    if dtype != torch.float32:
        return "tf32", 0.0  # 16-bit products are exact in float32; the flag only affects float32 inputs
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return "ieee", 0.0  # no tf32 before Ampere
    if not top2:
        return "tf32", TF32_ROUNDING
    # the matrix units run bf16 at twice the tf32 rate; at D <= 16 the per-score ops dominate instead,
    # and tf32x3's 16x tighter bound leaves fewer rows to rescore
    return ("tf32x3", TF32X3_ROUNDING) if dim <= TF32X3_MAX_D else ("bf16x3", BF16X3_ROUNDING)


def search_triton(
    z: torch.Tensor,
    codebook: torch.Tensor,
    e_sq: torch.Tensor,
    *,
    top2: bool,
    splits: int | None = None,
    config: dict | None = None,
) -> Candidates:
    """Smallest score (and second smallest if `top2`) for every row of `z`, in one fused kernel.

    Args:
        z: `[N, D]` float32/bfloat16/float16, N >= 1, on CUDA (or CPU under TRITON_INTERPRET=1).
        codebook: `[K, D]`, same device; a dtype different from z's runs both in float32.
        e_sq: float32 `[K]` squared code norms.
        top2: track the second-best score (exact mode: float32 inputs split into hi + lo parts).
        splits: how many parts of the codebook run as separate programs (default: enough to fill the GPU).
        config: a fixed kernel config (`BLOCK_N`, `BLOCK_K`, `PER_ELEMENT`, optional `BLOCK_D`,
            `num_warps`, `num_stages`) instead of autotuning; the interpreter always uses one.

    Raises:
        RuntimeError: CPU tensors without the interpreter having been on when this module was imported.
    """
    if z.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "the Triton kernel got CPU tensors, but TRITON_INTERPRET=1 was not set when "
            "vit_vq.ops.triton_backend was first imported; set it before importing, or use the torch backend"
        )
    n_rows, dim = z.shape
    n_codes = codebook.shape[0]
    upcast = z.dtype != codebook.dtype
    precision, rounding = _precision(torch.float32 if upcast else z.dtype, dim, top2, z.device)
    splits = splits or default_splits(n_rows, n_codes, z.device)
    codes_per_split = triton.cdiv(triton.cdiv(n_codes, splits), CODE_ALIGN) * CODE_ALIGN
    splits = triton.cdiv(n_codes, codes_per_split)  # no empty split

    padded_d = max(16, triton.next_power_of_2(dim))
    if config is None and INTERPRETED:
        config = INTERPRETER_CONFIG
    config = dict(config) if config is not None else None
    block_d = config.pop("BLOCK_D", padded_d) if config is not None else padded_d
    if config is not None and CODE_ALIGN % config["BLOCK_K"]:
        raise ValueError(f"BLOCK_K must divide {CODE_ALIGN}, got {config['BLOCK_K']}")
    single_d = block_d >= dim if config is not None else dim <= SMALL_D
    # float32 with a spare padding column: fold |e|^2 into the product (one op less per score)
    augmented = single_d and block_d > dim and z.dtype == codebook.dtype == torch.float32

    k_padded = triton.cdiv(n_codes, CODE_ALIGN) * CODE_ALIGN
    if augmented:  # O(K) per call, like the norms
        table = e_sq_padded = torch.empty(k_padded, block_d, dtype=torch.float32, device=z.device)
    else:
        table, e_sq_padded = codebook, torch.empty(k_padded, dtype=torch.float32, device=z.device)
    _pack_codebook_kernel[(k_padded // CODE_ALIGN,)](
        codebook, e_sq, e_sq_padded, n_codes, codebook.stride(0), codebook.stride(1),
        D=dim, WIDTH=block_d, AUGMENTED=augmented, BLOCK_R=CODE_ALIGN,
    )  # fmt: skip
    out_idx = torch.empty(splits, n_rows, dtype=torch.int64, device=z.device)
    out_best = torch.empty(splits, n_rows, dtype=torch.float32, device=z.device)
    out_second = torch.empty_like(out_best) if top2 else out_best  # unused pointer when not top2
    args = (
        z, table, e_sq_padded, out_idx, out_best, out_second,
        n_rows, n_codes, codes_per_split, dim,
        z.stride(0), z.stride(1), table.stride(0), table.stride(1),
    )  # fmt: skip
    meta = {"PRECISION": precision, "TOP2": top2, "UPCAST": upcast, "SINGLE_D": single_d, "AUGMENTED": augmented}
    if config is not None:
        grid = (triton.cdiv(n_rows, config["BLOCK_N"]), splits)
        _nearest_code_kernel[grid](*args, **meta, BLOCK_D=block_d, **config)
    else:

        def grid(cfg):
            return (triton.cdiv(n_rows, cfg["BLOCK_N"]), splits)

        if single_d:
            _tuned_kernel(True)[grid](*args, **meta, BLOCK_D=block_d)
        else:
            _tuned_kernel(False)[grid](*args, **meta)

    accumulation = "ieee" if precision == "ieee" else "matrix_unit"
    result = Candidates(out_idx[0], out_best[0], out_second[0] if top2 else None, rounding, accumulation)
    for i in range(1, splits):
        part = Candidates(out_idx[i], out_best[i], out_second[i] if top2 else None, rounding, accumulation)
        result = merge_candidates(result, part)
    return result


def search_reference(z: torch.Tensor, codebook: torch.Tensor, *, top2: bool) -> Candidates:
    """The kernel's float64 twin: scores `|e|^2 - 2 z.e`, lowest index among equal minima, second best."""
    z64, e64 = z.double(), codebook.double()
    s = e64.square().sum(1)[None, :] - 2 * z64 @ e64.T  # (N, K)
    best, idx = s.min(dim=1)
    second = None
    if top2:
        second = s.scatter(1, idx[:, None], float("inf")).amin(dim=1)
    return Candidates(idx, best, second)
