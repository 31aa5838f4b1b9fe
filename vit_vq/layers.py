"""Shared ViT layers: attention, MLP, pre-norm block, the block stack, position encodings for any grid, init.

One implementation serves both the encoder and the decoder; the patch embedding and the learned
position embeddings themselves live in `encoder.py` and `decoder.py`. Attention runs through
`torch.nn.functional.scaled_dot_product_attention`, which picks flash/memory-efficient
kernels where the device has them.

Position encodings for a token grid of any shape `(h, w)`:
* learned absolute embeddings, stored on the native square grid, are resampled to `(h, w)` by
  `resample_pos_embed`; `PositionCache` keeps one resampled copy per grid outside the state dict;
* `Rope2D`: axial 2D rotary embeddings, applied to q and k in every attention layer.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (as in HF ViT checkpoints)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`x` `[B, T, C]`; `rope`: `(cos, sin)` `[T, hs/2]` from `Rope2D`, rotating q and k."""
        B, T, C = x.shape
        hs = C // self.heads
        q = self.q(x).view(B, T, self.heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k(x).view(B, T, self.heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v(x).view(B, T, self.heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, round(width * mlp_ratio))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of `Block`s followed by a final LayerNorm."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, eps) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, rope)
        return self.norm(x)


# -- learned absolute positions ------------------------------------------------------------
def resample_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize a square grid of position embeddings `[1, g*g, C]` to `[1, h*w, C]` for `grid = (h, w)`.

    Bicubic with antialiasing, computed in float32 and cast back (as timm's `resample_abs_pos_embed`).
    At `grid == (g, g)` it returns `pos` itself.

    Raises:
        ValueError: `pos` does not hold a square number of positions.
    """
    n, C = pos.shape[1], pos.shape[2]
    old = math.isqrt(n)
    if old * old != n:
        raise ValueError(f"position embeddings must form a square grid, got {n} positions")
    h, w = grid
    if (h, w) == (old, old):
        return pos
    p = pos.reshape(1, old, old, C).permute(0, 3, 1, 2).float()  # (1, C, g, g)
    p = F.interpolate(p, size=(h, w), mode="bicubic", antialias=True, align_corners=False)  # (1, C, h, w)
    return p.permute(0, 2, 3, 1).reshape(1, h * w, C).to(pos.dtype)  # (1, h*w, C)


class PositionCache:
    """Resampled copies of one learned position embedding, one per grid shape (the last `size` grids).

    Not a module: nothing here enters a state dict. An entry is reused only for the same parameter
    object at the same storage, version counter, dtype and device, so a load, an optimizer step or
    `.to()` recomputes it. (Writes through `param.data` bypass the version counter; call `clear()`
    after one.) While the parameter takes gradients, or under `torch.compile`, it resamples every
    call so gradients flow. The native grid is never resampled.
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[int, int], tuple[tuple, torch.Tensor]] = OrderedDict()

    def __call__(self, pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        g = math.isqrt(pos.shape[1])
        if tuple(grid) == (g, g):
            return pos
        if torch.compiler.is_compiling() or (pos.requires_grad and torch.is_grad_enabled()):
            return resample_pos_embed(pos, grid)
        key = (pos.data_ptr(), pos._version, pos.dtype, pos.device, torch.is_inference_mode_enabled())
        entry = self._entries.get(grid)
        if entry is not None and entry[0][0]() is pos and entry[0][1:] == key:
            self._entries.move_to_end(grid)
            return entry[1]
        value = resample_pos_embed(pos.detach(), grid)
        self._entries[grid] = ((weakref.ref(pos), *key), value)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __getstate__(self) -> dict:  # pickled (torch.save of a whole module, process pools) empty: weakrefs do not pickle
        return {"size": self.size, "_entries": OrderedDict()}


# -- 2D rotary positions ----------------------------------------------------------------------
class Rope2D(nn.Module):
    """Axial 2D rotary position embedding for attention heads of width `head_dim` (a multiple of 4).

    The first half of a head's channels rotates with the token's row, the second half with its
    column: channel pair `k` of a half turns by `position * base ** (-k / (head_dim / 4))`. So a
    query at `(r, c)` and a key at `(r', c')` score as a function of `(r - r', c - c')` only.
    Angles are computed in float32 whatever the autocast, and cached per grid (no state dict entry).
    Prefix tokens (a CLS token) are not rotated.
    """

    def __init__(self, head_dim: int, base: float = 100.0, cache_size: int = 8) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head width that is a multiple of 4, got {head_dim}")
        self.head_dim, self.base, self.cache_size = head_dim, base, cache_size
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def frequencies(self, device: torch.device | None = None) -> torch.Tensor:
        """float32 `[head_dim / 4]`: radians per token step of each channel pair, along one axis."""
        pairs = self.head_dim // 4
        return self.base ** (-torch.arange(pairs, dtype=torch.float32, device=device) / pairs)

    def angles(self, grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
        """float32 `[h*w, head_dim / 2]`: the angle of every channel pair at every token, row-major."""
        h, w = grid
        freqs = self.frequencies(device)
        rows = torch.arange(h, dtype=torch.float32, device=device)[:, None].expand(h, w).reshape(-1)  # (h*w,)
        cols = torch.arange(w, dtype=torch.float32, device=device)[None, :].expand(h, w).reshape(-1)  # (h*w,)
        return torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)  # (h*w, hs/2)

    def forward(
        self, grid: tuple[int, int], prefix: int = 0, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(cos, sin)`, float32 `[prefix + h*w, head_dim / 2]`, for `Attention(..., rope=)`."""
        if torch.compiler.is_compiling():
            return self._compute(grid, prefix, device)
        key = (tuple(grid), prefix, str(device), torch.is_inference_mode_enabled())
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = self._cache[key] = self._compute(grid, prefix, device)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return value

    def _compute(self, grid: tuple[int, int], prefix: int, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=torch.device(device or "cpu").type, enabled=False):
            theta = F.pad(self.angles(grid, device), (0, 0, prefix, 0))  # (prefix + h*w, hs/2): prefix angles 0
            return theta.cos(), theta.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs `(2i, 2i+1)` of `x` `[..., T, hs]` by the angles behind `cos`, `sin` `[T, hs/2]`.

    Computed in float32, returned in `x`'s dtype.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., T, hs/2, 2)
    a, b = pairs[..., 0], pairs[..., 1]  # (..., T, hs/2)
    out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)  # (..., T, hs/2, 2)
    return out.flatten(-2).to(x.dtype)  # (..., T, hs)


def init_weights(module: nn.Module) -> None:
    """ViT-style init: truncated-normal linears (std 0.02), zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
