"""Chunked nearest-code search in plain torch, with bounded temporaries.

Rows are processed in chunks whose `[rows, K]` score block lives in one preallocated
buffer (`torch.addmm(..., out=buf)`), so memory stays O(chunk * K) instead of O(N * K)
and the allocator does not fragment. `torch.argmin` returns the first minimum, so ties
go to the lowest index.
"""

from __future__ import annotations

import torch

DEFAULT_MAX_TEMP_BYTES = 64 * 2**20


def nearest_code_torch(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    max_temp_bytes: int = DEFAULT_MAX_TEMP_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices `[N]` int64 and squared L2 distances `[N]` float32 of the nearest codes.

    `z` `[N, D]` and `codebook` `[K, D]` must already be float32 (and normalised for
    cosine). Distances are `|z|^2 + |e|^2 - 2 z.e`, clamped at 0.
    """
    N, K = z.shape[0], codebook.shape[0]
    rows = max(1, min(N, max_temp_bytes // (4 * K)))
    e_sq = codebook.pow(2).sum(1)  # (K,) computed per call: never stale under EMA
    cb_t = codebook.t()  # (D, K)
    buf = torch.empty(rows, K, dtype=torch.float32, device=z.device)
    indices = torch.empty(N, dtype=torch.int64, device=z.device)
    best = torch.empty(N, dtype=torch.float32, device=z.device)
    for start in range(0, N, rows):
        stop = min(N, start + rows)
        out = buf[: stop - start]
        # out = |e|^2 - 2 z.e   (B, K)
        torch.addmm(e_sq.unsqueeze(0), z[start:stop], cb_t, beta=1.0, alpha=-2.0, out=out)
        torch.min(out, dim=1, out=(best[start:stop], indices[start:stop]))
    best.add_(z.pow(2).sum(1)).clamp_(min=0)
    return indices, best
