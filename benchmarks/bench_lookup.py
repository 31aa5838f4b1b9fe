"""Nearest-code lookup benchmark (issues 3, 22): naive, torch.cdist, vector-quantize-pytorch, vit_vq exact and fast.

    python benchmarks/bench_lookup.py                      # GPU: the five cases, checks, results in benchmarks/results/
    python benchmarks/bench_lookup.py --small              # CPU: scaled-down cases, each method in its own process
    python benchmarks/bench_lookup.py --device cpu --cases 65536,16384,8 --methods naive,cdist,exact,fast
    python benchmarks/bench_lookup.py --device cpu --latents real --methods naive,exact,fast   # the default model's latents

`exact` rescores the rows its bound cannot settle over their candidate sets (the default);
`exact_codebook` is the same search with the older whole-codebook rescoring (`rescore="codebook"`),
so that one run compares both; `exact_tf32x3` (GPU only) has the kernel split float32 inputs into
tf32 parts at every D instead of bf16 parts above D = 16 (a tighter bound at half the rate). For
each, the report gives the share of rows left unresolved by the bound, the share sent to the
whole-codebook rescoring (the fallback), and the mean candidate-set size. `--latents real` replaces
the random data by the bundled default model's encoder latents (l2-normalised, as its cosine lookup
sees them) of crops of its sample photos, against its codebook.

On CPU every case runs under three conditions (`--conditions`): `idle-1` (torch on 1 thread),
`idle` (torch's default threads) and `loaded`: two other torch processes run 512x512 `a @ a` loops
with default threads (as two more ranks or busy data-loader workers would) while the naive formula
and vit_vq run with default threads in the same run; the loops are stopped afterwards. The load
average is recorded with each condition.

Reports the median time (triton.testing.do_bench on GPU, wall clock on CPU), the peak extra memory
(GPU: allocator peak above the inputs; CPU: peak RSS growth of a fresh process after import and data),
and agreement with float64 on 4096 sampled rows (share of identical indices, and the largest relative
excess of the chosen code's distance over the optimum). Times are also given as ratios against the
naive lookup of the same run. Writes lookup.json, lookup.md and lookup.png (needs matplotlib; the
plot can be redrawn elsewhere with --plot-from lookup.json) to --out.

Runs with torch >= 2.4 and, on GPU, Triton >= 3.0; vector-quantize-pytorch is used when installed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vit_vq.ops import nearest_code  # noqa: E402

CASES = [(12544, 16384, 512), (65536, 8192, 32), (65536, 16384, 8), (262144, 16384, 8), (65536, 65536, 32)]
SMALL_CASES = [(1568, 4096, 512), (8192, 2048, 32), (8192, 4096, 8), (32768, 4096, 8), (8192, 16384, 32)]
METHODS = ["naive", "cdist", "vqpytorch", "exact", "exact_codebook", "exact_tf32x3", "fast"]
GPU_ONLY_METHODS = ("exact_tf32x3",)  # the same as exact on the torch backend
EXACT_METHODS = {"exact": "candidates", "exact_codebook": "codebook", "exact_tf32x3": "candidates"}  # -> rescoring
SAMPLE_ROWS = 4096
GPU_TARGETS = {"exact": (15.0, 2.0), "fast": (30.0, 5.0)}  # ratio vs naive for D <= 32, D = 512
GPU_MEMORY_TARGET_MB = 64.0
CPU_TARGET_CASE = (65536, 16384, 8)
CPU_EXACT_VS_FAST_D512 = 1.15  # issue 22, at D = 512: exact at most this times fast, and never slower than naive
CPU_EXACT_VS_NAIVE_SMALL_D = {"idle": 15.0, "loaded": 3.0}  # issue 22, at D <= 32
FALLBACK_SHARE_TARGET = 0.001  # issue 22: rows sent to the whole-codebook rescoring, random data
REAL_CROPS = 64  # 128-px crops of the sample photos: 64 x 256 latents
CONDITIONS = {"idle-1": (1, 0), "idle": (None, 0), "loaded": (None, 2)}  # torch threads, matmul-loop processes
LOADED_METHODS = ("naive", "exact", "exact_codebook", "fast")


# -- methods -----------------------------------------------------------------------------
def naive(z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The reference design: |z|^2 - 2 z.e + |e|^2 over the full N x K matrix, then argmin."""
    return ((z**2).sum(1, keepdim=True) - 2 * z @ e.T + (e**2).sum(1)).argmin(1)


