"""VectorQuantizer on its own (keyword settings) and the rotation-trick gradient."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import photo_crops
from torch import nn

from vit_vq import VectorQuantizer, ViTVQConfig
from vit_vq.quantizer import QuantizerConfig, rotation_trick

SETTINGS = [
    dict(l2_normalize=False, use_ema=True, quantizer_gradient="ste"),
    dict(l2_normalize=True, use_ema=False, quantizer_gradient="rotation", dead_code_threshold=0.5),
    dict(l2_normalize=True, use_ema=True, kmeans_init=True, kmeans_iters=3, ema_decay=0.9, quantizer_gradient="ste"),
]


@pytest.mark.parametrize("kw", SETTINGS, ids=["l2_ema", "cosine_learnable_rotation", "cosine_kmeans"])
def test_keyword_and_config_constructions_are_bitwise_identical(kw):
    torch.manual_seed(0)
    by_kw = VectorQuantizer(codebook_dim=8, codebook_size=64, **kw).train()
    torch.manual_seed(0)
    config = ViTVQConfig.from_preset("tiny", codebook_size=64, codebook_dim=8, **kw)
    by_config = VectorQuantizer(config).train()
    assert by_kw.config == by_config.config
    gen = torch.Generator().manual_seed(1)
    for step in range(4):  # restarts, k-means and EMA all run in these steps
        z = torch.randn(2, 40, 8, generator=gen)  # [B, N, D]
        z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
        torch.manual_seed(step)
        a = by_kw(z1)
        torch.manual_seed(step)
        b = by_config(z2)
        assert torch.equal(a.quantized, b.quantized) and torch.equal(a.indices, b.indices)
        (a.quantized.square().sum() + a.commit_loss + a.codebook_loss).backward()
        (b.quantized.square().sum() + b.commit_loss + b.codebook_loss).backward()
        assert torch.equal(z1.grad, z2.grad)
    for (name, x), (name2, y) in zip(by_kw.state_dict().items(), by_config.state_dict().items(), strict=True):
        assert name == name2 and torch.equal(x, y), name
    assert torch.equal(by_kw.restart_pool, by_config.restart_pool)


def test_defaults_are_the_tokenizer_configs():
    tokenizer_defaults = {f.name: f.default for f in dataclasses.fields(ViTVQConfig)}
    for f in dataclasses.fields(QuantizerConfig):
        if f.default is not dataclasses.MISSING:
            assert f.default == tokenizer_defaults[f.name], f.name


def test_own_encoder_on_real_photos_trains_with_backward():
    """A user's conv encoder -> [B, N, D] latents -> the quantizer -> a loss; gradients reach the encoder."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(2))  # (B, 8, N)
    decoder = nn.Linear(8, 48)
    vq = VectorQuantizer(codebook_dim=8, codebook_size=32, l2_normalize=False)
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-2)
    x = photo_crops(16, 8)  # (B, 3, 16, 16) real photos
    target = F.unfold(x, 4, stride=4).transpose(1, 2)  # (B, N, 48) patches
    losses = []
    for _ in range(30):
        z = encoder(x).transpose(1, 2)  # (B, N, D)
        out = vq(z)
        assert out.quantized.shape == z.shape and out.indices.shape == z.shape[:2]
        loss = F.mse_loss(decoder(out.quantized), target) + out.commit_loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())
        assert float(encoder[0].weight.grad.abs().sum()) > 0
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((), {}, TypeError, "codebook_dim= and codebook_size="),
        ((), {"codebook_dim": 8}, TypeError, "codebook_size"),
        ((ViTVQConfig.from_preset("tiny"),), {"codebook_dim": 8}, TypeError, "not both"),
        ((ViTVQConfig.from_preset("tiny"),), {"l2_normalize": False}, TypeError, "not both"),
        ((8,), {}, TypeError, "expects a ViTVQConfig"),
        ((), {"codebook_dim": 8, "codebook_size": 16, "l2_normalize": "l2"}, ValueError, "l2_normalize"),
        ((), {"codebook_dim": 8, "codebook_size": 16, "ema_decay": 1.0}, ValueError, "ema_decay"),
        ((), {"codebook_dim": 8, "codebook_size": 0}, ValueError, "codebook_size"),
        ((), {"codebook_dim": 8, "codebook_size": 16, "quantizer_gradient": "gumbel"}, ValueError, "quantizer_gradient"),
        ((), {"codebook_dim": 8, "codebook_size": 16, "ema_eps": 1e300}, ValueError, "ema_eps must be in"),
        ((), {"codebook_dim": 8, "codebook_size": 16, "commitment_beta": -1.0}, ValueError, "commitment_beta must be in"),
        ((), {"codebook_dim": 8, "codebook_size": 2**30}, ValueError, r"codebook_size must be <= \d+ \(vit_vq.config.MAX"),
        ((), {"codebook_dim": 8, "codebook_size": 16, "dead_code_threshold": 2.0}, ValueError, "under dead_code_rule 'relative'"),
    ],
)
def test_bad_constructions_raise(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        VectorQuantizer(*args, **kwargs)


def test_wrong_latent_width_raises():
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        VectorQuantizer(codebook_dim=8, codebook_size=16)(torch.randn(2, 5, 4))


def test_config_json_without_the_new_fields_loads_with_the_old_behaviour():
    data = ViTVQConfig.from_preset("tiny").to_dict()
    del data["quantizer_gradient"], data["dead_code_rule"]
    config = ViTVQConfig.from_dict(data)
    assert (config.quantizer_gradient, config.dead_code_rule) == ("ste", "relative")
    old_hash = config.config_hash()
    assert old_hash == ViTVQConfig.from_preset("tiny", quantizer_gradient="rotation").config_hash()
    assert old_hash != ViTVQConfig.from_preset("tiny", dead_code_rule="absolute").config_hash()


def test_dead_code_rules_against_hand_counts():
    relative = VectorQuantizer(codebook_dim=2, codebook_size=4, dead_code_threshold=0.5)
    absolute = VectorQuantizer(codebook_dim=2, codebook_size=4, dead_code_threshold=0.5, dead_code_rule="absolute")
    usage = torch.tensor([0.1, 0.3, 0.6, 3.0])  # mean 1.0
    for q in (relative, absolute):
        q.ema_count.copy_(usage)
    assert relative.dead_mask().tolist() == [True, True, False, False]  # below 0.5 * mean = 0.5
    absolute.ema_count.mul_(4)  # mean 4: the relative cut would be 2.0, the absolute one stays 0.5
    assert absolute.dead_mask().tolist() == [True, False, False, False]


# -- the rotation trick --------------------------------------------------------------------
def _rodrigues(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float64 `[D, D]`: the rotation in span(u, v) taking unit u to unit v, built another way."""
    c = float(u @ v)
    k = torch.outer(v, u) - torch.outer(u, v)
    return torch.eye(len(u), dtype=torch.float64) + k + k @ k / (1 + c)


@pytest.mark.parametrize("dim", [2, 8, 33])
def test_rotation_trick_gradient_matches_a_float64_reference(dim):
    gen = torch.Generator().manual_seed(dim)
    z = torch.randn(50, dim, generator=gen) * torch.rand(50, 1, generator=gen) * 3
    q = torch.randn(50, dim, generator=gen)
    g = torch.randn(50, dim, generator=gen)
    zr = z.clone().requires_grad_()
    out = rotation_trick(zr, q)
    assert torch.equal(out, q)  # forward values are exactly the codes
    (grad,) = torch.autograd.grad(out, zr, g)
    for i in range(50):
        z64, q64 = z[i].double(), q[i].double()
        rot = _rodrigues(z64 / z64.norm(), q64 / q64.norm())
        s = q64.norm() / z64.norm()
        torch.testing.assert_close(s * rot @ z64, q64)  # the reference maps z to q
        expected = s * rot.T @ g[i].double()
        torch.testing.assert_close(grad[i].double(), expected, rtol=1e-5, atol=1e-5)


def test_rotation_quantizer_keeps_forward_values_and_changes_only_the_gradient():
    torch.manual_seed(0)
    ste = VectorQuantizer(codebook_dim=6, codebook_size=32, l2_normalize=False, use_ema=False).train()
    rot = VectorQuantizer(
        codebook_dim=6, codebook_size=32, l2_normalize=False, use_ema=False, quantizer_gradient="rotation"
    ).train()
    rot.load_state_dict(ste.state_dict())
    z = torch.randn(3, 20, 6)
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    a, b = ste(za), rot(zb)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.quantized, b.quantized, rtol=0, atol=1e-6)
    assert torch.equal(b.quantized, F.embedding(b.indices, rot.codebook()))
    g = torch.randn_like(z)
    (ga,) = torch.autograd.grad(a.quantized, za, g)
    (gb,) = torch.autograd.grad(b.quantized, zb, g)
    torch.testing.assert_close(ga, g)  # straight-through
    assert not torch.allclose(gb, g)
