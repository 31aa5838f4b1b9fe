"""The HF-ViT converter, tested on a tiny ViT saved by the installed transformers."""

import pytest
import torch
from transformers import ViTConfig, ViTModel

from vit_vq import ViTVQConfig, ViTVQTokenizer


@pytest.fixture
def hf_vit(tmp_path):
    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        image_size=32, patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = ViTModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # non-trivial position embeddings and CLS token
        model.embeddings.position_embeddings.normal_(0, 0.5)
        model.embeddings.cls_token.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "tiny-vit")
    return tmp_path / "tiny-vit", model


def test_converted_encoder_matches_transformers_features(hf_vit):
    path, hf = hf_vit
    base = ViTVQConfig.from_preset("tiny", image_size=32, patch_size=8)
    tok = ViTVQTokenizer.from_vit(str(path), base).eval()
    assert (tok.config.encoder_width, tok.config.encoder_depth, tok.config.encoder_heads) == (48, 2, 4)
    x = torch.rand(2, 3, 32, 32)
    pixels = (x - 0.5) / 0.5  # the in21k normalisation == minus_one_one
    with torch.no_grad():
        ours = tok.encoder.features(tok._to_model_space(x, validate=True))
        theirs = hf(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert not any(k.startswith(("embeddings.", "layers.", "encoder.layer.")) for k in tok.state_dict())


def test_position_embeddings_are_interpolated_to_a_new_grid(hf_vit):
    path, hf = hf_vit
    tok = ViTVQTokenizer.from_vit(str(path), ViTVQConfig.from_preset("tiny", image_size=64, patch_size=8))
    assert tok.encoder.pos_embed.shape == (1, 64, 48)
    assert tok.encode(torch.rand(1, 3, 64, 64)).shape == (1, 8, 8)
    # the interpolated grid keeps the original's mean (bicubic of a smooth field)
    orig = hf.embeddings.position_embeddings[0, 1:].detach()
    torch.testing.assert_close(tok.encoder.pos_embed[0].mean(0), orig.mean(0), rtol=0.2, atol=0.05)


def test_patch_size_mismatch_is_a_clear_error(hf_vit):
    path, _ = hf_vit
    with pytest.raises(ValueError, match=r"patch_size=8 but the config asks for patch_size=4"):
        ViTVQTokenizer.from_vit(str(path), ViTVQConfig.from_preset("tiny"))


def test_converted_tokenizer_saves_and_loads_without_transformers_names(hf_vit, tmp_path):
    path, _ = hf_vit
    tok = ViTVQTokenizer.from_vit(str(path), ViTVQConfig.from_preset("tiny", image_size=32, patch_size=8)).eval()
    tok.save_pretrained(tmp_path / "converted")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(ViTVQTokenizer.from_pretrained(tmp_path / "converted").encode(x), tok.encode(x))