def cdist(z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    return torch.cdist(z, e).argmin(1)


def vqpytorch(e: torch.Tensor):
    """vector-quantize-pytorch's VectorQuantize in eval mode with codebook `e`; raises ImportError if absent."""
    from vector_quantize_pytorch import VectorQuantize

    vq = VectorQuantize(dim=e.shape[1], codebook_size=e.shape[0]).to(e.device).eval()
    book = vq._codebook
    with torch.no_grad():
        book.embed.copy_(e.view(book.embed.shape))
        if hasattr(book, "initted"):
            book.initted.fill_(True)

    def run(z, _e):
        with torch.no_grad():
            return vq(z.unsqueeze(0))[1].reshape(-1)

    return run


def method(name: str, e: torch.Tensor):
    if name == "naive":
        return naive
    if name == "cdist":
        return cdist
    if name == "vqpytorch":
        return vqpytorch(e)
    if name in EXACT_METHODS:

        def run(z, e):
            with exact_split(name):
                return nearest_code(z, e, precision="exact", rescore=EXACT_METHODS[name])

        return run
    return lambda z, e: nearest_code(z, e, precision=name)


@contextlib.contextmanager
def exact_split(name: str):
    """`exact_tf32x3`: the Triton kernel splits float32 inputs into tf32 parts at every D (the library: D <= 16),
    a 16x smaller input term in the bound for half the matrix-unit rate. A benchmark-only experiment."""
    if name != "exact_tf32x3":
        yield
        return
    from vit_vq.ops import triton_backend

    saved, triton_backend.TF32X3_MAX_D = triton_backend.TF32X3_MAX_D, 1 << 30
    try:
        yield
    finally:
        triton_backend.TF32X3_MAX_D = saved


def make_data(case, device, latents_file: Path | None = None):
    """Random normal `(z [N, D], e [K, D])`, or the saved real latents and codebook (the case is then their shape)."""
    if latents_file is not None:
        saved = torch.load(latents_file)
        return saved["z"].to(device), saved["e"].to(device)
    n, k, d = case
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=gen)
    e = torch.randn(k, d, generator=gen)
    return z.to(device), e.to(device)


def real_latents(path: Path, crops: int = REAL_CROPS) -> tuple[int, int, int]:
    """Encode crops of the default model's sample photos, save its l2-normalised latents and codebook to `path`.

    Crops are 128 px, taken at random places from each photo resized to short sides 128-384 px.
    Returns the case `(N, K, D)`.
    """
    import numpy as np
    from PIL import Image

    import vit_vq
    from vit_vq.default_model import sample_photos

    tok = vit_vq.ViTVQTokenizer.default().eval()
    size = tok.config.image_size
    gen = torch.Generator().manual_seed(0)
    photos = [Image.open(p).convert("RGB") for p in sample_photos()]
    images = []
    for i in range(crops):
        photo = photos[i % len(photos)]
        short = int(torch.randint(size, 3 * size + 1, (1,), generator=gen))
        scale = short / min(photo.size)
        img = torch.from_numpy(np.array(photo.resize((round(photo.width * scale), round(photo.height * scale)))))
        top = int(torch.randint(0, img.shape[0] - size + 1, (1,), generator=gen))
        left = int(torch.randint(0, img.shape[1] - size + 1, (1,), generator=gen))
        images.append(img[top : top + size, left : left + size].permute(2, 0, 1))  # (3, S, S) uint8
    with torch.no_grad():
        latents = tok.encode(torch.stack(images), return_latents=True).latents  # (B, h, w, D)
        z = tok.quantizer.prepare(latents).reshape(-1, latents.shape[-1])  # (N, D), as the lookup sees them
        e = tok.quantizer.codebook()
    if tok.quantizer.metric == "cosine":  # unit vectors: l2 order == cosine order
        z, e = torch.nn.functional.normalize(z, dim=1), torch.nn.functional.normalize(e, dim=1)
    torch.save({"z": z.contiguous(), "e": e.contiguous()}, path)
    return (z.shape[0], e.shape[0], z.shape[1])


