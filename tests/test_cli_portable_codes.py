"""Codes that travel: any precision decodes at any other, changed weights are refused with both
hashes, `decode` uses the model the user names, and the bundled model is `vit_vq:default`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from test_cli_codes import png, uint8  # tests/ is on sys.path (pytest rootdir import mode)

from vit_vq import ViTVQTokenizer
from vit_vq.cli.main import main
from vit_vq.data import list_images, load_image
from vit_vq.pipeline.codes import load_codes

FAST = ["--num-workers", "0", "--device", "cpu"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([*map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bf16_codes_decode_at_fp32(capsys, tmp_path, photo_dir, tiny_tokenizer_dir):
    codes_path = tmp_path / "bf16.safetensors"
    code, _, err = run_cli(capsys, "encode", photo_dir, "-o", codes_path, "--model", tiny_tokenizer_dir,
                           "--precision", "bf16", *FAST)
    assert code == 0, err
    codes = load_codes(codes_path)
    assert codes.model.precision == "bf16"

    out = tmp_path / "decoded"
    code, _, err = run_cli(capsys, "decode", codes_path, "-o", out, "--model", tiny_tokenizer_dir, "--precision", "fp32", *FAST)
    assert code == 0, err
    expected = uint8(ViTVQTokenizer.from_pretrained(tiny_tokenizer_dir).decode(codes.codes))  # fp32, in Python
    for name, image in zip(codes.names, expected, strict=True):
        np.testing.assert_array_equal(png((out / name).with_suffix(".png")), image)

    fp32_path = tmp_path / "fp32.safetensors"  # the same weights at fp32 record the same decoder hash
    assert run_cli(capsys, "encode", photo_dir, "-o", fp32_path, "--model", tiny_tokenizer_dir, *FAST)[0] == 0
    assert load_codes(fp32_path).model.decoder_hash == codes.model.decoder_hash


def test_codes_from_changed_weights_are_refused_naming_both_hashes(capsys, tmp_path, photo_dir, tiny_tokenizer_dir):
    from vit_vq.fingerprint import decoder_hash

    model = tmp_path / "model"
    shutil.copytree(tiny_tokenizer_dir, model)
    codes_path = tmp_path / "codes.safetensors"
    assert run_cli(capsys, "encode", photo_dir, "-o", codes_path, "--model", model, "--precision", "bf16", *FAST)[0] == 0
    tok = ViTVQTokenizer.from_pretrained(model)
    with torch.no_grad():
        tok.decoder.to_pixels.weight.mul_(-1)  # same architecture, different weights
    tok.save_pretrained(model)
    old, new = load_codes(codes_path).model.decoder_hash, decoder_hash(ViTVQTokenizer.from_pretrained(model))
    assert old and new and old != new

    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "decode", codes_path, "-o", out, "--model", model, "--precision", "fp32", *FAST)
    line = error_line(err)
    assert code == 2 and old in line and new in line and "weights changed" in line
    assert not out.exists()


def test_decode_uses_the_named_model_and_the_recorded_one_only_when_asked(capsys, tmp_path, photo_dir, tiny_tokenizer_dir):
    codes_path = tmp_path / "codes.safetensors"
    assert run_cli(capsys, "encode", photo_dir, "-o", codes_path, "--model", tiny_tokenizer_dir, *FAST)[0] == 0
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "decode", codes_path, "-o", out, *FAST)  # no --model: the bundled one
    line = error_line(err)
    assert code == 2 and "vit_vq:default here has config hash" in line and "--model-from-codes" in line
    assert "using the model recorded" not in err

    code, _, err = run_cli(capsys, "decode", codes_path, "-o", out, "--model", tiny_tokenizer_dir, "--model-from-codes", *FAST)
    assert code == 2 and "not both" in error_line(err)

    code, _, err = run_cli(capsys, "decode", codes_path, "-o", out, "--model-from-codes", *FAST)
    assert code == 0, err
    assert f"using the model recorded in {codes_path}: {tiny_tokenizer_dir.resolve()}" in err
    assert len(list(out.rglob("*.png"))) == 6


def test_a_codes_file_from_before_the_name_decodes_with_the_bundled_model(tmp_path):
    from vit_vq.cli.decode import recorded_model
    from vit_vq.pipeline.codes import CodesFile
    from vit_vq.pipeline.runtime import ModelInfo

    def made_by(model_id: str) -> CodesFile:
        info = ModelInfo(model_id, None, "0" * 16, "torch", "exact", "fp32")
        return CodesFile(torch.zeros(1, 2, 2, dtype=torch.int64), ["a.png"], 4, 8, info, "0.1.0")

    assert recorded_model(made_by("default"), "c.safetensors") == "vit_vq:default-v1"  # 0.1's name for its default
    assert recorded_model(made_by("vit_vq:default"), "c.safetensors") == "vit_vq:default"  # no bundled hash matches
    assert recorded_model(made_by("org/name"), "c.safetensors") == "org/name"
    with pytest.raises(Exception, match="records no loadable model.*pass --model"):
        recorded_model(made_by("<in-memory>"), "c.safetensors")


def test_vit_vq_default_names_the_bundled_model_for_encode_and_decode(capsys, tmp_path, photo_dir):
    files = list_images(photo_dir)[:3]
    codes_path = tmp_path / "codes.safetensors"
    code, _, err = run_cli(capsys, "encode", *files, "-o", codes_path, "--model", "vit_vq:default", *FAST)
    assert code == 0, err
    codes = load_codes(codes_path)
    tok = ViTVQTokenizer.default()
    expected = tok.encode(tok.preprocess([load_image(f) for f in files]))
    assert torch.equal(codes.codes, expected)
    assert codes.model.model_id == "vit_vq:default"

    left_out = tmp_path / "encoded_without_model.safetensors"  # --model left out: the same model, the same record
    assert run_cli(capsys, "encode", *files, "-o", left_out, *FAST)[0] == 0
    assert torch.equal(load_codes(left_out).codes, expected) and load_codes(left_out).model.model_id == "vit_vq:default"

    decoded = uint8(tok.decode(expected))
    for extra in (["--model", "vit_vq:default"], ["--model-from-codes"], []):
        out = tmp_path / f"out{len(extra)}{extra[:1]}"
        code, _, err = run_cli(capsys, "decode", codes_path, "-o", out, *extra, *FAST)
        assert code == 0, (extra, err)
        for name, image in zip(codes.names, decoded, strict=True):
            np.testing.assert_array_equal(png((out / name).with_suffix(".png")), image)


def test_codes_of_the_replaced_default_still_decode_and_the_error_names_the_bundled_v1(capsys, tmp_path, photo_dir):
    """Codes that recorded `vit_vq:default` before the default was replaced were made by what is now
    `vit_vq:default-v1`: --model-from-codes finds it by config hash; the new default refuses them and
    the refusal names the bundled model that made them."""
    files = list_images(photo_dir)[:2]
    made = tmp_path / "made_by_v1.safetensors"
    assert run_cli(capsys, "encode", *files, "-o", made, "--model", "vit_vq:default-v1", *FAST)[0] == 0
    assert load_codes(made).model.model_id == "vit_vq:default-v1"
    # what the same run recorded before the default was replaced
    old = _with_metadata(made, tmp_path / "old.safetensors", model_id="vit_vq:default")

    v1 = ViTVQTokenizer.from_pretrained("vit_vq:default-v1")
    expected = uint8(v1.decode(load_codes(made).codes))
    code, _, err = run_cli(capsys, "decode", old, "-o", tmp_path / "refused", *FAST)
    line = error_line(err)
    assert code == 2 and "they match the bundled vit_vq:default-v1: --model vit_vq:default-v1" in line
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
    for extra in (["--model-from-codes"], ["--model", "vit_vq:default-v1"]):
        out = tmp_path / extra[-1].replace(":", "_")
        code, _, err = run_cli(capsys, "decode", old, "-o", out, *extra, *FAST)
        assert code == 0, (extra, err)
        if extra == ["--model-from-codes"]:
            assert f"using vit_vq:default-v1, whose hashes match {old} (it records 'vit_vq:default')" in err
        for name, image in zip(load_codes(old).names, expected, strict=True):
            np.testing.assert_array_equal(png((out / name).with_suffix(".png")), image)


def test_a_fine_tune_of_the_old_default_is_not_taken_for_it(capsys, tmp_path, photo_dir):
    """Same config as vit_vq:default-v1, other decoder weights: no hint pointing at the bundled model."""
    tok = ViTVQTokenizer.from_pretrained("vit_vq:default-v1")
    with torch.no_grad():
        tok.decoder.refine.bias.add_(1e-3)
    tok.save_pretrained(tmp_path / "my_ft")
    codes_path = tmp_path / "ft.safetensors"
    files = list_images(photo_dir)[:1]
    assert run_cli(capsys, "encode", *files, "-o", codes_path, "--model", tmp_path / "my_ft", *FAST)[0] == 0
    for model in ("vit_vq:default", "vit_vq:default-v1"):
        code, _, err = run_cli(capsys, "decode", codes_path, "-o", tmp_path / "out", "--model", model, *FAST)
        line = error_line(err)
        assert code == 2 and "default-v1: --model" not in line, line
    code, _, err = run_cli(capsys, "decode", codes_path, "-o", tmp_path / "out", "--model-from-codes", *FAST)
    assert code == 0 and "my_ft" in err, err


def test_a_tokenize_folder_of_the_old_default_names_it_when_refused_and_resumes_with_it(capsys, tmp_path, photo_dir):
    data = tmp_path / "two_photos"
    data.mkdir()
    for f in list_images(photo_dir)[:2]:
        shutil.copy(f, data / f.name)
    out = tmp_path / "out"
    v1 = ["--model", "vit_vq:default-v1"]
    assert run_cli(capsys, "tokenize", "--data", data, "--out", out, *v1, "--no-progress", *FAST)[0] == 0
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    code, _, err = run_cli(capsys, "tokenize", "--data", data, "--out", out, "--no-progress", *FAST)
    line = error_line(err)
    assert code == 2 and "they match the bundled vit_vq:default-v1: --model vit_vq:default-v1" in line
    code, _, err = run_cli(capsys, "tokenize", "--data", data, "--out", out, *v1, "--no-progress", *FAST)
    assert code == 0 and "0 written, 1 already complete" in err, err
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file() and f.name in before} == before


def _with_metadata(src, dst, **changes):
    """A copy of the codes file `src` at `dst` with metadata fields replaced (values JSON-encoded)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(src), framework="np") as f:
        meta, array = f.metadata(), f.get_tensor("codes")
    save_file({"codes": array}, str(dst), metadata={**meta, **{k: json.dumps(v) for k, v in changes.items()}})
    return dst


