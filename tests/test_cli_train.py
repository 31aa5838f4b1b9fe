"""`vit-vq train` end to end: train, export, load the export, encode; flags, config files and errors."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from vit_vq import ViTVQTokenizer
from vit_vq.cli.main import build_parser, main
from vit_vq.cli.train import config_from_args
from vit_vq.training import TrainConfig

FAST = ["--num-workers", "0", "--no-progress", "--trackers", "none", "--mixed-precision", "no", "--warmup-steps", "1"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def parse(*argv: str) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]))


@pytest.mark.slow
def test_train_export_load_encode_then_resume_from_the_command_line(tmp_path, train_photo_dir, capsys):
    from conftest import photo_crops

    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--data", str(train_photo_dir), "--output", str(out), "--max-steps", "3",
            "--batch-size", "4", "--save-every", "2", "--perceptual-weight", "0", *FAST]
    assert main(argv) == 0
    assert "model exported to" in capsys.readouterr().out
    tok = ViTVQTokenizer.from_pretrained(out / "final")
    codes = tok.encode(photo_crops(32, 3))
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.int64
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]

    # a second process continues the run: its first log line says where it resumed
    cmd = [sys.executable, "-m", "vit_vq", *argv[:-len(FAST)], *FAST]
    cmd[cmd.index("--max-steps") + 1] = "4"
    proc = subprocess.run([*cmd, "--resume", "latest"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[0] == "resumed from step 3", lines[:5]
    assert "checkpoint-4" in {p.name for p in (out / "checkpoints").iterdir()}


def test_every_train_config_field_has_a_flag():
    import argparse

    from vit_vq.cli.train import add_parser

    text = add_parser(argparse.ArgumentParser().add_subparsers()).format_help()
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in text, f.name
    for flag in ("--preset", "--config", "--data", "--init", "--output", "--max-steps", "--batch-size", "--save-every",
                 "--resume", "--perceptual-weight", "--mixed-precision"):
        assert f"{flag} " in text, flag


def test_every_flag_is_documented():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"`--{f.name.replace('_', '-')}`" not in text]
    assert not missing, f"docs/training.md lacks {missing}"


def test_flags_override_the_config_file_which_overrides_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\nmax-steps: 99\nlr: 0.01\nadam_betas: [0.8, 0.95]\nmodel_overrides: {codebook_size: 64}\n")
    cfg = parse("--config", str(path), "--max-steps", "2", "--no-hflip", "--codebook-lr", "none")
    assert (cfg.preset, cfg.max_steps, cfg.lr, cfg.adam_betas) == ("tiny", 2, 0.01, (0.8, 0.95))
    assert cfg.model_overrides == {"codebook_size": 64} and cfg.hflip is False and cfg.codebook_lr is None
    assert cfg.batch_size == TrainConfig().batch_size
    cfg = parse("--preset", "small", "--model-overrides", "codebook_size=128", "use_ema=false", "--adam-betas", "0.5", "0.9")
    assert cfg.model_overrides == {"codebook_size": 128, "use_ema": False} and cfg.adam_betas == (0.5, 0.9)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--preset", "tiny", "--init", "org/model"], "do not combine it with preset"),
        (["--data", "x"], "choose a model"),
        (["--preset", "tiny", "--max-steps", "0"], "--max-steps must be a positive int"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, argv, message, capsys):
    assert main(["train", *argv, "--output", str(tmp_path / "o"), *FAST]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_setting_in_the_config_file_is_named(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("preset: tiny\nlearning_rate: 0.1\n")
    assert main(["train", "--config", str(path)]) == 2
    assert "unknown training settings ['learning_rate']" in capsys.readouterr().err


def test_missing_vgg_weights_exit_2_and_say_how_to_fix(tmp_path, train_photo_dir, monkeypatch, capsys):
    import torch.hub

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    argv = ["train", "--preset", "tiny", "--data", str(train_photo_dir), "--output", str(tmp_path / "o"),
            "--perceptual-weight", "0.5", "--download-timeout", "0", *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--perceptual-weights-path" in err and "--perceptual-weight 0" in err


def test_init_vit_vq_default_fine_tunes_the_bundled_model(tmp_path, train_photo_dir, capsys):
    out = tmp_path / "run"
    argv = ["train", "--init", "vit_vq:default", "--data", str(train_photo_dir), "--output", str(out), "--max-steps", "1",
            "--batch-size", "2", "--lr", "1e-12", "--perceptual-weight", "0", *FAST]
    assert main(argv) == 0, capsys.readouterr().err
    tuned, base = ViTVQTokenizer.from_pretrained(out / "final"), ViTVQTokenizer.default()
    assert tuned.config == base.config
    for part in ("encoder", "decoder"):  # a learning rate of 1e-12 leaves the starting weights: the bundled ones
        theirs = getattr(base, part).state_dict()
        for key, value in getattr(tuned, part).state_dict().items():
            torch.testing.assert_close(value, theirs[key], atol=1e-6, rtol=0, msg=f"{part}.{key}")


def test_the_default_recipe_is_one_flag_beneath_the_file_and_the_flags(tmp_path):
    from vit_vq.training.config import RECIPES

    recipe = RECIPES["default"]
    assert recipe["crop_scales"] == "log_uniform" and recipe["whole_prob"] == 0.25
    cfg = parse("--preset", "tiny", "--recipe", "default")
    assert {k: getattr(cfg, k) for k in recipe} == recipe
    assert cfg == TrainConfig.from_recipe("default", preset="tiny")
    cfg = parse("--preset", "tiny", "--recipe", "default", "--whole-prob", "0", "--lr", "1e-3")  # flags win
    assert (cfg.whole_prob, cfg.lr, cfg.crop_scales) == (0.0, 1e-3, "log_uniform")
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\nwhole_prob: 0.5\n")
    assert parse("--config", str(path), "--recipe", "default").whole_prob == 0.5  # the file wins over the recipe
    path.write_text("preset: tiny\nrecipe: default\n")
    assert parse("--config", str(path)).crop_scales == "log_uniform"  # or names it
    with pytest.raises(ValueError, match=r"unknown recipe 'fast'; known recipes: \['default'\]"):
        TrainConfig.from_recipe("fast")
