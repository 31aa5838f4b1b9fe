"""Image sources shared by training, tokenizing and evaluation.

Every dataset here yields dicts `{"pixels": float [3, H, W] in [0, 1] | None, "key": str,
"label": int, "error": str | None}`. Unreadable items are not raised: they come back
with `pixels=None` and a reason, and `collate_images` drops and reports them, so a
corrupt file is skipped and counted instead of killing a long job.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .files import NotRegularFileError, open_regular
from .hub import looks_local
from .preprocess import to_tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# the decoders `load_image` uses (JPEG includes phones' MPO files); others (EPS runs Ghostscript, ...) are refused
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "DIB", "GIF", "WEBP", "TIFF", "PPM", "AVIF")


# Refused from the header, before any pixel is decoded. 2**26 pixels (8192 x 8192) cost at
# most ~1.3 GiB while loading (measured up to 20.2 bytes per pixel, for 32-bit TIFFs; 19.1
# for RGB/RGBA/CMYK: decode, converted copy, float32 tensor; see docs/security.md). Pillow's own
# `PIL.Image.MAX_IMAGE_PIXELS` (~179 M pixels refused, ~89 M warned) still applies on top.
DEFAULT_MAX_IMAGE_PIXELS = 2**26
# Long side / short side. Scaling a short side to S px needs S * S * ratio * 12 bytes, so at
# most 25 MB at S = 256 (a 1 x 60000 strip would need 11 GB at S = 128).
DEFAULT_MAX_ASPECT_RATIO = 32
# Set these to override the defaults in code; left at None, the environment variables
# VIT_VQ_MAX_IMAGE_PIXELS / VIT_VQ_MAX_ASPECT_RATIO (read at every load), else the defaults, apply.
MAX_IMAGE_PIXELS: int | None = None
MAX_ASPECT_RATIO: int | None = None


def image_limits() -> tuple[int, int]:
    """The `(max_pixels, max_aspect_ratio)` images are checked against, read now.

    `MAX_IMAGE_PIXELS` / `MAX_ASPECT_RATIO` when set, else the `VIT_VQ_MAX_IMAGE_PIXELS` /
    `VIT_VQ_MAX_ASPECT_RATIO` environment variables when set, else 2**26 pixels and 32:1.

    Raises:
        ValueError: an environment variable that is not a positive integer (naming it and its value).
    """
    pixels = _positive_from_env("VIT_VQ_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS)  # checked even when overridden
    ratio = _positive_from_env("VIT_VQ_MAX_ASPECT_RATIO", DEFAULT_MAX_ASPECT_RATIO)
    return (
        pixels if MAX_IMAGE_PIXELS is None else MAX_IMAGE_PIXELS,
        ratio if MAX_ASPECT_RATIO is None else MAX_ASPECT_RATIO,
    )


def _positive_from_env(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not (value.isascii() and value.isdigit()) or int(value) <= 0:
        raise ValueError(f"the environment variable {name} must be a positive integer, got {value!r}")
    return int(value)


Transform = Callable[[torch.Tensor], torch.Tensor]


def list_images(root: str | Path, *, include_all_files: bool = False) -> list[Path]:
    """Image files under `root`, recursively (hidden names skipped), sorted; `[root]` for a file.

    With `include_all_files` every entry that is not a folder is listed (FIFOs, sockets,
    devices, links to them, broken links), so that unreadable ones can be reported instead of
    silently ignored; without it, entries with an image extension are, whatever their type.
    A subfolder that cannot be read is listed too (loading it raises a `ValueError` that
    says why), so that no image is skipped unseen. Symlinked folders are not followed.

    Raises:
        FileNotFoundError: `root` does not exist.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"no such file or folder: {str(root)!r}")
    if not root.is_dir():
        return [root]
    found: list[Path] = []
    for folder, subfolders, names in os.walk(root, onerror=lambda err: found.append(Path(err.filename))):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        for name in names:  # every entry but folders (and links to folders): loading says what is wrong
            if not name.startswith(".") and (include_all_files or Path(name).suffix.lower() in IMAGE_EXTENSIONS):
                found.append(Path(folder) / name)
    return sorted(found)