def test_hostile_model_records_give_one_line_errors_and_print_as_one_line(capsys, tmp_path, photo_dir):
    made = tmp_path / "v1.safetensors"
    files = list_images(photo_dir)[:1]
    assert run_cli(capsys, "encode", *files, "-o", made, "--model", "vit_vq:default-v1", *FAST)[0] == 0
    for value in (7, None, ["vit_vq:default-v1"]):  # model_id must be a string
        bad = _with_metadata(made, tmp_path / "bad.safetensors", model_id=value)
        code, _, err = run_cli(capsys, "decode", bad, "-o", tmp_path / "out", "--model-from-codes", *FAST)
        line = error_line(err)
        assert code == 2 and "codes metadata field 'model_id' must be a string" in line, line
    # an unknown bundled-looking name is not remapped: the error lists the known names
    odd = _with_metadata(made, tmp_path / "odd.safetensors", model_id="vit_vq:../../etc")
    code, _, err = run_cli(capsys, "decode", odd, "-o", tmp_path / "out", "--model-from-codes", *FAST)
    assert code == 2 and "known names: vit_vq:default, vit_vq:default-v1" in error_line(err)
    # a name with a newline and terminal escapes is shown as its repr, on one line
    shouty = _with_metadata(made, tmp_path / "shouty.safetensors", model_id="vit_vq:default\n\x1b[31mFAKE")
    code, _, err = run_cli(capsys, "decode", shouty, "-o", tmp_path / "out", *FAST)
    line = error_line(err)
    assert code == 2 and "\x1b" not in err and "'vit_vq:default\\n\\x1b[31mFAKE'" in line, err


