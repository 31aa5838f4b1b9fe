"""`vit-vq tokenize`: two processes (gloo), skip-and-report, resumable shards, datasets input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vit_vq import ViTVQTokenizer
from vit_vq.cli.main import main
from vit_vq.data import load_image
from vit_vq.pipeline.manifest import iter_shards, load_manifest, verify_shards
from vit_vq.pipeline.shards import plan_shards, shards_for_rank

REQUIRED = {"num_images", "skipped", "shards", "model", "revision", "config_hash", "lookup_backend", "precision"}


def torchrun(*argv, timeout: float = 180) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m vit_vq.cli.main tokenize ...`; its whole process group dies on timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vit_vq.cli.main", "tokenize", *map(str, argv), "--num-workers", "0", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun tokenize timed out after {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture
def data_with_corrupt(photo_dir):
    (photo_dir / "sub" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    return photo_dir


def api_codes(tok, path) -> torch.Tensor:
    return tok.encode(tok.preprocess(load_image(path)))[0]


@pytest.mark.slow
def test_two_processes_resume_and_decode(tmp_path, data_with_corrupt, tiny_tokenizer_dir):
    out = tmp_path / "tokens"
    proc = torchrun("--data", data_with_corrupt, "--out", out, "--model", tiny_tokenizer_dir, "--shard-size", "2")
    assert proc.returncode == 0, proc.stderr
    manifest = load_manifest(out)
    assert REQUIRED <= set(manifest)
    readable = 6  # the photos; the seventh file is corrupt
    assert manifest["num_images"] == readable and manifest["num_inputs"] == readable + 1
    assert manifest["world_size"] == 2 and len(manifest["shards"]) == 4
    assert [s["path"] for s in manifest["skipped"]] == [os.path.join("sub", "corrupt.jpg")]
    assert "not a readable image" in manifest["skipped"][0]["reason"]
    assert sum(s["num_images"] for s in manifest["shards"]) == readable
    assert manifest["codes_dtype"] == "uint8" and manifest["grid"] == [8, 8]
    assert verify_shards(out) == []

    # every image coded exactly once, and the codes are the API's codes and decode
    tok = ViTVQTokenizer.from_pretrained(tiny_tokenizer_dir)
    seen = []
    for shard in iter_shards(out):
        for key, codes in zip(shard["keys"], shard["codes"], strict=True):
            assert torch.equal(codes, api_codes(tok, data_with_corrupt / key)), key
            seen.append(key)
        assert tok.decode(shard["codes"]).shape == (len(shard["keys"]), 3, 32, 32)
    assert len(seen) == len(set(seen)) == readable

    # delete one shard: a re-run rewrites only that one, and the manifest comes back byte-identical
    before = (out / "manifest.json").read_bytes()
    victim = out / manifest["shards"][1]["file"]
    victim.unlink()
    others = {p.name: p.stat().st_mtime_ns for p in out.glob("codes-*.safetensors")}
    proc = torchrun("--data", data_with_corrupt, "--out", out, "--model", tiny_tokenizer_dir, "--shard-size", "2")
    assert proc.returncode == 0, proc.stderr
    assert "(1 written, 3 already complete; 2 processes)" in proc.stderr
    assert victim.is_file()
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("codes-*.safetensors") if p != victim} == others
    assert (out / "manifest.json").read_bytes() == before


def test_datasets_input_with_labels_npy_and_conflicts(capsys, tmp_path, photos, tiny_tokenizer_dir):
    import datasets

    images = [Image.fromarray(p).resize((40, 48)) for p in photos[:5]]
    ds = datasets.Dataset.from_dict({"image": images, "label": [3, 1, 4, 1, 5]}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "tokens"
    argv = ["tokenize", "--data", tmp_path / "ds", "--out", out, "--model", tiny_tokenizer_dir, "--format", "npy",
            "--shard-size", "3", "--batch-size", "2", "--label-column", "label", "--num-workers", "0", "--device", "cpu"]
    assert main([*map(str, argv)]) == 0
    manifest = load_manifest(out)
    assert manifest["num_images"] == 5 and manifest["skipped"] == [] and manifest["shard_format"] == "npy"
    shard_files = [f"codes-0000{k}{ext}" for k in (0, 1) for ext in (".json", ".npy", ".indices.npy", ".labels.npy")]
    assert sorted(os.listdir(out)) == sorted(["manifest.json", ".vit_vq-tokenize.lock", ".vit_vq-output", *shard_files])
    assert np.load(out / "codes-00000.npy").dtype == np.uint8
    tok = ViTVQTokenizer.from_pretrained(tiny_tokenizer_dir)
    shards = list(iter_shards(out))
    assert torch.cat([s["labels"] for s in shards]).tolist() == [3, 1, 4, 1, 5]
    assert torch.cat([s["indices"] for s in shards]).tolist() == [0, 1, 2, 3, 4]
    assert [k for s in shards for k in s["keys"]] == ["0", "1", "2", "3", "4"]
    expected = tok.encode(tok.preprocess(images))
    assert torch.equal(torch.cat([s["codes"] for s in shards]), expected)
    capsys.readouterr()

    # the same folder with different settings is refused, then replaced with --overwrite
    changed = [a if a != "3" else "2" for a in map(str, argv)]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "holds files this run did not write: codes-00000.json was made by a different run" in err and "--overwrite" in err
    assert main([*changed, "--overwrite"]) == 0
    assert load_manifest(out)["shard_size"] == 2 and len(load_manifest(out)["shards"]) == 3


@pytest.mark.parametrize("num_items", [0, 1, 7, 10])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shard_plan_covers_every_item_once(num_items, world):
    shards = plan_shards(num_items, 3)
    items = [i for r in range(world) for s in shards_for_rank(shards, r, world) for i in range(s.start, s.stop)]
    assert sorted(items) == list(range(num_items))  # no padding duplicates, no lost items


def test_tokenize_missing_data(capsys, tmp_path, tiny_tokenizer_dir):
    code = main(["tokenize", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--model", str(tiny_tokenizer_dir)])
    err = capsys.readouterr().err
    assert code == 2 and re.search(r"no such (file or )?folder: .*nope", err), err
    assert not (tmp_path / "o").exists()


def test_manifest_json_is_plain_json(tmp_path, photo_dir, tiny_tokenizer_dir):
    argv = ["tokenize", "--data", photo_dir, "--out", tmp_path / "t", "--model", tiny_tokenizer_dir, "--num-workers", "0"]
    assert main([*map(str, argv)]) == 0
    data = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert data["num_images"] == 6 and data["skipped"] == [] and len(data["shards"]) == 1
    assert len(data["shards"][0]["sha256"]) == 64


def test_resume_after_the_inputs_changed_is_refused(capsys, tmp_path, photo_dir, tiny_tokenizer_dir):
    """Renaming an input shifts which images sit in which shard: reusing old shards would lose images."""
    out = tmp_path / "shards"
    argv = ["tokenize", "--data", str(photo_dir), "--out", str(out), "--model", str(tiny_tokenizer_dir), "--shard-size", "2"]
    assert main(argv) == 0
    first = sorted(photo_dir.glob("*.png"))[0]
    first.rename(first.with_name("zz_" + first.name))
    capsys.readouterr()
    assert main(argv) == 2
    assert "codes-00000.json was made by a different run" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    keys = [k for s in iter_shards(out) for k in s["keys"]]
    assert len(keys) == len(set(keys)) == load_manifest(out)["num_images"]
