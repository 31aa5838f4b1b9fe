"""The output folder of `vit-vq tokenize`: one run at a time, nothing clobbered, kept out of the inputs.

- A run holds `vit_vq.files.FolderLock` on `<out>/.vit_vq-tokenize.lock` throughout. The kernel
  drops it when the process dies, so a killed run never blocks the next one. The file records
  the holder's PID and host (named when a second run is refused) and the fingerprint of the last
  run that wrote into the folder, so a resumed run can tell its own half-written shards from
  files it did not make.
- `exclude_folder` drops `--out`'s files from an image-folder input that contains `--out`.
- `remove_stale_shards` (for `--overwrite`) deletes the shard files and records an earlier run
  wrote that this run will not rewrite, such as the extra shards of a smaller `--shard-size`.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

from ..files import FolderLock, read_json_file
from ..fingerprint import sha256_file
from .manifest import MANIFEST_FORMAT, MANIFEST_NAME

logger = logging.getLogger(__name__)

LOCK_NAME = ".vit_vq-tokenize.lock"  # `files.FolderLock` on it for the whole run


def tokenize_lock(out: str | Path) -> FolderLock:
    """The lock a tokenize run holds on its output folder `out` (refused at once when another run holds it)."""
    return FolderLock(Path(out) / LOCK_NAME, folder=out, user="vit-vq tokenize run")


def exclude_folder(files: list[Path], root: Path, folder: Path) -> list[Path]:
    """`files` (paths under `root`) minus those inside `folder`; unchanged when `folder` is not under `root`.

    Raises:
        ValueError: `folder` is `root` itself (the inputs and the outputs would be one folder).
    """
    try:
        relative = folder.resolve().relative_to(root.resolve())
    except ValueError:
        return files
    if relative == Path("."):
        raise ValueError(f"the output folder {folder} is the input folder itself; write the codes to another folder")
    inside = root / relative
    kept = [f for f in files if not f.is_relative_to(inside)]
    if len(kept) != len(files):
        logger.info("left out %d file(s) under %s: it is the output folder", len(files) - len(kept), folder)
    return kept


SHARD_FILE = re.compile(r"codes-\d{5,}(\.indices|\.labels)?\.(safetensors|npy|json)")  # every shard name a run writes


def remove_stale_shards(out: Path, keep: set[str]) -> list[str]:
    """Delete the shard files and records of earlier runs in `out` that `keep` (this run's names) leaves out.

    What earlier runs wrote is read from `out/manifest.json` and the shard records in `out`.
    A data file is deleted only while its bytes still have a checksum recorded for it, and a
    record only once every data file it names is gone; links, names unlike a shard's and
    anything no record describes stay. Returns the names deleted.
    """
    checksums: dict[str, set[str]] = {}  # data file -> the digests the records and the manifest gave it
    records: dict[str, set[str]] = {}  # shard record -> the data files it names
    manifest = read_json_file(out / MANIFEST_NAME)
    if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT and isinstance(manifest.get("shards"), list):
        for shard in manifest["shards"]:
            _collect(checksums, shard.get("checksums") if isinstance(shard, dict) else None)
    for path in sorted(out.glob("codes-*.json")):
        record = read_json_file(path)
        if SHARD_FILE.fullmatch(path.name) and isinstance(record, dict) and isinstance(record.get("run"), dict):
            records[path.name] = _collect(checksums, record.get("sha256"))
    removed = [name for name, digests in sorted(checksums.items()) if name not in keep and _unlink_if(out, name, digests)]
    left = {name for name in checksums if name not in keep and os.path.lexists(out / name)}
    if left:
        logger.warning("kept %d earlier shard file(s) in %s that changed since their run, e.g. %s", len(left), out, min(left))
    removed += [r for r, files in records.items() if r not in keep and not files & (left | keep) and _unlink_if(out, r, None)]
    if removed:
        logger.info("removed %d shard file(s) of an earlier run from %s", len(removed), out)
    return removed


def _collect(checksums: dict[str, set[str]], entry: Any) -> set[str]:
    """Add a `{file name: sha256}` entry to `checksums`; returns its file names (none when malformed)."""
    if not isinstance(entry, dict):
        return set()
    for name, digest in entry.items():
        checksums.setdefault(str(name), set()).add(str(digest))
    return {str(name) for name in entry}


def _unlink_if(out: Path, name: str, digests: set[str] | None) -> bool:
    """Delete `out/name` when `name` is a shard's and it is a regular file whose sha256 is in `digests` (any for None)."""
    path = out / name
    try:
        if not SHARD_FILE.fullmatch(name) or not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        if digests is not None and sha256_file(path) not in digests:
            return False
        path.unlink()
    except OSError:
        return False
    return True


__all__ = ["LOCK_NAME", "tokenize_lock", "exclude_folder", "remove_stale_shards"]
