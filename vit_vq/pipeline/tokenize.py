"""Pre-tokenize an image data set into resumable shards, on one process or many.

Launched plainly, one process does everything. Under `torchrun` or `accelerate launch`
(`WORLD_SIZE > 1` in the environment), `distributed()` joins the process group; every
rank codes the shards `k % world_size == rank` (no padding, no duplicates), then after a
barrier rank 0 gathers the shard records and writes `manifest.json`.

The output folder is locked for the whole run (`outdir.FolderLock`): a second run into
it is refused with the holder's PID. Resuming: a shard whose record and checksums are
intact, whose run fingerprint (model, data, settings) matches and whose input files have
the size, times and inode they had, is skipped; a shard of this run with a changed
input or a damaged file is rewritten. A file this run would write that another run made
(a shard record, a manifest, a shard file without a record) is never overwritten without
`overwrite=True`, which also removes earlier runs' shard files this run does not rewrite
(`outdir.remove_stale_shards`). An output folder inside an image-folder input is left out of the inputs.
"""

from __future__ import annotations

import contextlib
import datetime
import json
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

from ..data import list_images, open_image_source
from ..files import OUTPUT_MARKER, FolderInUseError, FolderLock, mark_output, read_json_file
from ..fingerprint import files_stat_fingerprint, inputs_fingerprint, text_digest
from ..tokenizer import ViTVQTokenizer
from .batching import encode_images, lookahead
from .codes import smallest_uint_dtype, to_storage
from .manifest import MANIFEST_NAME, build_manifest, write_manifest
from .outdir import exclude_folder, remove_stale_shards, tokenize_lock
from .runtime import ModelInfo
from .shards import ShardFormat, ShardSpec, data_files, is_complete, plan_shards, record_path, shards_for_rank, write_shard
from .sources import WHOLE_IMAGE_MODES, ModelSizedImages, ResizeMode, collate_sized

logger = logging.getLogger(__name__)

# Ranks wait at the barrier while the slowest one finishes its shards: allow long jobs.
BARRIER_TIMEOUT = datetime.timedelta(hours=12)


@dataclass
class TokenizeOptions:
    """What to tokenize and how.

    data: an image folder, a saved `datasets` folder or a Hub dataset name.
    out: the output folder (shards, shard records, `manifest.json`).
    shard_size: input items per shard. batch_size: images per forward pass, at most `batch_tokens`
        tokens (default `batching.DEFAULT_BATCH_TOKENS`) in one pass, of one grid shape.
    fmt: `"safetensors"` or `"npy"`. resize: `"crop"`, `"native"`, `"budget"` or `"none"` (other sizes
        are skipped, with a reason); see `sources.ModelSizedImages`. `native` and `budget` keep each
        image's aspect ratio: grids of many shapes, stored flat with their shapes (manifest format 3).
    short_side: the short side (`native`) or square side (`crop`) in pixels instead of the model's.
    split / image_column / label_column: for `datasets` inputs; labels are stored when a column is named.
    overwrite: rewrite files this run did not make (shards and a manifest of a different run,
        shard files without a record) instead of refusing, and remove earlier runs' shard files
        and records that this run does not rewrite (those still as their run wrote them).
    """

    data: str
    out: str
    shard_size: int = 4096
    batch_size: int = 64
    fmt: ShardFormat = "safetensors"
    resize: ResizeMode = "crop"
    short_side: int | None = None
    batch_tokens: int | None = None
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


CONFLICT_ADVICE = "; write to another folder, or let this run replace them (TokenizeOptions.overwrite)"


def _inputs_digest(source: Any) -> str:
    """sha256 (16 hex) of which inputs sit at which position: file paths, or a dataset's fingerprint.

    A resumed run whose inputs were added, removed or renamed then no longer matches its
    shards, instead of reusing shards that cover other images.
    """
    if hasattr(source, "files"):
        return inputs_fingerprint(source.files)
    return text_digest(str(getattr(source.ds, "_fingerprint", len(source))))


def _shard_inputs(source: Any, spec: ShardSpec) -> str | None:
    """Whether shard `spec`'s input files were replaced since (`fingerprint.files_stat_fingerprint`).

    A `datasets` input needs none (None): its fingerprint (in the run) covers the content.
    """
    if not hasattr(source, "files"):
        return None
    return files_stat_fingerprint(source.files[spec.start : spec.stop])


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
        **({"short_side": opts.short_side} if opts.short_side is not None else {}),  # runs without it keep their digest
    }


def _digest(run: dict[str, Any]) -> str:
    return text_digest(json.dumps(run, sort_keys=True))


def _open_source(opts: TokenizeOptions, out: Path) -> Any:
    """The input items, without the files of `out` when it lies inside an image-folder input."""
    source = open_image_source(opts.data, split=opts.split, image_column=opts.image_column, label_column=opts.label_column)
    if hasattr(source, "files") and getattr(source, "root", None) is not None and source.root.is_dir():
        source.files = exclude_folder(source.files, source.root, out)
    if len(source) == 0:
        raise ValueError(f"{opts.data!r} holds no input items")
    return source


