"""The tokenizer that ships inside the package, and the held-out photos that show it off.

`load_default()` reads `vit_vq/assets/default/` (`config.json`, `model.safetensors`, a
model card). Its name is `vit_vq:default`: `ViTVQTokenizer.from_pretrained("vit_vq:default")`,
every CLI `--model` / `--init` and `TokenizeBatch` accept it (`vit_vq.hub.resolve_model_name`
maps it to that folder); no Hub id is involved, so it works with no network.

Earlier defaults stay bundled under their own names, so codes they made still decode:
`vit_vq:default-v1` is the default of vit_vq 0.1 (`assets/default_v1/`). `bundled_name_for`
finds the bundled model that the config and decoder hashes recorded with some codes belong to.
`sample_photos()` lists the bundled demo photos (never seen in training; public domain, CC0
or CC-BY, credited in `samples/CREDITS.md`).
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path

import torch

from .tokenizer import ViTVQTokenizer

DEFAULT_DIR = ("assets", "default")
BUNDLED_DIRS = {"default": DEFAULT_DIR, "default-v1": ("assets", "default_v1")}  # name after `vit_vq:` -> folder
SAMPLES_DIR = ("assets", "samples")
SAMPLE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _asset(parts: tuple[str, ...], what: str) -> Path:
    """A folder inside the installed package (vit_vq installs as plain files, never zipped)."""
    path = Path(str(resources.files("vit_vq").joinpath(*parts)))
    if not path.is_dir():
        raise FileNotFoundError(f"{what} is missing ({path}); reinstall vit_vq from a wheel or sdist")
    return path


def default_model_dir() -> Path:
    """The folder that holds the packaged tokenizer: `config.json`, `model.safetensors`, `README.md`.

    Raises:
        FileNotFoundError: the package was installed without its assets.
    """
    return bundled_model_dir("default")


def bundled_model_dir(name: str) -> Path:
    """The folder of the bundled model `vit_vq:<name>` (`name` one of `BUNDLED_DIRS`).

    Raises:
        KeyError: an unknown name.
        FileNotFoundError: the package was installed without its assets.
    """
    what = "the packaged default tokenizer" if name == "default" else f"the bundled tokenizer vit_vq:{name}"
    return _asset(BUNDLED_DIRS[name], what)


def bundled_name_for(config_hash: str, decoder_hash: str | None = None) -> str | None:
    """`vit_vq:<name>` of the bundled model with this `ViTVQConfig.config_hash()` and, when given, this
    `vit_vq.pipeline.runtime.decoder_hash` (the weights that turn codes into pixels), else None.

    Reads the bundled `config.json` files; loads a bundled model's weights only when its config
    matches and a decoder hash is given, so a fine-tune of a bundled model is never taken for it.
    A bundled model that cannot be read (missing or corrupt files) matches nothing.
    """
    for name in BUNDLED_DIRS:
        try:  # a bundled model that cannot be read (a broken install) matches nothing
            if _bundled_config_hash(name) != config_hash:
                continue
            if decoder_hash is None or _bundled_decoder_hash(name) == decoder_hash:
                return f"vit_vq:{name}"
        except (OSError, ValueError, TypeError, RuntimeError):
            continue
    return None


def bundled_hint(config_hash: object, decoder_hash: object, model: object) -> str:
    """"; they match the bundled vit_vq:X: --model vit_vq:X" when the hashes some codes record (taken
    as given: they come from someone else's file) belong to a bundled model other than `model`, else ""."""
    if not isinstance(config_hash, str) or not isinstance(decoder_hash, str | None):
        return ""
    match = bundled_name_for(config_hash, decoder_hash)
    return f"; they match the bundled {match}: --model {match}" if match and match != model else ""


@functools.cache  # failures are not cached: a repaired install is read again
def _bundled_config_hash(name: str) -> str:
    from .config import ViTVQConfig

    config = json.loads((bundled_model_dir(name) / "config.json").read_text(encoding="utf-8"))
    return ViTVQConfig.from_dict(config).config_hash()


@functools.cache
def _bundled_decoder_hash(name: str) -> str:
    from .pipeline.runtime import decoder_hash

    return decoder_hash(ViTVQTokenizer.from_pretrained(f"vit_vq:{name}"))


def load_default(map_location: str | torch.device = "cpu") -> ViTVQTokenizer:
    """The packaged default tokenizer, in eval mode, on `map_location`. Never uses the network.

    Raises:
        FileNotFoundError: the package was installed without its assets.
    """
    return ViTVQTokenizer.from_pretrained("vit_vq:default", map_location=map_location)


def model_card() -> str:
    """The packaged model card (Markdown): data, training, held-out scores."""
    return (default_model_dir() / "README.md").read_text(encoding="utf-8")


def sample_photos() -> list[Path]:
    """The bundled held-out demo photos (JPEGs, short side 256 px), sorted by name.

    Raises:
        FileNotFoundError: the package was installed without its assets.
    """
    folder = _asset(SAMPLES_DIR, "the bundled sample photos")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in SAMPLE_SUFFIXES)


__all__ = [
    "load_default", "default_model_dir", "bundled_model_dir", "bundled_name_for", "bundled_hint", "model_card", "sample_photos",
]
