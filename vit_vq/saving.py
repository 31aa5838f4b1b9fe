"""Saving a tokenizer folder so that concurrent saves and crashes cannot lose files.

A save writes every file into a hidden sibling `.<name>.tmp-*`, then swaps it in with two
renames (`<name>` -> `.<name>.old-*`, tmp -> `<name>`) and deletes the old copy. Around that:

- a per-folder lock, `.<name>.lock` beside the folder (an OS-level `flock`, released when the
  process dies), serialises saves into one folder, from threads or processes;
- `recover()` runs under that lock before every save, and before a load of a folder that is
  missing: after a crash between the two renames, the old copy is restored; stale temporaries
  and half-deleted old copies are removed;
- a target that is the current working folder, or holds it, is refused (the swap would detach
  the caller's folder); a symlinked target is followed to its real folder, the link stays;
- a folder name too long for the hidden names (`MAX_STEM_BYTES`) is shortened in them, with a hash;
- a `README.md` that vit_vq did not write (no `hub.CARD_MARKER`) is kept, unless a card is asked for.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout
from torch import nn

from .config import ViTVQConfig
from .hub import CARD_NAME, CARD_SNIFF_BYTES, CONFIG_NAME, MANAGED, WEIGHTS_NAME, current_umask, is_generated_card

LOCK_TIMEOUT_S = 600.0
_TMP, _OLD, _TRASH = "tmp", "old", "trash"
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
    return f"{short}~{hashlib.sha256(os.fsencode(name)).hexdigest()[:16]}"


def _sibling(directory: Path, suffix: str) -> Path:
    return directory.with_name(f".{stem(directory)}.{suffix}")


def lock_path(directory: Path) -> Path:
    """The lock file of `directory`: `.<name>.lock` beside it (see `stem` for long names)."""
    return _sibling(directory, "lock")


def folder_lock(directory: Path) -> FileLock:
    """The per-folder lock shared by every save and recovery of `directory` (re-entrant in a process)."""
    return FileLock(str(lock_path(directory)), timeout=LOCK_TIMEOUT_S)


def _hidden(directory: Path, kind: str) -> list[Path]:
    """The `.<name>.<kind>-*` siblings of `directory` (none when its parent cannot be listed)."""
    prefix = f".{stem(directory)}.{kind}-"
    try:
        return [p for p in directory.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _discard(old: Path, directory: Path) -> None:
    """Delete an old copy, renamed to `.trash-*` first so that an `.old-*` copy is whole or gone."""
    trash = _sibling(directory, f"{_TRASH}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(old, trash)
    except FileNotFoundError:
        return
    _remove(trash)


def _recover_locked(directory: Path) -> bool:
    """Resolve the hidden copies of an interrupted save (the caller holds the lock).

    Returns True when a missing `directory` was restored from its old copy.
    """
    restored = False
    olds = _hidden(directory, _OLD)
    if not os.path.lexists(directory) and olds:
        newest = max(olds, key=lambda p: p.lstat().st_ctime)
        os.replace(newest, directory)  # the last complete save before the crash
        olds.remove(newest)
        restored = True
    for old in olds:
        _discard(old, directory)
    for path in [*_hidden(directory, _TMP), *_hidden(directory, _TRASH)]:
        _remove(path)
    return restored


def has_leftovers(directory: Path) -> bool:
    """Whether hidden copies of an interrupted save of `directory` lie beside it."""
    return any(_hidden(directory, kind) for kind in (_TMP, _OLD, _TRASH))


def real_folder(directory: str | Path) -> Path:
    """The folder a save into `directory` renames: `~` expanded, symlinks followed (even dangling ones)."""
    return Path(os.path.realpath(Path(directory).expanduser()))


def lost_to_a_crash(directory: str | Path) -> bool:
    """Whether the real folder of `directory` is missing and an old copy from an interrupted save lies beside it."""
    real = real_folder(directory)
    return not os.path.lexists(real) and bool(_hidden(real, _OLD))


def recover(directory: str | Path) -> bool:
    """Finish or undo an interrupted save of `directory` (symlinks followed), under its lock.

    Returns True when a missing folder was restored from the copy a crash left behind.

    Raises:
        TimeoutError: another process held the folder's lock for `LOCK_TIMEOUT_S` seconds.
    """
    directory = real_folder(directory)
    if not has_leftovers(directory):
        return False
    with _locked(directory):
        return _recover_locked(directory)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold the folder's lock; a timeout becomes a `TimeoutError` that names the lock file."""
    lock = folder_lock(directory)
    try:
        lock.acquire()
    except Timeout:
        raise TimeoutError(
            f"another process has held {lock.lock_file} for {LOCK_TIMEOUT_S:.0f} s while saving {directory}; "
            "wait for it, or delete the lock file if no vit_vq process is running"
        ) from None
    try:
        yield
    finally:
        lock.release()


