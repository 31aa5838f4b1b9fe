"""Shards of pre-tokenized codes: planning, atomic writing, verification and reading.

The input items `[0, N)` are cut into shards of `shard_size` consecutive items; shard `k`
covers `[k * shard_size, min(N, (k + 1) * shard_size))` whatever the number of ranks, so
a job can be resumed with a different world size. Shard `k` is written by rank
`k % world_size`. Its files, in the output folder:

    codes-00007.safetensors   tensors `codes` [n, h, w] (smallest uint dtype), `indices` int64 [n]
                              (positions in the input), `labels` int64 [n] (when the data has labels)
    codes-00007.npy           the same as .npy files instead: `codes-00007.npy`,
    codes-00007.indices.npy, codes-00007.labels.npy

A run that keeps each image's aspect ratio (resize `native` / `budget`: grids of many shapes)
stores the grids flat instead, in every shard of the run: `codes` [T] (each grid row-major, one
after another in item order, `T = sum(h_i * w_i)`) and `shapes` int64 [n, 2] (each grid's `(h_i, w_i)`;
`codes-00007.shapes.npy` in the npy format). `read_shard` checks that the shapes add up to the
codes and stay within the token budget, and returns each item's grid.
    codes-00007.json          the record: item range, counts, keys (file names or row ids),
                              skipped items with reasons, SHA-256 of every data file, run fingerprint,
                              and a digest of the shard's input files as they were (size, times, inode)

Every file is written atomically (temporary file + `os.replace`), data first and the
record last, so a record's presence means the shard is complete; `is_complete` re-checks
the checksums, and the shard's inputs, before a resumed run skips it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..config import MAX_GRID_SIZE
from ..files import atomic_write, atomic_write_json
from ..fingerprint import sha256_file
from ..registry import bundled_hint

ShardFormat = Literal["safetensors", "npy"]
SHARD_FORMATS = ("safetensors", "npy")


@dataclass(frozen=True)
class ShardSpec:
    """Shard `index` covers input items `[start, stop)`."""

    index: int
    start: int
    stop: int

    @property
    def stem(self) -> str:
        return f"codes-{self.index:05d}"


def plan_shards(num_items: int, shard_size: int) -> list[ShardSpec]:
    """Consecutive shards of `shard_size` items covering `[0, num_items)` exactly once.

    Raises:
        ValueError: `shard_size < 1`.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [ShardSpec(k, s, min(num_items, s + shard_size)) for k, s in enumerate(range(0, num_items, shard_size))]


def shards_for_rank(shards: list[ShardSpec], rank: int, world_size: int) -> list[ShardSpec]:
    """Rank `rank`'s shards (`index % world_size == rank`): no shard twice, none lost, no padding."""
    return [s for s in shards if s.index % world_size == rank]


def record_path(out: Path, spec: ShardSpec) -> Path:
    return out / f"{spec.stem}.json"


def data_files(fmt: ShardFormat | str, stem: str, has_labels: bool, flat: bool = False) -> dict[str, str]:
    """Role -> file name of a shard's data files (`flat`: grids of many shapes, with a `shapes` array)."""
    if fmt == "safetensors":
        return {"codes": f"{stem}.safetensors"}
    files = {"codes": f"{stem}.npy", "indices": f"{stem}.indices.npy"}
    if has_labels:
        files["labels"] = f"{stem}.labels.npy"
    if flat:
        files["shapes"] = f"{stem}.shapes.npy"
    return files