def check_image_size(width: int, height: int) -> None:
    """Raise unless a `width` x `height` image is within the limits of `image_limits()`.

    Raises:
        ValueError: no pixels, too many pixels, or too elongated (the message names the limit);
            a malformed limit in the environment.
    """
    max_pixels, max_ratio = image_limits()
    if width <= 0 or height <= 0:
        raise ValueError(f"image is {width}x{height} px: it has no pixels")
    if width * height > max_pixels:
        raise ValueError(
            f"image is {width}x{height} px = {width * height:,} pixels, above the limit of {max_pixels:,} "
            "(vit_vq.data.MAX_IMAGE_PIXELS, or the VIT_VQ_MAX_IMAGE_PIXELS environment variable)"
        )
    if max(width, height) > max_ratio * min(width, height):
        raise ValueError(
            f"image is {width}x{height} px, an aspect ratio above the limit of {max_ratio}:1 "
            "(vit_vq.data.MAX_ASPECT_RATIO, or the VIT_VQ_MAX_ASPECT_RATIO environment variable)"
        )


def load_image(path: str | Path | io.BytesIO) -> torch.Tensor:
    """Read an image file (or its bytes) -> float `[3, H, W]` in [0, 1], exactly (see `to_tensor`).

    Only regular files are opened (links are followed): a FIFO, socket or device is refused
    unopened, since reading it could block forever or never end. The size is checked from
    the header before any pixel is decoded (`check_image_size`); only `IMAGE_FORMATS` are
    opened; running out of memory is this image's error.

    Raises:
        ValueError: the file is not a readable image, not a regular file, empty, or too large
            (the message says why); a malformed limit in the environment.
    """
    from PIL import Image, UnidentifiedImageError

    name = "image bytes" if isinstance(path, io.BytesIO) else str(path)
    image_limits()  # a malformed environment variable is the caller's error, whatever the file
    try:
        if isinstance(path, io.BytesIO):
            if path.seek(0, io.SEEK_END) == 0:
                raise ValueError("empty image bytes")
            return _decode(path)
        with _open_regular_file(Path(path)) as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ValueError("an empty file")
            return _decode(f)
    except UnidentifiedImageError as err:  # its own message names the file object, not the file
        known = ", ".join(IMAGE_FORMATS)
        raise ValueError(f"{name}: not a readable image (UnidentifiedImageError: not identified as {known})") from err
    except (Image.DecompressionBombError, OSError, SyntaxError, TypeError) as err:
        raise ValueError(f"{name}: not a readable image ({type(err).__name__}: {err})") from err
    except (MemoryError, RuntimeError) as err:  # an allocation failure is this image's, not the job's
        raise ValueError(f"{name}: out of memory while loading ({type(err).__name__}: {str(err)[:200]})") from err
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err


def _decode(f: io.BufferedReader | io.BytesIO) -> torch.Tensor:
    """Decode an open image file: size checked from the header, then pixels (see `load_image`)."""
    from PIL import Image

    with Image.open(f, formats=IMAGE_FORMATS) as im:
        check_image_size(*im.size)
        im.load()
        return to_tensor(im)


def _open_regular_file(path: Path) -> io.BufferedReader:
    """`files.open_regular`, with the reason in the words of an image loader (a folder's reason says why)."""
    try:
        return open_regular(path)
    except NotRegularFileError as err:
        if err.kind == "a folder":
            raise ValueError(_folder_error(path)) from None
        raise ValueError(f"not a regular file: {err.kind}" + (" (through a symbolic link)" if err.via_link else "")) from None


def _folder_error(folder: Path) -> str:
    """What is wrong with loading `folder` as an image: unreadable (and why), or just a folder."""
    try:
        with os.scandir(folder) as entries:
            next(entries, None)
    except OSError as err:
        return f"a folder that cannot be read ({type(err).__name__}: {err.strerror or err}); its files are not listed"
    return "a folder, not an image file"


