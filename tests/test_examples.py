"""Every script in examples/ runs (on CPU, small settings). The GPT-2 and Ray examples have their own tests."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run(args, cwd, timeout=240):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_every_example_has_a_test():
    tested = {"generate_with_gpt2.py", "tokenize_with_ray.py", "plot_pipeline.py", "train_default.py", "prepare_default_data.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} <= tested


def test_plot_pipeline_draws_the_front_page_figure(tmp_path):
    run([EXAMPLES / "plot_pipeline.py", "--out", tmp_path / "pipeline.png"], cwd=tmp_path)
    with Image.open(tmp_path / "pipeline.png") as im:
        assert im.format == "PNG" and im.width > 600


@pytest.mark.slow
def test_train_default_recipe_runs_end_to_end_on_a_mini_pack(tmp_path, photos):
    """Two optimizer steps through the Trainer, export, held-out scoring and the model card."""
    from conftest import write_mini_pack

    pack = write_mini_pack(tmp_path / "pack", photos, excluded_packages=["mate-backgrounds"])
    out = run([EXAMPLES / "train_default.py", "--steps", "2", "--batch-size", "4", "--device", "cpu",
               "--data", pack, "--output", tmp_path / "run", "--eval-crops", "8"], cwd=tmp_path, timeout=400)
    final = tmp_path / "run" / "final"
    record = json.loads((final / "eval.json").read_text())
    assert record["run"]["steps"] == 2 and 0 < record["scores"]["heldout_psnr"] < 60
    assert "scikit-image" in (final / "README.md").read_text()
    from vit_vq import ViTVQTokenizer

    assert ViTVQTokenizer.from_pretrained(final).config.image_size == 128
    assert out


@pytest.mark.skipif(not Path("/usr/share/wallpapers").is_dir() or shutil.which("dpkg") is None,
                    reason="needs the Debian wallpaper packages (apt-get install plasma-workspace-wallpapers ...)")
def test_prepare_default_data_collects_the_pack(tmp_path):
    run([EXAMPLES / "prepare_default_data.py", "--out", tmp_path / "pack", "--short-side", "96"], cwd=tmp_path, timeout=400)
    manifest = json.loads((tmp_path / "pack" / "manifest.json").read_text())
    assert "mate-backgrounds" in manifest["excluded_packages"]
    names = {p["name"] for p in manifest["photos"]}
    assert set(manifest["heldout"]) <= names
    assert not any("mate" in p["source"] for p in manifest["photos"])
    assert len(list((tmp_path / "pack" / "train").glob("*.jpg"))) > 20
