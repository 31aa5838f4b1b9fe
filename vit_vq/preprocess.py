"""Turn PIL images, numpy arrays and tensors into float batches in [0, 1]: `[B, 3, S, S]` crops, or
whole images at their own aspect ratio (`resize="native"` / `"budget"`, see `preprocess`).

Pixels are read exactly: integer images are divided by the largest value of their type
(or of the file's bit depth), float images must already be in [0, 1], EXIF orientation
is applied, and layouts that could be read two ways are refused instead of guessed.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from . import json_fields
from .validation import PIXEL_TOLERANCE

# Refused before any pixel is converted (for files: from the header, before any pixel is decoded).
# 2**26 pixels (8192 x 8192) cost at most ~1.3 GiB while loading a file (measured up to 20.2
# bytes per pixel, for 32-bit TIFFs; 19.1 for RGB/RGBA/CMYK: decode, converted copy, float32
# tensor; see docs/security.md). Pillow's own `PIL.Image.MAX_IMAGE_PIXELS` (~179 M pixels
# refused, ~89 M warned) still applies on top for files.
DEFAULT_MAX_IMAGE_PIXELS = 2**26
# Long side / short side. Scaling a short side to S px needs S * S * ratio * 12 bytes, so at
# most 25 MB at S = 256 (a 1 x 60000 strip would need 11 GB at S = 128).
DEFAULT_MAX_ASPECT_RATIO = 32
# Set these to override the defaults in code; left at None, the environment variables
# VIT_VQ_MAX_IMAGE_PIXELS / VIT_VQ_MAX_ASPECT_RATIO (read at every check), else the defaults, apply.
MAX_IMAGE_PIXELS: int | None = None
MAX_ASPECT_RATIO: int | None = None
_MAX_LIMIT = 2**63 - 1  # a limit read from the environment is an int64

CHANNELS = (1, 3, 4)
# the largest value of each accepted integer dtype: pixels are divided by it
INT_PEAKS = {torch.uint8: 255, torch.uint16: 2**16 - 1, torch.uint32: 2**32 - 1}
LAYOUTS = "[H, W], [C, H, W] or [H, W, C] with C in (1, 3, 4) at exactly one end"
# "crop": center-crop the largest square, resize it to S x S; "native": keep the aspect ratio, short
# side to S; "budget": keep the aspect ratio, the largest size whose token count fits a budget
ResizeMode = Literal["crop", "native", "budget"]


def image_limits() -> tuple[int, int]:
    """The `(max_pixels, max_aspect_ratio)` images are checked against, read now.

    `MAX_IMAGE_PIXELS` / `MAX_ASPECT_RATIO` when set, else the `VIT_VQ_MAX_IMAGE_PIXELS` /
    `VIT_VQ_MAX_ASPECT_RATIO` environment variables when set, else 2**26 pixels and 32:1.

    Raises:
        ValueError: an environment variable that is not a whole number in [1, 2**63 - 1]
            (naming it; its digits are counted before any conversion).
    """
    pixels = _positive_from_env("VIT_VQ_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS)  # checked even when overridden
    ratio = _positive_from_env("VIT_VQ_MAX_ASPECT_RATIO", DEFAULT_MAX_ASPECT_RATIO)
    return (
        pixels if MAX_IMAGE_PIXELS is None else MAX_IMAGE_PIXELS,
        ratio if MAX_ASPECT_RATIO is None else MAX_ASPECT_RATIO,
    )


def _positive_from_env(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value.strip():
        return default
    return json_fields.integer_text(value, source="the environment variable", key=name, low=1, high=_MAX_LIMIT)


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
            "(vit_vq.preprocess.MAX_IMAGE_PIXELS, or the VIT_VQ_MAX_IMAGE_PIXELS environment variable)"
        )
    if max(width, height) > max_ratio * min(width, height):
        raise ValueError(
            f"image is {width}x{height} px, an aspect ratio above the limit of {max_ratio}:1 "
            "(vit_vq.preprocess.MAX_ASPECT_RATIO, or the VIT_VQ_MAX_ASPECT_RATIO environment variable)"
        )


def to_tensor(image: Any) -> torch.Tensor:
    """One image (PIL image, numpy array or tensor) -> float `[3, H, W]` in [0, 1].

    PIL images: EXIF orientation is applied (as browsers and
    `torchvision.io.decode_image(apply_exif_orientation=True)` do); 8-bit modes are divided
    by 255, 16-bit (`I;16*`) by 65535, 32-bit (`I`) by 2**32 - 1 (a TIFF's own bit depth and
    signedness win: 12-bit by 4095, signed 32-bit by 2**31 - 1; PGM/PNG `I` images by
    65535); float (`F`) images must be in [0, 1]; palette, 1-bit, LA, CMYK, YCbCr, ... are
    converted to RGB; alpha is dropped.

    Arrays and tensors: uint8 / 255, uint16 / 65535, uint32 / (2**32 - 1); float pixels must
    be in [0, 1]. Layout: `[H, W]` is grey; a rank-3 shape is `[C, H, W]` when only its
    first size is 1, 3 or 4, `[H, W, C]` when only its last is; when both are (`[4, 50, 3]`,
    `[3, 50, 3]`) or neither is, it is refused. Grey is repeated to 3 channels, alpha dropped.

    The size is checked first (`check_image_size`: pixel count and aspect ratio), before any
    pixel is converted.

    Raises:
        TypeError: not an image type, or an unsupported dtype (e.g. int64).
        ValueError: an ambiguous or unsupported shape; too many pixels or too elongated; float
            pixels outside [0, 1] or NaN; negative integer pixels.
    """
    if hasattr(image, "convert") and hasattr(image, "getexif"):  # PIL.Image
        check_image_size(*image.size)
        t = _pil_to_tensor(image)
    elif isinstance(image, np.ndarray):
        _check_array_size(image.shape)
        t = _channels_first(_numpy_to_tensor(image), image.shape)
    elif isinstance(image, torch.Tensor):
        _check_array_size(tuple(image.shape))
        t = _channels_first(image, tuple(image.shape))
    else:
        raise TypeError(f"expected a PIL image, numpy array or torch.Tensor, got {type(image).__name__}")
    t = _scaled(t)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    elif t.shape[0] == 4:
        t = t[:3]
    return t


def _pil_to_tensor(im: Any) -> torch.Tensor:
    """PIL image -> `[C, H, W]` tensor: uint8, or float32 (integer modes already scaled)."""
    from PIL import ExifTags, ImageOps

    bits, signed = _bit_depth(im)  # before exif_transpose, whose copy has no format or tags
    if im.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9):
        im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or im.mode == "I":
        return _int_pixels(np.asarray(im), bits, signed)
    if im.mode == "L" and signed:  # a signed 8-bit TIFF: Pillow reads its bytes as unsigned
        return _int_pixels(np.asarray(im).view(np.int8), bits, signed)
    if im.mode == "F":
        return torch.from_numpy(np.array(im, dtype=np.float32))[None]
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    t = torch.from_numpy(np.array(im))
    return t.permute(2, 0, 1) if t.ndim == 3 else t[None]


def _bit_depth(im: Any) -> tuple[int, bool]:
    """(bits, signed) of an integer-mode image's samples: a TIFF's own tags; 16 for `I;16*`
    modes and for PNG/PGM `I` images (Pillow widens those 16-bit files); else unsigned 32."""
    tags = getattr(im, "tag_v2", None)
    if im.format == "TIFF" and tags is not None:
        bits, fmt = tags.get(258, 32), tags.get(339, 1)
        bits, fmt = (v[0] if isinstance(v, tuple) else v for v in (bits, fmt))
        return int(bits), fmt == 2
    return (16 if im.mode.startswith("I;16") or im.format in ("PNG", "PPM") else 32), False


def _int_pixels(arr: np.ndarray, bits: int, signed: bool) -> torch.Tensor:
    """Integer `[H, W]` samples of `bits` bits -> float32 `[1, H, W]` in [0, 1] (divided by the peak)."""
    if arr.dtype == np.int32 and bits == 32 and not signed:  # Pillow keeps unsigned 32-bit data in int32
        arr = arr.view(np.uint32)
    elif signed:
        if arr.size and int(arr.min()) < 0:
            raise ValueError(f"expected non-negative pixels in a signed {bits}-bit image, got a minimum of {int(arr.min())}")
        bits -= 1
    work = np.float64 if bits > 24 else np.float32  # float32 holds every 24-bit integer exactly
    return torch.from_numpy((arr.astype(work) / work(2**bits - 1)).astype(np.float32, copy=False))[None]


def _numpy_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """A copy of a numpy array, in native byte order, as a tensor (dtype checked later)."""
    if arr.dtype.kind not in "uf":
        raise TypeError(f"expected uint8, uint16, uint32 or float pixels, got numpy dtype {arr.dtype}")
    return torch.from_numpy(np.array(arr, dtype=arr.dtype.newbyteorder("="), order="C"))


def _check_array_size(shape: tuple[int, ...]) -> None:
    """`check_image_size` for an array of `shape`, read as `_channels_first` reads it (other shapes pass, refused there)."""
    if len(shape) == 2:
        check_image_size(shape[1], shape[0])
    elif len(shape) == 3 and (shape[0] in CHANNELS) != (shape[2] in CHANNELS):
        height, width = shape[1:] if shape[0] in CHANNELS else shape[:2]
        check_image_size(width, height)


def _channels_first(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`[H, W]`, `[C, H, W]` or `[H, W, C]` -> `[C, H, W]`; see `to_tensor` for the rule."""
    if t.ndim == 2:
        return t[None]
    if t.ndim != 3:
        raise ValueError(f"expected an image of shape {LAYOUTS}, got {shape}")
    first, last = shape[0] in CHANNELS, shape[2] in CHANNELS
    if first and last:
        raise ValueError(
            f"ambiguous image shape {shape}: it reads as [C, H, W] and as [H, W, C]; "
            f"accepted layouts are {LAYOUTS}; permute it to [C, H, W] with H, W not in (1, 3, 4), or pass a PIL image"
        )
    if last:
        return t.permute(2, 0, 1)
    if not first:
        raise ValueError(f"expected 1, 3 or 4 channels in an image of shape {LAYOUTS}, got {shape}")
    return t


