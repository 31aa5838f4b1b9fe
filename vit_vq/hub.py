"""Where a tokenizer lives: model names, the Hub, and the files of a saved folder.

A model name is `vit_vq:<name>` (a tokenizer bundled with the package), a local folder, or a
Hub repo id; `resolve_model_name` tells them apart without touching the network, and
`resolve_files` finds `config.json` + `model.safetensors`. Reading those files strictly is in
`vit_vq.loading`; writing them (locked, atomic) is in `vit_vq.saving`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .config import ViTVQConfig
from .files import lost_to_a_crash
from .registry import bundled_model_dir, is_bundled_name

MAX_LISTED = 5
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
MANAGED = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)

# Written into every card vit_vq generates: a README.md without it is the user's, and a save keeps it.
CARD_MARKER = "<!-- vit_vq model card: save_pretrained rewrites this file; remove this line to keep your edits -->"
CARD_SNIFF_BYTES = 4096  # the marker sits in the first lines; only this much of a README is read

CARD_TEMPLATE = """---
{metadata}
---
{marker}

# {title}

A discrete image tokenizer made with [vit_vq](https://github.com/vit-vq/vit_vq): a ViT encoder,
a vector-quantized codebook of {codebook_size} codes (dim {codebook_dim}) and a ViT decoder.
Images of {image_size}x{image_size} px become {grid}x{grid} grids of integer codes.

```python
from vit_vq import ViTVQTokenizer
tok = ViTVQTokenizer.from_pretrained("{repo_id}")
codes = tok.encode(images)      # float [B,3,{image_size},{image_size}] in [0,1] -> int64 [B,{grid},{grid}]
images = tok.decode(codes)
```
{extra}
"""


def listing(items: Iterable[str], limit: int = MAX_LISTED) -> str:
    """`[a, b, c, ...] (N in all)`: a few items, then the count, so messages stay short."""
    items = list(items)
    head = ", ".join(items[:limit])
    return f"[{head}]" if len(items) <= limit else f"[{head}, ...] ({len(items)} in all)"


def model_card(config: ViTVQConfig, repo_id: str | None = None, extra: str = "") -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        library_name="vit_vq",
        license="apache-2.0",
        tags=["vit_vq", "image-tokenizer", "vector-quantization", "vq-vae", "pytorch"],
    )
    return CARD_TEMPLATE.format(
        metadata=data.to_yaml(),
        marker=CARD_MARKER,
        title=repo_id or "ViT-VQ image tokenizer",
        repo_id=repo_id or "path/to/this/folder",
        codebook_size=config.codebook_size,
        codebook_dim=config.codebook_dim,
        image_size=config.image_size,
        grid=config.grid_size,
        extra=extra,
    )


def is_generated_card(head: bytes) -> bool:
    """Whether the first `CARD_SNIFF_BYTES` of a README.md are a card `model_card` wrote."""
    return CARD_MARKER.encode() in head


def looks_local(name: str) -> bool:
    """Whether `name` is shaped like a path rather than a Hub id (`name` or `org/name`).

    Path-shaped: starts with `.`, `/` or `~`, ends with `/`, holds a backslash, or has more than one `/`.
    """
    return name.startswith((".", "/", "~")) or name.endswith("/") or "\\" in name or name.count("/") > 1


def resolve_model_name(name: str | Path) -> str | Path:
    """Where a model name points: a local folder (`Path`) or a Hub id (`str`). Reads, never writes.

    - `vit_vq:<name>`: a tokenizer bundled with the package (`vit_vq.registry`);
    - a `Path`, an existing path, a path-shaped string (see `looks_local`), or any name whose
      folder (through symlinks) was lost to a crash mid-save and whose old copy lies beside it
      (loading and saving restore it: `vit_vq.files.recover`): a local folder;
    - anything else: a Hub repo id.

    Raises:
        ValueError: an unknown `vit_vq:<name>`; the message lists the known names.
        FileNotFoundError: a local folder that does not exist: `no such folder: '<name>'`.
    """
    text = str(name)
    if isinstance(name, str) and is_bundled_name(name):
        return bundled_model_dir(name)
    path = Path(text).expanduser()
    if isinstance(name, Path) or path.exists() or looks_local(text) or lost_to_a_crash(path):
        if not path.exists() and not lost_to_a_crash(path) and not path.exists():  # missing (looked at again: a save may
            # have been between its two renames), or a link to a folder that is missing
            raise FileNotFoundError(
                f"no such folder: {text!r} (a local tokenizer folder holds {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
        return path
    return text


def resolve_files(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
) -> tuple[Path, Path]:
    """Paths of `config.json` and `model.safetensors` for a model name (see `resolve_model_name`).

    Raises:
        FileNotFoundError: no such folder, or a Hub repo, revision or
            file that cannot be found (online, or in the cache when offline); the message names it.
        ValueError: an unknown `vit_vq:` name or a revision for one, a path that is not a folder, or an
            invalid Hub id.
    """
    where = resolve_model_name(name_or_path)
    if revision is not None and isinstance(name_or_path, str) and is_bundled_name(name_or_path):
        raise ValueError(
            f"{name_or_path} is bundled with the package and has no revisions, got revision {revision!r}; "
            "a bundled model's versions are separate names (vit_vq:default-v1, ...)"
        )
    if isinstance(where, Path):
        try:
            mode = os.stat(where).st_mode  # one look: a save's two renames may run between two of them
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no such folder: {str(name_or_path)!r}; a save into it was interrupted, and loading it restores it"
            ) from None
        if not stat.S_ISDIR(mode):
            raise ValueError(f"{where} is not a folder; a tokenizer is a folder with {CONFIG_NAME} and {WEIGHTS_NAME}")
        return where / CONFIG_NAME, where / WEIGHTS_NAME  # loading checks that they exist
    kwargs: dict[str, Any] = dict(
        revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token, force_download=force_download,
    )
    return _download(where, CONFIG_NAME, **kwargs), _download(where, WEIGHTS_NAME, **kwargs)


def _download(repo_id: str, filename: str, **kwargs: Any) -> Path:
    """`hf_hub_download`, with huggingface_hub's errors turned into ones that name the repo and the fix."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    revision = kwargs.get("revision") or "main"
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, **kwargs))
    except HFValidationError as err:
        raise ValueError(f"{repo_id!r} is neither a local folder nor a valid Hub repo id ({err})") from err
    except RevisionNotFoundError as err:
        raise FileNotFoundError(f"Hub repo {repo_id!r} has no revision {revision!r}") from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(
            f"Hub repo {repo_id!r} not found (or private: pass token=...); for a local folder write './{repo_id}'"
        ) from err
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise FileNotFoundError(
            f"{filename} of Hub repo {repo_id!r} (revision {revision!r}) is not in the local Hugging Face cache "
            "and the Hub cannot be reached (offline, HF_HUB_OFFLINE=1 or local_files_only=True); download it once "
            f"with network access, or pass a local folder (for one named like this, write './{repo_id}')"
        ) from err
    except EntryNotFoundError as err:
        raise FileNotFoundError(
            f"Hub repo {repo_id!r} (revision {revision!r}) has no {filename}; vit_vq reads {CONFIG_NAME} + {WEIGHTS_NAME}"
        ) from err
