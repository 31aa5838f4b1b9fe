"""Exact mode's float64 rescoring kernel (`vit_vq.ops.triton_rescore`): memory layout, tile sizes and
codebook splits, on the row counts `bench_lookup.py` sees rescored; then the candidate-set path
(`triton_candidates`, issue 22) against the whole-codebook rescoring on the rows the bound leaves.

    python benchmarks/bench_rescore.py --out DIR          # CUDA; DIR/rescore.json and rescore.md
    TRITON_INTERPRET=1 python benchmarks/bench_rescore.py --out DIR --device cpu --small   # a dry run

Every variant runs the same kernel (same arithmetic, same order), so every variant must return the same
indices as the library's `rescore_triton`, which is itself checked against the torch twin
`exact.rescore` (float64 by direct differences) on the first rows. Times: `triton.testing.do_bench`
medians, the kernel alone (the layout copies are timed separately).

The candidate table runs the real first pass (`search_triton`) and bound (`exact.score_limits`) on
each case, and times, for the unresolved rows: the candidate pass plus the float64 rescoring of the
sets (`candidate_sets_triton` + `exact.rescore_candidates`), against `rescore_triton` over the whole
codebook; both must return the same indices.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from vit_vq.ops import exact, triton_rescore  # noqa: E402
from vit_vq.ops.torch_backend import Candidates, CandidateSets, merge_candidates  # noqa: E402
from vit_vq.ops.triton_backend import search_triton, sm_count  # noqa: E402
from vit_vq.ops.triton_candidates import candidate_sets_triton  # noqa: E402

# (N, K, D, share of rows rescored): the shares bench_lookup.py measured on an H200 (random data).
CASES = [(12544, 16384, 512, 0.0693), (65536, 8192, 32, 0.0140), (65536, 16384, 8, 0.0056)]
TILES = [(32, 64, 4), (64, 64, 4), (32, 128, 4), (64, 128, 8), (16, 64, 2), (16, 128, 4)]
PROGRAMS_PER_SM = [2, 8]
SMALL_CASES = [(256, 1024, 40, 0.1)]


def bench(fn) -> float:
    """Median milliseconds: device events on CUDA, one wall-clock run under the interpreter."""
    if torch.cuda.is_available():
        return do_bench(fn, return_mode="median")
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def programs(device: torch.device) -> int:
    return sm_count(device.index or 0) if device.type == "cuda" else 1


def layout_copies(z: torch.Tensor, e: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return z[rows].T.contiguous(), e.T.contiguous()


def run_kernel(zr, e, layout: str, tile, per_sm: int) -> torch.Tensor:
    """The rescoring kernel on rows `zr` against codes `e` (`[R, D]`, `[K, D]` for layout "rows"; `[D, R]`, `[D, K]`
    for "columns") with one tile and split rule; indices `[R]`."""
    block_r, block_k, warps = tile
    if layout == "rows":  # zr [R, D], e [K, D]
        (n_rows, dim), n_codes = zr.shape, e.shape[0]
        strides = (zr.stride(0), zr.stride(1), e.stride(0), e.stride(1))
    else:  # zr [D, R], e [D, K]
        (dim, n_rows), n_codes = zr.shape, e.shape[1]
        strides = (zr.stride(1), zr.stride(0), e.stride(1), e.stride(0))
    row_blocks = triton.cdiv(n_rows, block_r)
    splits = max(1, min(triton.cdiv(per_sm * programs(zr.device), row_blocks), n_codes // 1024))
    per_split = triton.cdiv(triton.cdiv(n_codes, splits), block_k) * block_k
    splits = triton.cdiv(n_codes, per_split)
    idx = torch.empty(splits, n_rows, dtype=torch.int64, device=zr.device)
    best = torch.empty(splits, n_rows, dtype=torch.float64, device=zr.device)
    triton_rescore._rescore_kernel[(row_blocks, splits)](
        zr, e, idx, best, n_rows, n_codes, per_split, dim, *strides,
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=warps,
    )  # fmt: skip
    result = Candidates(idx[0], best[0], None)
    for i in range(1, splits):
        result = merge_candidates(result, Candidates(idx[i], best[i], None))
    return result.indices


def candidate_path(z: torch.Tensor, e: torch.Tensor, rows: torch.Tensor, limit: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(indices of `z[rows]`, rows that overflowed the cap): candidate sets, rescored; overflow rows whole-codebook."""
    sets = candidate_sets_triton(z, e, triton_rescore.squared_norms_triton(e), rows, limit, cap=exact.CANDIDATE_CAP)
    fits = sets.counts <= exact.CANDIDATE_CAP
    out = torch.empty_like(rows)
    listed = CandidateSets(sets.indices[fits], sets.counts[fits])
    out[fits] = exact.rescore_candidates(z, e, rows[fits], listed, 1 << 26)
    if not bool(fits.all()):
        out[~fits] = triton_rescore.rescore_triton(z, e, rows[~fits])
    return out, int((~fits).sum())


