"""Per-code statistics (counts and sums of the vectors assigned to each code), without an N x K one-hot."""

from __future__ import annotations

import torch

from .torch_backend import DEFAULT_MAX_TEMP_BYTES


def codebook_statistics(
    indices: torch.Tensor,
    vectors: torch.Tensor,
    codebook_size: int,
    *,
    max_temp_bytes: int = DEFAULT_MAX_TEMP_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Count and sum the vectors assigned to each code.

    Args:
        indices: int64 `[N]` in `[0, codebook_size)`.
        vectors: `[N, D]`; summed in float32 whatever their dtype (16-bit inputs are converted
            in row blocks of at most `max_temp_bytes`).
        codebook_size: K >= 1.

    Returns:
        `(counts [K] float32, sums [K, D] float32)`; memory is O(K*D), never O(N*K).

    Raises:
        ValueError: on mismatched shapes or a non-positive codebook size.
        TypeError: when `indices` is not int64.
    """
    if indices.ndim != 1 or vectors.ndim != 2 or vectors.shape[0] != indices.shape[0]:
        raise ValueError(
            f"expected indices [N] and vectors [N, D], got {tuple(indices.shape)} and {tuple(vectors.shape)}"
        )
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64, got {indices.dtype}")
    if codebook_size < 1:
        raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
    counts = torch.bincount(indices, minlength=codebook_size).to(torch.float32)
    sums = torch.zeros(codebook_size, vectors.shape[1], dtype=torch.float32, device=vectors.device)
    if vectors.dtype == torch.float32:
        sums.index_add_(0, indices, vectors)
    else:
        rows = max(1, max_temp_bytes // (4 * vectors.shape[1]))
        for r0 in range(0, vectors.shape[0], rows):
            sums.index_add_(0, indices[r0 : r0 + rows], vectors[r0 : r0 + rows].float())
    return counts, sums