def _scaled(t: torch.Tensor) -> torch.Tensor:
    """Integer pixels divided by their dtype's peak; float pixels checked to lie in [0, 1] (within
    `PIXEL_TOLERANCE`, then clamped)."""
    if t.dtype in INT_PEAKS:
        return t.to(torch.float64 if t.dtype == torch.uint32 else torch.float32).div_(INT_PEAKS[t.dtype]).float()
    if not t.dtype.is_floating_point:
        raise TypeError(f"expected uint8, uint16, uint32 or float pixels, got dtype {t.dtype}")
    t = t.float()
    if t.numel():
        lo, hi = torch.stack(torch.aminmax(t)).tolist()
        if not (lo >= -PIXEL_TOLERANCE and hi <= 1 + PIXEL_TOLERANCE):  # also catches NaN
            raise ValueError(
                f"expected float pixels in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
                "pass uint8 for 0..255 images, or map [-1, 1] images with (x + 1) / 2"
            )
        t = t.clamp_(0, 1)  # round-off within the tolerance: every later step sees [0, 1] exactly
    return t


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """`[C, H, W]` -> `[C, size, size]`: center-crop the largest square, resize it (bicubic, antialiased).

    Cropping before resizing bounds memory by the input plus the output whatever the
    aspect ratio (scaling a 1 x 60000 strip's short side to 256 first would need 47 GB).

    Raises:
        ValueError: an image without pixels.
    """
    _, H, W = image.shape
    side = min(H, W)
    if side == 0:
        raise ValueError(f"cannot resize an image without pixels, of shape {tuple(image.shape)}")
    top, left = (H - side) // 2, (W - side) // 2
    image = image[:, top : top + side, left : left + side]
    if side != size:
        image = F.interpolate(image[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    return image.clamp(0, 1)


def _round_to(x: float, step: int) -> int:
    """`x` rounded half up to a multiple of `step`, at least `step`."""
    return max(step, math.floor(x / step + 0.5) * step)


def native_size(height: int, width: int, short_side: int, patch_size: int) -> tuple[int, int]:
    """`(H, W)` of a `height` x `width` image scaled so its short side is `short_side`, each side then
    rounded to the nearest multiple of `patch_size` (at least one patch).

    Raises:
        ValueError: a side or size that is not positive.
    """
    if min(height, width, short_side, patch_size) < 1:
        raise ValueError(f"cannot size a {height}x{width} image to short side {short_side} in patches of {patch_size}")
    scale = short_side / min(height, width)
    return _round_to(height * scale, patch_size), _round_to(width * scale, patch_size)


def budget_size(height: int, width: int, max_tokens: int, patch_size: int) -> tuple[int, int]:
    """`(H, W)`, multiples of `patch_size`, of the largest image with the aspect ratio of `height` x `width`
    (its long side rounded to the nearest patch) whose token count `(H / p) * (W / p)` is at most `max_tokens`.

    Raises:
        ValueError: a side or budget that is not positive.
    """
    if min(height, width, max_tokens, patch_size) < 1:
        raise ValueError(f"cannot size a {height}x{width} image to {max_tokens} tokens in patches of {patch_size}")
    ratio = max(height, width) / min(height, width)
    short = math.isqrt(max(1, math.floor(max_tokens / ratio))) + 1  # one above the real-valued optimum
    while short > 1 and short * max(1, math.floor(short * ratio + 0.5)) > max_tokens:
        short -= 1
    long = min(max(1, math.floor(short * ratio + 0.5)), max_tokens // short)
    h, w = (short, long) if height <= width else (long, short)
    return h * patch_size, w * patch_size


def resize_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`[C, H, W]` -> `[C, *size]`, whole (bicubic, antialiased), clamped to [0, 1]."""
    if tuple(image.shape[1:]) != tuple(size):
        image = F.interpolate(image[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
    return image.clamp(0, 1)


def preprocess(
    images: Any,
    size: int,
    *,
    resize: ResizeMode = "crop",
    patch_size: int = 1,
    max_tokens: int | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """PIL image(s), numpy array(s), tensors or a list of them -> float images in [0, 1].

    Args:
        size: the side of the square (`"crop"`) or the short side (`"native"`), rounded to a
            multiple of `patch_size`.
        resize: `"crop"`: center-crop the largest square and resize it to `size` x `size`.
            `"native"`: keep the aspect ratio (`native_size`). `"budget"`: keep the aspect ratio at
            the largest size of at most `max_tokens` patches (`budget_size`; `size` unused).
        patch_size: sides come out as multiples of it.
        max_tokens: the budget of `"budget"` (required there, refused elsewhere).

    Returns:
        `[B, 3, H, W]` when every image comes out the same shape, else a list of `[3, H, W]`.

    Raises:
        ValueError: no images; an unknown `resize`, or `max_tokens` given or missing against it; an
            image beyond the pixel or aspect limits (`check_image_size`), or one `to_tensor` refuses.
        TypeError: see `to_tensor`.
    """
    if resize not in ("crop", "native", "budget"):
        raise ValueError(f"resize must be 'crop', 'native' or 'budget', got {resize!r}")
    if (max_tokens is not None) != (resize == "budget"):
        raise ValueError(
            f"max_tokens goes with resize='budget' (and only there), got resize={resize!r}, max_tokens={max_tokens!r}"
        )
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        items = list(images)
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        items = list(images)
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    if not items:
        raise ValueError("preprocess got an empty list of images")
    side = _round_to(size, patch_size)
    out = []
    for item in items:
        t = to_tensor(item)
        H, W = t.shape[1:]
        if resize == "crop":
            out.append(resize_center_crop(t, side))
        elif resize == "native":
            out.append(resize_to(t, native_size(H, W, side, patch_size)))
        else:
            out.append(resize_to(t, budget_size(H, W, max_tokens, patch_size)))
    if all(t.shape == out[0].shape for t in out):
        return torch.stack(out)
    return out
