import json
import re

import pytest

from vit_vq import PRESETS, ViTVQConfig, __version__
from vit_vq.config import FORMAT_VERSION


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_round_trip_through_json(name):
    cfg = ViTVQConfig.from_preset(name)
    data = json.loads(cfg.to_json())
    assert data["format_version"] == FORMAT_VERSION and data["vit_vq_version"] == __version__
    assert ViTVQConfig.from_dict(data) == cfg


def test_preset_geometry_matches_the_recipes():
    small, seed = ViTVQConfig.from_preset("small"), ViTVQConfig.from_preset("seed")
    assert (small.image_size, small.patch_size, small.grid_size) == (256, 8, 32)
    assert (small.codebook_size, small.codebook_dim, small.l2_normalize) == (8192, 32, True)
    assert (seed.image_size, seed.patch_size, seed.grid_size, seed.codebook_size, seed.codebook_dim) == (224, 16, 14, 1024, 512)
    assert ViTVQConfig.from_preset("tiny").perceptual_weight == 0


def test_every_field_has_a_default():
    assert ViTVQConfig() == ViTVQConfig()


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*'base'.*'seed'.*'small'.*'tiny'"):
        ViTVQConfig.from_preset("huge")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=30, patch_size=4), r"image_size \(30\) must be a multiple of patch_size \(4\)"),
        (dict(encoder_width=30, encoder_heads=4), r"encoder_width \(30\) must be divisible by encoder_heads \(4\)"),
        (dict(decoder_width=30, decoder_heads=4), r"decoder_width \(30\) must be divisible"),
        (dict(ema_decay=1.0), r"ema_decay must be in \(0, 1\)"),
        (dict(codebook_size=0), r"codebook_size must be a positive int, got 0"),
        (dict(pixel_convention="rgb"), r"pixel_convention must be one of"),
        (dict(commitment_beta=-1.0), r"commitment_beta must be in \[0, 100\] \(vit_vq\.config\.FLOAT_RANGES\), got -1\.0"),
    ],
)
def test_impossible_combinations_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViTVQConfig(**kwargs)


def test_from_dict_rejects_unknown_keys_and_newer_formats():
    data = ViTVQConfig().to_dict()
    with pytest.raises(ValueError, match=r"unknown ViTVQConfig keys \['bogus'\]"):
        ViTVQConfig.from_dict({**data, "bogus": 1})
    with pytest.raises(ValueError, match="newer than this vit_vq reads"):
        ViTVQConfig.from_dict({**data, "format_version": FORMAT_VERSION + 1})


def test_config_hash_tracks_architecture_only():
    a, b = ViTVQConfig.from_preset("tiny"), ViTVQConfig.from_preset("tiny")
    assert a.config_hash() == b.config_hash()
    assert a.config_hash() != ViTVQConfig.from_preset("tiny", codebook_size=512).config_hash()


@pytest.mark.parametrize("field", ["commitment_beta", "ema_eps", "dead_code_threshold", "mlp_ratio"])
def test_nan_settings_are_rejected(field):
    with pytest.raises(ValueError, match=f"{field} must be a finite number, got nan"):
        ViTVQConfig(**{field: float("nan")})


