"""Turn PIL images, numpy arrays and tensors into a `[B, 3, S, S]` float batch in [0, 1]."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def to_tensor(image: Any) -> torch.Tensor:
    """One image (PIL, numpy HWC/HW, tensor CHW/HW) -> float `[C, H, W]` in [0, 1].

    Integer inputs are read as 0..255; float inputs must already be in [0, 1].
    Grey images are repeated to 3 channels; an alpha channel is dropped.
    """
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3:
            raise ValueError(f"expected a numpy image [H, W] or [H, W, C], got shape {image.shape}")
        t = torch.from_numpy(np.array(image, order="C")).permute(2, 0, 1)  # (C, H, W)
    elif isinstance(image, torch.Tensor):
        t = image.unsqueeze(0) if image.ndim == 2 else image
        if t.ndim != 3:
            raise ValueError(f"expected a tensor image [C, H, W] or [H, W], got shape {tuple(image.shape)}")
    else:
        raise TypeError(f"expected a PIL image, numpy array or torch.Tensor, got {type(image).__name__}")
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    elif t.dtype.is_floating_point:
        t = t.float()
        if t.numel():
            lo, hi = torch.stack(torch.aminmax(t)).tolist()
            if not (lo >= -1e-3 and hi <= 1 + 1e-3):  # also catches NaN
                raise ValueError(
                    f"expected float pixels in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
                    "pass uint8 for 0..255 images, or map [-1, 1] images with (x + 1) / 2"
                )
    else:
        raise TypeError(f"expected uint8 or float pixels, got dtype {t.dtype}")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    elif t.shape[0] == 4:
        t = t[:3]
    elif t.shape[0] != 3:
        raise ValueError(f"expected 1, 3 or 4 channels, got {t.shape[0]} in shape {tuple(t.shape)}")
    return t


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """`[C, H, W]` -> `[C, size, size]`: resize the short side to `size` (antialiased), center-crop."""
    _, H, W = image.shape
    if (H, W) != (size, size):
        scale = size / min(H, W)
        nh, nw = max(size, round(H * scale)), max(size, round(W * scale))
        image = F.interpolate(image[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
        top, left = (nh - size) // 2, (nw - size) // 2
        image = image[:, top : top + size, left : left + size]
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