def exact_paths(z: torch.Tensor, e: torch.Tensor, name: str) -> dict:
    """Where exact mode's rows went (one untimed call): unresolved and fallback shares, mean candidate-set size."""
    from vit_vq.ops.nearest import resolve_backend
    from vit_vq.ops.search import exact_search

    with exact_split(name):
        _, report = exact_search(z, e, resolve_backend(z.device, None), EXACT_METHODS[name], 64 * 2**20)
    return {
        "unresolved_share": report.unresolved / report.rows,
        "fallback_share": report.fallback / report.rows,
        "mean_candidates": report.mean_candidates,
    }


# -- float64 agreement -------------------------------------------------------------------
def agreement(z: torch.Tensor, e: torch.Tensor, indices: torch.Tensor) -> dict:
    """Share of identical indices and max relative distance excess vs float64, on sampled rows."""
    gen = torch.Generator().manual_seed(1)
    rows = torch.randperm(z.shape[0], generator=gen)[:SAMPLE_ROWS].to(z.device)
    zs, e64 = z[rows].double(), e.double()
    e_sq = e64.square().sum(1)
    best = torch.empty(len(rows), dtype=torch.int64, device=z.device)
    step = 256 if z.device.type == "cpu" else SAMPLE_ROWS
    for r0 in range(0, len(rows), step):
        zb = zs[r0 : r0 + step]
        best[r0 : r0 + step] = torch.addmm(e_sq[None, :], zb, e64.T, alpha=-2).argmin(1)
    chosen = indices[rows]
    d_best = (zs - e64[best]).square().sum(1)
    d_chosen = (zs - e64[chosen]).square().sum(1)
    rel = (d_chosen - d_best) / d_best.clamp(min=1e-30)
    return {"identical": float((chosen == best).double().mean()), "max_rel_err": float(rel.max())}


# -- GPU ---------------------------------------------------------------------------------
def gpu_time_ms(fn) -> float:
    try:
        from triton.testing import do_bench
    except ImportError:
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def chosen_configs() -> list[str]:
    """The autotuner's pick for every (K, D, mode, dtypes) key seen in this process."""
    from vit_vq.ops.triton_backend import _tuned_kernel

    picks = []
    for small_d in (True, False):
        for key, cfg in _tuned_kernel(small_d).cache.items():
            picks.append(f"{key[:6]} -> {cfg.kwargs} warps={cfg.num_warps} stages={cfg.num_stages}")
    return picks


def run_gpu_case(case, names, latents_file=None) -> list[dict]:
    z, e = make_data(case, "cuda", latents_file)
    results = []
    for name in names:
        row = {"case": list(case), "method": name}
        try:
            fn = method(name, e)
            fn(z, e)  # warm-up: autotuning, cuBLAS handles
            torch.cuda.synchronize()
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            indices = fn(z, e)
            torch.cuda.synchronize()
            row["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            row.update(agreement(z, e, indices))
            del indices
            torch.cuda.empty_cache()
            row["time_ms"] = gpu_time_ms(lambda fn=fn: fn(z, e))
            if name in EXACT_METHODS:
                row.update(exact_paths(z, e, name))
        except ImportError as err:
            row["error"] = f"not installed ({err.name})"
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
        except Exception as err:  # report and carry on: one broken method must not sink the run
            row["error"] = f"{type(err).__name__}: {err}"[:300]
            traceback.print_exc()
        gc.collect()
        torch.cuda.empty_cache()
        results.append(row)
        print(_line(row), flush=True)
    return results


# -- CPU: one fresh process per (case, method) -------------------------------------------
def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_worker(case, name, reps, threads=None, latents_file=None) -> dict:
    if threads:
        torch.set_num_threads(threads)  # this benchmark process only
    z, e = make_data(case, "cpu", latents_file)
    fn = method(name, e)
    gc.collect()
    try:  # reset the peak-RSS mark so it measures only what follows
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base, peak_field = _rss_mb("VmRSS"), "VmHWM"
    except OSError:
        base, peak_field = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "VmHWM"
    start, cpu_start = time.perf_counter(), time.process_time()
    indices = fn(z, e)
    times, cpu_times = [time.perf_counter() - start], [time.process_time() - cpu_start]
    row = {"case": list(case), "method": name, "threads": torch.get_num_threads(), "peak_mb": _rss_mb(peak_field) - base}
    row.update(agreement(z, e, indices))
    for _ in range(reps - 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn(z, e)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    row["time_ms"] = 1000 * statistics.median(times)
    row["cpu_ms"] = 1000 * statistics.median(cpu_times)  # CPU time of all threads: a check on a busy machine
    if name in EXACT_METHODS:
        row.update(exact_paths(z, e, name))
    return row


def run_cpu_case(case, names, reps, condition="idle", latents_file=None) -> list[dict]:
    threads = CONDITIONS[condition][0]
    if CONDITIONS[condition][1]:
        names = [n for n in names if n in LOADED_METHODS]
    results = []
    for name in names:
        job = {"case": case, "method": name, "reps": reps, "threads": threads,
               "latents_file": str(latents_file) if latents_file else None}
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            row = json.loads(lines[-1])
        else:
            tail = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            row = {"case": list(case), "method": name, "error": tail[:300]}
        row["condition"] = condition
        results.append(row)
        print(_line(row), flush=True)
    return results


def matmul_loop() -> None:
    """The load of the `loaded` condition: 512x512 matmuls forever, with torch's default threads."""
    a = torch.randn(512, 512)
    while True:
        a @ a


def start_load(processes: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, __file__, "--matmul-loop"]) for _ in range(processes)]
    time.sleep(2.0)  # let them get going
    return procs


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=30)


