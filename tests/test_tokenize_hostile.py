"""`vit-vq tokenize` against hostile folders: planted links and FIFOs, odd file names, replaced inputs, stale shards."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image
from test_tokenize_lock import assert_codes_match_api, tokenize_argv

from vit_vq.cli.main import main
from vit_vq.pipeline.manifest import load_manifest
from vit_vq.pipeline.outdir import LOCK_NAME

needs_posix = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX links and FIFOs")


def run_with_timeout(code: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -c code argv...`; a hang (the defect under test) fails the test instead of stalling the suite."""
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code), *argv], capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s (reading a FIFO or a device forever?)")


@needs_posix
def test_symlinked_lock_file_is_refused_and_its_target_untouched(capsys, tmp_path, photo_dir, tiny_tokenizer_dir):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious bytes\n")
    out = tmp_path / "tokens"
    out.mkdir()
    (out / LOCK_NAME).symlink_to(victim)
    assert main(tokenize_argv(photo_dir, out, tiny_tokenizer_dir)) == 2
    err = capsys.readouterr().err
    assert f"{out / LOCK_NAME} is a symbolic link" in err and len(err.strip().splitlines()) == 1, err
    assert victim.read_bytes() == b"precious bytes\n"
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written


@needs_posix
def test_fifo_in_place_of_the_manifest_is_refused_unread(tmp_path, photo_dir, tiny_tokenizer_dir):
    out = tmp_path / "tokens"
    out.mkdir()
    os.mkfifo(out / "manifest.json")
    code = "import sys; from vit_vq.cli.main import main; sys.exit(main(sys.argv[1:]))"
    proc = run_with_timeout(code, *tokenize_argv(photo_dir, out, tiny_tokenizer_dir))
    assert proc.returncode == 2 and "manifest.json describes a different run" in proc.stderr, proc.stderr


@needs_posix
def test_hard_linked_or_fifo_lock_file_is_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious bytes\n")
    linked, fifo = tmp_path / "linked", tmp_path / "fifo"
    linked.mkdir()
    fifo.mkdir()
    os.link(victim, linked / LOCK_NAME)
    os.mkfifo(fifo / LOCK_NAME)
    code = """
        import sys
        from vit_vq.pipeline.outdir import tokenize_lock as FolderLock
        for folder in sys.argv[1:]:
            try:
                FolderLock(folder).acquire()
                print("ACQUIRED")
            except ValueError as err:
                print(err)
    """
    proc = run_with_timeout(code, str(linked), str(fifo))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"{linked / LOCK_NAME} is a file with 2 hard links; remove it (vit-vq tokenize writes its lock there)",
        f"{fifo / LOCK_NAME} is not a regular file; remove it (vit-vq tokenize writes its lock there)",
    ]
    assert victim.read_bytes() == b"precious bytes\n"


def test_non_utf8_file_name_is_coded_and_its_key_round_trips(tmp_path, photo_dir, tiny_tokenizer_dir):
    name = os.fsdecode(b"bad\xff.png")  # not UTF-8: a surrogate escape in the str
    try:
        (photo_dir / "photo0.png").rename(photo_dir / name)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    corrupt = os.fsdecode(b"broken\xfe.png")
    (photo_dir / corrupt).write_bytes(b"not an image")
    out = tmp_path / "tokens"
    argv = [sys.executable, "-m", "vit_vq.cli.main", *tokenize_argv(photo_dir, out, tiny_tokenizer_dir, "--shard-size", "4")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)  # the real stderr stream
    assert first.returncode == 0 and "skipped broken\\udcfe.png: " in first.stderr, first.stderr  # reported, escaped
    keys = assert_codes_match_api(out, photo_dir, tiny_tokenizer_dir)  # each key opens its image again
    assert name in keys and os.fsencode(name) == b"bad\xff.png"
    manifest = load_manifest(out)
    assert manifest["num_images"] == 6 and [os.fsencode(s["path"]) for s in manifest["skipped"]] == [b"broken\xfe.png"]
    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert "(0 written, 2 already complete" in again.stderr, again.stderr  # a resume fingerprints the names the same way


def test_image_replaced_with_the_same_size_and_mtime_is_recoded(capsys, tmp_path, photo_dir, tiny_tokenizer_dir, photos):
    """`cp -p`, `rsync -t` or `os.utime` keep size and mtime; the change time and inode still tell."""
    victim = photo_dir / "photo0.bmp"  # BMP: the file size depends only on the image size
    (photo_dir / "photo0.png").unlink()
    Image.fromarray(photos[0]).resize((96, 96)).save(victim)
    out = tmp_path / "tokens"
    argv = tokenize_argv(photo_dir, out, tiny_tokenizer_dir, "--shard-size", "2")
    assert main(argv) == 0
    before = victim.stat()
    Image.fromarray(photos[7]).resize((96, 96)).save(victim)  # another photo, rewritten in place
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = victim.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)  # the case this test is about
    capsys.readouterr()
    assert main(argv) == 0
    assert "(1 written, 2 already complete" in capsys.readouterr().err
    assert_codes_match_api(out, photo_dir, tiny_tokenizer_dir)  # the new photo's codes, not the stale ones


