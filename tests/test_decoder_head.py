"""The decoder head option: the old head decodes bit-for-bit as before, the new one sees neighbouring tokens."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import photo_crops
from einops import rearrange
from torch.utils.flop_counter import FlopCounterMode

from vit_vq import ViTVQConfig, ViTVQTokenizer
from vit_vq.decoder import ConvUpsample, Decoder, head_flops
from vit_vq.default_model import bundled_model_dir, bundled_name_for, default_model_dir
from vit_vq.fingerprint import decoder_hash

# ViTVQConfig.config_hash() of the 0.1 default (bundled as vit_vq:default-v1) and of the tiny preset,
# computed before the decoder_head field existed: codes files record it and `vit-vq decode` checks it.
HASH_BEFORE = {"default": "86fd93c4e8075ac7", "tiny": "cf6d8e1603914702"}
# sha256 of the 0.1 default's model.safetensors as it shipped in vit_vq 0.1 (assets/default/ then).
V1_WEIGHTS_SHA256 = "d6c067492202f97453f8fdba4b60e70f1c45a9715f2f392fcb44238ca7c47a5d"


def old_decoder_forward(dec: Decoder, codes: torch.Tensor) -> torch.Tensor:
    """The decoder's forward as it was before `decoder_head` existed, verbatim."""
    g, p = dec.config.grid_size, dec.config.patch_size
    x = dec.transformer(dec.from_code(codes) + dec.pos_embed)
    x = dec.to_pixels(x)
    x = rearrange(x, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=g, w=g, p1=p, p2=p)
    return x + dec.refine(x)


def tiny(**overrides) -> ViTVQConfig:
    return ViTVQConfig.from_preset("tiny", **overrides)


def test_the_01_default_is_still_bundled_byte_for_byte_and_loads_as_pixel_shuffle():
    import hashlib

    folder = bundled_model_dir("default-v1")
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == V1_WEIGHTS_SHA256
    raw = json.loads((folder / "config.json").read_text())
    assert "decoder_head" not in raw  # the file as shipped before the field existed
    tok = ViTVQTokenizer.from_pretrained("vit_vq:default-v1")
    assert tok.config.decoder_head == "pixel_shuffle"
    assert tok.decoder.upsample is None
    assert not any(k.startswith("decoder.upsample") for k in tok.state_dict())
    assert tok.config.config_hash() == HASH_BEFORE["default"]
    assert tiny().config_hash() == HASH_BEFORE["tiny"]
    assert tiny(decoder_head="conv_upsample").config_hash() != HASH_BEFORE["tiny"]


def test_the_shipped_default_is_v2_with_the_seamless_head_and_its_own_config_hash():
    tok = ViTVQTokenizer.default()
    assert tok.config.decoder_head == "conv_upsample" and tok.config.quantizer_gradient == "rotation"
    assert tok.decoder.upsample is not None
    assert tok.config.config_hash() != HASH_BEFORE["default"]
    assert bundled_name_for(tok.config.config_hash()) == "vit_vq:default"
    assert bundled_name_for(HASH_BEFORE["default"]) == "vit_vq:default-v1"
    assert bundled_name_for("0" * 16) is None
    v1 = ViTVQTokenizer.from_pretrained("vit_vq:default-v1")
    assert bundled_name_for(HASH_BEFORE["default"], decoder_hash(v1)) == "vit_vq:default-v1"
    with torch.no_grad():
        v1.decoder.refine.bias.add_(1e-3)  # a fine-tune of v1: same config, other decoder weights
    assert bundled_name_for(HASH_BEFORE["default"], decoder_hash(v1)) is None
    assert default_model_dir() == bundled_model_dir("default")


@torch.no_grad()
def test_the_01_default_decodes_bit_for_bit_as_the_old_head():
    tok = ViTVQTokenizer.from_pretrained("vit_vq:default-v1")
    codes = torch.randint(0, tok.config.codebook_size, (3, 16, 16), generator=torch.Generator().manual_seed(0))
    vectors = tok.embed_codes(codes).flatten(1, 2)  # (B, h*w, D)
    expected = (old_decoder_forward(tok.decoder, vectors).float() * tok.pixel_std + tok.pixel_mean).clamp(0, 1)
    got = tok.decode(codes)
    assert torch.equal(got, expected)
    assert 0.05 < got.std() and got.min() < got.max()


@torch.no_grad()
def test_a_checkpoint_written_before_the_field_existed_decodes_as_before(tmp_path):
    """A config.json without `decoder_head` (as every old checkpoint has) loads as the old head."""
    torch.manual_seed(0)
    tok = ViTVQTokenizer(tiny()).eval()
    torch.nn.init.normal_(tok.decoder.refine.weight, std=0.1)  # not at its zero init
    tok.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["decoder_head"]
    raw.pop("quantizer_gradient", None)  # another field added later than the old checkpoints
    (tmp_path / "config.json").write_text(json.dumps(raw))
    back = ViTVQTokenizer.from_pretrained(tmp_path).eval()
    assert back.config.decoder_head == "pixel_shuffle" and back.config.config_hash() == tok.config.config_hash()
    codes = torch.randint(0, 256, (2, 8, 8))
    vectors = back.embed_codes(codes).flatten(1, 2)
    expected = (old_decoder_forward(back.decoder, vectors).float() * back.pixel_std + back.pixel_mean).clamp(0, 1)
    assert torch.equal(back.decode(codes), expected)
    assert torch.equal(back.decode(codes), tok.decode(codes))


