import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vit_vq import VectorQuantizer, ViTVQConfig, ViTVQTokenizer


def make(auto_update=False, **overrides):
    base = dict(codebook_size=32, codebook_dim=4, l2_normalize=False)
    return VectorQuantizer(ViTVQConfig.from_preset("tiny", **{**base, **overrides}), auto_update=auto_update).train()


def test_ema_codebook_moves_without_an_optimizer_and_is_not_a_parameter():
    torch.manual_seed(0)
    tok = ViTVQTokenizer(ViTVQConfig.from_preset("tiny")).train()
    params = dict(tok.named_parameters())
    buffers = dict(tok.named_buffers())
    assert not any(name.startswith("quantizer.") for name in params)
    for name in ("quantizer.embed", "quantizer.ema_count", "quantizer.ema_sum"):
        assert name in buffers
    opt = torch.optim.Adam(tok.parameters())
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert not held & {id(b) for b in tok.quantizer.buffers()}
    before = tok.quantizer.embed.clone()
    tok(torch.rand(4, 3, 32, 32))  # auto_update applies the EMA; no optimizer step
    assert not torch.equal(before, tok.quantizer.embed)


def test_learnable_codebook_is_a_parameter_when_ema_is_off():
    q = make(use_ema=False)
    assert "embed" in dict(q.named_parameters())


def test_ema_update_matches_a_float64_reference():
    q = make(ema_decay=0.9, l2_normalize=True)
    z = torch.randn(50, 4)
    q(z)
    idx = q.acc_count.clone(), q.acc_sum.clone()
    counts, sums = (t.double() for t in idx)
    cfg = q.config
    ema_count = 0.1 * counts
    ema_sum = 0.1 * sums
    n = ema_count.sum()
    smoothed = (ema_count + cfg.ema_eps) / (n + cfg.codebook_size * cfg.ema_eps) * n
    expected = F.normalize(ema_sum / smoothed[:, None], dim=1)
    used = counts > 0
    torch.manual_seed(0)
    q.update_codebook()
    torch.testing.assert_close(q.embed[used].double(), expected[used], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.ema_count[used].double(), ema_count[used])


def test_dead_codes_are_restarted_from_recent_encoder_outputs():
    torch.manual_seed(0)
    q = make()
    z = torch.randn(64, 4) * 0.1 + 10.0  # far from every initial code: a few codes win
    out = q(z)
    used_before = int(out.indices.unique().numel())
    assert used_before < q.config.codebook_size // 2
    dead = q.acc_count == 0
    q.update_codebook()
    assert not bool(q.dead_mask().any())
    # every revived code is one of the encoder outputs it saw
    revived = q.embed[dead]
    dist = torch.cdist(revived.double(), z.double())
    assert float(dist.min(dim=1).values.max()) < 1e-6
    used_after = int(q(z).indices.unique().numel())
    assert used_after > 2 * used_before


def test_accumulating_forwards_then_one_update_equals_one_big_batch():
    torch.manual_seed(0)
    q1 = make(ema_decay=0.8)
    q2 = copy.deepcopy(q1)
    z1, z2 = torch.randn(40, 4), torch.randn(24, 4)
    q1(z1)
    q1(z2)
    q2(torch.cat([z1, z2]))
    torch.manual_seed(1)
    q1.update_codebook()
    torch.manual_seed(1)
    q2.update_codebook()
    for name in ("embed", "ema_count", "ema_sum"):
        torch.testing.assert_close(getattr(q1, name), getattr(q2, name), rtol=1e-6, atol=1e-6)


def test_auto_update_off_leaves_the_codebook_until_update_codebook():
    q = make()
    before = q.embed.clone()
    q(torch.randn(16, 4))
    assert torch.equal(before, q.embed)
    q.update_codebook()
    assert not torch.equal(before, q.embed)


def test_eval_mode_accumulates_nothing():
    q = make(auto_update=True).eval()
    state = {k: v.clone() for k, v in q.state_dict().items()}
    q(torch.randn(16, 4))
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in state.items())
    assert float(q.acc_count.sum()) == 0