def check_target(directory: str | Path) -> Path:
    """The real folder a save into `directory` writes (symlinks followed).

    Raises:
        ValueError: the folder is the current working folder or holds it, or is not a folder.
    """
    target = real_folder(directory)
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        where = "is the current working folder" if target == cwd else f"holds the current working folder {cwd}"
        raise ValueError(
            f"refusing to save into {target}: it {where}, and a save replaces the folder as a whole; "
            "save into a subfolder, e.g. save_pretrained('my-tokenizer')"
        )
    if target.exists() and not target.is_dir():
        raise ValueError(f"cannot save into {target}: it exists and is not a folder")
    return target


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link a user's file into the new folder (no copy of its data), else copy it."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_user_files(directory: Path, tmp: Path, written: tuple[str, ...]) -> None:
    """Files other than `written` already in `directory` go into the new folder too (symlinks stay links)."""
    for item in directory.iterdir():
        if item.name in written:
            continue
        dest = tmp / item.name
        if item.is_dir() and not item.is_symlink():
            shutil.copytree(item, dest, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(item), str(dest))


def has_user_card(directory: Path) -> bool:
    """Whether `directory` holds a README.md that vit_vq did not write (anything but a regular file
    whose first `CARD_SNIFF_BYTES` carry `hub.CARD_MARKER`; it is not read further, nor followed if a link)."""
    path = directory / CARD_NAME
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return True
        with open(path, "rb") as fh:
            return not is_generated_card(fh.read(CARD_SNIFF_BYTES))
    except FileNotFoundError:
        return False
    except OSError:
        return True


def save_folder(
    model: nn.Module, config: ViTVQConfig, directory: str | Path, *, card: str, replace_card: bool = False
) -> Path:
    """Atomically write `config.json`, `model.safetensors` and `README.md` into `directory`.

    Files of other names already in `directory` are kept, and so is a README.md vit_vq did not
    write (see `has_user_card`) unless `replace_card`. Returns the real folder written.

    Raises:
        ValueError: `directory` is the current working folder or holds it, or is not a folder.
        TimeoutError: another save held the folder's lock for `LOCK_TIMEOUT_S` seconds.
    """
    directory = check_target(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _locked(directory):
        _recover_locked(directory)
        keep_card = not replace_card and has_user_card(directory)
        tmp = Path(tempfile.mkdtemp(prefix=f".{stem(directory)}.{_TMP}-", dir=directory.parent))
        try:
            _write(model, config, None if keep_card else card, directory, tmp)
            _swap_in(tmp, directory)
        except BaseException:
            _remove(tmp)
            raise
    return directory


def _write(model: nn.Module, config: ViTVQConfig, card: str | None, directory: Path, tmp: Path) -> None:
    """Write the files into `tmp`, then carry the user's files (and README.md when `card` is None)."""
    from safetensors.torch import save_file

    umask = current_umask()
    os.chmod(tmp, directory.stat().st_mode & 0o7777 if directory.exists() else 0o777 & ~umask)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt", "library": "vit_vq"})
    (tmp / CONFIG_NAME).write_text(config.to_json())
    written = MANAGED if card is not None else (CONFIG_NAME, WEIGHTS_NAME)
    if card is not None:
        (tmp / CARD_NAME).write_text(card)
    for name in written:
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp / name, 0o666 & ~umask)  # safetensors writes 0600
    if directory.exists():
        _carry_user_files(directory, tmp, written)


def _swap_in(tmp: Path, directory: Path) -> None:
    """Replace `directory` by `tmp` with two renames; the old copy is removed only afterwards."""
    if not directory.exists():
        os.replace(tmp, directory)
        return
    old = _sibling(directory, f"{_OLD}-{uuid.uuid4().hex[:8]}")
    os.replace(directory, old)
    try:
        os.replace(tmp, directory)
    except BaseException:
        os.replace(old, directory)
        raise
    _fsync_dir(directory.parent)
    _discard(old, directory)


def _fsync_dir(folder: Path) -> None:
    """Make the renames durable before the old copy goes."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "save_folder", "recover", "check_target", "folder_lock", "lock_path", "has_leftovers", "lost_to_a_crash",
    "real_folder", "has_user_card", "stem", "LOCK_TIMEOUT_S", "MAX_STEM_BYTES",
]