@torch.no_grad()
def test_conv_upsample_starts_exactly_as_the_pixel_shuffle_head_it_was_warm_started_from():
    torch.manual_seed(0)
    old = ViTVQTokenizer(tiny()).eval()
    new = ViTVQTokenizer(tiny(decoder_head="conv_upsample")).eval()
    missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("decoder.upsample.") for k in missing)
    codes = torch.randint(0, 256, (2, 8, 8))
    assert torch.equal(new.decode(codes), old.decode(codes))


@torch.no_grad()
def test_conv_upsample_pixels_see_neighbouring_tokens_and_pixel_shuffle_pixels_do_not():
    """Change one token's features; count how far outside its patch the head's output moves."""
    torch.manual_seed(0)
    cfg = tiny(decoder_head="conv_upsample")  # patch 4, grid 8
    dec = Decoder(cfg).eval()
    torch.nn.init.normal_(dec.upsample.to_rgb.weight, std=0.1)  # a trained head: not at its zero init
    torch.nn.init.normal_(dec.refine.weight, std=0.1)
    g, p, W = cfg.grid_size, cfg.patch_size, cfg.decoder_width
    h = torch.randn(1, W, g, g)
    h2 = h.clone()
    h2[0, :, 4, 4] += 1.0  # token (4, 4): pixels 16..19 in each direction

    def shuffle_head(feat: torch.Tensor) -> torch.Tensor:
        x = dec.to_pixels(rearrange(feat, "b c h w -> b (h w) c"))
        x = rearrange(x, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=g, w=g, p1=p, p2=p)
        return x + dec.refine(x)

    def reach(head) -> int:
        moved = (head(h2) - head(h)).abs().amax(dim=(0, 1)) > 1e-6  # (H, W)
        rows = moved.any(1).nonzero().flatten()
        return int(max(16 - rows.min(), rows.max() - 19))  # pixels beyond the token's own patch

    assert reach(shuffle_head) == 1  # only the 3x3 refine convolution crosses the seam
    assert reach(dec.upsample) >= p  # the upsampling branch spreads a token over its neighbours
    assert isinstance(dec.upsample, ConvUpsample)


def test_conv_upsample_round_trips_through_save_and_load(tmp_path):
    torch.manual_seed(0)
    tok = ViTVQTokenizer(tiny(decoder_head="conv_upsample")).eval()
    torch.nn.init.normal_(tok.decoder.upsample.to_rgb.weight, std=0.05)
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["decoder_head"] == "conv_upsample"
    back = ViTVQTokenizer.from_pretrained(tmp_path).eval()
    codes = torch.randint(0, 256, (2, 8, 8))
    assert back.config.decoder_head == "conv_upsample"
    assert torch.equal(back.decode(codes), tok.decode(codes))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(decoder_head="bilinear"), r"decoder_head must be one of \('pixel_shuffle', 'conv_upsample'\), got 'bilinear'"),
        (dict(decoder_head="conv_upsample", image_size=36, patch_size=6), r"patch_size must be a power of two, got 6"),
    ],
)
def test_bad_decoder_head_settings_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


def counted_flops(fn, *args) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("head", ["pixel_shuffle", "conv_upsample"])
@pytest.mark.parametrize("preset", ["tiny", "default"])
def test_head_flops_match_torch_flop_counter(head, preset):
    cfg = ViTVQTokenizer.default().config if preset == "default" else tiny()
    cfg = dataclasses.replace(cfg, decoder_head=head)
    dec = Decoder(cfg).eval()
    g, T, W = cfg.grid_size, cfg.num_tokens, cfg.decoder_width
    stated = head_flops(cfg)
    tokens = torch.randn(1, T, W)
    shuffle = counted_flops(lambda h: old_decoder_forward_head(dec, h), tokens)
    assert stated["pixel_shuffle"] == shuffle
    if head == "conv_upsample":
        assert stated["conv_upsample"] == counted_flops(dec.upsample, torch.randn(1, W, g, g)) > 0
    else:
        assert stated["conv_upsample"] == 0
    # the transformer: linears counted by torch; the attention products (QK^T, AV) are added here,
    # because FlopCounterMode does not count CPU scaled_dot_product_attention
    attention = cfg.decoder_depth * 2 * 2 * T * T * W
    body = counted_flops(lambda c: dec.transformer(dec.from_code(c) + dec.pos_embed), torch.randn(1, T, cfg.codebook_dim))
    assert stated["transformer"] == body + attention


def old_decoder_forward_head(dec: Decoder, h: torch.Tensor) -> torch.Tensor:
    g, p = dec.config.grid_size, dec.config.patch_size
    x = rearrange(dec.to_pixels(h), "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=g, w=g, p1=p, p2=p)
    return x + dec.refine(x)


def test_tiny_preset_with_conv_upsample_overfits_eight_real_photos():
    """The same bar as tests/test_learning.py (>= 25 dB in 400 Adam steps), with the new head."""
    torch.manual_seed(0)
    x = photo_crops(32, 8)
    tok = ViTVQTokenizer(tiny(decoder_head="conv_upsample"))
    opt = torch.optim.Adam(tok.parameters(), lr=1e-3)
    tok.train()
    for _ in range(400):
        loss = tok(x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    tok.eval()
    rec = tok.decode(tok.encode(x)).double().numpy()
    mse = ((rec - x.double().numpy()) ** 2).reshape(len(rec), -1).mean(axis=1)
    final = float(np.mean(10 * np.log10(1.0 / mse)))
    assert final >= 25.0, f"PSNR {final:.2f} dB after 400 steps"