def test_losses_and_straight_through_gradients():
    q = make(use_ema=False, commitment_beta=0.25, quantizer_gradient="ste")
    z = torch.randn(10, 4, requires_grad=True)
    out = q(z)
    e = q.embed.detach()[out.indices]
    zd = z.detach().double()
    torch.testing.assert_close(out.codebook_loss.double(), ((e.double() - zd) ** 2).mean())
    torch.testing.assert_close(out.commit_loss.double(), 0.25 * ((zd - e.double()) ** 2).mean())
    # codebook term moves only the codebook; commitment only the encoder output
    (gz,) = torch.autograd.grad(out.codebook_loss, z, retain_graph=True, allow_unused=True)
    assert gz is None or float(gz.abs().sum()) == 0
    (ge,) = torch.autograd.grad(out.codebook_loss, q.embed, retain_graph=True)
    assert float(ge.abs().sum()) > 0
    (ge2,) = torch.autograd.grad(out.commit_loss, q.embed, retain_graph=True, allow_unused=True)
    assert ge2 is None or float(ge2.abs().sum()) == 0
    # straight-through: d(sum(w * quantized)) / dz == w
    w = torch.randn(10, 4)
    (gst,) = torch.autograd.grad((w * out.quantized).sum(), z)
    torch.testing.assert_close(gst, w)


def test_codebook_math_is_fp32_under_bf16_autocast():
    q = make()
    z = torch.randn(20, 4)
    ref = q(z).indices
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
    assert out.quantized.dtype == torch.float32 and out.commit_loss.dtype == torch.float32
    assert torch.equal(out.indices, ref)


def test_metrics_match_an_independent_computation():
    q = make(codebook_size=16)
    out = q(torch.randn(200, 4))
    idx = out.indices.numpy()
    p = np.bincount(idx, minlength=16) / idx.size
    nz = p[p > 0]
    assert float(out.metrics["perplexity"]) == pytest.approx(np.exp(-(nz * np.log(nz)).sum()), rel=1e-5)
    assert float(out.metrics["usage"]) == pytest.approx(len(np.unique(idx)) / 16)


def test_kmeans_init_waits_for_enough_vectors_and_survives_reload():
    torch.manual_seed(0)
    q = make(auto_update=True, kmeans_init=True, codebook_size=64, l2_normalize=True, use_ema=False)
    batches = [torch.randn(16, 4) for _ in range(4)]
    for b in batches[:3]:
        q(b)  # 48 < 64 vectors: not yet
        assert not bool(q.initialized)
    q(batches[3])
    assert bool(q.initialized)
    # with exactly K samples every sample is its own center
    samples = F.normalize(torch.cat(batches), dim=1)
    dist = torch.cdist(q.embed.detach().double(), samples.double())
    assert float(dist.min(dim=1).values.max()) < 1e-5
    fresh = make(auto_update=True, kmeans_init=True, codebook_size=64, l2_normalize=True, use_ema=False)
    fresh.load_state_dict(q.state_dict())
    assert bool(fresh.initialized)
    fresh(torch.randn(100, 4))
    assert fresh._kmeans_samples == []


def test_kmeans_init_is_not_blurred_by_stale_statistics():
    """The step that runs k-means must leave the fresh centers in place (EMA mode)."""
    torch.manual_seed(0)
    q = make(auto_update=True, kmeans_init=True, codebook_size=64, l2_normalize=True, use_ema=True)
    samples = torch.randn(64, 4)
    q(samples)
    assert bool(q.initialized)
    dist = torch.cdist(q.embed.double(), F.normalize(samples, dim=1).double())
    assert float(dist.min(dim=1).values.max()) < 1e-5


@pytest.mark.parametrize("use_ema", [True, False])
def test_half_cast_keeps_codebook_values_in_fp32(use_ema):
    q = make(use_ema=use_ema)
    before = q.embed.detach().clone()
    q.half()
    assert q.embed.dtype == torch.float32 and torch.equal(q.embed.detach(), before)