@contextlib.contextmanager
def _locked(out: Path, rank: int, world_size: int) -> Iterator[tuple[FolderLock | None, str | None]]:
    """Rank 0 locks `out` for the whole run; yields `(the lock on rank 0, the run the folder last held)`.

    Raises (on every rank, so that none waits for the others forever):
        FolderInUseError: another run holds the folder. ValueError: the lock file is a link or
            not a regular file. OSError: the lock file cannot be opened.
    """
    lock, error = (tokenize_lock(out), None) if rank == 0 else (None, None)
    if lock is not None:
        try:
            lock.acquire()
        except (FolderInUseError, ValueError, OSError) as err:
            error = err
    error, previous = _gather((error, lock.previous_run if lock else None), world_size)[0]
    if error is not None:
        raise error
    try:
        yield lock, previous
    finally:
        if lock is not None:
            lock.release()


def _foreign_files(out: Path, spec: ShardSpec, opts: TokenizeOptions) -> list[str]:
    """Data files of shard `spec` that exist without a record (only ever written by a run before its record)."""
    if record_path(out, spec).is_file():
        return []
    names = data_files(opts.fmt, spec.stem, opts.label_column is not None, _flat(opts)).values()
    return [f"{name} exists but no record of this run describes it" for name in names if (out / name).exists()]


def _shard_names(num_items: int, opts: TokenizeOptions) -> set[str]:
    """Every shard file and record name a run of `opts` over `num_items` items writes."""
    names = set()
    for spec in plan_shards(num_items, opts.shard_size):
        names |= {record_path(Path(), spec).name,
                  *data_files(opts.fmt, spec.stem, opts.label_column is not None, _flat(opts)).values()}
    return names


def _flat(opts: TokenizeOptions) -> bool:
    """Whether the run keeps aspect ratios, so its shards store grids of many shapes flat."""
    return opts.resize in WHOLE_IMAGE_MODES