class ImageFolder(Dataset):
    """Images under a folder (recursive). Items are dicts; unreadable files carry an `error`.

    Raises:
        FileNotFoundError: `root` does not exist. ValueError: a malformed limit in the environment.
    """

    def __init__(self, root: str | Path, transform: Transform | None = None, *, include_all_files: bool = True):
        image_limits()  # now, as the job's error, rather than as every image's
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
        except (MemoryError, RuntimeError) as err:  # e.g. an allocation failure: this image's error, not the job's
            reason = f"{key}: cannot be transformed ({type(err).__name__}: {str(err)[:200]})"
            return {"pixels": None, "key": key, "label": -1, "error": reason}
        return {"pixels": img, "key": key, "label": -1, "error": None}


class HFImageDataset(Dataset):
    """A Hugging Face `datasets` dataset (Hub name or local path) viewed through its image column.

    Raises:
        ValueError: no such image or label column; a label column that does not hold integers;
            a malformed limit in the environment.
    """

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

        image_limits()  # now, as the job's error, rather than as every row's
        path = Path(name_or_path).expanduser()
        if _is_saved_dataset(path):
            ds = datasets.load_from_disk(str(path))
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(name_or_path, split=split)
        if image_column not in ds.column_names:
            raise ValueError(f"dataset has no image column {image_column!r}; its columns are {ds.column_names}")
        if label_column is not None:
            _check_label_column(ds, label_column)
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
            img = load_image_cell(value) if isinstance(value, dict) else to_tensor(value)
            if self.transform is not None:
                img = self.transform(img)
        except (ValueError, TypeError, OSError, KeyError) as err:
            return {"pixels": None, "key": str(i), "label": label, "error": f"row {i}: {err}"}
        except (MemoryError, RuntimeError) as err:  # e.g. an allocation failure: this row's error, not the job's
            return {"pixels": None, "key": str(i), "label": label, "error": f"row {i}: {type(err).__name__}: {str(err)[:200]}"}
        return {"pixels": img, "key": str(i), "label": label, "error": None}


def load_image_cell(cell: dict[str, Any]) -> torch.Tensor:
    """An undecoded `datasets.Image` cell `{"bytes": ..., "path": ...}` -> float `[3, H, W]`.

    Its bytes when present (even empty: "empty image bytes"), else the file at its path.
    """
    if cell.get("bytes") is not None:
        return load_image(io.BytesIO(cell["bytes"]))
    if cell.get("path"):
        return load_image(cell["path"])
    raise ValueError("image cell has neither bytes nor a path")


def _check_label_column(ds: Any, column: str) -> None:
    """Raise unless `ds` has an integer (or `ClassLabel`) column `column`."""
    import datasets

    if column not in ds.column_names:
        raise ValueError(f"dataset has no label column {column!r}; its columns are {ds.column_names}")
    feature = ds.features[column]
    dtype = getattr(feature, "dtype", type(feature).__name__)
    if not (isinstance(feature, datasets.ClassLabel) or (isinstance(feature, datasets.Value) and "int" in dtype)):
        raise ValueError(f"label column {column!r} holds {dtype} values; expected integer labels (an int Value or a ClassLabel)")


def open_image_source(
    data: str | Path,
    transform: Transform | None = None,
    *,
    split: str = "train",
    image_column: str = "image",
    label_column: str | None = None,
) -> Dataset:
    """An `ImageFolder` for a local folder/file, else a `datasets` dataset (saved folder or Hub name).

    A value that looks like a path (`vit_vq.hub.looks_local`) and does not exist is an error, never
    a Hub lookup.

    Raises:
        FileNotFoundError: a path-looking value that does not exist.
        ValueError: a `label_column` for a folder of image files (which has no labels); see
            `HFImageDataset` for a `datasets` dataset.
    """
    path = Path(str(data)).expanduser()
    if path.exists() and not _is_saved_dataset(path):
        if label_column is not None:
            raise ValueError(
                f"a label column ({label_column!r}) needs a `datasets` dataset, but {str(data)!r} is "
                "image files, which have no labels"
            )
        return ImageFolder(path, transform)
    if not path.exists() and looks_local(str(data)):
        raise FileNotFoundError(f"no such folder: {str(data)!r}")
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