def test_restarts_draw_distinct_encoder_outputs():
    """A pool of >= K distinct latents: after the first update every code is distinct (issue 14)."""
    torch.manual_seed(0)
    q = VectorQuantizer(ViTVQConfig.from_preset("tiny")).train()  # 256 codes, EMA, auto_update
    z = torch.randn(1024, 8) * 0.1 + 1.0  # 16 images' worth of distinct latents, bunched together
    out = q(z)
    assert out.indices.unique().numel() < 64  # most codes die: ~200 restarts from 1024 latents
    assert q.embed.unique(dim=0).shape[0] == 256
    used_before = out.indices.unique().numel()
    assert q(z).indices.unique().numel() > used_before


def test_a_pool_smaller_than_the_dead_codes_gives_distinct_noisy_copies():
    torch.manual_seed(0)
    q = VectorQuantizer(ViTVQConfig.from_preset("tiny", l2_normalize=False), restart_pool_size=100).train()
    z = torch.randn(100, 8) * 0.1 + 5.0  # far from every initial code: almost all codes die
    q(z)
    assert q.embed.unique(dim=0).shape[0] == 256
    dead_restarted = torch.cdist(q.embed.double(), z.double()).min(dim=1).values
    scale = float(z.square().mean().sqrt())
    assert int((dead_restarted == 0).sum()) >= 90  # (almost) every pool vector used once, exactly
    assert float(dead_restarted.max()) < 0.1 * scale * 8**0.5  # the rest: close noisy copies


@pytest.mark.parametrize("trigger", ["restart", "kmeans"])
def test_forward_updates_never_change_what_the_backward_needs(trigger):
    """Learnable, l2-normalised codebook with auto_update: gradients equal those of a quantizer
    whose update runs only after the backward."""
    torch.manual_seed(0)
    extra = dict(kmeans_init=True, codebook_size=16) if trigger == "kmeans" else dict(dead_code_threshold=0.9)
    live = make(auto_update=True, use_ema=False, l2_normalize=True, **extra)
    deferred = copy.deepcopy(live)
    deferred.auto_update = False
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(64, 4, generator=gen) * torch.linspace(0.2, 3, 64)[:, None]  # uneven code usage
    before = live.embed.detach().clone()
    out_live = live(z)
    out_deferred = deferred(z)
    assert not torch.equal(before, live.embed.detach())  # the forward did write the codebook
    w = torch.randn(64, 4, generator=gen)
    for out in (out_live, out_deferred):
        (out.codebook_loss + (w * out.quantized).sum()).backward()
    used = torch.zeros(live.config.codebook_size, dtype=torch.bool)
    used[out_live.indices] = True
    changed = (before != live.embed.detach()).any(dim=1)
    assert (used & changed).any()  # a code this batch used was rewritten: its gradient is at stake
    assert torch.equal(live.embed.grad, deferred.embed.grad)


def test_updating_between_forward_and_backward_is_caught_by_autograd():
    torch.manual_seed(0)
    q = make(use_ema=False, l2_normalize=True, dead_code_threshold=0.9)
    out = q(torch.randn(64, 4) * torch.linspace(0.2, 3, 64)[:, None])
    q.update_codebook()  # restarts write the parameter that normalize saved
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.codebook_loss.backward()


@pytest.mark.parametrize("settings", [dict(use_ema=True), dict(use_ema=False), dict(kmeans_init=True)])
def test_eval_forward_leaves_every_buffer_and_parameter_bitwise_equal(settings):
    q = make(auto_update=True, **settings)
    q(torch.randn(16, 4))  # some state first (k-means samples, pool, EMA)
    q.eval()
    state = {name: t.detach().clone() for name, t in [*q.named_buffers(), *q.named_parameters()]}
    samples = [s.clone() for s in q._kmeans_samples]
    z = torch.randn(3, 40, 4, requires_grad=True)
    q(z).quantized.sum().backward()
    q.lookup(q.prepare(z.detach()))
    q.update_codebook()  # nothing accumulated in eval: a no-op
    for name, t in [*q.named_buffers(), *q.named_parameters()]:
        assert torch.equal(t.detach(), state[name]), name
    assert len(q._kmeans_samples) == len(samples)
    assert all(torch.equal(a, b) for a, b in zip(q._kmeans_samples, samples, strict=True))
