"""Image sources at the model's resolution, with the resize policy applied and counted.

Items follow `vit_vq.data`: dicts `{"pixels": float [3, H, W] in [0, 1] | None, "key",
"label", "error"}`. `ModelSizedImages` brings readable images to `[3, S, S]` — center-cropping
the largest square and resizing it (`resize="crop"`), or rejecting other sizes with a
reason (`resize="none"`) — and marks each item `resized`, so commands can say what they did.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from ..data import IMAGE_EXTENSIONS, collate_images, image_limits, list_images, load_image
from ..preprocess import resize_center_crop

ResizeMode = Literal["crop", "none"]
RESIZE_MODES = ("crop", "none")


class FileImages(Dataset):
    """Image files named one by one, or folders of images, in the order given.

    A folder contributes its image files (by extension, recursively, sorted) under keys
    relative to it; a file contributes itself under its file name. Paths that are not
    regular files (a FIFO, a device) are kept, and loading them reports why they are skipped.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: no images at all, or a folder without image files; a malformed limit in the environment.
    """

    def __init__(self, paths: Sequence[str | Path]) -> None:
        image_limits()  # now, as the job's error, rather than as every image's
        self.files: list[Path] = []
        self.keys: list[str] = []
        for arg in paths:
            path = Path(arg).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"no such file or folder: {str(arg)!r}")
            if path.is_dir():
                found = list_images(path)
                if not found:
                    raise ValueError(f"{str(arg)!r} holds no image files (looked for {', '.join(IMAGE_EXTENSIONS)})")
                self.files += found
                self.keys += [str(p.relative_to(path)) for p in found]
            else:
                self.files.append(path)
                self.keys.append(path.name)
        if not self.files:
            raise ValueError("no input images given")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        key = self.keys[i]
        try:
            pixels = load_image(self.files[i])
        except ValueError as err:
            return {"pixels": None, "key": key, "label": -1, "error": str(err)}
        return {"pixels": pixels, "key": key, "label": -1, "error": None}


class ModelSizedImages(Dataset):
    """A view of an image dataset whose readable items are `[3, size, size]`.

    Args:
        base: a dataset of `vit_vq.data` item dicts (without a resizing transform).
        size: the model's `image_size`.
        resize: `"crop"` center-crops the largest square and resizes it to `size` (memory
            bounded by the image plus the output, whatever its shape); `"none"` turns
            any other size into an unreadable item whose `error` says why.
        indices: optional subset (and order) of `base`'s items.

    Items gain `"resized": bool` and `"index"`: the position in `base`.
    """

    def __init__(self, base: Dataset, size: int, resize: ResizeMode = "crop", indices: Sequence[int] | None = None) -> None:
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.base, self.size, self.resize = base, size, resize
        self.indices = list(range(len(base))) if indices is None else list(indices)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.indices[i]
        item = dict(self.base[index])
        item["index"], item["resized"] = index, False
        pixels = item["pixels"]
        if pixels is None:
            return item
        S = self.size
        if tuple(pixels.shape[1:]) != (S, S):
            if self.resize == "none":
                H, W = pixels.shape[1:]
                item["pixels"] = None
                item["error"] = (
                    f"{item['key']}: image is {W}x{H} px but the model takes {S}x{S}; "
                    "use --resize crop to resize the short side and center-crop"
                )
                return item
            try:
                item["pixels"], item["resized"] = resize_center_crop(pixels, S), True
            except (ValueError, MemoryError, RuntimeError) as err:  # this image's error, never the job's
                item["pixels"], item["error"] = None, f"{item['key']}: cannot be resized ({type(err).__name__}: {str(err)[:200]})"
        return item


def collate_sized(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`collate_images` plus `resized` (how many readable items were resized) and `indices`."""
    batch = collate_images(items)
    good = [it for it in items if it["pixels"] is not None]
    batch["resized"] = sum(bool(it.get("resized")) for it in good)
    batch["indices"] = [it.get("index", -1) for it in good]
    return batch


def resize_notice(resized: int, total: int, size: int) -> str | None:
    """The line a command prints after resizing some images (None when it resized none)."""
    if not resized:
        return None
    return (
        f"resized {resized} of {total} images to {size}x{size} px (short side, then center crop); "
        "--resize none rejects them instead"
    )


__all__ = ["FileImages", "ModelSizedImages", "collate_sized", "resize_notice", "ResizeMode", "RESIZE_MODES"]
