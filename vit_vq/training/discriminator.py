"""Patch discriminator, hinge losses and the adaptive adversarial weight (VQGAN recipe).

The discriminator is the PatchGAN of Isola et al. (2017) as used by VQGAN, with GroupNorm in
place of BatchNorm: it holds no running statistics, so it behaves the same in train and eval
mode and has no buffers to keep in sync across ranks, and real and fake images can share one
forward pass (which DDP needs: one forward per backward).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """Images float `[B, 3, H, W]` in [0, 1] -> patch logits `[B, 1, h, w]`.

    Args:
        channels: width of the first layer; doubled per strided layer up to 8x.
        layers: strided (stride-2) layers; the receptive field grows with each.
        in_channels: image channels.
    """

    def __init__(self, channels: int = 64, layers: int = 3, in_channels: int = 3) -> None:
        super().__init__()
        if channels < 1 or layers < 1:
            raise ValueError(f"channels and layers must be >= 1, got {channels} and {layers}")
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(width, out, 4, stride, 1, bias=False), _group_norm(out), nn.LeakyReLU(0.2)]
            width = out
        seq.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got {tuple(images.shape)}")
        return self.net(images * 2 - 1)  # (B, 1, h, w)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)  # any width: the group count divides it


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """`0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(G(z)))))`, in float32."""
    return 0.5 * (F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """`-mean(D(G(z)))`, in float32."""
    return -fake_logits.float().mean()


def adaptive_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, *, max_weight: float = 1e4
) -> torch.Tensor:
    """`||grad nll|| / (||grad g_loss|| + 1e-4)` at `last_layer`, clamped to `[0, max_weight]`, detached.

    Balances the GAN gradient against the reconstruction gradient at the decoder's output layer
    (Esser et al. 2021). Both graphs are kept for the backward pass that follows.
    """
    (nll_grad,) = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return torch.nan_to_num(weight, nan=0.0, posinf=max_weight).clamp(0.0, max_weight).detach()


__all__ = ["PatchDiscriminator", "hinge_d_loss", "hinge_g_loss", "adaptive_weight"]
