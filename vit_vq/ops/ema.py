"""Per-code statistics for EMA codebook updates, without an N x K one-hot."""

from __future__ import annotations

import torch


def codebook_statistics(
    indices: torch.Tensor, vectors: torch.Tensor, codebook_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Count and sum the vectors assigned to each code.

    Args:
        indices: int64 `[N]` in `[0, codebook_size)`.
        vectors: `[N, D]`; summed in float32 whatever their dtype.
        codebook_size: K.

    Returns:
        `(counts [K] float32, sums [K, D] float32)`; memory is O(K*D + N), never O(N*K).
    """
    if indices.ndim != 1 or vectors.ndim != 2 or vectors.shape[0] != indices.shape[0]:
        raise ValueError(
            f"expected indices [N] and vectors [N, D], got {tuple(indices.shape)} and {tuple(vectors.shape)}"
        )
    counts = torch.bincount(indices, minlength=codebook_size).to(torch.float32)
    sums = torch.zeros(codebook_size, vectors.shape[1], dtype=torch.float32, device=vectors.device)
    sums.index_add_(0, indices, vectors.float())
    return counts, sums
