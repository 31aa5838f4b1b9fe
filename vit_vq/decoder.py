"""ViT decoder: code vectors -> transformer -> upsampling head -> pixels."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .config import ViTVQConfig
from .layers import Transformer, init_weights


class Decoder(nn.Module):
    """Code vectors `[B, h*w, codebook_dim]` -> normalised pixels `[B, C, H, W]`.

    The head maps every token to a `patch x patch` pixel block (a learned pixel
    shuffle), then a 3x3 convolution smooths the seams between blocks.
    """

    def __init__(self, config: ViTVQConfig) -> None:
        super().__init__()
        self.config = config
        W, p, C = config.decoder_width, config.patch_size, config.in_channels
        self.from_code = nn.Linear(config.codebook_dim, W)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, W))
        self.transformer = Transformer(W, config.decoder_depth, config.decoder_heads, config.mlp_ratio, config.layer_norm_eps)
        self.to_pixels = nn.Linear(W, p * p * C)
        self.refine = nn.Conv2d(C, C, 3, padding=1)
        init_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.zeros_(self.refine.weight)
        nn.init.zeros_(self.refine.bias)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        g, p = self.config.grid_size, self.config.patch_size
        x = self.transformer(self.from_code(codes) + self.pos_embed)  # (B, h*w, W)
        x = self.to_pixels(x)  # (B, h*w, p*p*C)
        x = rearrange(x, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=g, w=g, p1=p, p2=p)  # (B, C, H, W)
        return x + self.refine(x)
