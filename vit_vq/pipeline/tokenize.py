"""Pre-tokenize an image data set into resumable shards, on one process or many.

Launched plainly, one process does everything. Under `torchrun` or `accelerate launch`
(`WORLD_SIZE > 1` in the environment), `distributed()` joins the process group; every
rank codes the shards `k % world_size == rank` (no padding, no duplicates), then after a
barrier rank 0 gathers the shard records and writes `manifest.json`.

Resuming: a shard whose record and checksums are intact, and whose run fingerprint
(model, data, settings) matches, is skipped; anything else in its range is rewritten.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..data import open_image_source
from ..tokenizer import ViTVQTokenizer
from .codes import smallest_uint_dtype, to_storage
from .manifest import build_manifest, write_manifest
from .runtime import ModelInfo
from .shards import ShardFormat, ShardSpec, is_complete, plan_shards, shards_for_rank, write_shard
from .sources import ModelSizedImages, ResizeMode, collate_sized

logger = logging.getLogger(__name__)

# Ranks wait at the barrier while the slowest one finishes its shards: allow long jobs.
BARRIER_TIMEOUT = datetime.timedelta(hours=12)


@dataclass
class TokenizeOptions:
    """What to tokenize and how.

    data: an image folder, a saved `datasets` folder or a Hub dataset name.
    out: the output folder (shards, shard records, `manifest.json`).
    shard_size: input items per shard. batch_size: images per forward pass.
    fmt: `"safetensors"` or `"npy"`. resize: `"crop"` or `"none"` (other sizes are skipped, with a reason).
    split / image_column / label_column: for `datasets` inputs; labels are stored when a column is named.
    overwrite: rewrite shards made by a different run instead of refusing.
    """

    data: str
    out: str
    shard_size: int = 4096
    batch_size: int = 64
    fmt: ShardFormat = "safetensors"
    resize: ResizeMode = "crop"
    split: str = "train"
    image_column: str = "image"
    label_column: str | None = None
    num_workers: int = 2
    overwrite: bool = False


@dataclass
class TokenizeResult:
    """`manifest` and the global `written`/`reused` shard indices on rank 0; this rank's lists elsewhere."""

    rank: int
    world_size: int
    written: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)
    manifest: dict[str, Any] | None = None


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[tuple[int, int]]:
    """Join the process group described by the launcher's environment; yield `(rank, world_size)`.

    A no-op `(0, 1)` without `WORLD_SIZE > 1`. Uses NCCL for CUDA devices, gloo otherwise,
    and leaves a group it did not create alone.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    created = False
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=BARRIER_TIMEOUT)
        created = True
    try:
        if dist.is_available() and dist.is_initialized():
            yield dist.get_rank(), dist.get_world_size()
        else:
            yield 0, 1
    finally:
        if created:
            dist.destroy_process_group()


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _inputs_digest(source: Any) -> str:
    """sha256 (16 hex) of which inputs sit at which position: file paths, or a dataset's fingerprint.

    A resumed run whose inputs were added, removed or renamed then no longer matches its
    shards, instead of reusing shards that cover other images.
    """
    digest = hashlib.sha256()
    if hasattr(source, "files"):
        for f in source.files:
            digest.update(str(f).encode() + b"\0")
    else:
        digest.update(str(getattr(source.ds, "_fingerprint", len(source))).encode())
    return digest.hexdigest()[:16]


def _run_fingerprint(opts: TokenizeOptions, info: ModelInfo, source: Any) -> dict[str, Any]:
    path = Path(opts.data).expanduser()
    return {
        **info.to_dict(),
        "inputs": _inputs_digest(source),
        "data": str(path.resolve()) if path.exists() else opts.data,
        "split": opts.split,
        "image_column": opts.image_column,
        "label_column": opts.label_column,
        "num_inputs": len(source),
        "shard_size": opts.shard_size,
        "format": opts.fmt,
        "resize": opts.resize,
    }


def _batches(pending: list[ShardSpec], batch_size: int) -> list[tuple[ShardSpec, list[int], bool]]:
    """`(shard, item positions, is the shard's last batch)`; batches never straddle shards."""
    plan = []
    for spec in pending:
        starts = list(range(spec.start, spec.stop, batch_size))
        for j, s in enumerate(starts):
            plan.append((spec, list(range(s, min(spec.stop, s + batch_size))), j == len(starts) - 1))
    return plan


def tokenize_dataset(
    tok: ViTVQTokenizer, info: ModelInfo, opts: TokenizeOptions, *, rank: int = 0, world_size: int = 1, progress: bool = True
) -> TokenizeResult:
    """Code every image of `opts.data` into shards under `opts.out`; rank 0 writes the manifest.

    Call it on every rank (inside `distributed(...)` when launched with several processes);
    `tok` must already be on its device and in eval mode.

    Raises:
        FileNotFoundError: missing input. ValueError: an empty input, or shards in `opts.out`
            from a different run (without `overwrite`). RuntimeError: counts that do not add up.
    """
    from tqdm.auto import tqdm

    source = open_image_source(opts.data, split=opts.split, image_column=opts.image_column, label_column=opts.label_column)
    num_inputs = len(source)
    if num_inputs == 0:
        raise ValueError(f"{opts.data!r} holds no input items")
    out = Path(opts.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    run = _run_fingerprint(opts, info, source)
    mine = shards_for_rank(plan_shards(num_inputs, opts.shard_size), rank, world_size)

    records: list[dict[str, Any]] = []
    pending: list[ShardSpec] = []
    conflicts: list[str] = []
    for spec in mine:
        record, conflict = is_complete(out, spec, run)
        if record is not None:
            records.append(record)
        else:
            pending.append(spec)
            if conflict:
                conflicts.append(conflict)
    all_conflicts = [c for cs in _gather(conflicts, world_size) for c in cs]
    if all_conflicts and not opts.overwrite:
        raise ValueError(
            f"{out} holds shards from a different run: {all_conflicts[0]}"
            + (f" (and {len(all_conflicts) - 1} more)" if len(all_conflicts) > 1 else "")
            + "; use a new --out, or --overwrite to replace them"
        )
    reused = [r["index"] for r in records]

    cfg = tok.config
    device = next(tok.parameters()).device
    dataset = ModelSizedImages(source, cfg.image_size, opts.resize)
    plan = _batches(pending, opts.batch_size)
    loader = DataLoader(  # only iterated when there is work: iterating starts the workers
        dataset,
        batch_sampler=[positions for _, positions, _ in plan],
        num_workers=opts.num_workers,
        collate_fn=collate_sized,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    dtype = smallest_uint_dtype(cfg.codebook_size)
    empty = np.zeros((0, cfg.grid_size, cfg.grid_size), dtype=dtype)
    acc: dict[str, Any] = {}
    bar = tqdm(total=sum(s.stop - s.start for s in pending), unit="img", desc="tokenize", disable=not progress or rank != 0)
    for (spec, positions, last), batch in zip(plan, loader if plan else [], strict=True):
        if not acc:
            acc = {"codes": [], "indices": [], "labels": [], "keys": [], "skipped": [], "resized": 0}
        if batch["pixels"] is not None:
            codes = tok.encode(batch["pixels"].to(device, non_blocking=True))  # (b, h, w)
            acc["codes"].append(to_storage(codes, cfg.codebook_size))
        acc["indices"] += batch["indices"]
        acc["labels"] += batch["labels"].tolist()
        acc["keys"] += batch["keys"]
        acc["skipped"] += batch["skipped"]
        acc["resized"] += batch["resized"]
        bar.update(len(positions))
        if last:
            records.append(
                write_shard(
                    out, spec,
                    codes=np.concatenate(acc["codes"]) if acc["codes"] else empty,
                    indices=acc["indices"],
                    labels=acc["labels"] if opts.label_column else None,
                    keys=acc["keys"],
                    skipped=acc["skipped"],
                    num_resized=acc["resized"],
                    fmt=opts.fmt,
                    run=run,
                )
            )
            acc = {}
    bar.close()
    written = [s.index for s in pending]

    gathered = _gather((records, written, reused), world_size)  # also the barrier before the manifest
    result = TokenizeResult(rank=rank, world_size=world_size, written=written, reused=reused)
    if rank == 0:
        all_records = [r for recs, _, _ in gathered for r in recs]
        result.written = sorted(i for _, w, _ in gathered for i in w)
        result.reused = sorted(i for _, _, u in gathered for i in u)
        result.manifest = build_manifest(
            all_records,
            info=info,
            num_inputs=num_inputs,
            codebook_size=cfg.codebook_size,
            image_size=cfg.image_size,
            grid=(cfg.grid_size, cfg.grid_size),
            codes_dtype=str(dtype),
            shard_format=opts.fmt,
            shard_size=opts.shard_size,
            world_size=world_size,
            data={k: run[k] for k in ("data", "split", "image_column", "label_column", "resize")},
        )
        write_manifest(out, result.manifest)
    if world_size > 1:
        dist.barrier()  # nobody leaves before the manifest exists
    return result


__all__ = ["TokenizeOptions", "TokenizeResult", "tokenize_dataset", "distributed", "BARRIER_TIMEOUT"]
