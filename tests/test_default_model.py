"""The tokenizer that ships inside the package: loads offline, reconstructs unseen photos, drives `vit-vq demo`."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vit_vq import ViTVQTokenizer
from vit_vq.default_model import default_model_dir, load_default, model_card, sample_photos

# Measured on the bundled samples with the shipped weights (see the model card), minus a margin
# that leaves room for BLAS differences between machines but not for a broken model.
SAMPLE_PSNR_FLOOR = 20.0
MAX_WEIGHTS_BYTES = 20 * 10**6


@pytest.fixture
def no_network(monkeypatch):
    """HF_HUB_OFFLINE=1 and every socket connection refused; yields the list of attempted addresses."""
    import huggingface_hub.constants

    attempts: list[object] = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network disabled in this test (tried {address!r})")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def _heldout_names(card: str) -> set[str]:
    """Photo names listed in the model card's held-out table (first column, backticked)."""
    section = card.split("## Held-out photos", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([^`]+)`", section, flags=re.M))


def _psnr_numpy(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """PSNR per image in float64 numpy: an independent check of `vit_vq.metrics.psnr`."""
    a64, b64 = a.double().numpy(), b.double().numpy()
    mse = ((a64 - b64) ** 2).reshape(len(a64), -1).mean(1)
    return 10 * np.log10(1.0 / mse)


def test_default_loads_with_networking_disabled(no_network):
    with pytest.raises(OSError, match="network disabled"):  # the guard is live
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    no_network.clear()
    tok = load_default()
    assert isinstance(tok, ViTVQTokenizer) and not tok.training
    assert no_network == []
    if hasattr(ViTVQTokenizer, "default"):  # the public entry point added on top of load_default
        assert ViTVQTokenizer.default().config == tok.config
        assert no_network == []


def test_default_files_are_small_safetensors_with_a_card():
    folder = default_model_dir()
    weights = folder / "model.safetensors"
    assert weights.stat().st_size <= MAX_WEIGHTS_BYTES
    assert weights.read_bytes()[8:9] == b"{"  # safetensors: 8-byte header length, then a JSON header
    config = json.loads((folder / "config.json").read_text())
    assert config["image_size"] >= 128 and config["patch_size"] >= 8
    card = model_card()
    for needle in ("scikit-image", "scikit-learn", "plasma-workspace-wallpapers", "mate-backgrounds", "PSNR", "SSIM"):
        assert needle in card


def test_samples_are_held_out_photos():
    samples = sample_photos()
    assert len(samples) >= 4
    heldout = _heldout_names(model_card())
    assert heldout, "the model card lists no held-out photos"
    assert {p.stem for p in samples} <= heldout


def test_default_reconstructs_unseen_photos(no_network):
    tok = load_default()
    images = [Image.open(p).convert("RGB") for p in sample_photos()]
    x = tok.preprocess(images)  # (B, 3, S, S)
    codes = tok.encode(x)
    assert codes.shape == (len(images), tok.config.grid_size, tok.config.grid_size)
    assert codes.dtype == torch.int64 and 0 <= int(codes.min()) and int(codes.max()) < tok.config.codebook_size
    recon = tok.decode(codes)
    scores = _psnr_numpy(recon, x)
    assert scores.mean() >= SAMPLE_PSNR_FLOOR, f"mean PSNR {scores.mean():.2f} dB on the held-out samples: {scores.round(2)}"
    # the reconstruction is of *this* photo: pairing it with another photo scores far worse
    shuffled = _psnr_numpy(recon, x.roll(1, dims=0))
    assert (scores > shuffled + 3).all()
    assert torch.equal(tok.encode(x), codes)  # deterministic


def _run_demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vit_vq", "demo", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=900,  # a guard against a hang, not a speed check (speed lives in benchmarks/)
    )


def test_demo_cli_writes_a_grid_and_scores(tmp_path):
    proc = _run_demo(tmp_path, "-o", "grid.png", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in ("PSNR", "SSIM", "codebook usage", "tokens per image", "center-cropped", "grid.png"):
        assert needle in out, out
    n = len(sample_photos())
    mean_psnr = float(re.search(r"^mean\s+([\d.]+)", out, flags=re.M).group(1))
    assert mean_psnr >= SAMPLE_PSNR_FLOOR
    with Image.open(tmp_path / "grid.png") as im:
        assert im.format == "PNG" and im.mode == "RGB"
        width, height = im.size
    size = json.loads((default_model_dir() / "config.json").read_text())["image_size"]
    assert height > n * size and width > 2 * size  # n rows of original | reconstruction


def test_demo_rejects_an_output_that_is_not_png(tmp_path):
    proc = _run_demo(tmp_path, "-o", "grid.jpg", "--device", "cpu")
    assert proc.returncode == 2
    assert "PNG" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "grid.jpg").exists()
