"""The tokenizer that ships inside the package, and the held-out photos that show it off.

`load_default()` reads `vit_vq/assets/default/` (`config.json`, `model.safetensors`, a
model card). Its name is `vit_vq:default`: `ViTVQTokenizer.from_pretrained("vit_vq:default")`,
every CLI `--model` / `--init` and `TokenizeBatch` accept it; no Hub id is involved, so it
works with no network.

Earlier defaults stay bundled under their own names, so codes they made still decode:
`vit_vq:default-v1` is the default of vit_vq 0.1. The table of bundled models, with their
pinned hashes, is `vit_vq.registry`. `sample_photos()` lists the bundled demo photos (never
seen in training; public domain, CC0 or CC-BY, credited in `samples/CREDITS.md`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .registry import DEFAULT_MODEL, SAMPLES_FOLDER, asset_folder, bundled_hint, bundled_model_dir, bundled_name_for
from .tokenizer import ViTVQTokenizer

SAMPLE_SUFFIXES = (".jpg", ".jpeg", ".png")


def default_model_dir() -> Path:
    """The folder that holds the packaged tokenizer: `config.json`, `model.safetensors`, `README.md`.

    Raises:
        FileNotFoundError: the package was installed without its assets.
    """
    return bundled_model_dir(DEFAULT_MODEL)


def load_default(map_location: str | torch.device = "cpu") -> ViTVQTokenizer:
    """The packaged default tokenizer, in eval mode, on `map_location`. Never uses the network.

    Raises:
        FileNotFoundError: the package was installed without its assets.
    """
    return ViTVQTokenizer.from_pretrained(DEFAULT_MODEL, map_location=map_location)


def model_card() -> str:
    """The packaged model card (Markdown): data, training, held-out scores."""
    return (default_model_dir() / "README.md").read_text(encoding="utf-8")


def sample_photos() -> list[Path]:
    """The bundled held-out demo photos (JPEGs, short side 256 px), sorted by name.

    Raises:
        FileNotFoundError: the package was installed without its assets.
    """
    folder = asset_folder(SAMPLES_FOLDER, "the bundled sample photos")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in SAMPLE_SUFFIXES)


__all__ = [
    "load_default", "default_model_dir", "bundled_model_dir", "bundled_name_for", "bundled_hint", "model_card", "sample_photos",
]
