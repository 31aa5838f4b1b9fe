"""The command line never destroys user files, and every failure is one line without a traceback."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vit_vq
from vit_vq.cli.main import main

FAST = ["--num-workers", "0", "--device", "cpu"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([*map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    """Exit status 2, exactly one `error:` line on stderr holding every needle, and no traceback."""
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and 'File "' not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def digests(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def codes_file(capsys, tmp_path, photo_dir, tiny_tokenizer_dir) -> Path:
    path = tmp_path / "codes.safetensors"
    code, _, err = run_cli(capsys, "encode", photo_dir, "-o", path, "--model", tiny_tokenizer_dir, *FAST)
    assert code == 0, err
    return path


# -- never destroy user files ----------------------------------------------------------------
def test_decode_into_the_folder_of_the_originals_leaves_them_byte_identical(capsys, photo_dir, codes_file, tiny_tokenizer_dir):
    before = digests(photo_dir)  # the originals are PNGs named like the decoded images will be
    code, _, err = run_cli(capsys, "decode", codes_file, "-o", photo_dir, "--model", tiny_tokenizer_dir, *FAST)
    line = assert_one_line_error(code, err, "refusing to overwrite", "--overwrite", "and 5 more")
    assert str(photo_dir / "photo0.png") in line  # the first image of the codes file
    assert digests(photo_dir) == before  # nothing replaced, nothing added

    code, _, err = run_cli(capsys, "decode", codes_file, "-o", photo_dir, "--model", tiny_tokenizer_dir, "--overwrite", *FAST)
    assert code == 0, err
    after = digests(photo_dir)
    assert set(after) == set(before) and all(after[k] != before[k] for k in before)  # replaced, as asked


def test_decode_checks_every_output_before_writing_any(capsys, tmp_path, codes_file, tiny_tokenizer_dir):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "photo5.png").write_bytes(b"mine")  # only the last image collides
    code, _, err = run_cli(capsys, "decode", codes_file, "-o", out, "--model", tiny_tokenizer_dir, *FAST)
    assert_one_line_error(code, err, "photo5.png", "--overwrite")
    assert digests(out) == {"sub/photo5.png": hashlib.sha256(b"mine").hexdigest()}


def test_outputs_are_checked_before_the_model_is_loaded(capsys, tmp_path, photo_dir):
    """The refusal comes first: a missing --model is not even looked at."""
    taken = tmp_path / "taken"
    taken.write_bytes(b"keep me")
    missing_model = tmp_path / "no_model"
    cases = [
        ["encode", photo_dir, "-o", tmp_path / "c.safetensors"],
        ["reconstruct", photo_dir / "photo0.png", "-o", tmp_path / "pair.png"],
        ["eval", "--data", photo_dir, "--json", tmp_path / "m.json"],
        ["eval", "--data", photo_dir, "--grid", tmp_path / "g.png"],
    ]
    for argv in cases:
        target = Path(argv[-1])
        target.write_bytes(b"keep me")
        code, _, err = run_cli(capsys, *argv, "--model", missing_model, *FAST)
        assert_one_line_error(code, err, "refusing to overwrite", str(target), "--overwrite")
        assert target.read_bytes() == b"keep me"


def test_demo_refuses_an_existing_grid(capsys, tmp_path):
    grid = tmp_path / "demo.png"
    grid.write_bytes(b"my picture")
    code, _, err = run_cli(capsys, "demo", "-o", grid, "--device", "cpu")
    assert_one_line_error(code, err, str(grid), "--overwrite")
    assert grid.read_bytes() == b"my picture"


def test_demo_replaces_its_own_grid_but_not_a_users_png(capsys, tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    grid = tmp_path / "demo.png"
    code, _, err = run_cli(capsys, "demo", "-o", grid, "--device", "cpu")
    assert code == 0, err
    with Image.open(grid) as im:
        assert im.format == "PNG" and im.text.get("vit-vq") == "demo"
        first = np.asarray(im.convert("RGB"))
    # A stand-in for an earlier demo's grid: a real 1x1 PNG carrying the marker is replaced by a full grid.
    mark = PngInfo()
    mark.add_text("vit-vq", "demo")
    Image.new("RGB", (1, 1)).save(grid, pnginfo=mark)
    code, out, err = run_cli(capsys, "demo", "-o", grid, "--device", "cpu")
    assert code == 0, err
    assert "replacing the grid an earlier vit-vq demo wrote" in out
    with Image.open(grid) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), first)  # the same grid again (deterministic)
    # A user's PNG without the marker (and one with another value) stays untouched.
    for text in ({}, {"vit-vq": "not the demo"}):
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
        Image.new("RGB", (4, 4), (200, 10, 10)).save(grid, pnginfo=info)
        before = grid.read_bytes()
        code, _, err = run_cli(capsys, "demo", "-o", grid, "--device", "cpu")
        assert_one_line_error(code, err, "refusing to overwrite", str(grid), "--overwrite")
        assert grid.read_bytes() == before


def test_eval_overwrite_replaces_its_outputs(capsys, tmp_path, photo_dir, tiny_tokenizer_dir):
    report = tmp_path / "m.json"
    report.write_text("old")
    code, _, err = run_cli(capsys, "eval", "--data", photo_dir, "--json", report, "--model", tiny_tokenizer_dir,
                           "--overwrite", *FAST)
    assert code == 0, err
    assert '"psnr"' in report.read_text() and report.with_suffix(".png").is_file()


def test_reconstruct_into_a_folder_inside_the_inputs_does_not_read_its_own_outputs(capsys, photo_dir, tiny_tokenizer_dir):
    out = photo_dir / "recon"
    argv = ["reconstruct", photo_dir, "-o", out, "--model", tiny_tokenizer_dir, *FAST]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "mean PSNR over 6 images" in stdout
    first = digests(out)
    assert len(first) == 6

    code, stdout, err = run_cli(capsys, *argv, "--overwrite")  # a second run reads the same 6 photos again
    assert code == 0, err
    assert "mean PSNR over 6 images" in stdout
    assert digests(out) == first  # same inputs, same pairs; no recon/recon/... from re-read outputs


def test_reconstruct_into_an_input_folder_or_above_it(capsys, photo_dir, tiny_tokenizer_dir):
    before = digests(photo_dir)
    code, _, err = run_cli(capsys, "reconstruct", photo_dir, "-o", photo_dir, "--model", tiny_tokenizer_dir, *FAST)
    assert_one_line_error(code, err, str(photo_dir / "photo0.png"), "--overwrite")  # the pairs would replace the photos
    assert digests(photo_dir) == before

    code, stdout, err = run_cli(capsys, "reconstruct", photo_dir / "sub", "-o", photo_dir, "--model", tiny_tokenizer_dir, *FAST)
    assert code == 0, err  # a folder above the inputs: every input is read, the pairs land beside the other photos
    assert "mean PSNR over 3 images" in stdout
    assert set(digests(photo_dir)) == set(before) | {"photo1.png", "photo3.png", "photo5.png"}
    assert all(digests(photo_dir)[k] == v for k, v in before.items())


# -- one line, never a traceback ----------------------------------------------------------------
def test_forced_triton_backend_on_cpu_is_one_line(capsys, monkeypatch, tmp_path, photo_dir, tiny_tokenizer_dir):
    monkeypatch.setenv("VIT_VQ_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, _, err = run_cli(capsys, "encode", photo_dir, "-o", tmp_path / "c.safetensors", "--model", tiny_tokenizer_dir, *FAST)
    assert_one_line_error(code, err, "VIT_VQ_BACKEND", "triton")


def test_unsafe_pickle_from_a_user_file_is_one_line(capsys, tmp_path, photo_dir, tiny_tokenizer_dir):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    evil = tmp_path / "inception.pth"
    evil.write_bytes(pickle.dumps(Payload()))
    code, _, err = run_cli(capsys, "eval", "--data", photo_dir, "--model", tiny_tokenizer_dir, "--inception-weights", evil,
                           "--grid", tmp_path / "g.png", *FAST)
    line = assert_one_line_error(code, err, "refused to unpickle")
    assert "weights_only` set to `False`" not in line  # torch's advice to switch the check off is not repeated
    assert not (tmp_path / "ran").exists()


def test_allocation_failure_is_one_line(capsys, monkeypatch, tmp_path, photo_dir, tiny_tokenizer_dir):
    from vit_vq import ViTVQTokenizer

    try:
        torch.empty(2**62, dtype=torch.uint8)  # the real error torch raises when an allocation fails
    except RuntimeError as err:
        failure = err
    monkeypatch.setattr(ViTVQTokenizer, "encode", lambda self, x: (_ for _ in ()).throw(failure))
    code, _, err = run_cli(capsys, "encode", photo_dir, "-o", tmp_path / "c.safetensors", "--model", tiny_tokenizer_dir, *FAST)
    assert_one_line_error(code, err, "out of memory", "--batch-size")


def test_an_unexpected_error_is_one_line_and_verbose_shows_the_traceback(capsys, monkeypatch, tmp_path, photo_dir,
                                                                         tiny_tokenizer_dir):
    from vit_vq import ViTVQTokenizer

    monkeypatch.setattr(ViTVQTokenizer, "encode", lambda self, x: {}["a bug"])
    argv = ["encode", photo_dir, "-o", tmp_path / "c.safetensors", "--model", tiny_tokenizer_dir, *FAST]
    code, _, err = run_cli(capsys, *argv)
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert "KeyError: 'a bug'" in lines[0] and "vit-vq -v" in lines[0]
    code, _, err = run_cli(capsys, "-v", *argv)
    assert code == 1 and "Traceback (most recent call last)" in err


def test_deeply_nested_train_config_is_one_line(capsys, tmp_path):
    nested = tmp_path / "run.yaml"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = run_cli(capsys, "train", "--config", nested)
    assert_one_line_error(code, err, "nested too deeply")


@pytest.mark.parametrize("flag", ["--data", "--init"])
def test_missing_local_paths_for_train_are_no_such_folder(capsys, tmp_path, monkeypatch, train_photo_dir, flag):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    given = {"--data": str(train_photo_dir), "--init": None}
    given[flag] = "tokins/"
    argv = ["train", "--data", given["--data"], "--output", tmp_path / "run", "--num-workers", "0", "--trackers", "none",
            "--no-progress", "--perceptual-weight", "0", "--max-steps", "1", "--batch-size", "2"]
    argv += ["--init", given["--init"]] if given["--init"] else ["--preset", "tiny"]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "no such folder", "tokins/")


def test_too_little_training_data_names_the_count_and_the_batch(capsys, tmp_path, photo_dir):
    argv = ["train", "--preset", "tiny", "--data", photo_dir, "--output", tmp_path / "run", "--batch-size", "32",
            "--num-workers", "0", "--trackers", "none", "--no-progress", "--perceptual-weight", "0"]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "6 items", "32", "--batch-size")


def test_resume_latest_refuses_a_checkpoint_linked_from_outside_the_run(tmp_path):
    from vit_vq.training.checkpoint import STATE_NAME, checkpoints_dir, resolve_resume

    run, elsewhere = tmp_path / "run", tmp_path / "downloaded" / "checkpoint-9"
    elsewhere.mkdir(parents=True)
    (checkpoints_dir(run) / "checkpoint-2").mkdir(parents=True)
    for folder in (elsewhere, checkpoints_dir(run) / "checkpoint-2"):  # complete: trainer state and weights
        (folder / STATE_NAME).write_text("{}")
        (folder / "model.safetensors").write_bytes(b"weights")
    assert resolve_resume(run, "latest") == checkpoints_dir(run) / "checkpoint-2"
    (checkpoints_dir(run) / "checkpoint-9").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match="refusing to resume from .*checkpoint-9.*a link to"):
        resolve_resume(run, "latest")


def test_version_flag():
    proc = subprocess.run([sys.executable, "-m", "vit_vq", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"vit-vq {vit_vq.__version__}"
    from importlib.metadata import version

    assert version("vit_vq") == vit_vq.__version__


@pytest.mark.slow
def test_torchrun_train_on_cpu_is_one_line_per_process(tmp_path, train_photo_dir):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "-m", "vit_vq.cli.main", "train", "--preset", "tiny",
           "--data", str(train_photo_dir), "--output", str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "2",
           "--num-workers", "0", "--no-progress", "--trackers", "none", "--perceptual-weight", "0"]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    ours = [ln for ln in proc.stderr.splitlines() if "vit-vq train: error:" in ln]
    assert len(ours) == 2, proc.stderr[-3000:]  # one line from each rank
    assert all(ln.count("error:") == 1 and "accelerate launch" in ln for ln in ours), ours
    assert not re.search(r'File ".*vit_vq[/\\]', proc.stderr), proc.stderr[-3000:]  # no traceback through our code


def test_missing_train_extra_names_the_install_command(tmp_path, train_photo_dir):
    """`pip install .` without `[train]`: `vit-vq train` says which extra to install (accelerate hidden from import)."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    # A meta-path finder that makes `import accelerate` fail exactly as on a machine without it.
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoAccelerate:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'accelerate' or name.startswith('accelerate.'):\n"
        "            raise ModuleNotFoundError(f\"No module named '{name}'\", name=name)\n"
        "sys.meta_path.insert(0, _NoAccelerate())\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "vit_vq.cli.main", "train", "--preset", "tiny", "--data", str(train_photo_dir),
         "--output", str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "4"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "'accelerate'" in lines[0] and "pip install '.[train]'" in lines[0], lines[0]