# -- checks ------------------------------------------------------------------------------
def _key(r) -> tuple:
    return (tuple(r["case"]), r.get("condition"))


def target_checks(results, device, random_data: bool = True) -> list[dict]:
    checks = []

    def add(name, ok, detail):
        checks.append({"name": name, "ok": bool(ok), "detail": detail})

    times = {(r["method"], *_key(r)): r.get("time_ms") for r in results}
    for r in results:
        case = tuple(r["case"])
        if r["method"] not in (*EXACT_METHODS, "fast"):
            continue
        label = f"{r['method']} {case}" + (f" {r['condition']}" if r.get("condition") else "")
        if "error" in r:
            add(label, False, r["error"])
            continue
        if r["method"] in EXACT_METHODS:
            add(f"{label} vs float64", r["max_rel_err"] <= 1e-5, f"max rel err {r['max_rel_err']:.2e}")
            if random_data and r["method"] == "exact":  # exact_codebook sends every unresolved row there
                share = r["fallback_share"]
                add(f"{label} fallback", share <= FALLBACK_SHARE_TARGET,
                    f"{100 * share:.3f}% of rows to the whole codebook (target <= {100 * FALLBACK_SHARE_TARGET:.1f}%)")
        else:
            add(f"{label} vs float64", r["identical"] >= 0.99, f"identical {r['identical']:.4f}")
        naive = times.get(("naive", *_key(r)))
        ratio = naive and naive / r["time_ms"]
        if device == "cuda" and ratio and r["method"] in GPU_TARGETS:
            want = GPU_TARGETS[r["method"]][0 if case[2] <= 32 else 1]
            add(f"{label} speed", ratio >= want, f"{ratio:.1f}x naive (target {want}x)")
            add(f"{label} memory", r["peak_mb"] <= GPU_MEMORY_TARGET_MB, f"{r['peak_mb']:.1f} MB (target 64)")
        if device == "cpu" and r["method"] == "exact" and ratio:
            checks += _cpu_exact_checks(label, r, ratio, times)
    return checks


