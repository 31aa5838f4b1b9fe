"""`nearest_code`: the single dispatch point for nearest-code search.

Under `torch.compile` the search is one PyTorch custom op, `vit_vq::nearest_code`, so the graph has a
single opaque node (no graph break) whichever backend runs; eager calls run the same function directly.
The backends:

- **triton** (`triton_backend`): one fused kernel, O(N) memory. Chosen for CUDA tensors when Triton is
  installed.
- **torch** (`torch_backend`): blocks of rows scored into preallocated buffers, temporaries within
  `max_temp_bytes` per worker; big CPU searches run on a few single-threaded worker threads
  (`cpu_workers`), which hold up when other processes share the cores. Everything else.

`VIT_VQ_BACKEND=torch|triton` forces one; forcing Triton where it cannot run raises `RuntimeError`.
Exact mode adds the steps of `search.settle` to either backend's fast pass: a proven bound settles
most rows, and the rest are rescored by direct float64 differences, over the few candidate codes
the bound leaves (`VIT_VQ_RESCORE=codebook`: over the whole codebook, the older way). Codebook
norms are computed on every call, so nothing can go stale while EMA moves the codebook. Safe to
call from several Python threads at once.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from . import exact, search
from .search import Rescore, resolve_rescore
from .torch_backend import DEFAULT_MAX_TEMP_BYTES

Metric = Literal["l2", "cosine"]
LookupPrecision = Literal["exact", "fast"]  # the compute dtype of the networks is pipeline.runtime.ComputeDtype
Backend = Literal["torch", "triton"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class NearestCodeResult:
    """`indices` int64 `[N]`; `distances` float32 `[N]` (squared L2, or `1 - cos` for cosine)."""

    indices: torch.Tensor
    distances: torch.Tensor


def _check(z: torch.Tensor, codebook: torch.Tensor) -> None:
    if z.ndim != 2 or codebook.ndim != 2:
        raise ValueError(
            f"expected z [N, D] and codebook [K, D], got {tuple(z.shape)} and {tuple(codebook.shape)}"
        )
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(f"z has D={z.shape[1]} but the codebook has D={codebook.shape[1]}")
    if codebook.shape[0] < 1 or z.shape[1] < 1:
        raise ValueError(f"need K >= 1 and D >= 1, got codebook {tuple(codebook.shape)}")
    for name, t in (("z", z), ("codebook", codebook)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if z.device != codebook.device:
        raise ValueError(f"z is on {z.device} but the codebook is on {codebook.device}")


def triton_problem(device: torch.device) -> str | None:
    """Why the Triton kernel cannot run on `device`, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'vit_vq[triton]')"
    if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    return f"the tensors are on {device}, and Triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)"


def resolve_backend(device: torch.device, backend: Backend | None) -> Backend:
    """The backend for tensors on `device`: the argument, else `VIT_VQ_BACKEND`, else automatic.

    Automatic: triton for CUDA tensors when Triton is installed, torch for everything else.

    Raises:
        ValueError: an unknown backend name.
        RuntimeError: triton was forced but cannot run here.
    """
    source = f"backend={backend!r}"
    choice = backend
    if choice is None and os.environ.get("VIT_VQ_BACKEND"):
        choice = os.environ["VIT_VQ_BACKEND"]
        source = f"VIT_VQ_BACKEND={choice!r}"
    if choice not in (None, "torch", "triton"):
        raise ValueError(f"{source}: the backend must be 'torch' or 'triton'")
    if choice == "torch":
        return "torch"
    problem = triton_problem(device)
    if choice == "triton":
        if problem:
            raise RuntimeError(f"{source} forces the Triton kernel, but {problem}. Use the torch backend instead.")
        return "triton"
    return "triton" if device.type == "cuda" and problem is None else "torch"


