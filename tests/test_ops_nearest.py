"""nearest_code on the torch path (CPU): float64 agreement, exactness, ties, bounded memory, dispatch.

The Triton kernel runs under the interpreter in tests/test_ops_triton.py.
"""

from __future__ import annotations

import functools
import importlib.util
import threading

import pytest
import torch
import torch.nn.functional as F

from vit_vq.ops import NearestCodeResult, nearest_code
from vit_vq.ops import exact as exact_mod
from vit_vq.ops.nearest import resolve_backend

SHAPES = [(1, 1, 1), (1, 7, 3), (9, 1, 8), (50, 300, 3), (37, 257, 8), (64, 513, 17), (20, 100, 64), (333, 1000, 8)]


def fp64_distances(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """(N, K) float64 distances computed directly (no cancellation): the independent reference."""
    z64, e64 = z.double(), codebook.double()
    if metric == "cosine":
        z64, e64 = F.normalize(z64, dim=1), F.normalize(e64, dim=1)
        return 1 - z64 @ e64.T
    return (z64[:, None, :] - e64[None, :, :]).square().sum(-1)


def chosen_relative_error(z, codebook, indices, metric="l2") -> torch.Tensor:
    """(d(chosen) - d(optimum)) / d(optimum) per row, in float64."""
    d = fp64_distances(z, codebook, metric)
    best = d.min(dim=1).values
    chosen = d.gather(1, indices[:, None]).squeeze(1)
    return (chosen - best) / best.clamp(min=1e-30)


def peak_temporary_bytes(fn) -> int:
    """Peak bytes of live tensors allocated while `fn` runs, from the profiler's allocator events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_exact_matches_float64(shape, metric):
    n, k, d = shape
    gen = torch.Generator().manual_seed(n * 1000 + k + d)
    z, codebook = torch.randn(n, d, generator=gen), torch.randn(k, d, generator=gen)
    idx = nearest_code(z, codebook, metric=metric, backend="torch")
    assert idx.dtype == torch.int64 and idx.shape == (n,)
    assert chosen_relative_error(z, codebook, idx, metric).max() <= 1e-5
    assert torch.equal(idx, fp64_distances(z, codebook, metric).argmin(dim=1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs_accumulate_in_float32(dtype):
    gen = torch.Generator().manual_seed(1)
    z, codebook = torch.randn(200, 17, generator=gen).to(dtype), torch.randn(300, 17, generator=gen).to(dtype)
    for precision in ("exact", "fast"):
        idx = nearest_code(z, codebook, precision=precision, backend="torch")
        assert torch.equal(idx, fp64_distances(z, codebook).argmin(dim=1)), precision
    mixed = nearest_code(z, codebook.float(), backend="torch")
    assert torch.equal(mixed, fp64_distances(z, codebook).argmin(dim=1))


def test_fast_agrees_with_float64_on_random_data():
    gen = torch.Generator().manual_seed(2)
    z, codebook = torch.randn(2000, 8, generator=gen), torch.randn(4096, 8, generator=gen)
    idx = nearest_code(z, codebook, precision="fast", backend="torch")
    agree = (idx == fp64_distances(z, codebook).argmin(dim=1)).double().mean()
    assert agree >= 0.99


def test_same_indices_as_float32_reference_in_any_chunking(single_thread):
    gen = torch.Generator().manual_seed(3)
    z, codebook = torch.randn(150, 8, generator=gen), torch.randn(3000, 8, generator=gen)
    reference = (z[:, None, :] - codebook[None, :, :]).square().sum(-1).argmin(dim=1)  # float32, direct
    for budget in (64 * 2**20, 200_000, 20_000):  # one block; row blocks; row and code blocks
        for precision in ("exact", "fast"):
            idx = nearest_code(z, codebook, precision=precision, backend="torch", max_temp_bytes=budget)
            assert torch.equal(idx, reference), (budget, precision)


def test_temporaries_stay_within_the_bound(single_thread):
    gen = torch.Generator().manual_seed(4)
    n, k, d = 5_000, 5_000, 8  # a full N x K float32 matrix would be 100 MB
    z, codebook = torch.randn(n, d, generator=gen), torch.randn(k, d, generator=gen)
    budget = 2**20
    outputs = 32 * n  # O(N) results and per-row scalars are not temporaries
    for precision in ("exact", "fast"):
        run = functools.partial(nearest_code, z, codebook, precision=precision, max_temp_bytes=budget)
        peak = peak_temporary_bytes(run)
        assert peak <= budget + outputs, (precision, peak)
    # every row rescored in float64 (a duplicated codebook): the rescoring blocks obey the bound too
    doubled = torch.cat([codebook, codebook])
    peak = peak_temporary_bytes(lambda: nearest_code(z[:1000], doubled, max_temp_bytes=budget))
    assert peak <= budget + 32 * 1000 + 8 * 1000 * d


@pytest.mark.parametrize("layout", ["stacked", "interleaved"])
@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("values", ["integers", "floats"])
def test_ties_go_to_the_lowest_index(layout, precision, values):
    gen = torch.Generator().manual_seed(5)
    base_k, d = 700, 4
    if values == "integers":  # exact arithmetic: duplicates score bit-identically in every path
        base = torch.randint(-20, 20, (base_k, d), generator=gen).float()
        z = torch.randint(-20, 20, (400, d), generator=gen).float()
    else:
        base, z = torch.randn(base_k, d, generator=gen), torch.randn(400, d, generator=gen)
    if layout == "stacked":  # copies 700 codes apart: different groups and (with the budget) code blocks
        codebook, first = torch.cat([base, base]), torch.arange(2 * base_k) % base_k
    else:  # copies side by side
        codebook, first = base.repeat_interleave(2, dim=0), torch.arange(2 * base_k) // 2 * 2
    d64 = fp64_distances(z, codebook)
    best = d64.min(dim=1).values
    tied = (d64 == best[:, None]).sum(dim=1) > 1
    assert tied.sum() == len(z)  # every row is tied: the test proves something
    lowest = (d64 == best[:, None]).double().argmax(dim=1)  # first index holding the minimum
    for budget in (64 * 2**20, 10_000):
        idx = nearest_code(z, codebook, precision=precision, backend="torch", max_temp_bytes=budget)
        if values == "integers" or precision == "exact":
            assert torch.equal(idx, lowest)
        assert torch.equal(idx, first[idx])  # never the later copy of a code


def test_exact_mode_settles_rows_float32_cannot():
    """Codes and queries far from the origin: |z|^2 - 2 z.e + |e|^2 cancels catastrophically in float32."""
    gen = torch.Generator().manual_seed(6)
    offset = torch.full((4,), 1000.0)
    codebook = offset + 0.1 * torch.randn(512, 4, generator=gen)
    z = offset + 0.1 * torch.randn(300, 4, generator=gen)
    truth = fp64_distances(z, codebook).argmin(dim=1)
    fast = nearest_code(z, codebook, precision="fast", backend="torch")
    assert (fast != truth).sum() > 10  # float32 scores really are ambiguous here
    idx = nearest_code(z, codebook, precision="exact", backend="torch")
    assert chosen_relative_error(z, codebook, idx).max() <= 1e-5


def _tf32_truncate(x):
    return (x.view(torch.int32) & -8192).view(torch.float32)


def _split(x, kind):
    """The kernel's hi + lo split, emulated in torch."""
    if kind == "tf32x3":
        hi = _tf32_truncate(x)
        return hi, _tf32_truncate(x - hi)  # the matrix unit truncates the remainder once more
    hi = x.bfloat16().float()
    return hi, (x - hi).bfloat16().float()


@pytest.mark.parametrize("kind", ["tf32", "tf32x3", "bf16x3", "bf16"])
def test_input_rounding_constants_bound_the_emulated_products(kind):
    """c_in * sum|z_i e_i| bounds the error of each kind of matrix-unit product (products exact, sums in fp64)."""
    gen = torch.Generator().manual_seed(7)
    scale = torch.logspace(-3, 3, 64)[:, None]
    z = torch.randn(64, 16, generator=gen) * scale
    e = torch.randn(300, 16, generator=gen)
    exact = z.double() @ e.double().T
    magnitude = z.double().abs() @ e.double().abs().T
    if kind == "tf32":
        approx, c_in = _tf32_truncate(z).double() @ _tf32_truncate(e).double().T, exact_mod.TF32_ROUNDING
    elif kind == "bf16":
        approx, c_in = z.bfloat16().double() @ e.bfloat16().double().T, exact_mod.BF16_ROUNDING
    else:
        zh, zl = (t.double() for t in _split(z, kind))
        eh, el = (t.double() for t in _split(e, kind))
        approx = zl @ eh.T + zh @ el.T + zh @ eh.T
        c_in = exact_mod.TF32X3_ROUNDING if kind == "tf32x3" else exact_mod.BF16X3_ROUNDING
    ratio = ((approx - exact).abs() / magnitude).max()
    assert ratio <= c_in
    assert ratio >= c_in / 64  # the constant is not absurdly loose either


def test_return_distances():
    gen = torch.Generator().manual_seed(9)
    z, codebook = torch.randn(100, 5, generator=gen), torch.randn(64, 5, generator=gen)
    for metric in ("l2", "cosine"):
        truth = fp64_distances(z, codebook, metric).min(dim=1).values
        for precision, tol in (("exact", 1e-6), ("fast", 1e-4)):
            out = nearest_code(z, codebook, metric=metric, precision=precision, return_distances=True)
            assert isinstance(out, NearestCodeResult)
            assert out.distances.dtype == torch.float32 and out.distances.shape == (100,)
            torch.testing.assert_close(out.distances.double(), truth, rtol=tol, atol=tol)


def test_empty_batch():
    codebook = torch.randn(10, 4)
    assert nearest_code(torch.empty(0, 4), codebook).shape == (0,)
    out = nearest_code(torch.empty(0, 4), codebook, return_distances=True)
    assert out.indices.dtype == torch.int64 and out.distances.shape == (0,)


def test_codebook_changes_are_seen_immediately():
    """No cached norms: an in-place EMA-style update changes the answer on the next call."""
    codebook = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    z = torch.tensor([[9.0, 9.0]])
    assert nearest_code(z, codebook).item() == 1
    codebook[1].lerp_(torch.tensor([100.0, 100.0]), 0.5)
    assert nearest_code(z, codebook).item() == 0


def test_compiles_without_graph_break():
    codebook = torch.randn(300, 8)

    def encode(z):
        return nearest_code(z * 2, codebook) + 1

    compiled = torch.compile(encode, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    for n in (64, 65, 1):
        z = torch.randn(n, 8)
        assert torch.equal(compiled(z), encode(z))


def test_inputs_requiring_grad_are_fine():
    z = torch.randn(10, 4, requires_grad=True)
    codebook = torch.randn(6, 4, requires_grad=True)
    assert nearest_code(z, codebook).shape == (10,)


def test_forcing_triton_where_it_cannot_run_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    z, codebook = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        nearest_code(z, codebook, backend="triton")
    monkeypatch.setenv("VIT_VQ_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="VIT_VQ_BACKEND='triton'"):
        nearest_code(z, codebook)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else object())
    with pytest.raises(RuntimeError, match="not installed"):
        nearest_code(z, codebook)
    monkeypatch.setenv("VIT_VQ_BACKEND", "torch")
    assert nearest_code(z, codebook).shape == (4,)
    monkeypatch.setenv("VIT_VQ_BACKEND", "cuda")
    with pytest.raises(ValueError, match="VIT_VQ_BACKEND='cuda'"):
        nearest_code(z, codebook)


def test_automatic_dispatch(monkeypatch):
    monkeypatch.delenv("VIT_VQ_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(torch.device("cpu"), None) == "torch"  # auto never picks the interpreter
    assert resolve_backend(torch.device("cpu"), "triton") == "triton"
    if importlib.util.find_spec("triton") is not None:
        assert resolve_backend(torch.device("cuda", 0), None) == "triton"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else object())
    assert resolve_backend(torch.device("cuda", 0), None) == "torch"


@pytest.mark.parametrize(
    ("z", "codebook", "kwargs", "error"),
    [
        (torch.randn(3), torch.randn(4, 3), {}, ValueError),
        (torch.randn(3, 2), torch.randn(4, 3), {}, ValueError),
        (torch.randn(3, 3), torch.randn(0, 3), {}, ValueError),
        (torch.randn(3, 3).double(), torch.randn(4, 3), {}, TypeError),
        (torch.randn(3, 3), torch.randn(4, 3), {"metric": "dot"}, ValueError),
        (torch.randn(3, 3), torch.randn(4, 3), {"precision": "tf32"}, ValueError),
        (torch.randn(3, 3), torch.randn(4, 3), {"backend": "cuda"}, ValueError),
        (torch.randn(3, 3), torch.randn(4, 3), {"max_temp_bytes": 0}, ValueError),
    ],
)
def test_bad_arguments_raise(z, codebook, kwargs, error):
    with pytest.raises(error):
        nearest_code(z, codebook, **kwargs)


@pytest.mark.parametrize("offset, spread, dim", [(1000.0, 1e-2, 8), (100.0, 1e-3, 8), (300.0, 1e-2, 32)])
def test_exact_mode_survives_a_large_common_offset(offset, spread, dim, single_thread):
    """|z|^2 - 2z.e + |e|^2 cancels catastrophically here; exact mode must still match float64."""
    gen = torch.Generator().manual_seed(0)
    cb = offset + spread * torch.randn(2000, dim, generator=gen)
    z = offset + spread * torch.randn(500, dim, generator=gen)
    idx = nearest_code(z, cb, backend="torch", precision="exact")
    d = ((z.double()[:, None] - cb.double()[None]) ** 2).sum(-1)
    best = d.min(1).values
    chosen = d.gather(1, idx[:, None])[:, 0]
    assert float(((chosen - best) / best).max()) <= 1e-5


def test_exact_match_beats_a_one_ulp_neighbour():
    z = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    cb = torch.cat([torch.nextafter(z, torch.full_like(z, float("inf"))), z])  # [z + 1 ulp, z]
    assert torch.equal(nearest_code(z, cb, backend="torch"), torch.arange(5, 10))


def _threads_a_new_thread_starts_with() -> int:
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]


def test_worker_threads_from_several_python_threads_at_once(monkeypatch):
    """Four Python threads search at once, each on 3 single-threaded workers: float64 answers, and
    no thread setting changed afterwards (the caller's, or the one new threads start with)."""
    from vit_vq.ops import cpu_workers, torch_backend

    calls = {"search": [], "rescore": []}

    def counting(kind):
        def run_units(units, workers, *args):
            calls[kind].append((len(units), workers))
            cpu_workers.run_units(units, workers, *args)

        return run_units

    for module, kind in ((torch_backend, "search"), (exact_mod, "rescore")):  # the search, the float64 rescoring
        monkeypatch.setattr(module, "run_units", counting(kind))
        monkeypatch.setattr(module, "worker_count", lambda z, n_codes, n_blocks: min(3, n_blocks))
    before = torch.get_num_threads(), _threads_a_new_thread_starts_with()
    problems = []
    for i in range(4):
        gen = torch.Generator().manual_seed(40 + i)
        offset, spread = (1000.0, 1e-2) if i == 1 else (0.0, 1.0)  # one needs whole-codebook rescoring on many rows
        z, codebook = torch.randn(700, 8, generator=gen), torch.randn(900, 8, generator=gen)
        problems.append((offset + spread * z, offset + spread * codebook))
    results: dict[int, torch.Tensor] = {}

    def search(i):
        z, codebook = problems[i]
        results[i] = nearest_code(z, codebook, precision="exact" if i < 2 else "fast", max_temp_bytes=2**16)

    threads = [threading.Thread(target=search, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # four searches, and the candidate pass over the offset problem's rows (all unresolved)
    assert len(calls["search"]) == 5 and all(units > 3 and workers == 3 for units, workers in calls["search"])
    assert any(workers == 3 for _, workers in calls["rescore"])  # the offset problem rescored on workers
    for i, (z, codebook) in enumerate(problems):
        truth = fp64_distances(z, codebook).argmin(dim=1)
        if i < 2:
            assert torch.equal(results[i], truth)
        else:
            assert (results[i] == truth).double().mean() >= 0.99
    assert (torch.get_num_threads(), _threads_a_new_thread_starts_with()) == before


def test_worker_count_does_not_change_the_answer():
    from vit_vq.ops.torch_backend import search_torch, squared_norms

    gen = torch.Generator().manual_seed(11)
    z, codebook = torch.randn(1000, 8, generator=gen), torch.randn(3000, 8, generator=gen)
    e_sq = squared_norms(codebook)
    inline = search_torch(z, codebook, e_sq, top2=True, max_temp_bytes=2**17, workers=1)
    pooled = search_torch(z, codebook, e_sq, top2=True, max_temp_bytes=2**17, workers=2)
    for name in ("indices", "best", "second"):
        assert torch.equal(getattr(inline, name), getattr(pooled, name)), name


def test_an_error_in_a_worker_reaches_the_caller():
    from vit_vq.ops.cpu_workers import run_units

    def work(state, unit):
        if unit == 3:
            raise KeyError("unit 3")

    with pytest.raises(KeyError, match="unit 3"):
        run_units(list(range(8)), 2, lambda: None, work)
