"""What the command line prints: result lines never run into the progress bar; counts read as English."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from vit_vq.cli.main import main

FAST = ["--num-workers", "0", "--device", "cpu"]


def test_reconstruct_lines_do_not_run_into_the_progress_bar(tmp_path, photo_dir, tiny_tokenizer_dir):
    """stdout and stderr into one unbuffered pipe, as on a terminal: each result line starts a line of its own."""
    out = tmp_path / "pairs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "vit_vq", "reconstruct", str(photo_dir), "-o", str(out), "--model", str(tiny_tokenizer_dir),
         "--batch-size", "1", *FAST],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout
    assert "img/s]" in proc.stdout or "img]" in proc.stdout  # the bar was drawn, so the test can fail
    segments = re.split(r"[\r\n]", proc.stdout)  # what a terminal shows as line starts
    results = [s for s in segments if "PSNR" in s and "->" in s]
    assert len(results) == 6, proc.stdout
    assert all(re.match(r"(sub/)?photo\d\.png: PSNR", s) for s in results), results
    assert "wrote 6 side-by-side PNGs (original | reconstruction)" in proc.stdout


def test_one_image_is_one_png_and_one_code_grid(capsys, tmp_path, photo_dir, tiny_tokenizer_dir):
    photo = photo_dir / "photo0.png"
    assert main(["reconstruct", str(photo), "-o", str(tmp_path / "pair.png"), "--model", str(tiny_tokenizer_dir), *FAST]) == 0
    err = capsys.readouterr().err
    assert "wrote 1 side-by-side PNG (original" in err
    assert main(["encode", str(photo), "-o", str(tmp_path / "c.safetensors"), "--model", str(tiny_tokenizer_dir), *FAST]) == 0
    assert "wrote 1 code grid of 8x8" in capsys.readouterr().err
