"""The whole model learns: the tiny preset over-fits 8 real photos to >= 25 dB within 400 Adam steps."""

import numpy as np
import torch
from conftest import photo_crops

from vit_vq import ViTVQConfig, ViTVQTokenizer


def psnr_float64(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) computed in numpy float64."""
    a64, b64 = a.double().numpy(), b.double().numpy()
    mse = ((a64 - b64) ** 2).reshape(len(a64), -1).mean(axis=1)
    return float(np.mean(10 * np.log10(1.0 / mse)))


def test_tiny_preset_overfits_eight_real_photos():
    torch.manual_seed(0)
    x = photo_crops(32, 8)
    tok = ViTVQTokenizer(ViTVQConfig.from_preset("tiny"))
    opt = torch.optim.Adam(tok.parameters(), lr=1e-3)
    tok.train()
    start = None
    for _ in range(400):
        out = tok(x)
        start = start if start is not None else psnr_float64(out.reconstruction.detach().clamp(0, 1), x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    tok.eval()
    rec = tok.decode(tok.encode(x))
    final = psnr_float64(rec, x)
    assert start < 15, start
    assert final >= 25.0, f"PSNR {final:.2f} dB after 400 steps (started at {start:.2f})"
    assert float(tok(x).metrics["usage"]) > 0.3