def test_a_broken_bundled_model_does_not_hide_the_real_error(capsys, tmp_path, photo_dir, tiny_tokenizer_dir, monkeypatch):
    import dataclasses

    from vit_vq import registry

    made = tmp_path / "v1.safetensors"
    files = list_images(photo_dir)[:1]
    assert run_cli(capsys, "encode", *files, "-o", made, "--model", "vit_vq:default-v1", *FAST)[0] == 0
    broken = dataclasses.replace(registry.BUNDLED["default"], folder="no-such-folder")
    monkeypatch.setitem(registry.BUNDLED, "default", broken)  # a broken install
    assert registry.bundled_name_for(load_codes(made).model.config_hash) == "vit_vq:default-v1"
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "decode", made, "-o", out, "--model-from-codes", *FAST)
    assert code == 0 and "using the model recorded in" in err, err
    code, _, err = run_cli(capsys, "decode", made, "-o", tmp_path / "out2", "--model", tiny_tokenizer_dir, *FAST)
    line = error_line(err)
    assert code == 2 and "config hash" in line and "missing" not in line, line


def test_float_codes_are_refused_not_truncated(capsys, tmp_path, photo_dir, tiny_tokenizer_dir):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    good = tmp_path / "codes.safetensors"
    assert run_cli(capsys, "encode", photo_dir, "-o", good, "--model", tiny_tokenizer_dir, *FAST)[0] == 0
    with safe_open(str(good), framework="np") as f:
        meta, array = f.metadata(), f.get_tensor("codes")
    bad = tmp_path / "float.safetensors"
    save_file({"codes": array.astype(np.float32) + 0.7}, str(bad), metadata=meta)  # 3.7 must not become code 3
    assert json.loads(meta["names"])  # the file is a codes file in every other respect
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "decode", bad, "-o", out, "--model", tiny_tokenizer_dir, *FAST)
    assert code == 2 and "integers" in error_line(err) and "float32" in error_line(err)
    assert not out.exists()


