"""Turn PIL images, numpy arrays and tensors into a `[B, 3, S, S]` float batch in [0, 1].

Pixels are read exactly: integer images are divided by the largest value of their type
(or of the file's bit depth), float images must already be in [0, 1], EXIF orientation
is applied, and layouts that could be read two ways are refused instead of guessed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

CHANNELS = (1, 3, 4)
# the largest value of each accepted integer dtype: pixels are divided by it
INT_PEAKS = {torch.uint8: 255, torch.uint16: 2**16 - 1, torch.uint32: 2**32 - 1}
LAYOUTS = "[H, W], [C, H, W] or [H, W, C] with C in (1, 3, 4) at exactly one end"


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

    Raises:
        TypeError: not an image type, or an unsupported dtype (e.g. int64).
        ValueError: an ambiguous or unsupported shape; float pixels outside [0, 1] or NaN;
            negative integer pixels.
    """
    if hasattr(image, "convert") and hasattr(image, "getexif"):  # PIL.Image
        t = _pil_to_tensor(image)
    elif isinstance(image, np.ndarray):
        t = _channels_first(_numpy_to_tensor(image), image.shape)
    elif isinstance(image, torch.Tensor):
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
    """Integer pixels divided by their dtype's peak; float pixels checked to lie in [0, 1]."""
    if t.dtype in INT_PEAKS:
        return t.to(torch.float64 if t.dtype == torch.uint32 else torch.float32).div_(INT_PEAKS[t.dtype]).float()
    if not t.dtype.is_floating_point:
        raise TypeError(f"expected uint8, uint16, uint32 or float pixels, got dtype {t.dtype}")
    t = t.float()
    if t.numel():
        lo, hi = torch.stack(torch.aminmax(t)).tolist()
        if not (lo >= -1e-3 and hi <= 1 + 1e-3):  # also catches NaN
            raise ValueError(
                f"expected float pixels in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
                "pass uint8 for 0..255 images, or map [-1, 1] images with (x + 1) / 2"
            )
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


def preprocess(images: Any, size: int) -> torch.Tensor:
    """PIL image(s), numpy array(s), tensors or a list of them -> float `[B, 3, size, size]` in [0, 1]."""
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
    return torch.stack([resize_center_crop(to_tensor(x), size) for x in items])