def _nearest_code_impl(
    z: torch.Tensor,
    codebook: torch.Tensor,
    metric: str,
    precision: str,
    backend: str,
    rescore: str,
    need_distances: bool,
    max_temp_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices int64 [N], distances float32 [N] or [0]) for validated inputs; see `nearest_code`."""
    choice = resolve_backend(z.device, None if backend == "auto" else backend)
    rescore = resolve_rescore(None if rescore == "auto" else rescore)
    # Triton launches on the *current* CUDA device: make it the inputs' device (e.g. cuda:1).
    guard = torch.cuda.device(z.device) if z.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        return _search(z, codebook, metric, precision, choice, rescore, need_distances, max_temp_bytes)


def _search(
    z: torch.Tensor,
    codebook: torch.Tensor,
    metric: str,
    precision: str,
    choice: str,
    rescore: Rescore,
    need_distances: bool,
    max_temp_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    if metric == "cosine":
        z, codebook = F.normalize(z.float(), dim=1), F.normalize(codebook.float(), dim=1)
    n_rows, dim = z.shape
    if n_rows == 0:
        return z.new_empty(0, dtype=torch.int64), z.new_empty(0, dtype=torch.float32)

    is_exact = precision == "exact"
    e_sq, cand = search.first_pass(z, codebook, choice, top2=is_exact, max_temp_bytes=max_temp_bytes)
    indices = cand.indices
    if is_exact:
        search.settle(z, codebook, e_sq, cand, choice, rescore, max_temp_bytes)

    distances = z.new_empty(0, dtype=torch.float32)
    if need_distances:
        if is_exact:
            distances = exact.exact_distances(z, codebook, indices, max_temp_bytes)
        else:
            z_sq = torch.linalg.vector_norm(z, dim=1, dtype=torch.float32).square_()
            distances = cand.best.add_(z_sq).clamp_(min=0)
        if metric == "cosine":
            distances = distances.mul_(0.5)  # |a - b|^2 = 2 - 2 cos for unit vectors
    return indices, distances


# One opaque node for torch.compile: no graph break at the lookup, whichever backend runs inside.
_nearest_code_op = torch.library.custom_op("vit_vq::nearest_code", _nearest_code_impl, mutates_args=())


@_nearest_code_op.register_fake
def _(z, codebook, metric, precision, backend, rescore, need_distances, max_temp_bytes):
    n_rows = z.shape[0]
    return z.new_empty(n_rows, dtype=torch.int64), z.new_empty(n_rows if need_distances else 0, dtype=torch.float32)


def nearest_code(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    metric: Metric = "l2",
    precision: LookupPrecision = "exact",
    backend: Backend | None = None,
    rescore: Rescore | None = None,
    return_distances: bool = False,
    max_temp_bytes: int = DEFAULT_MAX_TEMP_BYTES,
) -> torch.Tensor | NearestCodeResult:
    """Index of the nearest codebook row for every row of `z`.

    Args:
        z: `[N, D]` float32/bfloat16/float16 queries (N >= 0, D >= 1). Not differentiated through.
        codebook: `[K, D]` codes (K >= 1), same device, any of those dtypes. Accumulation is float32.
        metric: `"l2"` (squared Euclidean) or `"cosine"` (both sides l2-normalised in float32 first).
        precision: `"exact"`: the chosen code's distance equals the float64 optimum to within 1e-5
            relative (a proven bound settles most rows; the rest are rescored in float64). `"fast"`:
            one pass, on GPU with tf32 matrix units for float32 inputs; agrees with float64 on >= 99%
            of rows of random data for D >= 8 (below that, with large K, nearest codes get closer
            than tf32 can tell apart). On CPU both are float32.
        backend: `None` (automatic), `"torch"` or `"triton"`; `VIT_VQ_BACKEND` is read when None.
        rescore: how exact mode rescores the rows its bound cannot settle: `"candidates"` (the
            default: only the few codes the bound cannot rule out, the whole codebook for a row with
            more than `exact.CANDIDATE_CAP`) or `"codebook"` (always the whole codebook; the older,
            slower way, kept for comparisons). Same indices either way. `VIT_VQ_RESCORE` is read
            when None.
        return_distances: also return the chosen distances.
        max_temp_bytes: bound on temporaries (the torch path's score blocks, per worker thread; the
            float64 rescoring); besides O(N) outputs, and float32 copies of 16-bit inputs on the
            torch path.

    Returns:
        int64 `[N]`, or a `NearestCodeResult` when `return_distances`. Equal distances go to the
        lowest index. Inputs must be finite: for NaN or infinite values the result is unspecified
        and differs between backends (no check is made: it would cost a pass and, on GPU, a sync).

    Raises:
        ValueError / TypeError: on bad shapes, dtypes or options.
        RuntimeError: when a forced backend cannot run here.
    """
    _check(z, codebook)
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    if precision not in ("exact", "fast"):
        raise ValueError(f"precision must be 'exact' or 'fast', got {precision!r}")
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"backend must be None, 'torch' or 'triton', got {backend!r}")
    if rescore not in (None, "candidates", "codebook"):
        raise ValueError(f"rescore must be None, 'candidates' or 'codebook', got {rescore!r}")
    if max_temp_bytes < 1:
        raise ValueError(f"max_temp_bytes must be positive, got {max_temp_bytes}")
    args = (
        z.detach(), codebook.detach(), metric, precision, backend or "auto", rescore or "auto", return_distances,
        max_temp_bytes,
    )  # fmt: skip
    # Eager calls skip the dispatcher: the custom op's first eager call imports torch's fake-tensor
    # stack (~2 s, ~175 MB), which a compiled graph has loaded anyway.
    op = _nearest_code_op if torch.compiler.is_compiling() else _nearest_code_impl
    indices, distances = op(*args)
    return NearestCodeResult(indices, distances) if return_distances else indices