def write_shard(
    out: Path,
    spec: ShardSpec,
    *,
    codes: np.ndarray,
    indices: list[int],
    labels: list[int] | None,
    keys: list[str],
    skipped: list[dict[str, str]],
    num_resized: int,
    fmt: ShardFormat,
    run: dict[str, Any],
    inputs: str | None = None,
    shapes: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write one shard's data files and then its record, each atomically; return the record.

    Args:
        codes: `[n, h, w]` in its storage dtype (see `codes.smallest_uint_dtype`), or with `shapes`
            the flat `[T]` grids of shapes `shapes` int64 `[n, 2]`.
        indices: the n input positions; labels: n labels or None; keys: n names.
        skipped: `{"path", "reason"}` for the unreadable items of this shard's range.
        run: the run fingerprint (model, data, sharding), checked on resume.
        inputs: a digest of the state of this shard's inputs (see `is_complete`), or None.
    """
    count = codes.shape[0] if shapes is None else shapes.shape[0]
    if not (count == len(indices) == len(keys)) or (labels is not None and len(labels) != len(keys)):
        raise ValueError(f"shard {spec.index}: {count} codes, {len(indices)} indices, {len(keys)} keys do not match")
    if shapes is not None and (codes.ndim != 1 or int(shapes.prod(axis=1).sum()) != codes.shape[0]):
        raise ValueError(f"shard {spec.index}: shapes {list(shapes.shape)} do not add up to the {codes.shape[0]} flat codes")
    arrays = {"codes": codes, "indices": np.asarray(indices, dtype=np.int64)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    if shapes is not None:
        arrays["shapes"] = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
    files = data_files(fmt, spec.stem, labels is not None, flat=shapes is not None)
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        # no metadata: safetensors writes it in hash order, so a rewritten shard would not be byte-identical
        atomic_write(out / files["codes"], lambda tmp: save_file(arrays, str(tmp)))
    elif fmt == "npy":
        for role, name in files.items():
            atomic_write(out / name, lambda tmp, a=arrays[role]: _save_npy(tmp, a))
    else:
        raise ValueError(f"format must be one of {SHARD_FORMATS}, got {fmt!r}")
    record = {
        "index": spec.index,
        "start": spec.start,
        "stop": spec.stop,
        "num_images": len(keys),
        "num_resized": num_resized,
        "files": files,
        "sha256": {name: sha256_file(out / name) for name in files.values()},
        "keys": keys,
        "skipped": skipped,
        "run": run,
        "inputs": inputs,
    }
    atomic_write_json(record_path(out, spec), record)
    return record


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save on a path would append ".npy" to the temporary name
        np.save(f, array)


def is_complete(
    out: Path, spec: ShardSpec, run: dict[str, Any], inputs: str | None = None
) -> tuple[dict[str, Any] | None, str | None]:
    """Check an existing shard before a resumed run skips it.

    Returns:
        `(record, None)` when the shard is complete, intact and its inputs are unchanged
        (`inputs` equals the digest it was made from); `(None, None)` when this run must
        (re)write it (missing, partial or corrupt files, or inputs changed since); `(None, reason)`
        when its record was not made by this run (other model, data or settings, or not a shard
        record at all), which a resume must not overwrite or mix in.
    """
    path = record_path(out, spec)
    if not path.is_file():
        return None, None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("run"), dict):
        return None, f"{path.name} is not a vit_vq shard record"
    if record["run"] != run:
        old, new = record["run"], run
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:3])
        hint = ""
        if (old.get("config_hash"), old.get("decoder_hash")) != (new.get("config_hash"), new.get("decoder_hash")):
            hint = bundled_hint(old.get("config_hash"), old.get("decoder_hash"), new.get("model_id"))
        return None, f"{path.name} was made by a different run ({detail}){hint}"
    if (record.get("start"), record.get("stop")) != (spec.start, spec.stop) or record.get("inputs") != inputs:
        return None, None
    for name, digest in (record.get("sha256") or {}).items():
        if not (out / name).is_file() or sha256_file(out / name) != digest:
            return None, None
    return record, None


def read_shard(out: str | Path, files: dict[str, str], *, max_tokens: int = MAX_GRID_SIZE**2) -> dict[str, Any]:
    """Load a shard's arrays as int64: `codes` (`[n, h, w]`, or flat `[T]` with `shapes` `[n, 2]`),
    `indices` `[n]`, `labels` `[n]` if any, and `grids`: each item's `[h_i, w_i]` grid (views of `codes`).

    Raises:
        ValueError: arrays other than these, non-integer arrays, counts that disagree, or (flat) shapes that
            do not add up to the codes, a side below 1 or a grid over `max_tokens`; names the file and array.
    """
    out = Path(out)
    main = out / files["codes"]
    if files["codes"].endswith(".safetensors"):
        from safetensors.numpy import load_file

        arrays = load_file(str(main))
        names = {role: main for role in arrays}
    else:
        arrays = {role: np.load(out / name) for role, name in files.items()}
        names = {role: out / name for role, name in files.items()}
    if "codes" not in arrays or "indices" not in arrays or set(arrays) - {"codes", "indices", "labels", "shapes"}:
        raise ValueError(f"{main}: a shard holds 'codes', 'indices' and optionally 'labels' and 'shapes', got {sorted(arrays)}")
    for role, a in arrays.items():
        if a.dtype.kind not in "ui":
            raise ValueError(f"{names[role]}: array {role!r} must hold integers, got dtype {a.dtype}")
    n = arrays["indices"].shape[0]
    if "shapes" in arrays:
        _check_flat(names["shapes"], arrays["codes"], arrays["shapes"], n, max_tokens)
    elif arrays["codes"].ndim != 3 or arrays["codes"].shape[0] != n:
        raise ValueError(f"{names['codes']}: array 'codes' is {list(arrays['codes'].shape)}, not [{n}, h, w] for {n} indices")
    if "labels" in arrays and arrays["labels"].shape != (n,):
        raise ValueError(f"{names['labels']}: array 'labels' is {list(arrays['labels'].shape)}, not [{n}]")
    result = {role: torch.from_numpy(a.astype(np.int64)) for role, a in arrays.items()}
    if "shapes" in result:
        shapes = [(int(h), int(w)) for h, w in result["shapes"].tolist()]
        parts = torch.split(result["codes"], [h * w for h, w in shapes])
        result["grids"] = [part.view(h, w) for part, (h, w) in zip(parts, shapes, strict=True)]
    else:
        result["grids"] = list(result["codes"])
        result["shapes"] = torch.tensor([list(result["codes"].shape[1:])] * n, dtype=torch.int64).reshape(n, 2)
    return result


def _check_flat(path: Path, codes: np.ndarray, shapes: np.ndarray, n: int, max_tokens: int) -> None:
    """Raise unless `shapes` is `[n, 2]` with sides >= 1, grids within `max_tokens`, adding up to flat `codes`."""
    if shapes.shape != (n, 2) or codes.ndim != 1:
        raise ValueError(f"{path}: array 'shapes' is {list(shapes.shape)} and 'codes' {list(codes.shape)}; "
                         f"{n} items need shapes [{n}, 2] and flat codes [T]")
    if n and (int(shapes.min()) < 1 or int(shapes.max()) > max_tokens):
        raise ValueError(f"{path}: array 'shapes' holds sides in [{int(shapes.min())}, {int(shapes.max())}], "
                         f"outside [1, {max_tokens}]")
    tokens = shapes.astype(np.int64).prod(axis=1)
    if n and int(tokens.max()) > max_tokens:
        raise ValueError(f"{path}: array 'shapes' holds a grid of {int(tokens.max())} tokens, over the budget of {max_tokens}")
    if int(tokens.sum()) != codes.shape[0]:
        raise ValueError(f"{path}: array 'shapes' adds up to {int(tokens.sum())} codes but 'codes' holds {codes.shape[0]}")


__all__ = [
    "ShardSpec",
    "ShardFormat",
    "SHARD_FORMATS",
    "plan_shards",
    "shards_for_rank",
    "write_shard",
    "is_complete",
    "read_shard",
    "record_path",
]
