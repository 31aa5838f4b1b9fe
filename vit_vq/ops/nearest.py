"""`nearest_code`: the single dispatch point for nearest-code search."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .torch_backend import DEFAULT_MAX_TEMP_BYTES, nearest_code_torch

Metric = Literal["l2", "cosine"]
Precision = Literal["exact", "fast"]
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


def resolve_backend(device: torch.device, backend: Backend | None) -> Backend:
    """Choose the backend: argument, else `VIT_VQ_BACKEND`, else triton for CUDA tensors."""
    choice = backend or os.environ.get("VIT_VQ_BACKEND") or None
    if choice not in (None, "torch", "triton"):
        raise ValueError(f"backend must be 'torch' or 'triton' (or VIT_VQ_BACKEND unset), got {choice!r}")
    if choice == "triton":
        raise RuntimeError("the triton backend is not available in this build of vit_vq")
    return "torch"


def nearest_code(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    metric: Metric = "l2",
    precision: Precision = "exact",
    backend: Backend | None = None,
    return_distances: bool = False,
    max_temp_bytes: int = DEFAULT_MAX_TEMP_BYTES,
) -> torch.Tensor | NearestCodeResult:
    """Index of the nearest codebook row for every row of `z`.

    Args:
        z: `[N, D]` float32/bfloat16/float16 queries.
        codebook: `[K, D]` codes, same device. Accumulation is always float32.
        metric: `"l2"` (squared Euclidean) or `"cosine"` (both sides l2-normalised first).
        precision: `"exact"` matches the float64 argmin up to fp32 rounding; `"fast"` may use
            tf32/bf16 matrix units on GPU.
        backend: `None` (auto), `"torch"` or `"triton"`; `VIT_VQ_BACKEND` overrides auto.
        return_distances: also return the chosen distances.
        max_temp_bytes: bound on the torch path's temporaries.

    Returns:
        int64 `[N]`, or a `NearestCodeResult` when `return_distances`. Ties go to the lowest index.

    Raises:
        ValueError / TypeError: on bad shapes, dtypes or options.
        RuntimeError: when a forced backend cannot run.
    """
    _check(z, codebook)
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    if precision not in ("exact", "fast"):
        raise ValueError(f"precision must be 'exact' or 'fast', got {precision!r}")
    resolve_backend(z.device, backend)
    zf, cf = z.float(), codebook.float()
    if metric == "cosine":
        zf, cf = F.normalize(zf, dim=1), F.normalize(cf, dim=1)
    if z.shape[0] == 0:
        empty = torch.empty(0, dtype=torch.int64, device=z.device)
        return NearestCodeResult(empty, empty.float()) if return_distances else empty
    indices, dist = nearest_code_torch(zf, cf, max_temp_bytes=max_temp_bytes)
    if metric == "cosine":
        dist = dist * 0.5  # |a-b|^2 = 2 - 2cos for unit vectors
    return NearestCodeResult(indices, dist) if return_distances else indices
