"""Input checks shared by the public API. Each costs at most one reduction and one host sync."""

from __future__ import annotations

import torch

_IMAGE_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def check_images(images: torch.Tensor, image_size: int, channels: int, *, values: bool = True) -> None:
    """Raise unless `images` is `[B, C, S, S]` float in [0, 1] (finite) or uint8.

    Raises:
        TypeError: not a tensor, or an unsupported dtype.
        ValueError: wrong rank, channels or size; NaN/Inf or values outside [0, 1].
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"expected a torch.Tensor of shape [B, {channels}, {image_size}, {image_size}], got {type(images).__name__}; "
            "use tokenizer.preprocess(...) for PIL images, numpy arrays or lists"
        )
    expected = f"[B, {channels}, {image_size}, {image_size}]"
    if images.ndim != 4:
        raise ValueError(f"expected images of shape {expected}, got {tuple(images.shape)} (rank {images.ndim})")
    if images.shape[1] != channels:
        raise ValueError(f"expected {channels} channels in images of shape {expected}, got {tuple(images.shape)}")
    if images.shape[2] != image_size or images.shape[3] != image_size:
        raise ValueError(
            f"expected images of shape {expected}, got {tuple(images.shape)}; "
            "tokenizer.preprocess(...) resizes and center-crops to the model size"
        )
    if images.dtype == torch.uint8:
        return
    if images.dtype not in _IMAGE_FLOATS:
        raise TypeError(f"expected float images in [0, 1] or uint8 images, got dtype {images.dtype}")
    if not values or images.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(images.detach())).float().tolist()  # one reduction, one sync
    if lo != lo or hi != hi or hi in (float("inf"), float("-inf")) or lo == float("-inf"):
        raise ValueError("images contain NaN or Inf values")
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise ValueError(
            f"expected float images in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
            "divide uint8-range images by 255, or map [-1, 1] images with (x + 1) / 2"
        )


def check_indices(indices: torch.Tensor, grid: int, codebook_size: int, *, values: bool = True) -> torch.Tensor:
    """Raise unless `indices` is integer `[B, grid, grid]` or `[B, grid*grid]` in `[0, codebook_size)`.

    Checked before any gather: an out-of-range index in a CUDA gather is an
    unrecoverable device assert. Returns int64 `[B, grid, grid]`.
    """
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"expected an integer torch.Tensor of codes, got {type(indices).__name__}")
    if indices.dtype not in _INDEX_DTYPES:
        raise TypeError(f"expected integer code indices (e.g. torch.int64), got dtype {indices.dtype}")
    shape = tuple(indices.shape)
    if indices.ndim == 2 and shape[1] == grid * grid:
        indices = indices.view(shape[0], grid, grid)
    elif not (indices.ndim == 3 and shape[1:] == (grid, grid)):
        raise ValueError(f"expected code indices of shape [B, {grid}, {grid}] or [B, {grid * grid}], got {shape}")
    if values and indices.numel():
        lo, hi = torch.stack(torch.aminmax(indices)).tolist()  # one reduction, one sync
        if lo < 0 or hi >= codebook_size:
            raise ValueError(f"code indices must be in [0, {codebook_size}), got values in [{lo}, {hi}]")
    return indices.long()
