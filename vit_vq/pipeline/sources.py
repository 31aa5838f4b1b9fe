"""Image sources at the model's resolution, with the resize policy applied and counted.

Items follow `vit_vq.data`: dicts `{"pixels": float [3, H, W] in [0, 1] | None, "key",
"label", "error"}`. `ModelSizedImages` brings readable images to a size the model codes:

- `resize="crop"`: center-crop the largest square and resize it to `S x S` (`S` the model's
  `image_size`, or `short_side`);
- `resize="native"`: the whole image, its short side resized to `S` (or `short_side`), each side
  rounded to a multiple of the patch (`preprocess.native_size`); an image whose grid would exceed
  the model's token budget is that item's error;
- `resize="budget"`: the whole image at the largest size within the token budget
  (`preprocess.budget_size`);
- `resize="none"`: images must already be `S x S` (others are rejected with a reason),

and marks each item `resized`, so commands can say what they did.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from ..data import IMAGE_EXTENSIONS, collate_images, image_limits, list_images, load_image
from ..preprocess import budget_size, native_size, resize_center_crop, resize_to

ResizeMode = Literal["crop", "native", "budget", "none"]
RESIZE_MODES = ("crop", "native", "budget", "none")
WHOLE_IMAGE_MODES = ("native", "budget")  # the modes that keep each image's aspect ratio (grids of many shapes)


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


class ImageSizer:
    """Brings one image to a size the model codes (the resize policy of the module docstring).

    Args:
        size: the model's `image_size` (the square side, or the short side, unless `short_side`).
        resize: `"crop"`, `"native"`, `"budget"` or `"none"`. Resizing bounds memory by the image
            plus the output, whatever its shape.
        patch_size: sides come out as multiples of it (`"crop"` and `"native"` round `size` to it).
        max_tokens: the token budget per image (the model's `config.token_budget`): `"budget"` sizes
            to it, `"native"` and `"crop"` turn a larger grid into the image's error.
        short_side: the square side (`"crop"`) or short side (`"native"`) instead of `size`.

    Raises:
        ValueError: an unknown `resize`, `short_side` with `"budget"` or `"none"`, non-positive sizes.
    """

    def __init__(
        self, size: int, resize: ResizeMode = "crop", *, patch_size: int = 1, max_tokens: int | None = None,
        short_side: int | None = None,
    ) -> None:
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        if short_side is not None and resize not in ("crop", "native"):
            raise ValueError(f"short_side goes with resize 'crop' or 'native', got resize={resize!r}")
        if min(size, patch_size, short_side or 1, max_tokens or 1) < 1:
            raise ValueError(f"sizes must be positive, got size={size}, patch_size={patch_size}, "
                             f"short_side={short_side}, max_tokens={max_tokens}")
        side = short_side or size
        self.resize, self.patch_size, self.max_tokens = resize, patch_size, max_tokens
        self.size = max(patch_size, (side + patch_size // 2) // patch_size * patch_size) if resize != "none" else size

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """`(H, W)` an image of `height` x `width` px is brought to (`"none"`: the model's square)."""
        p = self.patch_size
        if self.resize == "native":
            return native_size(height, width, self.size, p)
        if self.resize == "budget":
            return budget_size(height, width, self.max_tokens or (self.size // p) ** 2, p)
        return self.size, self.size

    def fit(self, pixels: torch.Tensor, key: str = "") -> tuple[torch.Tensor, bool]:
        """`pixels` `[3, H, W]` at the target size, and whether they were resized.

        Raises:
            ValueError: the image's error, starting with `key` (when given): a size `"none"` refuses, a grid
                over `max_tokens`, or a resize that failed (out of memory included).
        """
        key = f"{key}: " if key else ""
        H, W = (int(v) for v in pixels.shape[1:])
        target = self.target_size(H, W)
        if (H, W) == target:
            return pixels, False
        S = self.size
        if self.resize == "none":
            raise ValueError(f"{key}image is {W}x{H} px but the model takes {S}x{S}; "
                             "use --resize crop to resize the short side and center-crop")
        tokens = (target[0] // self.patch_size) * (target[1] // self.patch_size)
        if self.max_tokens is not None and tokens > self.max_tokens:
            raise ValueError(
                f"{key}at {target[1]}x{target[0]} px ({W}x{H} resized) the image is {tokens} tokens, above "
                f"the model's budget of {self.max_tokens} tokens per image; resize 'budget' fits it within"
            )
        try:
            return (resize_center_crop(pixels, S) if self.resize == "crop" else resize_to(pixels, target)), True
        except (ValueError, MemoryError, RuntimeError) as err:  # this image's error, never the job's
            raise ValueError(f"{key}cannot be resized ({type(err).__name__}: {str(err)[:200]})") from None


class ModelSizedImages(Dataset):
    """A view of an image dataset whose readable items are at a size the model codes (`ImageSizer`).

    Args:
        base: a dataset of `vit_vq.data` item dicts (without a resizing transform).
        size, resize, patch_size, max_tokens, short_side: see `ImageSizer`.
        indices: optional subset (and order) of `base`'s items.

    Items gain `"resized": bool` and `"index"`: the position in `base`; an image the policy refuses
    becomes an unreadable item whose `error` says why.

    Raises:
        ValueError: see `ImageSizer`.
    """

    def __init__(
        self,
        base: Dataset,
        size: int,
        resize: ResizeMode = "crop",
        indices: Sequence[int] | None = None,
        *,
        patch_size: int = 1,
        max_tokens: int | None = None,
        short_side: int | None = None,
    ) -> None:
        self.sizer = ImageSizer(size, resize, patch_size=patch_size, max_tokens=max_tokens, short_side=short_side)
        self.base, self.resize, self.size = base, resize, self.sizer.size
        self.indices = list(range(len(base))) if indices is None else list(indices)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.indices[i]
        item = dict(self.base[index])
        item["index"], item["resized"] = index, False
        if item["pixels"] is None:
            return item
        try:
            item["pixels"], item["resized"] = self.sizer.fit(item["pixels"], item["key"])
        except ValueError as err:
            item["pixels"], item["error"] = None, str(err)
        return item


def collate_sized(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`collate_images` plus `resized` (how many readable items were resized) and `indices`.

    `pixels` is `[B, 3, H, W]` when the readable images share one shape, else a list of `[3, H, W]`
    (None when none is readable).
    """
    good = [it for it in items if it["pixels"] is not None]
    if len({tuple(it["pixels"].shape) for it in good}) > 1:
        batch = collate_images([it if it["pixels"] is None else {**it, "pixels": it["pixels"][:, :0, :0]} for it in items])
        batch["pixels"] = [it["pixels"] for it in good]
    else:
        batch = collate_images(items)
    batch["resized"] = sum(bool(it.get("resized")) for it in good)
    batch["indices"] = [it.get("index", -1) for it in good]
    return batch


def resize_notice(resized: int, total: int, size: int, resize: ResizeMode = "crop") -> str | None:
    """The line a command prints after resizing some images (None when it resized none)."""
    if not resized:
        return None
    how = {
        "crop": f"to {size}x{size} px (short side, then center crop)",
        "native": f"whole, short side to {size} px (sides rounded to the patch)",
        "budget": "whole, to the largest size within the model's token budget",
    }.get(resize, f"to {size}x{size} px")
    return f"resized {resized} of {total} images {how}"


__all__ = [
    "FileImages", "ImageSizer", "ModelSizedImages", "collate_sized", "resize_notice", "ResizeMode", "RESIZE_MODES",
    "WHOLE_IMAGE_MODES",
]
