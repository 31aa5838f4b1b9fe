"""Saving a tokenizer folder so that concurrent saves and crashes cannot lose files.

A save writes every file into a hidden sibling `.<name>.tmp-*`, then swaps it in with two
renames (`<name>` -> `.<name>.old-*`, tmp -> `<name>`) and deletes the old copy: the folder swap
and its lock live in `vit_vq.files`. Around that:

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

import os
import shutil
import stat
from pathlib import Path
from typing import Any

from torch import nn

from .config import ViTVQConfig
from .files import (
    MAX_STEM_BYTES,
    SWAP_LOCK_TIMEOUT_S,
    has_leftovers,
    lost_to_a_crash,
    new_tmp_folder,
    read_umask,
    real_folder,
    recover,
    recover_locked,
    remove,
    stem,
    swap_in,
    swap_lock,
)
from .hub import CARD_NAME, CARD_SNIFF_BYTES, CONFIG_NAME, MANAGED, WEIGHTS_NAME, is_generated_card, model_card

LOCK_TIMEOUT_S = SWAP_LOCK_TIMEOUT_S


def lock_path(directory: Path) -> Path:
    """The lock file of `directory`: `.<name>.lock` beside it (see `files.stem` for long names)."""
    return swap_lock(directory).path


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


def save_pretrained(
    model: nn.Module, directory: str | Path, *, repo_id: str | None = None, model_card_kwargs: dict[str, Any] | None = None
) -> Path:
    """`ViTVQTokenizer.save_pretrained` without the Hub push: the model's config, weights and card.

    A README.md that vit_vq did not write is kept unless `model_card_kwargs` is given.
    """
    extra = (model_card_kwargs or {}).get("extra", "")
    card = model_card(model.config, repo_id=repo_id, extra=extra)
    return save_folder(model, model.config, directory, card=card, replace_card=model_card_kwargs is not None)


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
    with swap_lock(directory):
        recover_locked(directory)
        keep_card = not replace_card and has_user_card(directory)
        tmp = new_tmp_folder(directory)
        try:
            _write(model, config, None if keep_card else card, directory, tmp)
            swap_in(tmp, directory)
        except BaseException:
            remove(tmp)
            raise
    return directory


def _write(model: nn.Module, config: ViTVQConfig, card: str | None, directory: Path, tmp: Path) -> None:
    """Write the files into `tmp`, then carry the user's files (and README.md when `card` is None)."""
    from safetensors.torch import save_file

    umask = read_umask()
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


__all__ = [
    "save_pretrained", "save_folder", "recover", "check_target", "lock_path", "has_leftovers", "lost_to_a_crash",
    "real_folder", "has_user_card", "stem", "LOCK_TIMEOUT_S", "MAX_STEM_BYTES",
]
