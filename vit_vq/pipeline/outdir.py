"""The output folder of `vit-vq tokenize`: one run at a time, nothing clobbered, kept out of the inputs.

- `FolderLock` holds an OS-level exclusive lock on `<out>/.vit_vq-tokenize.lock` for the whole
  run (`flock` on POSIX, `msvcrt.locking` on Windows). The kernel drops it when the process
  dies, so a killed run never blocks the next one. The file records the holder's PID and host
  (named when a second run is refused) and the fingerprint of the last run that wrote into the
  folder, so a resumed run can tell its own half-written shards from files it did not make.
- `exclude_folder` drops `--out`'s files from an image-folder input that contains `--out`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)

LOCK_NAME = ".vit_vq-tokenize.lock"
_LOCK_OFFSET = 1 << 30  # Windows locks a byte range: lock one far past the text, so it stays readable


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
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self.previous_run: str | None = None

    def acquire(self) -> FolderLock:
        """Lock the folder; `previous_run` is then the run fingerprint the last holder claimed (or None)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
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


__all__ = ["FolderLock", "FolderInUseError", "LOCK_NAME", "exclude_folder"]
