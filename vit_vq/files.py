"""Files written and read safely: regular-file checks, atomic writes, one folder lock, the folder swap.

Everything vit_vq writes goes through here:

- `atomic_write(path, write)`: a hidden temporary beside `path`, fsynced, then `os.replace`d in,
  so a reader never sees half a file; its mode follows the umask like any other new file.
- `read_umask()` reads the umask without changing it (`/proc/self/status`, else a probe file
  created with mode 0o666 in a private folder): setting and restoring it, as a naive read does,
  races with every thread that creates a file meanwhile.
- `FolderLock`: an exclusive OS lock (`flock`, or `msvcrt.locking` on Windows) on one lock file,
  dropped by the kernel when the process dies. Saves into a tokenizer folder wait for it
  (`timeout`); a tokenize run refuses at once when another holds it. The file records the
  holder's PID and host, and a run fingerprint for tokenize's resume.
- The folder swap (`swap_in`, `recover`): a folder is replaced by writing a hidden sibling
  `.<name>.tmp-*`, renaming the old folder to `.<name>.old-*` and the new one into place, then
  deleting the old copy. After a crash between the renames, `recover` restores the old copy.

Reading someone else's file starts with `open_regular` / `regular_file_size`: a FIFO, device or
socket in a file's place would block or act on the device when opened or never end when read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

# -- regular files --------------------------------------------------------------------------------
_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))  # fmt: skip


class NotRegularFileError(ValueError):
    """A path that must be a regular file is something else; `kind` says what ("a FIFO (named pipe)", ...)."""

    def __init__(self, path: Path, kind: str, via_link: bool) -> None:
        self.path, self.kind, self.via_link = path, kind, via_link
        super().__init__(f"{path}: not a regular file: {kind}" + (" (through a symbolic link)" if via_link else ""))


def file_kind(mode: int) -> str | None:
    """What an `os.stat` mode says a path is, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), f"of file type {stat.S_IFMT(mode):#o}")


def open_regular(path: str | Path) -> io.BufferedReader:
    """Open `path` for reading if it is a regular file (links followed).

    Checked before opening (opening a FIFO blocks, opening a device can act on it) and again on
    the open file, opened without blocking, so a file swapped in between is refused too.

    Raises:
        FileNotFoundError: it does not exist (a dangling link included).
        PermissionError: it cannot be read.
        NotRegularFileError: it is not a regular file (a `ValueError`); the message says what it is.
    """
    path = Path(path)
    try:
        kind = file_kind(os.stat(path).st_mode)
        if kind is None:
            nonblocking = getattr(os, "O_NONBLOCK", 0)
            f = open(path, "rb", opener=lambda p, flags: os.open(p, flags | nonblocking))
            kind = file_kind(os.fstat(f.fileno()).st_mode)
            if kind is None:
                if nonblocking:
                    os.set_blocking(f.fileno(), True)
                return f
            f.close()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist (or is a link to nothing)") from None
    except PermissionError:
        raise PermissionError(f"cannot read {path}: permission denied") from None
    raise NotRegularFileError(path, kind, path.is_symlink())


def regular_file_size(path: str | Path) -> int:
    """The size of `path`, which must be a regular, readable file (see `open_regular` for the errors)."""
    with open_regular(path) as f:
        return os.fstat(f.fileno()).st_size


_SNAPSHOT_TRIES = 20
_PROC_FD = Path("/proc/self/fd")


