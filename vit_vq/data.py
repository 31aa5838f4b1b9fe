"""Image sources shared by training, tokenizing and evaluation.

Every dataset here yields dicts `{"pixels": float [3, H, W] in [0, 1] | None, "key": str,
"label": int, "error": str | None}`. Unreadable items are not raised: they come back
with `pixels=None` and a reason, and `collate_images` drops and reports them, so a
corrupt file is skipped and counted instead of killing a long job.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .preprocess import to_tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

Transform = Callable[[torch.Tensor], torch.Tensor]


def list_images(root: str | Path, *, include_all_files: bool = False) -> list[Path]:
    """Image files under `root`, recursively, sorted (or `[root]` for a single file).

    With `include_all_files` every regular file is listed, so that unreadable ones can be
    reported instead of silently ignored.

    Raises:
        FileNotFoundError: `root` does not exist.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"no such file or folder: {str(root)!r}")
    if root.is_file():
        return [root]
    files = (p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return sorted(p for p in files if include_all_files or p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image(path: str | Path | io.BytesIO) -> torch.Tensor:
    """Read an image file -> float `[3, H, W]` in [0, 1].

    Raises:
        ValueError: the file is not a readable image (the message says why).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return to_tensor(im)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{path}: not a readable image ({type(err).__name__}: {err})") from err


class ImageFolder(Dataset):
    """Images under a folder (recursive). Items are dicts; unreadable files carry an `error`."""

    def __init__(self, root: str | Path, transform: Transform | None = None, *, include_all_files: bool = True):
        self.root = Path(root).expanduser()
        self.files = list_images(self.root, include_all_files=include_all_files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.files[i]
        key = str(path.relative_to(self.root)) if self.root.is_dir() else path.name
        try:
            img = load_image(path)
            if self.transform is not None:
                img = self.transform(img)
        except ValueError as err:
            return {"pixels": None, "key": key, "label": -1, "error": str(err)}
        return {"pixels": img, "key": key, "label": -1, "error": None}


class HFImageDataset(Dataset):
    """A Hugging Face `datasets` dataset (Hub name or local path) viewed through its image column."""

    def __init__(
        self,
        name_or_path: str,
        *,
        split: str = "train",
        image_column: str = "image",
        label_column: str | None = None,
        transform: Transform | None = None,
    ):
        import datasets

        path = Path(name_or_path).expanduser()
        if _is_saved_dataset(path):
            ds = datasets.load_from_disk(str(path))
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(name_or_path, split=split)
        if image_column not in ds.column_names:
            raise ValueError(f"dataset has no image column {image_column!r}; its columns are {ds.column_names}")
        if isinstance(ds.features.get(image_column), datasets.Image):
            # decode in __getitem__'s try, so one corrupt row is skipped instead of raised
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.ds, self.image_column, self.label_column, self.transform = ds, image_column, label_column, transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        label = -1
        try:
            row = self.ds[i]
            label = int(row[self.label_column]) if self.label_column else -1
            value = row[self.image_column]
            if isinstance(value, dict):  # an undecoded image: {"bytes": ..., "path": ...}
                value = load_image(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
            img = to_tensor(value)
            if self.transform is not None:
                img = self.transform(img)
        except (ValueError, TypeError, OSError, KeyError) as err:
            return {"pixels": None, "key": str(i), "label": label, "error": f"row {i}: {err}"}
        return {"pixels": img, "key": str(i), "label": label, "error": None}


def open_image_source(
    data: str | Path,
    transform: Transform | None = None,
    *,
    split: str = "train",
    image_column: str = "image",
    label_column: str | None = None,
) -> Dataset:
    """An `ImageFolder` for a local folder/file, else a `datasets` dataset (saved folder or Hub name).

    Raises:
        FileNotFoundError: a local-looking path that does not exist.
    """
    path = Path(str(data)).expanduser()
    if path.exists() and not _is_saved_dataset(path):
        return ImageFolder(path, transform)
    if not path.exists() and str(data).startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such file or folder: {str(data)!r}")
    return HFImageDataset(str(data), split=split, image_column=image_column, label_column=label_column, transform=transform)


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets.Dataset(Dict).save_to_disk`."""
    return path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def collate_images(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack readable items; report the rest under `skipped` as `{"path", "reason"}` dicts.

    Returns `{"pixels": [B, 3, S, S] | None, "keys": [...], "labels": int64 [B], "skipped": [...]}`.
    """
    good = [it for it in items if it["pixels"] is not None]
    skipped = [{"path": it["key"], "reason": it["error"]} for it in items if it["pixels"] is None]
    return {
        "pixels": torch.stack([it["pixels"] for it in good]) if good else None,
        "keys": [it["key"] for it in good],
        "labels": torch.tensor([it["label"] for it in good], dtype=torch.int64),
        "skipped": skipped,
    }