def _cpu_exact_checks(label: str, r: dict, ratio: float, times: dict) -> list[dict]:
    """Issue 22's CPU targets (D = 512; D <= 32) and issue 3's at N = 65536, K = 16384, D = 8."""
    checks = []
    case, condition = tuple(r["case"]), r.get("condition", "idle")
    fast = times.get(("fast", *_key(r)))
    if case[2] >= 512 and fast:
        vs_fast = r["time_ms"] / fast
        checks.append({"name": f"{label} speed", "ok": vs_fast <= CPU_EXACT_VS_FAST_D512 and ratio >= 1,
                       "detail": f"{vs_fast:.2f}x fast (target <= {CPU_EXACT_VS_FAST_D512}x), {ratio:.2f}x naive (target >= 1x)"})
    if case[2] <= 32 and condition in CPU_EXACT_VS_NAIVE_SMALL_D:
        want = CPU_EXACT_VS_NAIVE_SMALL_D[condition]
        checks.append({"name": f"{label} speed", "ok": ratio >= want, "detail": f"{ratio:.1f}x naive (target {want}x)"})
    if case == CPU_TARGET_CASE:
        cdist = times.get(("cdist", *_key(r)))
        if condition == "idle" and cdist:
            checks.append({"name": f"{label} vs cdist", "ok": cdist / r["time_ms"] >= 3,
                           "detail": f"{cdist / r['time_ms']:.1f}x cdist (target 3x, issue 3)"})
        checks.append({"name": f"{label} memory", "ok": r["peak_mb"] <= 128, "detail": f"{r['peak_mb']:.0f} MB RSS"})
    return checks


def sanity_checks() -> list[dict]:
    """Quick GPU checks of what CI can only test under the interpreter: dtypes, odd shapes, ties, compile."""
    checks = []

    def check(name, fn):
        try:
            ok, detail = fn()
        except Exception as err:
            ok, detail = False, f"{type(err).__name__}: {err}"[:300]
        checks.append({"name": name, "ok": bool(ok), "detail": detail})
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)

    def vs_float64(z, e, metric="l2", **kwargs):
        idx = nearest_code(z, e, metric=metric, **kwargs)
        z64, e64 = z.double(), e.double()
        if metric == "cosine":
            z64, e64 = torch.nn.functional.normalize(z64, dim=1), torch.nn.functional.normalize(e64, dim=1)
        d = torch.cdist(z64, e64).square()
        best = d.min(1).values
        rel = (d.gather(1, idx[:, None]).squeeze(1) - best) / best.clamp(min=1e-30)
        return float(rel.max()), idx, d

    def shapes():
        worst = 0.0
        for n, k, d in [(1, 1, 1), (1000, 3000, 3), (777, 5000, 17), (300, 2000, 100)]:
            for metric in ("l2", "cosine"):
                z, e = torch.randn(n, d, device="cuda"), torch.randn(k, d, device="cuda")
                worst = max(worst, vs_float64(z, e, metric)[0])
        return worst <= 1e-5, f"exact, odd shapes, both metrics: max rel err {worst:.1e}"

    def dtypes():
        out = []
        for dtype in (torch.bfloat16, torch.float16):
            z, e = torch.randn(4096, 32, device="cuda").to(dtype), torch.randn(8192, 32, device="cuda").to(dtype)
            rel, _, _ = vs_float64(z, e)
            fast = nearest_code(z, e, precision="fast")
            same = float((fast == nearest_code(z, e)).double().mean())
            out.append((rel, same))
        ok = all(rel <= 1e-5 and same >= 0.99 for rel, same in out)
        return ok, "bf16/fp16 exact max rel err " + ", ".join(f"{r:.1e}" for r, _ in out) + \
            "; fast identical " + ", ".join(f"{s:.4f}" for _, s in out)

    def ties():
        base = torch.randint(-8, 8, (8192, 8), device="cuda").float()
        e = torch.cat([base, base])  # K = 16384: copies 8192 apart, in different tiles and splits
        details = []
        ok = True
        for n in (65536, 500):  # 500 rows: the codebook is split across programs
            z = torch.randint(-8, 8, (n, 8), device="cuda").float()
            d = torch.cdist(z.double(), e.double()).square()
            best = d.min(1).values
            lowest = (d == best[:, None]).double().argmax(1)
            for precision in ("exact", "fast"):
                idx = nearest_code(z, e, precision=precision)
                ok &= bool(torch.equal(idx, lowest))
            details.append(f"N={n}: {int(((d == best[:, None]).sum(1) > 1).sum())} tied rows")
            del d
        return ok, "lowest index wins; " + ", ".join(details)

    def compiled():
        e = torch.randn(16384, 8, device="cuda")

        def encode(z):
            return nearest_code(z * 1.5, e) + 1

        z = torch.randn(65536, 8, device="cuda")
        fn = torch.compile(encode, fullgraph=True)
        return torch.equal(fn(z), encode(z)), "torch.compile(fullgraph=True) matches eager"

    def torch_backend():
        z, e = torch.randn(65536, 32, device="cuda"), torch.randn(8192, 32, device="cuda")
        rel, idx, _ = vs_float64(z[:4096], e, backend="torch")
        same = torch.equal(nearest_code(z, e, backend="torch"), nearest_code(z, e, backend="triton"))
        return rel <= 1e-5 and same, f"torch path on CUDA: max rel err {rel:.1e}, same indices as triton: {same}"

    check("odd shapes", shapes)
    check("16-bit inputs", dtypes)
    check("ties", ties)
    check("torch.compile", compiled)
    check("torch backend", torch_backend)
    return checks