@needs_posix
@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero"])
def test_pickling_a_mapper_refuses_model_weights_that_are_not_a_file(tmp_path, tiny_tokenizer_dir, kind):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_tokenizer_dir / "config.json").read_bytes())
    weights = folder / "model.safetensors"
    if kind == "fifo":
        os.mkfifo(weights)
    else:
        if not os.path.exists("/dev/zero"):
            pytest.skip("no /dev/zero")
        weights.symlink_to("/dev/zero")
    code = """
        import pickle, sys
        from vit_vq.pipeline import TokenizeBatch
        try:
            pickle.dumps(TokenizeBatch(sys.argv[1], device="cpu"))
            print("PICKLED")
        except ValueError as err:
            print(err)
    """
    proc = run_with_timeout(code, str(folder))
    assert proc.returncode == 0, proc.stderr
    what = "a FIFO (named pipe)" if kind == "fifo" else "a character device"
    assert proc.stdout.strip() == f"{weights} is {what}; vit_vq reads tokenizer files only from regular files"


def test_pickled_mapper_fingerprint_follows_the_weights(tiny_tokenizer_dir, tmp_path):
    """The fingerprint still tracks the bytes of a regular model folder (copied, then one weight changed)."""
    from safetensors.numpy import load_file, save_file

    from vit_vq.pipeline import TokenizeBatch

    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((tiny_tokenizer_dir / name).read_bytes())
    same = TokenizeBatch(str(tiny_tokenizer_dir), device="cpu").__getstate__()["_weights"]
    assert TokenizeBatch(str(folder), device="cpu").__getstate__()["_weights"] == same
    assert pickle.loads(pickle.dumps(TokenizeBatch(str(folder), device="cpu"))).model == str(folder)
    arrays = load_file(str(folder / "model.safetensors"))
    name = sorted(arrays)[0]
    arrays[name] = np.ascontiguousarray(arrays[name] + 1)
    save_file(arrays, str(folder / "model.safetensors"))
    assert TokenizeBatch(str(folder), device="cpu").__getstate__()["_weights"] != same


@needs_posix
def test_overwrite_removes_the_previous_runs_extra_shards_only(capsys, tmp_path, photo_dir, tiny_tokenizer_dir):
    out = tmp_path / "tokens"
    assert main(tokenize_argv(photo_dir, out, tiny_tokenizer_dir, "--shard-size", "2", "--format", "npy")) == 0
    assert len(list(out.glob("codes-*.json"))) == 3
    (out / "codes-00007.npy").write_bytes(b"the user's own file, named like a shard")  # no record names it
    (out / "codes-00002.indices.npy").write_bytes(b"edited by the user")  # no longer the bytes its record names
    (out / "notes.txt").write_text("mine")
    victim = tmp_path / "victim.npy"
    victim.write_bytes(b"precious")
    digest = hashlib.sha256(b"precious").hexdigest()
    (out / "codes-00005.npy").symlink_to(victim)  # a planted record naming a link and a path outside --out
    (out / "codes-00005.json").write_text(json.dumps({"run": {}, "sha256": {"codes-00005.npy": digest, "../victim.npy": digest}}))
    capsys.readouterr()
    assert main(tokenize_argv(photo_dir, out, tiny_tokenizer_dir, "--shard-size", "4")) == 2  # refused without --overwrite
    assert "different run" in capsys.readouterr().err
    assert main(tokenize_argv(photo_dir, out, tiny_tokenizer_dir, "--shard-size", "4", "--overwrite")) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([
        ".vit_vq-output", ".vit_vq-tokenize.lock", "manifest.json", "notes.txt",
        "codes-00000.json", "codes-00000.safetensors", "codes-00001.json", "codes-00001.safetensors",  # this run
        "codes-00007.npy", "codes-00002.indices.npy", "codes-00002.json",  # not the previous run's bytes: kept
        "codes-00005.npy", "codes-00005.json",  # a link is never removed, nor the record that names it
    ])
    assert victim.read_bytes() == b"precious"
    assert (out / "codes-00007.npy").read_bytes() == b"the user's own file, named like a shard"
    keys = assert_codes_match_api(out, photo_dir, tiny_tokenizer_dir)
    assert len(keys) == 6 and [s["file"] for s in load_manifest(out)["shards"]] == [
        "codes-00000.safetensors", "codes-00001.safetensors",
    ]
    # the record kept for the edited file still names it; the files it names that were intact are gone
    assert json.loads((out / "codes-00002.json").read_text())["files"]["codes"] == "codes-00002.npy"
