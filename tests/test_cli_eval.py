"""`vit-vq eval`: JSON keys and ranges, PSNR/SSIM/usage against independent computations, the PNG grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vit_vq import ViTVQTokenizer
from vit_vq.cli.main import main
from vit_vq.data import list_images, load_image

KEYS = {"psnr", "ssim", "codebook_usage", "perplexity", "images", "images_per_second"}


def run_eval(capsys, *argv) -> tuple[int, str, str]:
    code = main(["eval", *map(str, argv), "--num-workers", "0", "--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_json_matches_independent_metrics(capsys, tmp_path, photo_dir, tiny_tokenizer_dir, monkeypatch):
    from skimage.metrics import structural_similarity

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_weights_here"))
    (photo_dir / "broken.png").write_bytes(b"garbage")
    report = tmp_path / "out" / "metrics.json"
    code, out, err = run_eval(capsys, "--data", photo_dir, "--json", report, "--model", tiny_tokenizer_dir, "--batch-size", "4")
    assert code == 0, err
    metrics = json.loads(report.read_text())
    assert set(metrics) == KEYS  # no weights here: no lpips / rfid keys
    assert "lpips: not computed" in err and "rfid: not computed" in err
    assert "skipped broken.png" in err and "resized 6 of 6 images" in err
    assert metrics["images"] == 6
    assert 0 < metrics["codebook_usage"] <= 1 and 1 <= metrics["perplexity"] <= 256
    assert -1 <= metrics["ssim"] <= 1 and 0 < metrics["psnr"] < 100 and metrics["images_per_second"] > 0

    tok = ViTVQTokenizer.from_pretrained(tiny_tokenizer_dir)
    files = [f for f in list_images(photo_dir) if f.name != "broken.png"]
    x = tok.preprocess([load_image(f) for f in files])
    codes = torch.cat([tok.encode(x[i : i + 4]) for i in range(0, 6, 4)])  # the same batches as the command
    recon = torch.cat([tok.decode(codes[i : i + 4]) for i in range(0, 6, 4)])
    xd, rd = x.double().numpy(), recon.double().numpy()
    psnr_ref = np.mean([10 * np.log10(1 / ((xd[i] - rd[i]) ** 2).mean()) for i in range(6)])
    ssim_ref = np.mean([
        structural_similarity(xd[i].transpose(1, 2, 0), rd[i].transpose(1, 2, 0), data_range=1.0, channel_axis=-1,
                              gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        for i in range(6)
    ])
    assert metrics["psnr"] == pytest.approx(psnr_ref, abs=1e-4)
    assert metrics["ssim"] == pytest.approx(ssim_ref, abs=1e-5)
    assert metrics["codebook_usage"] == pytest.approx(len(np.unique(codes.numpy())) / 256)
    assert f"{metrics['psnr']:.3f}" in out

    grid = np.asarray(Image.open(report.with_suffix(".png")))
    assert grid.shape == (2 + 2 * 34, 2 + 6 * 34, 3)  # originals above reconstructions, 6 per row, 2 px gaps


class PoolFeatures(torch.nn.Module):
    """A cheap stand-in for Inception-v3: 4x4 average-pooled pixels (48 features)."""

    def __init__(self, weights=None):
        super().__init__()

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1)


def test_eval_rfid_when_features_are_available(capsys, tmp_path, photo_dir, tiny_tokenizer_dir, monkeypatch):
    """The rFID wiring: features of originals vs reconstructions, compared with an independent Frechet distance."""
    from scipy.linalg import sqrtm

    import vit_vq.cli.eval as eval_cli

    monkeypatch.setattr(eval_cli, "InceptionFeatures", PoolFeatures)
    report = tmp_path / "m.json"
    code, out, err = run_eval(
        capsys, "--data", photo_dir, "--json", report, "--model", tiny_tokenizer_dir, "--limit", "5",
        "--grid", tmp_path / "g.png", "--fid-weights", tmp_path / "absent.pth",  # the TF-Inception one cannot be had
    )
    assert code == 0, err
    metrics = json.loads(report.read_text())
    assert set(metrics) == KEYS | {"rfid", "rfid_network"} and metrics["images"] == 5
    assert metrics["rfid_network"] == "torchvision-inception" and "comparable within vit_vq only" in err
    assert "rFID" in out and "only 5 images" in err and (tmp_path / "g.png").is_file()

    tok = ViTVQTokenizer.from_pretrained(tiny_tokenizer_dir)
    x = tok.preprocess([load_image(f) for f in list_images(photo_dir)[:5]])
    real = PoolFeatures()(x).double().numpy()
    fake = PoolFeatures()(tok.decode(tok.encode(x))).double().numpy()
    c1, c2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    expected = ((real.mean(0) - fake.mean(0)) ** 2).sum() + np.trace(c1 + c2 - 2 * sqrtm(c1 @ c2).real)
    assert metrics["rfid"] == pytest.approx(expected, rel=1e-5, abs=1e-8)


def test_eval_bad_input(capsys, tmp_path, tiny_tokenizer_dir):
    code, _, err = run_eval(capsys, "--data", tmp_path / "missing", "--model", tiny_tokenizer_dir)
    assert code == 2 and "no such folder" in err and "missing" in err
    empty = tmp_path / "only_text"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    code, _, err = run_eval(capsys, "--data", empty, "--model", tiny_tokenizer_dir, "--grid", tmp_path / "g.png")
    assert code == 2 and "no readable images" in err


def test_eval_rfid_as_published_through_torchmetrics(capsys, tmp_path, photo_dir, tiny_tokenizer_dir, tf_inception_file,
                                                    monkeypatch):
    """--fid-weights: torchmetrics' FID on torch-fidelity's TF-Inception (a local random-weight copy here; its
    64-feature tap, so that the 2048 x 2048 eigen-solve does not cost minutes on a CPU)."""
    import functools

    import vit_vq.cli.eval as eval_cli
    from vit_vq.metrics import PublishedFID

    monkeypatch.setattr(eval_cli, "PublishedFID", functools.partial(PublishedFID, features=64))

    report = tmp_path / "m.json"
    code, out, err = run_eval(capsys, "--data", photo_dir, "--json", report, "--model", tiny_tokenizer_dir, "--limit", "2",
                              "--fid-weights", tf_inception_file)
    assert code == 0, err
    metrics = json.loads(report.read_text())
    assert metrics["rfid_network"] == "tf-inception" and "(tf-inception)" in out
    tok = ViTVQTokenizer.from_pretrained(tiny_tokenizer_dir)
    x = tok.preprocess([load_image(f) for f in list_images(photo_dir)[:2]])
    fid = PublishedFID(tf_inception_file, features=64)
    fid.update(x, tok.decode(tok.encode(x)))
    assert metrics["rfid"] == pytest.approx(fid.compute(), rel=1e-5)
