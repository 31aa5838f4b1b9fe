"""`manifest.json` of a tokenized data set: what made the codes, the counts, and the shards.

Written once by rank 0 after every shard is complete. Keys:

    format, format_version, vit_vq_version
    run                                   sha256 (16 hex) of the run fingerprint (model, data, settings)
    model, revision, config_hash          the tokenizer (Hub id or folder, commit, config hash)
    decoder_hash                          the decoding weights as loaded, whatever the precision
    lookup_backend, lookup_precision      how nearest codes were searched
    precision                             encoder compute dtype
    codebook_size, image_size, grid, codes_dtype, shard_format, shard_size, world_size
    token_budget                          (format 3) the tokens-per-image bound of the run
    data                                  the input (path, split, columns) and resize mode
    num_inputs                            items in the input (readable or not)
    num_images                            images coded (= readable inputs)
    num_resized                           of which resized to the model's resolution
    skipped                               [{path, reason}] for every unreadable input
    shards                                [{index, file, sha256, files, checksums, record,
                                            start, stop, num_images, num_skipped}]

`num_images + len(skipped) == num_inputs` always holds: no image is lost or counted twice.
A run that keeps each image's aspect ratio (resize `native` / `budget`) writes format 3: `grid`
is null, `token_budget` is set, and its shards store the grids flat with their `shapes` (see
`shards`); other runs write format 2 exactly as before.
Format 1 manifests still load; their `decoder_hash` depended on the compute precision and
is dropped (`None`) with a warning.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import MAX_GRID_SIZE
from ..files import atomic_write_json
from ..fingerprint import sha256_file
from .runtime import ModelInfo
from .shards import read_shard

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "vit_vq.tokenized"
MANIFEST_FORMAT_VERSION = 3  # 2: decoder_hash taken before the precision cast; run. 3: grids of many shapes
UNIFORM_MANIFEST_VERSION = 2  # what a run of one grid shape writes


def build_manifest(
    records: list[dict[str, Any]],
    *,
    info: ModelInfo,
    num_inputs: int,
    codebook_size: int,
    image_size: int,
    grid: tuple[int, int] | None,
    codes_dtype: str,
    shard_format: str,
    shard_size: int,
    world_size: int,
    data: dict[str, Any],
    run: str,
    token_budget: int | None = None,
) -> dict[str, Any]:
    """Combine the shard records (any order) into a manifest; `run` is the run fingerprint's digest.

    `grid` None: grids of many shapes (format 3, recording `token_budget`).

    Raises:
        RuntimeError: the records do not cover `[0, num_inputs)` exactly once, or the counts
            do not add up (an image lost or coded twice).
    """
    from .. import __version__

    records = sorted(records, key=lambda r: r["index"])
    covered = [(r["start"], r["stop"]) for r in records]
    expected_start = 0
    for start, stop in covered:
        if start != expected_start:
            raise RuntimeError(f"shard records do not tile the input: expected a shard at item {expected_start}, got {start}")
        expected_start = stop
    if expected_start != num_inputs:
        raise RuntimeError(f"shard records cover {expected_start} of {num_inputs} input items")
    skipped = [s for r in records for s in r["skipped"]]
    num_images = sum(r["num_images"] for r in records)
    if num_images + len(skipped) != num_inputs:
        raise RuntimeError(f"{num_images} coded + {len(skipped)} skipped != {num_inputs} input items")
    shards = []
    for r in records:
        main = r["files"]["codes"]
        shards.append(
            {
                "index": r["index"],
                "file": main,
                "sha256": r["sha256"][main],
                "files": r["files"],
                "checksums": r["sha256"],
                "record": f"{Path(main).name.split('.')[0]}.json",
                "start": r["start"],
                "stop": r["stop"],
                "num_images": r["num_images"],
                "num_skipped": len(r["skipped"]),
            }
        )
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": UNIFORM_MANIFEST_VERSION if grid is not None else MANIFEST_FORMAT_VERSION,
        "vit_vq_version": __version__,
        "run": run,
        "model": info.model_id,
        "revision": info.revision,
        "config_hash": info.config_hash,
        "lookup_backend": info.lookup_backend,
        "lookup_precision": info.lookup_precision,
        "precision": info.precision,
        "decoder_hash": info.decoder_hash,
        "codebook_size": codebook_size,
        "image_size": image_size,
        "grid": list(grid) if grid is not None else None,
        "codes_dtype": codes_dtype,
        "shard_format": shard_format,
        "shard_size": shard_size,
        "world_size": world_size,
        "data": data,
        "num_inputs": num_inputs,
        "num_images": num_images,
        "num_resized": sum(r["num_resized"] for r in records),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "shards": shards,
    }
    if grid is None:
        manifest["token_budget"] = token_budget
    return manifest


def write_manifest(out: str | Path, manifest: dict[str, Any]) -> Path:
    """Atomically write `out/manifest.json`."""
    return atomic_write_json(Path(out) / MANIFEST_NAME, manifest)


def load_manifest(out: str | Path) -> dict[str, Any]:
    """Read `out/manifest.json`.

    Raises:
        FileNotFoundError: no manifest (the job has not finished).
        ValueError: not a vit_vq manifest, or a newer format.
    """
    path = Path(out).expanduser() / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {str(out)!r}; has `vit-vq tokenize` finished there?")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path} is not valid JSON ({type(err).__name__}); is it a vit_vq manifest?") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a vit_vq tokenized-data manifest")
    version = manifest.get("format_version")
    if type(version) is not int or version < 1:
        raise ValueError(f"{path}: format_version must be a whole number >= 1, got {version!r}")
    if version > MANIFEST_FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version}; this vit_vq reads up to {MANIFEST_FORMAT_VERSION}: upgrade")
    if version < 2 and manifest.get("decoder_hash"):
        warnings.warn(
            f"{path} was written by an older vit_vq (format {version}) whose decoder_hash depends on the compute "
            "precision; it is dropped",
            stacklevel=2,
        )
        manifest["decoder_hash"] = None
    return manifest


def verify_shards(out: str | Path, manifest: dict[str, Any] | None = None) -> list[str]:
    """Re-hash every shard file; return one line per missing or changed file (empty when all match)."""
    out = Path(out)
    manifest = manifest or load_manifest(out)
    problems = []
    for shard in manifest["shards"]:
        for name, digest in shard["checksums"].items():
            path = out / name
            if not path.is_file():
                problems.append(f"{name}: missing")
            elif sha256_file(path) != digest:
                problems.append(f"{name}: checksum differs from the manifest")
    return problems


def iter_shards(out: str | Path, manifest: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Yield every shard in order as `{"grids", "shapes", "codes", "indices", "labels"?, "keys", "index"}`:
    `grids` is each item's int64 `[h_i, w_i]` grid, `shapes` int64 `[n, 2]` their shapes, `codes` the
    stored array (`[n, h, w]`, or flat `[T]` in a run of many shapes; see `shards.read_shard`).

    Raises:
        ValueError: a shard's arrays that disagree (see `shards.read_shard`), or a bad `token_budget`.
    """
    out = Path(out)
    manifest = manifest or load_manifest(out)
    budget = manifest.get("token_budget")
    if budget is None:
        budget = MAX_GRID_SIZE**2
    elif type(budget) is not int or not 1 <= budget <= MAX_GRID_SIZE**2:
        raise ValueError(f"{Path(out) / MANIFEST_NAME}: 'token_budget' must be a whole number in [1, {MAX_GRID_SIZE**2}], "
                         f"got {budget!r}")
    for shard in manifest["shards"]:
        arrays = read_shard(out, shard["files"], max_tokens=budget)
        record = json.loads((out / shard["record"]).read_text())
        yield {**arrays, "keys": record["keys"], "index": shard["index"]}


__all__ = ["MANIFEST_NAME", "build_manifest", "write_manifest", "load_manifest", "verify_shards", "iter_shards"]
