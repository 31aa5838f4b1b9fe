"""Any resolution, any aspect ratio (issue 20): position encodings for any grid, the shape API, preprocess modes."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vit_vq import ViTVQConfig, ViTVQTokenizer
from vit_vq.layers import PositionCache, Rope2D, apply_rope, resample_pos_embed
from vit_vq.preprocess import budget_size, native_size

GRIDS = [(16, 24), (24, 16), (8, 64), (32, 32)]  # the grids; 32x32 is the tiny budget (1024) exactly
# sha256 of the int64 codes [6, 16, 16] of the bundled sample photos (preprocess -> encode), computed at
# commit 0ca2e1f, before position embeddings could be resampled: square-size codes must not change.
SQUARE_CODES_SHA256 = {
    "vit_vq:default": "0e65f884eace6a1a0d5f3612855f2ef758ad59c5f1a306bb57a98f4d190b66ff",
    "vit_vq:default-v1": "77927da07f08302a04db41ec79543a0e591514bc9b8df63da7ff311b943d98d9",
}


def tiny(**overrides) -> ViTVQTokenizer:
    torch.manual_seed(0)
    return ViTVQTokenizer(ViTVQConfig.from_preset("tiny", **overrides)).eval()


# -- learned positions ---------------------------------------------------------------------------
def test_native_grid_uses_the_stored_embedding_bitwise():
    tok = tiny()
    for part in (tok.encoder, tok.decoder):
        assert resample_pos_embed(part.pos_embed, (8, 8)) is part.pos_embed
        assert part.positions(part.pos_embed, (8, 8)) is part.pos_embed
    x = torch.rand(2, 3, 32, 32)
    patches = tok.encoder.patch_embed((x - 0.5) / 0.5).flatten(2).transpose(1, 2)  # the pre-issue-20 sum, by hand
    by_hand = tok.encoder.to_code(tok.encoder.transformer(patches + tok.encoder.pos_embed))
    assert torch.equal(tok.encoder((x - 0.5) / 0.5), by_hand)


@pytest.mark.parametrize("name", sorted(SQUARE_CODES_SHA256))
def test_bundled_models_square_codes_are_unchanged(name):
    from vit_vq.default_model import sample_photos

    tok = ViTVQTokenizer.from_pretrained(name)
    codes = tok.encode(tok.preprocess([Image.open(p) for p in sample_photos()]))
    assert codes.shape == (6, 16, 16)
    assert hashlib.sha256(codes.numpy().astype("int64").tobytes()).hexdigest() == SQUARE_CODES_SHA256[name]


def test_resampling_is_bicubic_in_float32_and_keeps_a_constant_field():
    pos = torch.randn(1, 64, 12)
    out = resample_pos_embed(pos, (5, 11))
    assert out.shape == (1, 55, 12)
    grid = pos.reshape(1, 8, 8, 12).permute(0, 3, 1, 2).double()  # an independent float64 resample
    ref = F.interpolate(grid, size=(5, 11), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 55, 12)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    flat = torch.full((1, 64, 4), 0.25)
    torch.testing.assert_close(resample_pos_embed(flat, (16, 3)), torch.full((1, 48, 4), 0.25))
    half = resample_pos_embed(pos.bfloat16(), (5, 11))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half, resample_pos_embed(pos.bfloat16().float(), (5, 11)).bfloat16(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="square grid, got 10 positions"):
        resample_pos_embed(torch.zeros(1, 10, 4), (2, 5))


def test_position_cache_reuses_and_invalidates():
    pos = torch.nn.Parameter(torch.randn(1, 64, 8))
    cache = PositionCache(size=2)
    with torch.no_grad():
        first = cache(pos, (4, 12))
        assert cache(pos, (4, 12)) is first  # cached
        pos.add_(1.0)  # an optimizer step or a load bumps the version counter
        second = cache(pos, (4, 12))
        assert second is not first
        torch.testing.assert_close(second, first + 1.0)
        cache(pos, (3, 3))
        cache(pos, (5, 5))  # evicts (4, 12): at most `size` grids
        assert cache(pos, (4, 12)) is not second
        other = torch.nn.Parameter(pos.detach().clone())
        assert cache(other, (4, 12)) is not cache(pos, (4, 12))  # another parameter never shares an entry
    grads = cache(pos, (4, 12))  # grad enabled and a trainable parameter: fresh, differentiable
    assert grads.requires_grad
    grads.sum().backward()
    assert pos.grad is not None and float(pos.grad.abs().sum()) > 0


def test_caches_stay_out_of_the_state_dict_and_follow_a_load():
    tok = tiny()
    keys = set(tok.state_dict())
    x = torch.rand(1, 3, 32, 48)
    before = tok.encode(x)  # fills the caches for the 8x12 grid
    assert set(tok.state_dict()) == keys and not any("position" in k or "rope" in k for k in keys)
    torch.manual_seed(1)
    other = ViTVQTokenizer(tok.config).eval()
    tok.load_state_dict(other.state_dict())  # new values in the same parameter objects
    after = tok.encode(x)
    assert torch.equal(after, other.encode(x)) and not torch.equal(after, before)


# -- 2D RoPE ---------------------------------------------------------------------------------------
def rope_reference(x: torch.Tensor, grid: tuple[int, int], base: float = 100.0) -> torch.Tensor:
    """float64, complex-number form: pair k of the first half turns by row * base**(-k/n), of the second by col."""
    h, w = grid
    hs = x.shape[-1]
    n = hs // 4
    freqs = base ** (-np.arange(n, dtype=np.float64) / n)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    theta = np.concatenate([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], axis=1)  # (T, hs/2)
    z = x.double().numpy().reshape(*x.shape[:-1], hs // 2, 2)
    z = (z[..., 0] + 1j * z[..., 1]) * np.exp(1j * theta)
    return torch.from_numpy(np.stack([z.real, z.imag], axis=-1).reshape(x.shape))


@pytest.mark.parametrize("grid", [(3, 5), (6, 2)])
def test_rope_matches_a_float64_reference(grid):
    rope = Rope2D(16)
    q = torch.randn(2, 4, grid[0] * grid[1], 16)
    out = apply_rope(q, *rope(grid))
    torch.testing.assert_close(out.double(), rope_reference(q, grid), rtol=0, atol=2e-5)
    cos, sin = rope(grid, prefix=1)
    assert cos.dtype == torch.float32 and torch.equal(cos[0], torch.ones(8)) and torch.equal(sin[0], torch.zeros(8))


def test_rope_scores_depend_only_on_offsets():
    h, w, hs = 6, 7, 16
    rope = Rope2D(hs)
    q, k = torch.randn(hs, dtype=torch.float64), torch.randn(hs, dtype=torch.float64)
    T = h * w
    qs = rope_reference(q.expand(T, hs).float(), (h, w))  # the same content at every position
    ks = rope_reference(k.expand(T, hs).float(), (h, w))
    cos, sin = rope((h, w))
    ours = apply_rope(q.float().expand(T, hs), cos, sin).double() @ apply_rope(k.float().expand(T, hs), cos, sin).double().T
    scores = qs @ ks.T  # (T, T)
    torch.testing.assert_close(ours, scores, rtol=0, atol=1e-4)
    by_offset: dict[tuple[int, int], list[float]] = {}
    for i in range(T):
        for j in range(T):
            offset = (i // w - j // w, i % w - j % w)
            by_offset.setdefault(offset, []).append(float(ours[i, j]))
    repeated = [v for v in by_offset.values() if len(v) > 1]
    assert len(repeated) > 50  # many offsets seen at several absolute positions: the check has teeth
    assert max(max(v) - min(v) for v in repeated) < 1e-4
    means = torch.tensor([sum(v) / len(v) for v in by_offset.values()])
    assert float(means.std()) > 0.1  # and the score does change with the offset


def test_rope_angles_stay_float32_under_autocast():
    rope = Rope2D(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, sin = rope((40, 3))
    assert cos.dtype == sin.dtype == torch.float32
    assert float(cos[-1, 0]) == pytest.approx(math.cos(39.0), abs=1e-6)


def test_rope_config_has_no_learned_positions_and_its_own_hash():
    learned, rope = ViTVQConfig.from_preset("tiny"), ViTVQConfig.from_preset("tiny", position_embedding="rope2d")
    assert learned.config_hash() != rope.config_hash()
    tok = ViTVQTokenizer(rope)
    assert not any("pos_embed" in k for k in tok.state_dict())
    with pytest.raises(ValueError, match="head width .* must be a multiple of 4"):
        ViTVQConfig.from_preset("tiny", position_embedding="rope2d", encoder_heads=8, encoder_width=48)
    with pytest.raises(ValueError, match="position_embedding must be one of"):
        ViTVQConfig.from_preset("tiny", position_embedding="sincos")


def test_new_fields_at_default_keep_every_hash():
    base = ViTVQConfig.from_preset("tiny")
    assert base.max_tokens is None and base.token_budget == 16 * 64
    assert ViTVQConfig.from_preset("tiny", max_tokens=100).config_hash() == base.config_hash()
    with pytest.raises(ValueError, match=r"max_tokens must be in \[num_tokens = 64, 65536\] .*, got 63"):
        ViTVQConfig.from_preset("tiny", max_tokens=63)


def test_rope_model_saves_and_loads(tmp_path):
    tok = tiny(position_embedding="rope2d")
    x = torch.rand(2, 3, 24, 40)
    tok.save_pretrained(tmp_path / "m")
    back = ViTVQTokenizer.from_pretrained(tmp_path / "m")
    assert back.config.position_embedding == "rope2d"
    assert torch.equal(back.encode(x), tok.encode(x))


# -- the shape API ----------------------------------------------------------------------------------
@pytest.mark.parametrize("position_embedding", ["learned", "rope2d"])
@pytest.mark.parametrize("head", ["pixel_shuffle", "conv_upsample"])
def test_encode_and_decode_at_any_grid(position_embedding, head):
    tok = tiny(position_embedding=position_embedding, decoder_head=head)
    for h, w in GRIDS:
        x = torch.rand(2, 3, 4 * h, 4 * w)
        codes = tok.encode(x)
        assert codes.shape == (2, h, w) and codes.dtype == torch.int64
        images = tok.decode(codes)
        assert images.shape == (2, 3, 4 * h, 4 * w)
        enc = tok.encode(x, return_latents=True)
        assert enc.latents.shape == (2, h, w, 8) and torch.equal(enc.indices, codes)
        torch.testing.assert_close(tok.decode_latents(tok.embed_codes(codes)).clamp(0, 1), images)


def test_a_batch_is_coded_like_its_images_one_by_one():
    tok = tiny()
    x = torch.rand(3, 3, 24, 56)
    codes = tok.encode(x)
    assert all(torch.equal(codes[i], tok.encode(x[i : i + 1])[0]) for i in range(3))


def test_lists_are_coded_in_shape_groups_in_input_order():
    tok = tiny(position_embedding="rope2d")
    shapes = [(32, 48), (32, 32), (48, 32), (32, 48), (8, 256)]
    images = [torch.rand(3, h, w) for h, w in shapes]
    images[1] = (images[1] * 255).to(torch.uint8)  # dtypes may differ too
    codes = tok.encode(images)
    assert [tuple(c.shape) for c in codes] == [(h // 4, w // 4) for h, w in shapes]
    for img, c in zip(images, codes, strict=True):
        assert torch.equal(c, tok.encode(img[None])[0])
    decoded = tok.decode(codes)
    assert [tuple(d.shape) for d in decoded] == [(3, h, w) for h, w in shapes]
    assert torch.equal(decoded[0], tok.decode(codes[0][None])[0])
    out = tok.encode(images[:2], return_latents=True)
    assert out[0].indices.shape == (8, 12) and out[0].latents.shape == (8, 12, 8)
    assert tok.encode([]) == [] and tok.decode([]) == []
    with pytest.raises(ValueError, match=r"each image in a list to be \[3, H, W\], got \(1, 3, 32, 48\) at position 1"):
        tok.encode([images[0], images[0][None]])
    with pytest.raises(ValueError, match=r"each code grid in a list to be \[h, w\], got \(64,\) at position 0"):
        tok.decode([codes[1].flatten()])


def test_over_budget_requests_are_one_line_errors():
    tok = ViTVQTokenizer(ViTVQConfig.from_preset("tiny", max_tokens=100)).eval()
    tok.encode(torch.rand(1, 3, 40, 40))  # 100 tokens: fits
    for call, arg in ((tok.encode, torch.rand(1, 3, 44, 40)), (tok.decode, torch.zeros(1, 11, 10, dtype=torch.long))):
        with pytest.raises(ValueError) as err:
            call(arg)
        message = str(err.value)
        assert "\n" not in message and "110 tokens" in message and "budget of 100 tokens" in message
    with pytest.raises(ValueError, match="budget of 100"):
        tok.decode_latents(torch.zeros(1, 11, 10, 8))


@pytest.mark.parametrize("position_embedding", ["learned", "rope2d"])
def test_training_forward_and_backward_at_a_wide_grid(position_embedding):
    tok = tiny(position_embedding=position_embedding).train()
    out = tok(torch.rand(2, 3, 24, 64))
    assert out.reconstruction.shape == (2, 3, 24, 64) and out.indices.shape == (2, 6, 16)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for n, p in tok.named_parameters() if n.startswith(("encoder.transformer", "decoder.transformer"))]
    assert all(g is not None for g in grads)
    if position_embedding == "learned":
        assert float(tok.encoder.pos_embed.grad.abs().sum()) > 0 and float(tok.decoder.pos_embed.grad.abs().sum()) > 0


# -- preprocess ---------------------------------------------------------------------------------------
def test_native_and_budget_sizes():
    assert native_size(200, 300, 32, 4) == (32, 48)  # 2:3 landscape, short side 32
    assert native_size(1080, 1920, 128, 8) == (128, 224)  # 227.6 rounds to 224
    assert native_size(1920, 1080, 128, 8) == (224, 128)
    assert native_size(100, 100, 30, 4) == (32, 32)  # the short side itself rounds to the patch
    for h, w, budget in [(1080, 1920, 4096), (1920, 1080, 1024), (100, 3000, 256), (640, 480, 100), (7, 7, 64)]:
        H, W = budget_size(h, w, budget, 8)
        tokens = (H // 8) * (W // 8)
        assert H % 8 == 0 and W % 8 == 0 and tokens <= budget, (h, w, budget)
        bigger = budget_size(h, w, tokens + 1, 8)
        short = min(H, W) // 8  # one more short-side token must overshoot the budget
        long_next = math.floor((short + 1) * max(h, w) / min(h, w) + 0.5)
        assert (short + 1) * long_next > budget and bigger[0] * bigger[1] >= H * W
        assert abs(math.log((W / H) / (w / h))) < math.log(1 + 1 / min(H // 8, W // 8)) + 1e-9  # aspect kept to a patch


def test_preprocess_modes():
    tok = tiny()
    wide = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))
    assert tok.preprocess([wide, tall]).shape == (2, 3, 32, 32)  # "crop" stays the default
    native = tok.preprocess([wide, tall], "native")
    assert isinstance(native, list) and [tuple(t.shape) for t in native] == [(3, 32, 48), (3, 48, 32)]
    assert tok.preprocess([wide, wide], resize="native", short_side=64).shape == (2, 3, 64, 96)
    budget = tok.preprocess(wide, max_tokens=96)  # max_tokens alone means resize="budget"
    assert budget.shape == (1, 3, 32, 48)
    assert tok.preprocess(wide, "budget").shape == (1, 3, 104, 156)  # 26 x 39 = 1014 tokens <= 1024
    assert all(c.shape == (8, 12) for c in tok.encode(native[:1]))
    ref = F.interpolate(torch.from_numpy(wide).permute(2, 0, 1)[None].float() / 255, size=(32, 48), mode="bicubic",
                        antialias=True).clamp(0, 1)[0]  # fmt: skip
    torch.testing.assert_close(native[0], ref)
    with pytest.raises(ValueError, match="short_side goes with resize='crop' or 'native'"):
        tok.preprocess(wide, "budget", short_side=64)
    with pytest.raises(ValueError, match="max_tokens goes with resize='budget'"):
        tok.preprocess(wide, "native", max_tokens=64)
    with pytest.raises(ValueError, match="resize must be 'crop', 'native' or 'budget'"):
        tok.preprocess(wide, "stretch")
    with pytest.raises(ValueError, match="short_side must be a positive int"):
        tok.preprocess(wide, "native", short_side=0)


@pytest.mark.parametrize("position_embedding", ["learned", "rope2d"])
def test_position_encodings_trace_under_torch_compile(position_embedding):
    tok = tiny(position_embedding=position_embedding)
    x, z = torch.rand(2, 3, 32, 48), torch.randn(2, 96, 8)
    encoder = torch.compile(tok.encoder, backend="eager", fullgraph=True)  # no graph break in the caches
    decoder = torch.compile(tok.decoder, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), tok.encoder(x))
        torch.testing.assert_close(decoder(z, (8, 12)), tok.decoder(z, (8, 12)))
