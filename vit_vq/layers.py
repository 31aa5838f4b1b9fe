"""Shared ViT layers: attention, MLP, pre-norm block, the block stack, position-embedding resizing, init.

One implementation serves both the encoder and the decoder; the patch embedding and the position
embeddings themselves live in `encoder.py` and `decoder.py`. Attention runs through
`torch.nn.functional.scaled_dot_product_attention`, which picks flash/memory-efficient
kernels where the device has them.
"""

from __future__ import annotations

import math

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        hs = C // self.heads
        q = self.q(x).view(B, T, self.heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k(x).view(B, T, self.heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v(x).view(B, T, self.heads, hs).transpose(1, 2)  # (B, nh, T, hs)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of `Block`s followed by a final LayerNorm."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, eps) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def interpolate_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize a square grid of position embeddings `[1, g*g, C]` to `[1, grid*grid, C]` (bicubic)."""
    n, C = pos.shape[1], pos.shape[2]
    old = math.isqrt(n)
    if old * old != n:
        raise ValueError(f"position embeddings must form a square grid, got {n} positions")
    if old == grid:
        return pos
    p = pos.reshape(1, old, old, C).permute(0, 3, 1, 2).float()  # (1, C, g, g)
    p = F.interpolate(p, size=(grid, grid), mode="bicubic", align_corners=False)
    return p.permute(0, 2, 3, 1).reshape(1, grid * grid, C).to(pos.dtype)  # (1, grid*grid, C)


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