@contextmanager
def open_snapshot(folder: str | Path, names: Sequence[str]) -> Iterator[dict[str, Path]]:
    """Open the files `names` of `folder` as one state of the folder, even while saves replace it.

    Saves replace a folder whole (the folder swap), never a file in it. So the folder is opened
    once, as a directory descriptor, and every file is opened relative to it: all from the same
    generation. A file gone because a swap deleted that generation meanwhile means "open the
    folder again" (up to 20 tries). Yields `{name: path}` where each path reads the opened file
    (`/proc/self/fd/N` on Linux; elsewhere the plain path, which is then best effort).

    Raises:
        FileNotFoundError: a file is missing from the folder as it stands.
        NotRegularFileError: a file (links followed) is not a regular file.
        PermissionError: a file cannot be read.
    """
    folder = Path(folder)
    for attempt in range(_SNAPSHOT_TRIES):
        fds: dict[str, int] = {}
        try:
            dir_fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            if attempt + 1 < _SNAPSHOT_TRIES and _wait_for_swap(folder):  # between the two renames of a save
                continue
            raise
        try:
            for name in names:
                fds[name] = _open_in(dir_fd, folder, name)
        except FileNotFoundError:
            for fd in fds.values():
                os.close(fd)
            if attempt + 1 < _SNAPSHOT_TRIES and (
                _wait_for_swap(folder) or (folder.is_dir() and all((folder / n).exists() for n in names))
            ):
                continue  # this generation was deleted by a newer save: take the newer one
            raise FileNotFoundError(f"{folder / name} does not exist (or is a link to nothing)") from None
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        finally:
            os.close(dir_fd)
        try:
            yield {n: (_PROC_FD / str(fd) if _PROC_FD.is_dir() else folder / n) for n, fd in fds.items()}
        finally:
            for fd in fds.values():
                os.close(fd)
        return


def _wait_for_swap(folder: Path) -> bool:
    """If a save may be replacing `folder` now (its hidden copies lie beside it), wait for it to end
    (its lock) and return True; else False. Waiting on the lock, not polling, outlasts any stall."""
    real = real_folder(folder)
    if not has_leftovers(real):
        return False
    with swap_lock(real):
        pass
    return True