@pytest.mark.parametrize("change", ["missing", "null", "empty"])
def test_a_format_2_file_without_decoder_hash_is_refused_unless_asked(capsys, tmp_path, photo_dir, tiny_tokenizer_dir, change):
    """The decoder-weights check cannot be switched off from the codes file (issue 19, point 4)."""
    made = tmp_path / "made.safetensors"
    model = ["--model", str(tiny_tokenizer_dir)]
    assert run_cli(capsys, "encode", *list_images(photo_dir)[:1], "-o", made, *model, *FAST)[0] == 0
    value = {"missing": None, "null": None, "empty": ""}[change]
    bad = _with_metadata(made, tmp_path / "bad.safetensors", decoder_hash=value)
    if change == "missing":
        _drop_metadata(bad, "decoder_hash")
    code, _, err = run_cli(capsys, "decode", bad, "-o", tmp_path / "refused", *model, *FAST)
    assert code == 2 and "records no decoder_hash" in error_line(err) and "--no-weights-check" in error_line(err)
    assert not (tmp_path / "refused").exists()
    code, _, err = run_cli(capsys, "decode", bad, "-o", tmp_path / "out", *model, "--no-weights-check", *FAST)
    assert code == 0, err
    ok = tmp_path / "ok"
    assert run_cli(capsys, "decode", made, "-o", ok, *model, *FAST)[0] == 0
    for name in load_codes(made).names:
        np.testing.assert_array_equal(png((tmp_path / "out" / name).with_suffix(".png")), png((ok / name).with_suffix(".png")))


def _drop_metadata(path, key):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), framework="np") as f:
        meta, array = dict(f.metadata()), f.get_tensor("codes")
    del meta[key]
    save_file({"codes": array}, str(path), metadata=meta)
