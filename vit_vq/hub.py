"""Saving and loading tokenizers: `config.json` + `model.safetensors` + a model card.

Loading is strict and never unpickles: only `model.safetensors` is read, missing or
unexpected keys and shape mismatches are named, and a truncated file is reported as such.
Saving is atomic as a whole: files go into a temporary sibling folder that is then
swapped in, so a crash never leaves new weights beside an old config.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ViTVQConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
MANAGED = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)

CARD_TEMPLATE = """---
{metadata}
---

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


def model_card(config: ViTVQConfig, repo_id: str | None = None, extra: str = "") -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        library_name="vit_vq",
        license="apache-2.0",
        tags=["vit_vq", "image-tokenizer", "vector-quantization", "vq-vae", "pytorch"],
    )
    return CARD_TEMPLATE.format(
        metadata=data.to_yaml(),
        title=repo_id or "ViT-VQ image tokenizer",
        repo_id=repo_id or "path/to/this/folder",
        codebook_size=config.codebook_size,
        codebook_dim=config.codebook_dim,
        image_size=config.image_size,
        grid=config.grid_size,
        extra=extra,
    )


def save_folder(model: nn.Module, config: ViTVQConfig, directory: str | Path, *, card: str) -> Path:
    """Atomically write `config.json`, `model.safetensors` and `README.md` into `directory`.

    Files of other names already in `directory` are kept.
    """
    from safetensors.torch import save_file

    directory = Path(directory).expanduser().absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    umask = current_umask()
    os.chmod(tmp, directory.stat().st_mode & 0o7777 if directory.exists() else 0o777 & ~umask)
    file_mode = 0o666 & ~umask
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt", "library": "vit_vq"})
        (tmp / CONFIG_NAME).write_text(config.to_json())
        (tmp / CARD_NAME).write_text(card)
        if directory.exists():
            for item in directory.iterdir():
                if item.name not in MANAGED:
                    dest = tmp / item.name
                    shutil.copytree(item, dest) if item.is_dir() else shutil.copy2(item, dest)
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                if f.name in MANAGED:
                    os.chmod(f, file_mode)  # safetensors writes 0600
        _swap_in(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def current_umask() -> int:
    """The process umask (read by setting and restoring it): temp files ignore it, our outputs follow it."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _swap_in(tmp: Path, directory: Path) -> None:
    """Replace `directory` by `tmp` with two renames; the old copy is removed only afterwards."""
    if not directory.exists():
        os.replace(tmp, directory)
        return
    old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(directory, old)
    try:
        os.replace(tmp, directory)
    except BaseException:
        os.replace(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _looks_local(name: str) -> bool:
    """A Hub id is `name` or `org/name`; anything else shaped like a path is local."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")


def resolve_files(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
) -> tuple[Path, Path]:
    """Paths of `config.json` and `model.safetensors` for a local folder or a Hub repo id.

    Raises:
        FileNotFoundError: a local-looking path that does not exist, or a folder without the files.
    """
    path = Path(str(name_or_path)).expanduser()
    if path.is_dir():
        cfg, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
        for f in (cfg, weights):
            if not f.is_file():
                others = sorted(p.name for p in path.iterdir())
                raise FileNotFoundError(f"{path} has no {f.name} (found: {others}); vit_vq reads only safetensors weights")
        return cfg, weights
    name = str(name_or_path)
    if path.exists() or isinstance(name_or_path, Path) or _looks_local(name):
        raise FileNotFoundError(f"no tokenizer folder at {name!r} (expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME})")
    from huggingface_hub import hf_hub_download

    kwargs: dict[str, Any] = dict(
        repo_id=name, revision=revision, cache_dir=cache_dir,
        local_files_only=local_files_only, token=token, force_download=force_download,
    )
    return Path(hf_hub_download(filename=CONFIG_NAME, **kwargs)), Path(hf_hub_download(filename=WEIGHTS_NAME, **kwargs))


def read_config(path: Path) -> ViTVQConfig:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return ViTVQConfig.from_dict(data)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a truncated or corrupted file raises `ValueError` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        size = path.stat().st_size if path.exists() else 0
        raise ValueError(f"{path} ({size} bytes) is truncated or corrupted and cannot be read as safetensors: {err}") from err


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """`load_state_dict(strict=True)` with errors that name every bad key and shape."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if mismatched:
            parts.append(f"shape mismatches {mismatched}")
        raise ValueError(f"the weights in {source} do not match its config: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