def test_only_rgb_is_supported():
    with pytest.raises(ValueError, match="in_channels must be 3"):
        ViTVQConfig(in_channels=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(encoder_depth=257), r"encoder_depth must be <= 256 \(vit_vq\.config\.MAX_SIZES\), got 257"),
        (dict(decoder_width=16392, decoder_heads=12), r"decoder_width must be <= 16384 \(vit_vq\.config\.MAX_SIZES\), got 16392"),
        (dict(codebook_size=2**22 + 1), r"codebook_size must be <= 4194304"),
        (dict(kmeans_iters=10**6), r"kmeans_iters must be <= 1000"),
        (dict(image_size=8192, patch_size=32), r"image_size must be <= 4096"),
        (dict(image_size=2048, patch_size=4), r"image_size // patch_size must be <= 256 tokens per side"),
        (dict(encoder_cls_token=1), r"encoder_cls_token must be true or false, got 1"),
    ],
)
def test_upper_bounds_and_types_name_the_limit(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViTVQConfig(**kwargs)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_sit_inside_the_bounds(name):
    from vit_vq.config import MAX_CODEBOOK_ELEMENTS, MAX_SIZES

    cfg = ViTVQConfig.from_preset(name)
    assert all(getattr(cfg, field) <= limit for field, limit in MAX_SIZES.items())
    assert cfg.codebook_size * cfg.codebook_dim <= MAX_CODEBOOK_ELEMENTS


@pytest.mark.parametrize("version", ["1", True, 0, -7, 1.0])
def test_format_version_must_be_a_positive_int(version):
    with pytest.raises(ValueError, match=r"format_version must be a positive integer, got"):
        ViTVQConfig.from_dict({**ViTVQConfig().to_dict(), "format_version": version})


@pytest.mark.parametrize(
    "field, value",
    [
        ("layer_norm_eps", -1.0), ("layer_norm_eps", 0.0), ("layer_norm_eps", 1e300), ("layer_norm_eps", 1e-300),
        ("layer_norm_eps", 0.2), ("ema_eps", 0.0), ("ema_eps", 1e300), ("commitment_beta", 1e300),
        ("perceptual_weight", -0.5), ("perceptual_weight", 1e300), ("dead_code_threshold", -1.0),
        ("dead_code_threshold", 1e300),
    ],
)
def test_float_fields_outside_their_range_are_refused_naming_the_limit(field, value):
    from vit_vq.config import FLOAT_RANGES

    low, high = FLOAT_RANGES[field]
    assert not low <= value <= high
    limit = r"\[.*\] \(vit_vq\.config\.FLOAT_RANGES\)"
    with pytest.raises(ValueError, match=rf"{field} must be in {limit}, got {re.escape(repr(value))}$"):
        ViTVQConfig.from_preset("tiny", **{field: value})


@pytest.mark.parametrize("field", ["layer_norm_eps", "ema_eps", "commitment_beta", "perceptual_weight", "dead_code_threshold"])
def test_float_range_ends_are_accepted(field):
    from vit_vq.config import FLOAT_RANGES

    rule = {"dead_code_rule": "absolute"} if field == "dead_code_threshold" else {}
    for value in FLOAT_RANGES[field]:
        assert getattr(ViTVQConfig.from_preset("tiny", **rule, **{field: value}), field) == value


@pytest.mark.parametrize("eps", [-1.0, 1e300])
def test_a_bad_layer_norm_eps_would_have_collapsed_the_codes(eps):
    """What the bound prevents: the same weights with this eps give NaN latents or a single code."""
    import torch

    from vit_vq import ViTVQTokenizer

    torch.manual_seed(0)
    tok = ViTVQTokenizer(ViTVQConfig.from_preset("tiny")).eval()
    images = torch.rand(2, 3, 32, 32)
    for module in tok.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = eps
    with torch.no_grad():
        latents = tok.encoder(tok._to_model_space(images, validate=True))
    assert not torch.isfinite(latents).all() or tok.encode(images).unique().numel() == 1
    with pytest.raises(ValueError, match=r"layer_norm_eps must be in \[1e-12, 0\.1\]"):
        ViTVQConfig.from_preset("tiny", layer_norm_eps=eps)


def test_relative_dead_code_threshold_is_a_fraction_of_the_mean():
    with pytest.raises(ValueError, match=r"dead_code_threshold must be <= 1 under dead_code_rule 'relative'"):
        ViTVQConfig.from_preset("tiny", dead_code_threshold=2.0)
    assert ViTVQConfig.from_preset("tiny", dead_code_threshold=2.0, dead_code_rule="absolute").dead_code_threshold == 2.0


def test_an_mlp_ratio_that_rounds_to_no_hidden_units_is_refused():
    with pytest.raises(ValueError, match=r"mlp_ratio 0\.001 gives encoder MLPs no hidden units"):
        ViTVQConfig.from_preset("tiny", mlp_ratio=0.001)