# -- output ------------------------------------------------------------------------------
def _fmt_time(ms):
    return f"{ms / 1000:.2f} s" if ms >= 1000 else f"{ms:.3f} ms" if ms < 10 else f"{ms:.1f} ms"


def _paths(r) -> str:
    return (f"{100 * r['unresolved_share']:.2f}% unresolved, {100 * r['fallback_share']:.3f}% to the whole codebook, "
            f"mean set {r['mean_candidates']:.2f}")


def _line(r) -> str:
    head = f"{str(tuple(r['case'])):>22} {r.get('condition', ''):>7} {r['method']:>10}"
    if "error" in r:
        return f"{head}  {r['error']}"
    extra = f"  {_paths(r)}" if "fallback_share" in r else ""
    return (f"{head}  {_fmt_time(r['time_ms']):>10}  {r['peak_mb']:9.1f} MB  identical {r['identical']:.4f}"
            f"  max rel err {r['max_rel_err']:.1e}{extra}")


def markdown(report) -> str:
    naive_ms = {_key(r): r.get("time_ms") for r in report["results"] if r["method"] == "naive"}
    data = "the default model's latents of its sample photos" if report.get("latents") == "real" else "random normal"
    lines = [
        f"Device: {report['device']}; torch {report['torch']}, triton {report['triton']}; data: {data}.",
        *(f"Condition {c}: load average {v[0]:.1f} before, {v[1]:.1f} after." for c, v in report.get("load", {}).items()),
        "",
        "| case (N, K, D) | method | median time | vs naive | peak extra memory | identical to fp64 | max rel. excess |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        case = ", ".join(map(str, r["case"])) + (f" ({r['condition']})" if r.get("condition") else "")
        if "error" in r:
            lines.append(f"| {case} | {r['method']} | {r['error']} | | | | |")
            continue
        base = naive_ms.get(_key(r))
        ratio = f"{base / r['time_ms']:.1f}x" if base else "n/a"
        mem = "MB RSS" if report["device_type"] == "cpu" else "MB"
        label = r["method"] + (f" ({_paths(r)})" if "fallback_share" in r else "")
        lines.append(
            f"| {case} | {label} | {_fmt_time(r['time_ms'])} | {ratio} | {r['peak_mb']:.1f} {mem} "
            f"| {100 * r['identical']:.2f}% | {r['max_rel_err']:.1e} |"
        )
    if report["checks"]:
        lines += ["", "| check | result | detail |", "|---|---|---|"]
        lines += [f"| {c['name']} | {'PASS' if c['ok'] else 'FAIL'} | {c['detail']} |" for c in report["checks"]]
    return "\n".join(lines) + "\n"


def plot(report, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (redraw later with --plot-from lookup.json)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = sorted({r["method"] for r in report["results"]}, key=METHODS.index)
    for i, name in enumerate(names):
        rows = sorted((r for r in report["results"] if r["method"] == name and "error" not in r), key=lambda r: r["case"][1])
        for ax, key in zip(axes, ("time_ms", "peak_mb"), strict=True):
            ks = [r["case"][1] * (1 + 0.04 * (i - 2)) for r in rows]  # nudge methods apart
            ax.scatter(ks, [max(r[key], 1e-3) for r in rows], label=name, s=36)
            for k, r in zip(ks, rows, strict=True):
                ax.annotate(f"N={r['case'][0]},D={r['case'][2]}", (k, max(r[key], 1e-3)), fontsize=6, alpha=0.6)
    for ax, label in zip(axes, ("median time (ms)", "peak extra memory (MB)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("codebook size K")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"nearest-code lookup on {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="scaled-down cases (the default on CPU)")
    parser.add_argument("--cases", help="semicolon-separated N,K,D triples instead of the built-in cases")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--reps", type=int, default=3, help="timed runs per method on CPU")
    parser.add_argument("--no-checks", action="store_true", help="skip the extra GPU sanity checks")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results"))
    parser.add_argument("--plot-from", type=Path, help="only redraw the plot from a lookup.json")
    parser.add_argument("--conditions", default=",".join(CONDITIONS), help="CPU only: idle-1, idle, loaded")
    parser.add_argument("--latents", choices=["random", "real"], default="random",
                        help="random normal data, or the default model's latents of its sample photos (one case)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--matmul-loop", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.matmul_loop:
        matmul_loop()
        return
    if args.worker:
        job = json.loads(args.worker)
        latents_file = Path(job["latents_file"]) if job.get("latents_file") else None
        print(json.dumps(cpu_worker(tuple(job["case"]), job["method"], job["reps"], job.get("threads"), latents_file)))
        return
    if args.plot_from:
        plot(json.loads(args.plot_from.read_text()), args.plot_from.with_suffix(".png"))
        return

    if args.cases:
        cases = [tuple(int(v) for v in c.split(",")) for c in args.cases.split(";")]
    else:
        cases = SMALL_CASES if args.small or args.device == "cpu" else CASES
    names = [m for m in args.methods.split(",") if m and (args.device == "cuda" or m not in GPU_ONLY_METHODS)]
    unknown = sorted(set(args.conditions.split(",")) - set(CONDITIONS))
    if unknown:
        parser.error(f"unknown conditions {unknown}; known: {sorted(CONDITIONS)}")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    report = {
        "device": device_name(args.device),
        "device_type": args.device,
        "torch": torch.__version__,
        "triton": triton_version,
        "results": [],
        "checks": [],
    }
    print(f"{report['device']} | torch {report['torch']} | triton {triton_version}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    latents_file = None
    report["latents"] = args.latents
    if args.latents == "real":
        latents_file = args.out / "real_latents.pt"
        cases = [real_latents(latents_file)]
        print(f"real latents of the default model: N, K, D = {cases[0]}", flush=True)
    start = time.time()
    if args.device == "cuda":
        for case in cases:
            report["results"] += run_gpu_case(case, names, latents_file)
            (args.out / "lookup.json").write_text(json.dumps(report, indent=1))
    else:
        report["load"] = {}
        for condition in args.conditions.split(","):
            before = os.getloadavg()[0]
            load = start_load(CONDITIONS[condition][1])
            try:
                for case in cases:
                    report["results"] += run_cpu_case(case, names, args.reps, condition, latents_file)
                    (args.out / "lookup.json").write_text(json.dumps(report, indent=1))
            finally:
                stop_load(load)
            report["load"][condition] = (before, os.getloadavg()[0])
    print(f"-- measured in {time.time() - start:.0f} s", flush=True)
    if args.device == "cuda" and triton_version != "not installed":
        try:
            report["autotune"] = chosen_configs()
            print("autotuned:\n  " + "\n  ".join(report["autotune"]), flush=True)
        except Exception as err:  # diagnostics only
            print(f"no autotune report: {type(err).__name__}: {err}")

    report["checks"] = target_checks(report["results"], args.device, random_data=args.latents == "random")
    for c in report["checks"]:
        print(f"{'PASS' if c['ok'] else 'FAIL'}  {c['name']}: {c['detail']}")
    if args.device == "cuda" and not args.no_checks:
        t = time.time()
        report["checks"] += sanity_checks()
        print(f"-- sanity checks in {time.time() - t:.0f} s", flush=True)

    (args.out / "lookup.json").write_text(json.dumps(report, indent=1))
    (args.out / "lookup.md").write_text(markdown(report))
    print(markdown(report))
    plot(report, args.out / "lookup.png")
    print(f"total {time.time() - start:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
