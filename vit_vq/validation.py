"""Input checks shared by the public API. Each costs at most one reduction and one host sync."""

from __future__ import annotations

import torch

# Float pixels may stray this far outside [0, 1] (resampling and format round-off); `preprocess`
# clamps what it returns, `encode` takes images up to this far out as they are.
PIXEL_TOLERANCE = 1e-3

_IMAGE_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def check_grid(h: int, w: int, max_tokens: int, subject: str | None = None) -> None:
    """Raise unless an `h` x `w` token grid is non-empty and within `max_tokens` (a one-line `ValueError`)."""
    subject = subject or f"a {h}x{w} code grid"
    if h < 1 or w < 1:
        raise ValueError(f"{subject} has no tokens")
    if h * w > max_tokens:
        raise ValueError(
            f"{subject} is {h * w} tokens, above this tokenizer's budget of {max_tokens} tokens per image "
            "(ViTVQConfig.max_tokens)"
        )


def check_images(
    images: torch.Tensor, patch_size: int, channels: int, max_tokens: int, *, values: bool = True
) -> tuple[int, int]:
    """Raise unless `images` is `[B, C, H, W]` float in [0, 1] (finite) or uint8, with `H` and `W`
    positive multiples of `patch_size` and at most `max_tokens` patches per image; returns the
    token grid `(H / patch_size, W / patch_size)`.

    Raises:
        TypeError: not a tensor, or an unsupported dtype.
        ValueError: wrong rank, channels or size; more tokens than `max_tokens`; NaN/Inf or values
            outside [0, 1].
    """
    p = patch_size
    expected = f"[B, {channels}, H, W] with H and W multiples of {p}"
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"expected a torch.Tensor of shape {expected} (or a list of [{channels}, H, W] tensors), "
            f"got {type(images).__name__}; use tokenizer.preprocess(...) for PIL images, numpy arrays or lists"
        )
    if images.ndim != 4:
        raise ValueError(f"expected images of shape {expected}, got {tuple(images.shape)} (rank {images.ndim})")
    if images.shape[1] != channels:
        raise ValueError(f"expected {channels} channels in images of shape {expected}, got {tuple(images.shape)}")
    H, W = images.shape[2], images.shape[3]
    if H < p or W < p or H % p or W % p:
        raise ValueError(
            f"expected images of shape {expected}, got {tuple(images.shape)}; "
            "tokenizer.preprocess(...) resizes to a size the model takes"
        )
    check_grid(H // p, W // p, max_tokens, f"a {H}x{W} px image ({H // p}x{W // p} patches of {p} px)")
    if images.dtype == torch.uint8:
        return H // p, W // p
    if images.dtype not in _IMAGE_FLOATS:
        raise TypeError(f"expected float images in [0, 1] or uint8 images, got dtype {images.dtype}")
    if not values or images.numel() == 0:
        return H // p, W // p
    lo, hi = torch.stack(torch.aminmax(images.detach())).float().tolist()  # one reduction, one sync
    if lo != lo or hi != hi or hi in (float("inf"), float("-inf")) or lo == float("-inf"):
        raise ValueError("images contain NaN or Inf values")
    if lo < -PIXEL_TOLERANCE or hi > 1 + PIXEL_TOLERANCE:
        raise ValueError(
            f"expected float images in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
            "divide uint8-range images by 255, or map [-1, 1] images with (x + 1) / 2"
        )
    return H // p, W // p


def check_indices(
    indices: torch.Tensor, grid: int, codebook_size: int, max_tokens: int, *, values: bool = True
) -> torch.Tensor:
    """Raise unless `indices` is integer `[B, h, w]` (at most `max_tokens` per image), or `[B, grid*grid]`
    (the native grid), in `[0, codebook_size)`.

    Checked before any gather: an out-of-range index in a CUDA gather is an
    unrecoverable device assert. Returns int64 `[B, h, w]`.
    """
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"expected an integer torch.Tensor of codes, got {type(indices).__name__}")
    if indices.dtype not in _INDEX_DTYPES:
        raise TypeError(f"expected integer code indices (e.g. torch.int64), got dtype {indices.dtype}")
    shape = tuple(indices.shape)
    if indices.ndim == 2 and shape[1] == grid * grid:
        indices = indices.view(shape[0], grid, grid)
    elif indices.ndim != 3:
        raise ValueError(
            f"expected code indices of shape [B, h, w], or [B, {grid * grid}] for the native {grid}x{grid} grid, got {shape}"
        )
    check_grid(indices.shape[1], indices.shape[2], max_tokens)
    if values and indices.numel():
        lo, hi = torch.stack(torch.aminmax(indices)).tolist()  # one reduction, one sync
        if lo < 0 or hi >= codebook_size:
            raise ValueError(f"code indices must be in [0, {codebook_size}), got values in [{lo}, {hi}]")
    return indices.long()
