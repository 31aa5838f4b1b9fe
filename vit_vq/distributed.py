"""Thin wrappers over `torch.distributed` that are no-ops in a single process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """Sum tensors in place across ranks with one bucketed collective."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def all_reduce_min(value: int, device: torch.device) -> int:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def broadcast_(tensor: torch.Tensor, src: int = 0) -> None:
    """Overwrite `tensor` on every rank with rank `src`'s copy."""
    if is_distributed():
        dist.broadcast(tensor, src=src)


MAX_DEFAULT_WORKERS = 4  # data-loader workers when not set: min(this, CPUs available)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else the CPU count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers() -> int:
    """Data-loader (image-decoding) workers when not set: the CPUs this process may use, at most 4."""
    return max(1, min(MAX_DEFAULT_WORKERS, available_cpus()))
