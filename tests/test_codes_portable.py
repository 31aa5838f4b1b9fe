"""Portable codes: the decoder identity is the weights as stored, whatever the compute precision or device."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vit_vq import ViTVQTokenizer
from vit_vq.cli.main import main
from vit_vq.fingerprint import decoder_hash
from vit_vq.pipeline import load_codes, prepare_for_inference


@pytest.mark.parametrize("name", ["tiny", "default"])
def test_decoder_hash_does_not_depend_on_precision(name, tiny_tokenizer_dir):
    """The bundled model stores fp16 weights (loaded into float32); the tiny one stores float32."""

    def load() -> ViTVQTokenizer:
        return ViTVQTokenizer.default() if name == "default" else ViTVQTokenizer.from_pretrained(tiny_tokenizer_dir)

    hashes = {p: prepare_for_inference(load(), model_id=name, device="cpu", precision=p)[1].decoder_hash
              for p in ("fp32", "bf16", "fp16")}
    assert len(set(hashes.values())) == 1, hashes
    rounded = load()
    rounded.decoder.to(torch.bfloat16)  # bf16 copies hold other numbers: the hash is taken before the cast
    assert decoder_hash(rounded) != hashes["fp32"]
    if name == "default":  # stored as fp16: an fp16 copy holds the very numbers stored
        half = load()
        half.decoder.half()
        assert decoder_hash(half) == hashes["fp32"]


def test_decoder_hash_changes_with_the_decoding_weights_only(tiny_tokenizer_dir):
    tok = ViTVQTokenizer.from_pretrained(tiny_tokenizer_dir)
    before = decoder_hash(tok)
    with torch.no_grad():
        next(tok.encoder.parameters()).add_(1.0)  # the encoder makes codes; it does not decode them
        tok.quantizer.ema_count.add_(1.0)  # training statistics: do not turn codes into pixels
    assert decoder_hash(tok) == before
    with torch.no_grad():
        tok.decoder.to_pixels.bias[0] += 1e-3
    changed = decoder_hash(tok)
    assert changed != before
    with torch.no_grad():
        tok.decoder.to_pixels.bias[0] -= 1e-3
        tok.quantizer.embed[3, 0] += 1e-3
    assert decoder_hash(tok) not in (before, changed)


def test_encode_bf16_decode_fp32_through_the_cli(capsys, tmp_path, photos, tiny_tokenizer_dir):
    for i, p in enumerate(photos[:3]):
        Image.fromarray(p).resize((32, 32)).save(tmp_path / f"p{i}.png")
    codes_file = tmp_path / "codes.safetensors"
    common = ["--model", str(tiny_tokenizer_dir), "--device", "cpu", "--num-workers", "0"]
    assert main(["encode", *[str(tmp_path / f"p{i}.png") for i in range(3)], "-o", str(codes_file), *common,
                 "--precision", "bf16"]) == 0
    made = load_codes(codes_file)
    assert made.model.precision == "bf16"
    reference = prepare_for_inference(ViTVQTokenizer.from_pretrained(tiny_tokenizer_dir), model_id="x", device="cpu",
                                      precision="fp32")[1]
    assert made.model.decoder_hash == reference.decoder_hash
    assert main(["decode", str(codes_file), "-o", str(tmp_path / "out"), *common, "--precision", "fp32"]) == 0, (
        capsys.readouterr().err
    )
    tok = ViTVQTokenizer.from_pretrained(tiny_tokenizer_dir)
    decoded = np.asarray(Image.open(tmp_path / "out" / "p0.png"))
    expected = (tok.decode(made.codes[:1])[0].permute(1, 2, 0) * 255).round().byte().numpy()
    assert np.abs(decoded.astype(int) - expected.astype(int)).max() <= 1


def rewrite_metadata(path, **changes) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), framework="np") as f:
        meta, array = dict(f.metadata()), f.get_tensor("codes")
    meta.update(changes)
    save_file({"codes": array}, str(path), metadata=meta)


def test_format_1_codes_still_load_without_their_precision_bound_hash(tmp_path, tiny_tokenizer_dir):
    from vit_vq.pipeline import save_codes

    tok, info = prepare_for_inference(ViTVQTokenizer.from_pretrained(tiny_tokenizer_dir), model_id="m", device="cpu",
                                      precision="bf16")
    codes = torch.randint(0, 256, (2, 8, 8))
    path = save_codes(tmp_path / "c.safetensors", codes, ["a", "b"], info=info, codebook_size=256, image_size=32)
    assert load_codes(path).model.decoder_hash == info.decoder_hash

    rewrite_metadata(path, format_version="1", decoder_hash=json.dumps("0123456789abcdef"))
    with pytest.warns(UserWarning, match="older vit_vq .* cannot be checked"):
        old = load_codes(path)
    assert old.model.decoder_hash is None and old.model.config_hash == info.config_hash
    assert torch.equal(old.codes, codes)

    for bad in ("true", "-7", "1.0", "", "\u0661", "\u00b2"):  # Arabic-Indic 1 and superscript 2 pass isdigit()
        rewrite_metadata(path, format_version=bad)
        with pytest.raises(ValueError, match="'format_version' must be (a whole number|in )"):
            load_codes(path)