def _open_in(dir_fd: int, folder: Path, name: str) -> int:
    """A read-only descriptor of the regular file `name` inside the directory `dir_fd` (links followed)."""
    kind = file_kind(os.stat(name, dir_fd=dir_fd).st_mode)  # before opening: opening a device can act on it
    if kind is not None:
        raise NotRegularFileError(folder / name, kind, os.path.islink(folder / name))
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0), dir_fd=dir_fd)
    except PermissionError:
        raise PermissionError(f"cannot read {folder / name}: permission denied") from None
    kind = file_kind(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise NotRegularFileError(folder / name, kind, os.path.islink(folder / name))
    os.set_blocking(fd, True)
    return fd


def read_json_file(path: Path) -> Any:
    """The JSON in `path` when it is a regular file (not a link: never a FIFO); None when missing, not one or not JSON.

    For vit_vq's own bookkeeping files, where anything unreadable means "start afresh".
    """
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


# -- output folders ---------------------------------------------------------------------------------------
OUTPUT_MARKER = ".vit_vq-output"  # in every folder a tokenize or train run writes: never read back as input


def mark_output(folder: Path, what: str) -> None:
    """Mark `folder` as a vit_vq output, so that image listings leave it out (e.g. when it lies inside the data)."""
    marker = folder / OUTPUT_MARKER
    if not os.path.lexists(marker):
        atomic_write(marker, lambda tmp: tmp.write_text(f"written by {what}; vit_vq never reads this folder as input\n"))


def is_output(folder: Path, names: Sequence[str] | None = None) -> bool:
    """Whether `folder` holds a vit_vq output marker (`names`: its entries, when already listed)."""
    if names is not None:
        return OUTPUT_MARKER in names
    return os.path.lexists(folder / OUTPUT_MARKER)


# -- writing ------------------------------------------------------------------------------------------
_UMASK_LINE = re.compile(rb"^Umask:\s*([0-7]+)\s*$", re.MULTILINE)


def read_umask() -> int:
    """The process umask, read without changing it (thread-safe)."""
    try:
        with open("/proc/self/status", "rb") as f:
            match = _UMASK_LINE.search(f.read())
        if match:
            return int(match.group(1), 8)
    except OSError:
        pass
    with tempfile.TemporaryDirectory(prefix=".vit_vq-umask-") as folder:  # private: 0o700, no other process races
        probe = os.path.join(folder, "probe")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        return 0o666 & ~os.stat(probe).st_mode & 0o777


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` for a temporary file beside `path`, fsync it, then `os.replace` it in.

    A reader never sees a half-written `path`; a crash leaves at most a hidden temporary file.
    The file gets mode `0o666` less the umask, as `open()` would give it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~read_umask())  # mkstemp (and safetensors) create 0600 files
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON, atomically."""
    text = json.dumps(data, indent=2) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def fsync_folder(folder: Path) -> None:
    """Make renames inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the lock -------------------------------------------------------------------------------------------
class FolderInUseError(RuntimeError):
    """Another process holds a folder's lock."""


_LOCK_OFFSET = 1 << 30  # Windows locks a byte range: lock one far past the text, so it stays readable
# never through a link (a planted link would make the lock truncate its target), never inherited;
# non-blocking so that a FIFO in its place cannot stall the open
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
_POLL_S = (0.005, 0.1)  # first and longest wait between tries of a waiting lock


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
    """An exclusive lock held through the file `path`, from `acquire()` (or `with`) until `release()` or process exit.

    Two holders conflict whether they are processes or threads (each acquire opens the file anew);
    a holder must not acquire the same lock twice.

    Args:
        path: the lock file (created if missing; it must be a regular file with one link).
        folder: the folder it guards, for messages.
        user: what holds it, for messages (e.g. "vit-vq tokenize run").
        timeout: None to refuse at once when held; else seconds to wait for it.

    Raises (on acquire):
        FolderInUseError: held by another, with `timeout=None`; the message names its PID and host.
        TimeoutError: still held by another after `timeout` seconds; the message names the lock file.
        ValueError: the lock file is a link, not a regular file, or has other hard links.
    """

    def __init__(self, path: str | Path, *, folder: str | Path, user: str, timeout: float | None = None) -> None:
        self.path, self.folder, self.user, self.timeout = Path(path), Path(folder), user, timeout
        self.writer = user.removesuffix(" run")
        self._fd: int | None = None
        self.previous_run: str | None = None

    def acquire(self) -> FolderLock:
        """Lock; `previous_run` is then the run fingerprint the last holder claimed (or None)."""
        fd = self._open()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        wait = _POLL_S[0]
        while not _try_lock(fd):
            if deadline is None or time.monotonic() >= deadline:
                holder = self._read(fd)
                os.close(fd)
                who = f"PID {holder.get('pid', 'unknown')}" + (f" on {holder['host']}" if holder.get("host") else "")
                if deadline is None:
                    raise FolderInUseError(
                        f"{self.folder} is in use by another {self.user} ({who}, per {self.path}); "
                        "wait for it to finish, or write to another folder"
                    )
                raise TimeoutError(
                    f"{self.folder} has been locked by another {self.user} ({who}, per {self.path}) for "
                    f"{self.timeout:.0f} s; wait for it to finish (the lock goes when that process ends)"
                )
            time.sleep(wait)
            wait = min(2 * wait, _POLL_S[1])
        self._fd = fd
        self.previous_run = self._read(fd).get("run")
        self._write(self.previous_run)
        return self

    def _open(self) -> int:
        try:
            fd = os.open(self.path, _LOCK_FLAGS, 0o666)
        except OSError as err:
            if not os.path.islink(self.path):
                raise
            raise ValueError(f"{self.path} is a symbolic link; remove it ({self.writer} writes its lock there)") from err
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            os.close(fd)
            what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"a file with {st.st_nlink} hard links"
            raise ValueError(f"{self.path} is {what}; remove it ({self.writer} writes its lock there)")
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
        except (ValueError, OSError, RecursionError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, run: str | None) -> None:
        if self._fd is None:
            raise RuntimeError(f"{self.path} is not locked by this process")
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run": run}).encode()
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.write(self._fd, text)


# -- the folder swap ----------------------------------------------------------------------------------
TMP, OLD, TRASH = "tmp", "old", "trash"
SWAP_LOCK_TIMEOUT_S = 600.0
# `.<stem>.trash-<8 hex>` must fit in a 255-byte file name: longer folder names are cut to
# `SHORT_STEM_BYTES` and followed by a hash of the whole name.
MAX_STEM_BYTES = 200
SHORT_STEM_BYTES = 160


def stem(directory: Path) -> str:
    """The folder's name as its hidden siblings spell it: the name, or a prefix + hash when too long."""
    name = directory.name
    if len(os.fsencode(name)) <= MAX_STEM_BYTES:
        return name
    short = name
    while len(os.fsencode(short)) > SHORT_STEM_BYTES:
        short = short[:-1]
    return f"{short}~{hashlib.sha256(os.fsencode(name)).hexdigest()[:16]}"  # shortens a name; fingerprints are in fingerprint.py


def sibling(directory: Path, suffix: str) -> Path:
    """`.<stem>.<suffix>` beside `directory`."""
    return directory.with_name(f".{stem(directory)}.{suffix}")


def swap_lock(directory: Path) -> FolderLock:
    """The lock shared by every save into, and recovery of, `directory`: `.<name>.lock` beside it."""
    return FolderLock(sibling(directory, "lock"), folder=directory, user="vit_vq save", timeout=SWAP_LOCK_TIMEOUT_S)


def real_folder(directory: str | Path) -> Path:
    """The folder a swap of `directory` renames: `~` expanded, symlinks followed (even dangling ones)."""
    return Path(os.path.realpath(Path(directory).expanduser()))


def _hidden(directory: Path, kind: str) -> list[Path]:
    """The `.<name>.<kind>-*` siblings of `directory` (none when its parent cannot be listed)."""
    prefix = f".{stem(directory)}.{kind}-"
    try:
        return [p for p in directory.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []


def remove(path: Path) -> None:
    """Delete a file, link or folder tree (best effort)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _discard(old: Path, directory: Path) -> None:
    """Delete an old copy, renamed to `.trash-*` first so that an `.old-*` copy is whole or gone."""
    trash = sibling(directory, f"{TRASH}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(old, trash)
    except FileNotFoundError:
        return
    remove(trash)


def has_leftovers(directory: Path) -> bool:
    """Whether hidden copies of an interrupted swap of `directory` lie beside it."""
    return any(_hidden(directory, kind) for kind in (TMP, OLD, TRASH))


def lost_to_a_crash(directory: str | Path) -> bool:
    """Whether the real folder of `directory` is missing and an old copy from an interrupted swap lies beside it."""
    real = real_folder(directory)
    return not os.path.lexists(real) and bool(_hidden(real, OLD))


def recover_locked(directory: Path) -> bool:
    """Resolve the hidden copies of an interrupted swap (the caller holds `swap_lock(directory)`).

    Returns True when a missing `directory` was restored from its old copy.
    """
    restored = False
    olds = _hidden(directory, OLD)
    if not os.path.lexists(directory) and olds:
        newest = max(olds, key=lambda p: p.lstat().st_ctime)
        os.replace(newest, directory)  # the last complete save before the crash
        olds.remove(newest)
        restored = True
    for old in olds:
        _discard(old, directory)
    for path in [*_hidden(directory, TMP), *_hidden(directory, TRASH)]:
        remove(path)
    return restored


def recover(directory: str | Path) -> bool:
    """Finish or undo an interrupted swap of `directory` (symlinks followed), under its lock.

    Returns True when a missing folder was restored from the copy a crash left behind.

    Raises:
        TimeoutError: another process held the folder's lock for `SWAP_LOCK_TIMEOUT_S` seconds.
    """
    directory = real_folder(directory)
    if not has_leftovers(directory):
        return False
    with swap_lock(directory):
        return recover_locked(directory)


def new_tmp_folder(directory: Path) -> Path:
    """A fresh hidden `.<name>.tmp-*` folder beside `directory`, to fill and then `swap_in`."""
    return Path(tempfile.mkdtemp(prefix=f".{stem(directory)}.{TMP}-", dir=directory.parent))


def swap_in(tmp: Path, directory: Path) -> None:
    """Replace `directory` by `tmp` with two renames; the old copy is removed only afterwards.

    The caller holds `swap_lock(directory)`.
    """
    if not directory.exists():
        os.replace(tmp, directory)
        fsync_folder(directory.parent)
        return
    old = sibling(directory, f"{OLD}-{uuid.uuid4().hex[:8]}")
    os.replace(directory, old)
    try:
        os.replace(tmp, directory)
    except BaseException:
        os.replace(old, directory)
        raise
    fsync_folder(directory.parent)
    _discard(old, directory)


__all__ = [
    "NotRegularFileError", "open_regular", "regular_file_size", "open_snapshot", "file_kind", "read_json_file",
    "read_umask", "atomic_write", "atomic_write_json", "fsync_folder",
    "FolderLock", "FolderInUseError",
    "stem", "sibling", "swap_lock", "real_folder", "remove", "has_leftovers", "lost_to_a_crash",
    "recover", "recover_locked", "new_tmp_folder", "swap_in", "SWAP_LOCK_TIMEOUT_S", "MAX_STEM_BYTES",
]
