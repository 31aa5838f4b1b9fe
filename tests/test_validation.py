"""Every bad input named in the core contract raises its stated error."""

import pytest
import torch

from vit_vq import ViTVQConfig, ViTVQTokenizer

OVER_BUDGET = (  # one line, naming the request and the budget
    r"^a 4x4100 px image \(1x1025 patches of 4 px\) is 1025 tokens, "
    r"above this tokenizer's budget of 1024 tokens per image \(ViTVQConfig.max_tokens\)$"
)


@pytest.fixture(scope="module")
def tok():
    return ViTVQTokenizer(ViTVQConfig.from_preset("tiny")).eval()


@pytest.mark.parametrize(
    "images, error, match",
    [
        (torch.rand(3, 32, 32), ValueError, r"shape \[B, 3, H, W\] with H and W multiples of 4, got \(3, 32, 32\) \(rank 3\)"),
        (torch.rand(2, 1, 32, 32), ValueError, r"expected 3 channels .* got \(2, 1, 32, 32\)"),
        (torch.rand(2, 3, 30, 32), ValueError, r"multiples of 4, got \(2, 3, 30, 32\).*preprocess"),
        (torch.rand(2, 3, 32, 2), ValueError, r"multiples of 4, got \(2, 3, 32, 2\)"),
        (torch.rand(1, 3, 4, 4 * 1025), ValueError, OVER_BUDGET),
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
        (torch.zeros(1, 0, 7, dtype=torch.long), ValueError, r"a 0x7 code grid has no tokens"),
        (torch.zeros(1, 1, 1025, dtype=torch.long), ValueError, r"^a 1x1025 code grid is 1025 tokens, above .* 1024"),
        (torch.zeros(1, 63, dtype=torch.long), ValueError, r"\[B, h, w\], or \[B, 64\] for the native 8x8 grid, got \(1, 63\)"),
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
