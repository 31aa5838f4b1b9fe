"""Every bad input named in the core contract raises its stated error."""

import pytest
import torch

from vit_vq import ViTVQConfig, ViTVQTokenizer


@pytest.fixture(scope="module")
def tok():
    return ViTVQTokenizer(ViTVQConfig.from_preset("tiny")).eval()


@pytest.mark.parametrize(
    "images, error, match",
    [
        (torch.rand(3, 32, 32), ValueError, r"expected images of shape \[B, 3, 32, 32\], got \(3, 32, 32\) \(rank 3\)"),
        (torch.rand(2, 1, 32, 32), ValueError, r"expected 3 channels .* got \(2, 1, 32, 32\)"),
        (torch.rand(2, 3, 64, 64), ValueError, r"expected images of shape \[B, 3, 32, 32\], got \(2, 3, 64, 64\).*preprocess"),
        (torch.randint(0, 9, (2, 3, 32, 32), dtype=torch.int32), TypeError, r"float images in \[0, 1\] or uint8 .* torch\.int32"),
        (torch.full((1, 3, 32, 32), float("nan")), ValueError, "NaN or Inf"),
        (torch.full((1, 3, 32, 32), float("inf")), ValueError, "NaN or Inf"),
        (torch.rand(1, 3, 32, 32) * 255, ValueError, r"expected float images in \[0, 1\], got values in"),
        (torch.rand(1, 3, 32, 32) * 2 - 1, ValueError, r"\(x \+ 1\) / 2"),
        ([[0.5]], TypeError, "expected a torch.Tensor"),
    ],
)
def test_bad_images(tok, images, error, match):
    with pytest.raises(error, match=match):
        tok.encode(images)
    with pytest.raises(error, match=match):
        tok(images)


def test_single_nan_among_valid_pixels_is_caught(tok):
    x = torch.rand(2, 3, 32, 32)
    x[1, 2, 5, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        tok.encode(x)


@pytest.mark.parametrize(
    "indices, error, match",
    [
        (torch.full((1, 8, 8), 256), ValueError, r"code indices must be in \[0, 256\), got values in \[256, 256\]"),
        (torch.full((1, 8, 8), -1), ValueError, r"must be in \[0, 256\), got values in \[-1, -1\]"),
        (torch.zeros(1, 8, 8), TypeError, r"integer code indices .* torch\.float32"),
        (torch.zeros(1, 7, 7, dtype=torch.long), ValueError, r"shape \[B, 8, 8\] or \[B, 64\], got \(1, 7, 7\)"),
        (torch.zeros(1, 63, dtype=torch.long), ValueError, r"\[B, 64\], got \(1, 63\)"),
        (torch.zeros(64, dtype=torch.long), ValueError, r"got \(64,\)"),
    ],
)
def test_bad_indices(tok, indices, error, match):
    with pytest.raises(error, match=match):
        tok.decode(indices)
    with pytest.raises(error, match=match):
        tok.embed_codes(indices)


def test_small_integer_dtypes_are_accepted(tok):
    idx = torch.randint(0, 256, (2, 8, 8))
    ref = tok.decode(idx)
    assert torch.equal(tok.decode(idx.to(torch.int32)), ref)
    assert torch.equal(tok.decode(idx.to(torch.uint8)), ref)


def test_validate_false_skips_checks(tok):
    x = torch.rand(1, 3, 32, 32) * 1.5  # out of range, but allowed when validation is off
    assert tok.encode(x, validate=False).shape == (1, 8, 8)


def test_bad_latents_and_config_type(tok):
    with pytest.raises(ValueError, match=r"expected latents \[B, h, w, 8\]"):
        tok.quantize(torch.rand(2, 64, 5))
    with pytest.raises(ValueError, match=r"expected code vectors"):
        tok.decode_latents(torch.rand(2, 10, 8))
    with pytest.raises(TypeError, match="expected a ViTVQConfig, got dict"):
        ViTVQTokenizer({"image_size": 32})
