import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vit_vq import EncodeOutput, ViTVQConfig, ViTVQTokenizer


@pytest.fixture
def tok():
    torch.manual_seed(0)
    return ViTVQTokenizer(ViTVQConfig.from_preset("tiny")).eval()


def test_encode_decode_shapes_dtypes_ranges(tok):
    x = torch.rand(3, 3, 32, 32)
    idx = tok.encode(x)
    assert idx.shape == (3, 8, 8) and idx.dtype == torch.int64
    assert 0 <= int(idx.min()) and int(idx.max()) < tok.config.codebook_size
    rec = tok.decode(idx)
    assert rec.shape == (3, 3, 32, 32) and rec.dtype == torch.float32
    assert float(rec.min()) >= 0 and float(rec.max()) <= 1
    assert torch.equal(tok.decode(idx.view(3, 64)), rec)


def test_uint8_images_match_float_images(tok):
    x8 = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(tok.encode(x8), tok.encode(x8.float() / 255))


def test_eval_round_trip_matches_forward_and_is_deterministic(tok):
    x = torch.rand(2, 3, 32, 32)
    idx = tok.encode(x)
    assert torch.equal(idx, tok.encode(x))
    out = tok(x)
    assert torch.equal(out.indices, idx)
    torch.testing.assert_close(tok.decode(idx), out.reconstruction, rtol=1e-5, atol=1e-5)


def test_forward_fields_and_loss_composition(tok):
    tok.train()
    out = tok(torch.rand(2, 3, 32, 32))
    torch.testing.assert_close(out.loss, out.recon_loss + out.codebook_loss + out.commit_loss)
    assert set(out.metrics) == {"perplexity", "usage", "dead_codes"}
    assert out.indices.shape == (2, 8, 8)


def test_reconstruction_term_alone_reaches_the_encoder(tok):
    """Straight-through: F.mse_loss(reconstruction, x) alone must give the encoder gradients."""
    tok.train()
    x = torch.rand(2, 3, 32, 32)
    out = tok(x)
    F.mse_loss(out.reconstruction, x).backward()
    grads = [p.grad for p in tok.encoder.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert float(tok.encoder.patch_embed.weight.grad.abs().sum()) > 0


def test_latent_level_api_composes_to_encode_decode(tok):
    x = torch.rand(2, 3, 32, 32)
    enc = tok.encode(x, return_latents=True)
    assert isinstance(enc, EncodeOutput) and enc.latents.shape == (2, 8, 8, 8)
    q = tok.quantize(enc.latents)
    assert torch.equal(q.indices, enc.indices)
    vectors = tok.embed_codes(enc.indices)
    torch.testing.assert_close(vectors, q.quantized)
    with torch.no_grad():
        torch.testing.assert_close(tok.decode_latents(vectors).clamp(0, 1), tok.decode(enc.indices))


def test_preprocess_accepts_pil_numpy_tensors_and_lists(tok, photos):
    arr = photos[0]  # (512, 512, 3) uint8
    batch = tok.preprocess([Image.fromarray(arr), arr, torch.from_numpy(arr).permute(2, 0, 1), arr[..., 0]])
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.float32
    torch.testing.assert_close(batch[0], batch[1])
    torch.testing.assert_close(batch[1], batch[2])
    assert tok.encode(batch).shape == (4, 8, 8)
    wide = np.zeros((40, 80, 3), dtype=np.uint8)
    wide[:, 20:60] = 255  # center crop of a wide image keeps the middle
    assert float(tok.preprocess(wide).mean()) > 0.95


def test_bf16_module_still_quantizes_in_fp32(tok):
    tok = tok.to(torch.bfloat16)
    x = torch.rand(2, 3, 32, 32)
    idx = tok.encode(x)
    assert idx.dtype == torch.int64 and tok.decode(idx).dtype == torch.float32


def test_half_precision_cast_keeps_the_codebook_fp32_and_the_codes(tok):
    x = torch.rand(2, 3, 32, 32)
    ref_latents = tok.encode(x, return_latents=True).latents
    ref = tok.quantizer.lookup(tok.quantizer.prepare(ref_latents))
    tok = tok.to(torch.bfloat16)
    for name in ("embed", "ema_count", "ema_sum"):
        assert getattr(tok.quantizer, name).dtype == torch.float32, name
    assert tok.encoder.patch_embed.weight.dtype == torch.bfloat16
    assert torch.equal(tok.quantizer.lookup(tok.quantizer.prepare(ref_latents)), ref)


def test_compile_keeps_state_dict_keys_and_outputs(tok):
    keys = set(tok.state_dict())
    with pytest.raises(ValueError, match="scope must be 'model' or 'blocks'"):
        tok.compile(scope="layers")
    assert set(tok.compile(scope="blocks").state_dict()) == keys


def test_preprocess_rejects_float_pixels_outside_zero_one(tok):
    with pytest.raises(ValueError, match=r"expected float pixels in \[0, 1\], got values in"):
        tok.preprocess(np.random.rand(40, 50, 3).astype(np.float32) * 255)
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        tok.preprocess(torch.rand(3, 40, 40) * 2 - 1)
