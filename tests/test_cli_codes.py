"""`vit-vq encode`, `decode` and `reconstruct` on real photos with a tiny model, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from vit_vq import ViTVQConfig, ViTVQTokenizer
from vit_vq.cli.main import main
from vit_vq.data import list_images, load_image
from vit_vq.pipeline.codes import load_codes

FAST = ["--num-workers", "0", "--device", "cpu"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([*map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def api_codes_and_pixels(model_dir, files) -> tuple[torch.Tensor, torch.Tensor, ViTVQTokenizer]:
    """Codes computed without the CLI: load each file, preprocess with the public API, encode."""
    tok = ViTVQTokenizer.from_pretrained(model_dir)
    pixels = tok.preprocess([load_image(f) for f in files])
    return tok.encode(pixels), pixels, tok


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_encode_decode_round_trip(capsys, tmp_path, photo_dir, tiny_tokenizer_dir):
    codes_path = tmp_path / "codes.safetensors"
    code, _, err = run_cli(capsys, "encode", photo_dir, "-o", codes_path, "--model", tiny_tokenizer_dir, *FAST)
    assert code == 0, err
    assert "resized 6 of 6 images to 32x32" in err  # 96x96 photos, 32 px model: the command says it resized

    files = list_images(photo_dir)
    expected, _, tok = api_codes_and_pixels(tiny_tokenizer_dir, files)
    loaded = load_codes(codes_path)
    assert loaded.names == [str(f.relative_to(photo_dir)) for f in files]
    assert torch.equal(loaded.codes, expected) and loaded.codes.dtype == torch.int64
    assert loaded.grid == (8, 8) and loaded.codebook_size == 256
    assert loaded.model.model_id == str(tiny_tokenizer_dir.resolve())
    assert loaded.model.config_hash == tok.config.config_hash()
    assert loaded.model.revision is None
    assert loaded.model.precision == "fp32" and loaded.model.lookup_backend and loaded.model.lookup_precision == "exact"
    with safe_open(str(codes_path), framework="np") as f:
        assert f.get_tensor("codes").dtype == np.uint8  # smallest dtype for 256 codes
        assert json.loads(f.metadata()["grid"]) == [8, 8]

    # a second encode, naming the files one by one, gives identical codes
    code, _, err = run_cli(capsys, "encode", *files, "-o", tmp_path / "again.safetensors", "--model", tiny_tokenizer_dir, *FAST)
    assert code == 0, err
    assert torch.equal(load_codes(tmp_path / "again.safetensors").codes, expected)

    # decode without --model uses the bundled model, never the one the file names: refused, nothing written
    out = tmp_path / "decoded"
    code, _, err = run_cli(capsys, "decode", codes_path, "-o", out, *FAST)
    assert code == 2 and "but vit_vq:default here has config hash" in err and "--model-from-codes" in err
    assert not out.exists()
    # --model-from-codes uses the recorded model; PNGs equal the API's decode, named after the inputs
    code, _, err = run_cli(capsys, "decode", codes_path, "-o", out, "--model-from-codes", *FAST)
    assert code == 0, err
    decoded = uint8(tok.decode(expected))
    for name, image in zip(loaded.names, decoded, strict=True):
        np.testing.assert_array_equal(png((out / name).with_suffix(".png")), image)


def test_reconstruct_side_by_side_and_psnr(capsys, tmp_path, photo_dir, tiny_tokenizer_dir):
    photo = sorted(photo_dir.glob("*.png"))[0]
    target = tmp_path / "pair.png"
    code, out, err = run_cli(capsys, "reconstruct", photo, "-o", target, "--model", tiny_tokenizer_dir, *FAST)
    assert code == 0, err
    codes, pixels, tok = api_codes_and_pixels(tiny_tokenizer_dir, [photo])
    recon = tok.decode(codes)
    pair = png(target)
    assert pair.shape == (32, 64, 3)
    np.testing.assert_array_equal(pair[:, :32], uint8(pixels)[0])  # original | ...
    np.testing.assert_array_equal(pair[:, 32:], uint8(recon)[0])  # ... | reconstruction

    mse = ((pixels.double().numpy() - recon.double().numpy()) ** 2).mean()
    printed = float(out.split("PSNR ")[1].split(" dB")[0])
    assert printed == pytest.approx(10 * np.log10(1 / mse), abs=0.006)

    # several images into a folder: one PNG each, and the reconstruction matches `decode` of `encode`'s codes
    folder = tmp_path / "pairs"
    code, out, err = run_cli(capsys, "reconstruct", photo_dir, "-o", folder, "--model", tiny_tokenizer_dir, *FAST)
    assert code == 0, err
    assert "mean PSNR over 6 images" in out
    run_cli(capsys, "encode", photo_dir, "-o", tmp_path / "c.safetensors", "--model", tiny_tokenizer_dir, *FAST)
    run_cli(capsys, "decode", tmp_path / "c.safetensors", "-o", tmp_path / "dec", "--model", tiny_tokenizer_dir, *FAST)
    for name in load_codes(tmp_path / "c.safetensors").names:
        np.testing.assert_array_equal(png(folder / name)[:, 32:], png(tmp_path / "dec" / name))


def test_resize_none_rejects_other_sizes(capsys, tmp_path, photo_dir, tiny_tokenizer_dir):
    code, _, err = run_cli(
        capsys, "encode", photo_dir, "-o", tmp_path / "c.safetensors", "--resize", "none", "--model", tiny_tokenizer_dir, *FAST
    )
    assert code == 2
    assert "is 96x96 px but the model takes 32x32; use --resize crop" in err
    exact = tmp_path / "exact.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(exact)
    code, _, err = run_cli(
        capsys, "encode", exact, "-o", tmp_path / "c.safetensors", "--resize", "none", "--model", tiny_tokenizer_dir, *FAST
    )
    assert code == 0, err
    assert "resized" not in err


def _bad_inputs(tmp_path, photo_dir, model):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(ViTVQConfig.from_preset("tiny").to_json())
    other = tmp_path / "other_model"
    ViTVQTokenizer(ViTVQConfig.from_preset("tiny", codebook_size=128)).save_pretrained(other)
    out = tmp_path / "c.safetensors"
    return [
        (["encode", tmp_path / "missing.png", "-o", out, "--model", model], "no such file or folder"),
        (["encode", text, "-o", out, "--model", model, "--strict"], "notes.png: not a readable image"),
        (["encode", text, "-o", out, "--model", model], "none of the 1 input images could be read"),
        (["encode", photo_dir, "-o", out, "--model", no_weights], "has no model.safetensors"),
        (["encode", photo_dir, "-o", tmp_path / "c.bin", "--model", model], "must end in .safetensors"),
        (["encode", photo_dir, "-o", out, "--model", tmp_path / "missing_model"], "no such folder: .*missing_model"),
        (["reconstruct", photo_dir, "-o", tmp_path / "x.png", "--model", model], "names one PNG but several images"),
        (["decode", tmp_path / "missing.safetensors", "-o", tmp_path / "d", "--model", model], "no such codes file"),
        (["decode", model / "model.safetensors", "-o", tmp_path / "d", "--model", model], "not a vit_vq codes file"),
        (["decode", "CODES", "-o", tmp_path / "d", "--model", other], "config hash .* decode with the model that encoded them"),
    ]


def test_bad_input_exits_nonzero_with_one_line(capsys, tmp_path, photo_dir, tiny_tokenizer_dir):
    codes = tmp_path / "good.safetensors"
    assert run_cli(capsys, "encode", photo_dir, "-o", codes, "--model", tiny_tokenizer_dir, *FAST)[0] == 0
    import re

    for argv, message in _bad_inputs(tmp_path, photo_dir, tiny_tokenizer_dir):
        argv = [codes if a == "CODES" else a for a in argv]
        code, _, err = run_cli(capsys, *argv, *FAST)
        lines = [ln for ln in err.splitlines() if "error:" in ln]
        assert code == 2, (argv, err)
        assert len(lines) == 1 and re.search(message, lines[0]), (argv, err)
        assert "Traceback" not in err


def test_missing_packaged_default_is_a_one_line_error(capsys, tmp_path, photo_dir, monkeypatch):
    import dataclasses

    from vit_vq import registry

    monkeypatch.setitem(registry.BUNDLED, "default", dataclasses.replace(registry.BUNDLED["default"], folder="no-such-folder"))
    code, _, err = run_cli(capsys, "encode", photo_dir, "-o", tmp_path / "c.safetensors", *FAST)
    assert code == 2 and "the packaged default tokenizer is missing" in err and "reinstall vit_vq" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_compile_flag_gives_the_same_codes(capsys, tmp_path, photo_dir, tiny_tokenizer_dir, single_thread):
    eager, compiled = tmp_path / "eager.safetensors", tmp_path / "compiled.safetensors"
    assert run_cli(capsys, "encode", photo_dir, "-o", eager, "--model", tiny_tokenizer_dir, *FAST)[0] == 0
    code, _, err = run_cli(capsys, "encode", photo_dir, "-o", compiled, "--model", tiny_tokenizer_dir, "--compile", *FAST)
    assert code == 0, err
    assert torch.equal(load_codes(compiled).codes, load_codes(eager).codes)
    tok = ViTVQTokenizer.from_pretrained(tiny_tokenizer_dir)
    keys = set(tok.state_dict())

    assert set(tok.compile().state_dict()) == keys  # compiled in place: save_pretrained keeps working


def test_decode_refuses_codes_from_other_weights(capsys, tmp_path, photo_dir, tiny_tokenizer_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_tokenizer_dir, model)
    codes = tmp_path / "codes.safetensors"
    assert run_cli(capsys, "encode", photo_dir, "-o", codes, "--model", model)[0] == 0
    tok = ViTVQTokenizer.from_pretrained(model)
    with torch.no_grad():
        tok.decoder.to_pixels.weight.mul_(-1)  # same architecture, different weights
    tok.save_pretrained(model)
    code, _, err = run_cli(capsys, "decode", codes, "-o", tmp_path / "out", "--model", model)
    assert code == 2 and "weights changed since encoding" in err


def test_encode_and_reconstruct_skip_an_unreadable_file_and_report_it(capsys, tmp_path, photo_dir, tiny_tokenizer_dir):
    """One text file named .png in a folder of photos: coded around, reported; --strict stops (issue 19, point 6)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(photo_dir, data)
    (data / "notes.png").write_text("this is not an image")
    good = list_images(photo_dir)
    model = ["--model", tiny_tokenizer_dir]
    codes = tmp_path / "c.safetensors"
    code, _, err = run_cli(capsys, "encode", data, "-o", codes, *model, *FAST)
    assert code == 0, err
    assert "skipped" in err and "notes.png: not a readable image" in err
    loaded = load_codes(codes)
    assert len(loaded.names) == len(good) and "notes.png" not in loaded.names
    expected = ViTVQTokenizer.from_pretrained(tiny_tokenizer_dir).encode(
        ViTVQTokenizer.from_pretrained(tiny_tokenizer_dir).preprocess([load_image(data / n) for n in loaded.names]))
    assert torch.equal(loaded.codes, expected)  # the rest coded as if the bad file were not there
    out = tmp_path / "side"
    code, stdout, err = run_cli(capsys, "reconstruct", data, "-o", out, *model, *FAST)
    assert code == 0 and "notes.png: not a readable image" in err, err
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written == sorted(str(Path(n).with_suffix(".png")) for n in loaded.names)
    code, _, err = run_cli(capsys, "encode", data, "-o", tmp_path / "strict.safetensors", *model, "--strict", *FAST)
    assert code == 2 and "notes.png: not a readable image" in err
    assert not (tmp_path / "strict.safetensors").exists()


def test_an_unwritable_output_fails_before_any_work(capsys, tmp_path, photo_dir, tiny_tokenizer_dir, monkeypatch):
    import vit_vq.cli.encode as encode_cmd

    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    called = []
    monkeypatch.setattr(encode_cmd, "setup_model", lambda *a, **k: called.append(1))
    code, _, err = run_cli(capsys, "encode", photo_dir, "-o", blocker / "sub" / "c.safetensors", "--model",
                           tiny_tokenizer_dir, *FAST)
    assert code == 2 and "cannot write the codes file into" in err and called == []
