"""ViT decoder: code vectors -> transformer -> upsampling head -> pixels.

Two heads, chosen by `ViTVQConfig.decoder_head`:

* `"pixel_shuffle"` (every checkpoint made before the field existed): each token is projected
  linearly to its own `patch x patch` pixel block (a learned pixel shuffle), then one 3x3
  convolution over the 3 output channels joins neighbouring blocks. Cheap, but each block
  sees only its own token, so an 8-px grid of seams shows in smooth areas.
* `"conv_upsample"`: the same pixel shuffle, plus a convolutional upsampling branch added to
  it. The branch projects the tokens to a feature map on the token grid, then doubles it
  `log2(patch)` times (nearest upsampling + 3x3 convolution + SiLU, a residual block at the
  last two scales) and ends in a 3x3 convolution to RGB, so every output pixel sees its
  neighbouring tokens. The branch's last convolution starts at zero: a fresh model (or one
  warm-started from a `pixel_shuffle` checkpoint) starts out exactly as the plain head.

Cost per 128 px image (default model: width 256, 4 blocks, 256 tokens, patch 8), in FLOPs
(2 x multiply-adds of the linear, convolution and attention products): decoder transformer 1.88 G;
pixel-shuffle head 0.03 G; the `conv_upsample` branch (channels 128 -> 64 -> 32 -> 32, residual
blocks at 64 and 128 px) 1.54 G. `head_flops` computes them for any config.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import ViTVQConfig
from .layers import PositionCache, Rope2D, Transformer, init_weights


class ResBlock(nn.Module):
    """`x + conv(silu(conv(silu(x))))` with 3x3 convolutions; `[B, c, H, W]` -> same."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


def upsample_channels(config: ViTVQConfig) -> list[int]:
    """Channels of the `conv_upsample` branch at the token grid and after each doubling."""
    first = min(128, config.decoder_width)
    stages = int(math.log2(config.patch_size))
    return [max(32, first >> k) for k in range(stages + 1)]


class ConvUpsample(nn.Module):
    """Token features `[B, W, h, w]` -> pixels `[B, C, h*p, w*p]` through `log2(p)` 2x upsamplings."""

    def __init__(self, config: ViTVQConfig) -> None:
        super().__init__()
        ch = upsample_channels(config)
        self.proj = nn.Conv2d(config.decoder_width, ch[0], 3, padding=1)
        self.ups = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(ch, ch[1:], strict=False))
        n_res = min(2, len(self.ups))
        self.res = nn.ModuleList(ResBlock(c) for c in ch[len(ch) - n_res :])
        self.to_rgb = nn.Conv2d(ch[-1], config.in_channels, 3, padding=1)
        nn.init.zeros_(self.to_rgb.weight)
        nn.init.zeros_(self.to_rgb.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, c0, h, w)
        first_res = len(self.ups) - len(self.res)
        for i, up in enumerate(self.ups):
            x = F.silu(up(F.interpolate(x, scale_factor=2.0, mode="nearest")))  # (B, c_i+1, 2h, 2w)
            if i >= first_res:
                x = self.res[i - first_res](x)
        return self.to_rgb(F.silu(x))  # (B, C, H, W)


class Decoder(nn.Module):
    """Code vectors `[B, h*w, codebook_dim]` on a grid `(h, w)` -> normalised pixels `[B, C, h*p, w*p]`.

    Positions follow `config.position_embedding` (as in the encoder). The head is
    `config.decoder_head` (see the module docstring). State-dict keys of the
    `pixel_shuffle` head (`to_pixels`, `refine`) are the same in both heads; `conv_upsample`
    adds `upsample.*`.
    """

    def __init__(self, config: ViTVQConfig) -> None:
        super().__init__()
        self.config = config
        W, p, C = config.decoder_width, config.patch_size, config.in_channels
        self.from_code = nn.Linear(config.codebook_dim, W)
        self.rope = Rope2D(W // config.decoder_heads) if config.position_embedding == "rope2d" else None
        if self.rope is None:
            self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, W))
            self.positions = PositionCache()
        self.transformer = Transformer(W, config.decoder_depth, config.decoder_heads, config.mlp_ratio, config.layer_norm_eps)
        self.to_pixels = nn.Linear(W, p * p * C)
        self.refine = nn.Conv2d(C, C, 3, padding=1)
        init_weights(self)
        if self.rope is None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.zeros_(self.refine.weight)
        nn.init.zeros_(self.refine.bias)
        self.upsample = ConvUpsample(config) if config.decoder_head == "conv_upsample" else None

    def forward(self, codes: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """`codes` `[B, h*w, D]`, row-major on `grid = (h, w)` (default: the native square grid)."""
        p = self.config.patch_size
        gh, gw = grid if grid is not None else (self.config.grid_size, self.config.grid_size)
        x = self.from_code(codes)  # (B, h*w, W)
        if self.rope is None:
            x = x + self.positions(self.pos_embed, (gh, gw))
        rope = self.rope((gh, gw), device=x.device) if self.rope is not None else None
        h = self.transformer(x, rope)  # (B, h*w, W)
        x = self.to_pixels(h)  # (B, h*w, p*p*C)
        x = rearrange(x, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=gh, w=gw, p1=p, p2=p)  # (B, C, H, W)
        x = x + self.refine(x)
        if self.upsample is not None:
            x = x + self.upsample(rearrange(h, "b (h w) c -> b c h w", h=gh, w=gw))  # (B, C, H, W)
        return x


def head_flops(config: ViTVQConfig) -> dict[str, int]:
    """FLOPs (2 x multiply-adds) per image of the decoder transformer and of each head part.

    Returns `{"transformer", "pixel_shuffle", "conv_upsample"}`; `conv_upsample` is the branch
    only (0 for a `pixel_shuffle` config). Biases, norms and activations are not counted.
    """
    W, T, g, p, C = config.decoder_width, config.num_tokens, config.grid_size, config.patch_size, config.in_channels
    hidden = round(W * config.mlp_ratio)
    per_block = 2 * T * (4 * W * W + 2 * W * hidden) + 2 * 2 * T * T * W  # q,k,v,proj + MLP + QK^T and AV
    transformer = config.decoder_depth * per_block + 2 * T * config.codebook_dim * W
    shuffle = 2 * T * W * p * p * C + 2 * 9 * C * C * (g * p) ** 2
    branch = 0
    if config.decoder_head == "conv_upsample":
        ch, side = upsample_channels(config), g
        branch = 2 * 9 * W * ch[0] * side * side
        n_res = min(2, len(ch) - 1)
        for k, (a, b) in enumerate(zip(ch, ch[1:], strict=False)):
            side *= 2
            branch += 2 * 9 * a * b * side * side
            if k >= len(ch) - 1 - n_res:
                branch += 2 * 2 * 9 * b * b * side * side
        branch += 2 * 9 * ch[-1] * C * side * side
    return {"transformer": transformer, "pixel_shuffle": shuffle, "conv_upsample": branch}


__all__ = ["Decoder", "ConvUpsample", "ResBlock", "head_flops", "upsample_channels"]
