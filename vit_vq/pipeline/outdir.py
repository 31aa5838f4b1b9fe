"""The output folder of `vit-vq tokenize`: one run at a time, nothing clobbered, kept out of the inputs.

- `FolderLock` holds an OS-level exclusive lock on `<out>/.vit_vq-tokenize.lock` for the whole
  run (`flock` on POSIX, `msvcrt.locking` on Windows). The kernel drops it when the process
  dies, so a killed run never blocks the next one. The file records the holder's PID and host
  (named when a second run is refused) and the fingerprint of the last run that wrote into the
  folder, so a resumed run can tell its own half-written shards from files it did not make.
- `exclude_folder` drops `--out`'s files from an image-folder input that contains `--out`.
- `remove_stale_shards` (for `--overwrite`) deletes the shard files and records an earlier run
  wrote that this run will not rewrite, such as the extra shards of a smaller `--shard-size`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import stat
from pathlib import Path
from types import TracebackType
from typing import Any

from .codes import sha256_file
from .manifest import MANIFEST_FORMAT, MANIFEST_NAME

logger = logging.getLogger(__name__)

LOCK_NAME = ".vit_vq-tokenize.lock"
_LOCK_OFFSET = 1 << 30  # Windows locks a byte range: lock one far past the text, so it stays readable
# never through a link (a planted link would make the run truncate its target), never inherited;
# non-blocking so that a FIFO in its place cannot stall the open
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


class FolderInUseError(RuntimeError):
    """Another process holds the output folder's lock."""


def _try_lock(fd: int) -> bool:
    """Take an exclusive, non-blocking lock on `fd`; False when another open file holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        os.lseek(fd, _LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class FolderLock:
    """An exclusive lock on a folder, held from `acquire()` (or `with`) until `release()` or process exit.

    Raises (on acquire):
        FolderInUseError: another process holds it; the message names its PID and host.
        ValueError: the lock file is a link, not a regular file, or has other hard links (the
            lock writes into it, so it must be a file of its own); the message names it.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self.previous_run: str | None = None

    def acquire(self) -> FolderLock:
        """Lock the folder; `previous_run` is then the run fingerprint the last holder claimed (or None)."""
        fd = self._open()
        if not _try_lock(fd):
            holder = self._read(fd)
            os.close(fd)
            who = f"PID {holder.get('pid', 'unknown')}" + (f" on {holder['host']}" if holder.get("host") else "")
            raise FolderInUseError(
                f"{self.folder} is in use by another vit-vq tokenize run ({who}, per {self.path}); "
                "wait for it to finish or use another --out"
            )
        self._fd = fd
        self.previous_run = self._read(fd).get("run")
        self._write(self.previous_run)
        return self

    def _open(self) -> int:
        """A descriptor of the lock file, created if missing; refuses anything but a plain file of its own."""
        try:
            fd = os.open(self.path, _LOCK_FLAGS, 0o666)
        except OSError as err:
            if not os.path.islink(self.path):
                raise
            raise ValueError(f"{self.path} is a symbolic link; remove it (vit-vq tokenize writes its lock there)") from err
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            os.close(fd)
            what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"a file with {st.st_nlink} hard links"
            raise ValueError(f"{self.path} is {what}; remove it (vit-vq tokenize writes its lock there)")
        return fd

    def claim(self, run: str) -> None:
        """Record that run `run` now writes into the folder (after its checks passed)."""
        self._write(run)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the lock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            data = json.loads(os.read(fd, 4096) or b"{}")
        except (ValueError, OSError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, run: str | None) -> None:
        if self._fd is None:
            raise RuntimeError(f"{self.path} is not locked by this process")
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run": run}).encode()
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.write(self._fd, text)


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
        raise ValueError(f"--out {folder} is the input folder itself; write the codes to another folder")
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


def read_json_file(path: Path) -> Any:
    """The JSON in `path` when it is a regular file (not a link: never a FIFO); None when missing, not one or not JSON."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


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


__all__ = ["FolderLock", "FolderInUseError", "LOCK_NAME", "exclude_folder", "read_json_file", "remove_stale_shards"]
