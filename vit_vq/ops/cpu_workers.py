"""Coarse-grained CPU parallelism: a few single-threaded worker threads instead of many parallel regions.

torch's intra-op parallelism opens an OpenMP parallel region per operation, and every region waits
for its slowest thread. A chunked search runs thousands of small operations, so when other
processes share the cores (data-loader workers, a second rank, a busy server) each region stalls
on a descheduled thread and the whole search crawls. Here the rows are cut into a few large units
instead; each worker thread runs torch single-threaded (no parallel regions at all), pulls the next
unit when it finishes one, and a stalled worker holds up nothing but its own unit.

Threads: OpenMP's thread count is per calling thread, so `torch.set_num_threads(1)` inside a worker
leaves the caller's setting alone. It also sets the count that threads started later begin with;
that value is restored when the last worker of all concurrent calls finishes (a reference count
under a lock), so several Python threads may call in at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

Unit = TypeVar("Unit")

UNITS_PER_WORKER = 4  # a few units each: a stalled worker leaves its remaining units to the others

_lock = threading.Lock()
_active = 0  # workers running now, across all calls
_saved_threads = 0  # the thread count new threads started with before the first active worker


def _enter_single_threaded() -> None:
    global _active, _saved_threads
    with _lock:
        if _active == 0:
            _saved_threads = torch.get_num_threads()  # a fresh thread: the count new threads start with
        _active += 1
        torch.set_num_threads(1)


def _leave_single_threaded() -> None:
    global _active
    with _lock:
        _active -= 1
        if _active == 0:
            torch.set_num_threads(_saved_threads)


def row_spans(n_rows: int, block_rows: int, workers: int) -> list[tuple[int, int]]:
    """`[r0, r1)` spans of whole `block_rows` blocks, about `UNITS_PER_WORKER` per worker."""
    n_blocks = -(-n_rows // block_rows)
    per_unit = -(-n_blocks // (workers * UNITS_PER_WORKER)) * block_rows
    return [(r0, min(r0 + per_unit, n_rows)) for r0 in range(0, n_rows, per_unit)]


def run_units(
    units: Sequence[Unit], workers: int, make_state: Callable[[], object], work: Callable[[object, Unit], None]
) -> None:
    """Run `work(state, unit)` for every unit on `workers` fresh threads, each single-threaded in torch.

    Every worker calls `make_state()` once (its own preallocated buffers), then takes units in order
    until none are left. Gradient recording is off in the workers. Returns when all units are done;
    the first exception raised in a worker is re-raised here.

    Raises:
        ValueError: when `workers` < 1.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    next_unit = iter(range(len(units)))
    take = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        _enter_single_threaded()
        try:
            with torch.no_grad():
                state = make_state()
                while not errors:
                    with take:
                        i = next(next_unit, None)
                    if i is None:
                        return
                    work(state, units[i])
        except BaseException as err:  # handed to the caller
            errors.append(err)
        finally:
            _leave_single_threaded()

    threads = [threading.Thread(target=worker, name=f"vit_vq-cpu-{i}", daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