def _manifest_conflict(out: Path, run_digest: str) -> str | None:
    """Why `out/manifest.json` is not this run's to rewrite (None when absent or ours)."""
    path = out / MANIFEST_NAME
    if not os.path.lexists(path):
        return None
    old = read_json_file(path)  # a FIFO or a link there is not ours either, and is never read
    if isinstance(old, dict) and old.get("run") == run_digest:
        return None
    return f"{MANIFEST_NAME} describes a different run (or is not a vit_vq manifest)"


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
    `tok` must already be on its device and in eval mode. Rank 0 holds the lock on `opts.out`
    until the manifest is written.

    Raises:
        FileNotFoundError: missing input. ValueError: an empty input, or `opts.out` is the input
            folder, or its lock file is a link or not a regular file. FolderInUseError: another run
            is writing into `opts.out`. FileExistsError:
            `opts.out` holds files this run would overwrite but did not make (without `overwrite`).
            RuntimeError: counts that do not add up.
    """
    out = Path(opts.out).expanduser()
    source = _open_source(opts, out)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out, rank, world_size) as (lock, previous_run):
        run = _run_fingerprint(opts, info, source)
        run_digest = _digest(run)
        records, pending, conflicts = _plan(out, source, opts, run, rank, world_size, own_files=previous_run == run_digest)
        if rank == 0 and (conflict := _manifest_conflict(out, run_digest)):
            conflicts.append(conflict)
        all_conflicts = [c for cs in _gather(conflicts, world_size) for c in cs]
        if all_conflicts and not opts.overwrite:
            raise FileExistsError(
                f"{out} holds files this run did not write: {all_conflicts[0]}"
                + (f" (and {len(all_conflicts) - 1} more)" if len(all_conflicts) > 1 else "")
                + CONFLICT_ADVICE
            )
        if lock is not None:
            if opts.overwrite:
                remove_stale_shards(out, _shard_names(len(source), opts))
            lock.claim(run_digest)
            # never mark (and so hide) a folder that holds the user's files
            if (out / OUTPUT_MARKER).exists() or not list_images(out, include_all_files=True):
                mark_output(out, "vit-vq tokenize")  # only once the run owns the folder
        return _code_and_collect(tok, info, opts, out, source, run, run_digest, records, pending, rank, world_size, progress)


def _plan(
    out: Path, source: Any, opts: TokenizeOptions, run: dict[str, Any], rank: int, world_size: int, *, own_files: bool
) -> tuple[list[dict[str, Any]], list[tuple[ShardSpec, str | None]], list[str]]:
    """This rank's finished shards (records), shards to write (with their input digest), and conflicts.

    `own_files`: the folder was last claimed by this same run, so shard files without a record
    are this run's, left by a crash between a shard's data and its record.
    """
    records: list[dict[str, Any]] = []
    pending: list[tuple[ShardSpec, str | None]] = []
    conflicts: list[str] = []
    for spec in shards_for_rank(plan_shards(len(source), opts.shard_size), rank, world_size):
        inputs = _shard_inputs(source, spec)
        record, conflict = is_complete(out, spec, run, inputs)
        if record is not None:
            records.append(record)
            continue
        pending.append((spec, inputs))
        if conflict:
            conflicts.append(conflict)
        elif not own_files:
            conflicts += _foreign_files(out, spec, opts)
    return records, pending, conflicts


def _code_and_collect(
    tok: ViTVQTokenizer,
    info: ModelInfo,
    opts: TokenizeOptions,
    out: Path,
    source: Any,
    run: dict[str, Any],
    run_digest: str,
    records: list[dict[str, Any]],
    pending: list[tuple[ShardSpec, str | None]],
    rank: int,
    world_size: int,
    progress: bool,
) -> TokenizeResult:
    """Code the pending shards, then gather every rank's records and (rank 0) write the manifest."""
    from tqdm.auto import tqdm

    reused = [r["index"] for r in records]
    inputs_of = dict((spec.index, inputs) for spec, inputs in pending)
    specs = [spec for spec, _ in pending]
    cfg = tok.config
    device = next(tok.parameters()).device
    flat = _flat(opts)
    dataset = ModelSizedImages(source, cfg.image_size, opts.resize, patch_size=cfg.patch_size,
                               max_tokens=cfg.token_budget, short_side=opts.short_side)
    plan = _batches(specs, lookahead(cfg, opts.batch_size, opts.batch_tokens, uniform=not flat))
    loader = DataLoader(  # only iterated when there is work: iterating starts the workers
        dataset,
        batch_sampler=[positions for _, positions, _ in plan],
        num_workers=opts.num_workers,
        collate_fn=collate_sized,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    dtype = smallest_uint_dtype(cfg.codebook_size)
    side = dataset.size // cfg.patch_size  # the square grid of a crop / none run
    acc: dict[str, Any] = {}
    bar = tqdm(total=sum(s.stop - s.start for s in specs), unit="img", desc="tokenize", disable=not progress or rank != 0)
    for (spec, positions, last), batch in zip(plan, loader if plan else [], strict=True):
        if not acc:
            acc = {"codes": [], "indices": [], "labels": [], "keys": [], "skipped": [], "resized": 0}
        if batch["pixels"] is not None:
            acc["codes"] += encode_images(tok, batch["pixels"], batch_size=opts.batch_size,
                                          batch_tokens=opts.batch_tokens, out_device="cpu")  # (h, w) each, in order
        acc["indices"] += batch["indices"]
        acc["labels"] += batch["labels"].tolist()
        acc["keys"] += batch["keys"]
        acc["skipped"] += batch["skipped"]
        acc["resized"] += batch["resized"]
        bar.update(len(positions))
        if last:
            codes, shapes = _shard_arrays(acc["codes"], flat, (side, side), cfg.codebook_size)
            records.append(
                write_shard(
                    out, spec,
                    codes=codes,
                    shapes=shapes,
                    indices=acc["indices"],
                    labels=acc["labels"] if opts.label_column else None,
                    keys=acc["keys"],
                    skipped=acc["skipped"],
                    num_resized=acc["resized"],
                    fmt=opts.fmt,
                    run=run,
                    inputs=inputs_of[spec.index],
                )
            )
            acc = {}
    bar.close()
    written = [s.index for s in specs]

    gathered = _gather((records, written, reused), world_size)  # also the barrier before the manifest
    result = TokenizeResult(rank=rank, world_size=world_size, written=written, reused=reused)
    if rank == 0:
        all_records = [r for recs, _, _ in gathered for r in recs]
        result.written = sorted(i for _, w, _ in gathered for i in w)
        result.reused = sorted(i for _, _, u in gathered for i in u)
        result.manifest = build_manifest(
            all_records,
            info=info,
            num_inputs=len(source),
            codebook_size=cfg.codebook_size,
            image_size=cfg.image_size,
            grid=None if flat else (side, side),
            token_budget=cfg.token_budget if flat else None,
            codes_dtype=str(dtype),
            shard_format=opts.fmt,
            shard_size=opts.shard_size,
            world_size=world_size,
            data={k: run[k] for k in ("data", "split", "image_column", "label_column", "resize", "short_side") if k in run},
            run=run_digest,
        )
        write_manifest(out, result.manifest)
    if world_size > 1:
        dist.barrier()  # nobody leaves before the manifest exists
    return result


def _shard_arrays(
    grids: list[torch.Tensor], flat: bool, grid: tuple[int, int], codebook_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """A shard's `(codes, shapes)`: `[n, h, w]` and None, or (`flat`) `[T]` and int64 `[n, 2]`; smallest uint dtype."""
    if not flat:
        stacked = torch.stack(grids) if grids else torch.zeros(0, *grid, dtype=torch.int64)
        return to_storage(stacked, codebook_size), None
    shapes = np.array([tuple(g.shape) for g in grids], dtype=np.int64).reshape(-1, 2)
    joined = torch.cat([g.reshape(-1) for g in grids]) if grids else torch.zeros(0, dtype=torch.int64)
    return to_storage(joined, codebook_size), shapes


__all__ = [
    "TokenizeOptions", "TokenizeResult", "tokenize_dataset", "distributed", "BARRIER_TIMEOUT", "FolderInUseError",
    "CONFLICT_ADVICE",
]
