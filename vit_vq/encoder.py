"""ViT encoder: pixels -> patch tokens -> transformer -> projection to the code space."""

from __future__ import annotations

import torch
from torch import nn

from .config import ViTVQConfig
from .layers import PositionCache, Rope2D, Transformer, init_weights


class Encoder(nn.Module):
    """`[B, C, H, W]` normalised pixels (`H`, `W` multiples of the patch) -> latents `[B, h*w, codebook_dim]`.

    Positions follow `config.position_embedding`: learned embeddings on the native grid (resampled
    to other grids, cached per grid), or 2D RoPE in every attention layer. With
    `config.encoder_cls_token` a CLS token is prepended (as in Hugging Face ViT checkpoints) and
    dropped after the transformer.
    """

    def __init__(self, config: ViTVQConfig) -> None:
        super().__init__()
        self.config = config
        W = config.encoder_width
        self.patch_embed = nn.Conv2d(config.in_channels, W, config.patch_size, stride=config.patch_size)
        self.rope = Rope2D(W // config.encoder_heads) if config.position_embedding == "rope2d" else None
        if self.rope is None:
            self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, W))
            self.positions = PositionCache()
        if config.encoder_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, W))
            if self.rope is None:
                self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, W))
        self.transformer = Transformer(W, config.encoder_depth, config.encoder_heads, config.mlp_ratio, config.layer_norm_eps)
        self.to_code = nn.Linear(W, config.codebook_dim)
        init_weights(self)
        if self.rope is None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Transformer output before the code projection: `[B, (1+) h*w, width]`."""
        x = self.patch_embed(pixels)  # (B, W, h, w)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, W)
        if self.rope is None:
            x = x + self.positions(self.pos_embed, grid)  # (B, h*w, W)
        cls = self.config.encoder_cls_token
        if cls:
            token = self.cls_token if self.rope is not None else self.cls_token + self.cls_pos_embed
            x = torch.cat([token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+h*w, W)
        rope = self.rope(grid, prefix=int(cls), device=x.device) if self.rope is not None else None
        return self.transformer(x, rope)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.features(pixels)
        if self.config.encoder_cls_token:
            x = x[:, 1:]  # (B, h*w, W)
        return self.to_code(x)  # (B, h*w, D)