def candidate_table(cases, dev: torch.device, gen: torch.Generator) -> tuple[list[str], list[dict]]:
    """Markdown lines and rows: the candidate path against whole-codebook rescoring, on the unresolved rows."""
    lines = ["", "| case (N, K, D) | rows unresolved | to the whole codebook | mean set | candidates: pass + rescoring ms "
             "| whole codebook ms | same indices |", "|---|---:|---:|---:|---:|---:|---|"]
    out = []
    for n, k, d, _ in cases:
        z = torch.randn(n, d, device=dev, generator=gen)
        e = torch.randn(k, d, device=dev, generator=gen)
        e_sq = triton_rescore.squared_norms_triton(e)
        cand = search_triton(z, e, e_sq, top2=True)
        limit = exact.score_limits(cand, torch.linalg.vector_norm(z, dim=1), e_sq.sqrt(), d)
        rows = (cand.second <= limit).nonzero().squeeze(1)
        if not rows.numel():
            lines.append(f"| {n}, {k}, {d} | 0 | | | | | |")
            continue
        got, overflow = candidate_path(z, e, rows, limit[rows])
        sets = candidate_sets_triton(z, e, e_sq, rows, limit[rows], cap=exact.CANDIDATE_CAP)
        mean_set = float(sets.counts[sets.counts <= exact.CANDIDATE_CAP].double().mean())
        same = torch.equal(got, triton_rescore.rescore_triton(z, e, rows))
        cand_ms = bench(functools.partial(candidate_path, z, e, rows, limit[rows]))
        whole_ms = bench(functools.partial(triton_rescore.rescore_triton, z, e, rows))
        out.append(dict(case=[n, k, d], unresolved=rows.numel(), overflow=overflow, mean_set=mean_set,
                        candidates_ms=cand_ms, codebook_ms=whole_ms, same=same))
        lines.append(
            f"| {n}, {k}, {d} | {rows.numel()} | {overflow} | {mean_set:.2f} | {cand_ms:.3f} | {whole_ms:.3f} | {same} |"
        )
    return lines, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="one small case (an interpreter dry run)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_rescore.py: no CUDA device here; for a dry run use TRITON_INTERPRET=1 with --device cpu --small")
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    gen = torch.Generator(device=dev).manual_seed(0)
    header = "| case (N, K, D), rows | layout | BLOCK_R x BLOCK_K, warps | programs/SM | median ms | same indices |"
    rows_out, lines = [], [header, "|---|---|---|---|---|---|"]
    for n, k, d, share in SMALL_CASES if args.small else CASES:
        z = torch.randn(n, d, device=dev, generator=gen)
        e = torch.randn(k, d, device=dev, generator=gen)
        rows = torch.randperm(n, device=dev, generator=gen)[: max(1, round(share * n))]
        lib = triton_rescore.rescore_triton(z, e, rows)
        ref = exact.rescore(z, e, rows[:64], 1 << 26)
        assert torch.equal(lib[:64], ref), f"rescore_triton differs from the float64 torch twin on {(n, k, d)}"
        copy_ms = bench(functools.partial(layout_copies, z, e, rows))
        lib_ms = bench(functools.partial(triton_rescore.rescore_triton, z, e, rows))
        inputs = {"rows": (z[rows].contiguous(), e), "columns": (z[rows].T.contiguous(), e.T.contiguous())}
        for layout, (zr, ee) in inputs.items():
            for tile in TILES:
                for per_sm in PROGRAMS_PER_SM:
                    same = torch.equal(run_kernel(zr, ee, layout, tile, per_sm), lib)
                    ms = bench(functools.partial(run_kernel, zr, ee, layout, tile, per_sm))
                    rows_out.append(dict(case=[n, k, d], rows=rows.numel(), layout=layout, tile=tile, per_sm=per_sm,
                                         ms=ms, same=same))
                    lines.append(f"| {n}, {k}, {d}, {rows.numel()} | {layout} | {tile[0]}x{tile[1]}, {tile[2]} | {per_sm} | "
                                 f"{ms:.3f} | {same} |")
        lines.append(f"| {n}, {k}, {d}, {rows.numel()} | library (with copies) | | | {lib_ms:.3f} | - |")
        lines.append(f"| {n}, {k}, {d}, {rows.numel()} | the two layout copies | | | {copy_ms:.3f} | - |")
        rows_out.append(dict(case=[n, k, d], rows=rows.numel(), library_ms=lib_ms, copies_ms=copy_ms))
    cand_lines, cand_rows = candidate_table(SMALL_CASES if args.small else CASES, dev, gen)
    lines += cand_lines
    rows_out += cand_rows
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (Triton interpreter)"
    device = f"{name}, torch {torch.__version__}, triton {triton.__version__}"
    (args.out / "rescore.json").write_text(json.dumps({"device": device, "results": rows_out}, indent=1) + "\n")
    table = "\n".join([f"Device: {device}.", "", *lines])
    (args.out / "rescore.md").write_text(table + "\n")
    print(table)
    return 0 if all(r.get("same", True) for r in rows_out) else 1


if __name__ == "__main__":
    sys.exit(main())
