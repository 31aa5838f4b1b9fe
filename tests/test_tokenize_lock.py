"""`vit-vq tokenize` output folders: one run at a time, resumes that see replaced images, no clobbering."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

from vit_vq import ViTVQTokenizer
from vit_vq.cli.main import main
from vit_vq.data import load_image
from vit_vq.pipeline.manifest import iter_shards, load_manifest

# A real tokenize run that stops after its first shard until it is killed (it holds the lock meanwhile).
PAUSED_RUN = textwrap.dedent(
    """
    import sys, time
    import vit_vq.pipeline.tokenize as T
    from vit_vq.cli.main import main

    write = T.write_shard

    def write_then_pause(*args, **kwargs):
        record = write(*args, **kwargs)
        print("PAUSED", flush=True)
        time.sleep(600)
        return record

    T.write_shard = write_then_pause
    sys.exit(main(sys.argv[1:]))
    """
)


def tokenize_argv(data, out, model, *extra) -> list[str]:
    return ["tokenize", "--data", str(data), "--out", str(out), "--model", str(model), "--num-workers", "0",
            "--device", "cpu", "--no-progress", *map(str, extra)]


def assert_codes_match_api(out, data, model_dir) -> list[str]:
    """Every shard's codes equal `tok.encode` of the image on disk now; returns the keys."""
    tok = ViTVQTokenizer.from_pretrained(model_dir)
    keys = []
    for shard in iter_shards(out):
        for key, codes in zip(shard["keys"], shard["codes"], strict=True):
            assert torch.equal(codes, tok.encode(tok.preprocess(load_image(data / key)))[0]), key
            keys.append(key)
    assert len(keys) == len(set(keys)) == load_manifest(out)["num_images"]
    return keys


@pytest.mark.slow
def test_second_concurrent_run_is_refused_with_the_holders_pid(capsys, tmp_path, photo_dir, tiny_tokenizer_dir):
    out = tmp_path / "tokens"
    argv = tokenize_argv(photo_dir, out, tiny_tokenizer_dir, "--shard-size", "2", "--batch-size", "1")
    holder = subprocess.Popen(
        [sys.executable, "-c", PAUSED_RUN, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
    )
    try:
        line = holder.stdout.readline()
        assert line.strip() == "PAUSED", holder.stderr.read()
        # a second run with other settings while the first holds the folder: refused, naming the holder
        assert main(tokenize_argv(photo_dir, out, tiny_tokenizer_dir, "--shard-size", "3")) == 2
        err = capsys.readouterr().err
        assert f"in use by another vit-vq tokenize run (PID {holder.pid}" in err, err
        assert not (out / "manifest.json").exists()
        assert json.loads((out / "codes-00000.json").read_text())["run"]["shard_size"] == 2  # the holder's shard, untouched
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # a killed holder: the kernel drops its lock
        holder.communicate()
    assert main(argv) == 0
    assert "(2 written, 1 already complete; 1 process)" in capsys.readouterr().err
    assert_codes_match_api(out, photo_dir, tiny_tokenizer_dir)


def test_replaced_image_is_recoded_on_resume(capsys, tmp_path, photo_dir, tiny_tokenizer_dir, photos):
    out = tmp_path / "tokens"
    argv = tokenize_argv(photo_dir, out, tiny_tokenizer_dir, "--shard-size", "2")
    assert main(argv) == 0
    untouched = load_manifest(out)["shards"][1]
    victim = photo_dir / next(iter_shards(out))["keys"][0]  # an image of shard 0
    before = next(iter_shards(out))["codes"][0].clone()
    stat = victim.stat()
    Image.fromarray(photos[7]).resize((96, 96)).save(victim)  # another photo under the same name
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    capsys.readouterr()
    assert main(argv) == 0
    assert "(1 written, 2 already complete" in capsys.readouterr().err
    after = next(iter_shards(out))["codes"][0]
    assert not torch.equal(before, after)  # the new photo's codes, not the stale ones
    assert_codes_match_api(out, photo_dir, tiny_tokenizer_dir)
    assert load_manifest(out)["shards"][1] == untouched  # the other shards were reused as they were


def test_out_inside_the_data_folder_is_left_out_of_the_inputs(capsys, tmp_path, photo_dir, tiny_tokenizer_dir):
    out = photo_dir / "tokens"
    argv = tokenize_argv(photo_dir, out, tiny_tokenizer_dir, "--shard-size", "2")
    assert main(argv) == 0
    assert load_manifest(out)["num_inputs"] == 6 and load_manifest(out)["skipped"] == []
    capsys.readouterr()
    assert main(argv) == 0  # a re-run sees the same inputs, so it resumes instead of reading its own shards
    assert "(0 written, 3 already complete" in capsys.readouterr().err
    assert_codes_match_api(out, photo_dir, tiny_tokenizer_dir)

    assert main(tokenize_argv(photo_dir, photo_dir, tiny_tokenizer_dir)) == 2
    assert "is the input folder itself" in capsys.readouterr().err


def test_files_of_another_run_are_never_overwritten(capsys, tmp_path, photo_dir, tiny_tokenizer_dir):
    out = tmp_path / "tokens"
    out.mkdir()
    user_file = out / "codes-00000.safetensors"
    user_file.write_bytes(b"the user's own file")
    argv = tokenize_argv(photo_dir, out, tiny_tokenizer_dir, "--shard-size", "2")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "codes-00000.safetensors exists but no record of this run describes it" in err and "--overwrite" in err
    assert user_file.read_bytes() == b"the user's own file"

    user_file.unlink()
    (out / "manifest.json").write_text('{"notes": "not a tokenize manifest"}')
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "manifest.json describes a different run" in err and "--overwrite" in err
    assert (out / "manifest.json").read_text() == '{"notes": "not a tokenize manifest"}'
    assert not list(out.glob("codes-*"))  # refused before writing anything

    assert main([*argv, "--overwrite"]) == 0
    assert_codes_match_api(out, photo_dir, tiny_tokenizer_dir)

    # a shard file without its record, left by this same run (a crash between the two): rewritten
    (out / "codes-00001.json").unlink()
    capsys.readouterr()
    assert main(argv) == 0
    assert "(1 written, 2 already complete" in capsys.readouterr().err
    assert_codes_match_api(out, photo_dir, tiny_tokenizer_dir)
    # the same orphan in a folder another run claimed last: refused
    (out / "codes-00001.json").unlink()
    other = tokenize_argv(photo_dir, out, tiny_tokenizer_dir, "--shard-size", "2", "--resize", "none")
    assert main(other) == 2
    assert "different run" in capsys.readouterr().err
    assert main(argv) == 0  # the run that made it can still finish


def test_lock_file_names_pid_and_dies_with_the_process(tmp_path):
    from vit_vq.files import FolderInUseError
    from vit_vq.pipeline.outdir import tokenize_lock as FolderLock

    code = (
        "import sys; from vit_vq.pipeline.outdir import tokenize_lock as FolderLock\n"
        "FolderLock(sys.argv[1]).acquire(); print('LOCKED', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        with pytest.raises(FolderInUseError, match=f"PID {holder.pid} on "):
            FolderLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with FolderLock(tmp_path) as lock:  # the dead holder's lock is gone; its file remains
        lock.claim("abc")
        with pytest.raises(FolderInUseError, match=f"PID {os.getpid()} "):
            FolderLock(tmp_path).acquire()  # a second open file in one process is refused too
    with FolderLock(tmp_path) as lock:
        assert lock.previous_run == "abc"
    assert [p.name for p in tmp_path.iterdir()] == [".vit_vq-tokenize.lock"]


def test_outputs_inside_the_data_are_left_out_of_every_later_run(capsys, tmp_path, photo_dir, tiny_tokenizer_dir):
    """A tokenize --out inside the data is marked; encode, a later tokenize with another --out, and the
    training listing never read it back as (unreadable) inputs (issue 19, point 10)."""
    from vit_vq.data import list_images
    from vit_vq.files import OUTPUT_MARKER

    inside = photo_dir / "tokens"
    assert main(tokenize_argv(photo_dir, inside, tiny_tokenizer_dir)) == 0
    assert (inside / OUTPUT_MARKER).is_file()
    photos = list_images(photo_dir, include_all_files=True)
    assert photos and not any(p.is_relative_to(inside) for p in photos)
    capsys.readouterr()
    other = tmp_path / "other"
    assert main(tokenize_argv(photo_dir, other, tiny_tokenizer_dir)) == 0
    manifest = load_manifest(other)
    assert manifest["num_inputs"] == 6 and manifest["skipped"] == [], manifest["skipped"][:2]
    assert main(["encode", str(photo_dir), "-o", str(tmp_path / "c.safetensors"), "--model", str(tiny_tokenizer_dir),
                 "--num-workers", "0", "--device", "cpu"]) == 0
    assert "skipped" not in capsys.readouterr().err
    # without its marker the folder is an input again (a lock file alone hides nothing)
    (inside / OUTPUT_MARKER).unlink()
    assert any(p.is_relative_to(inside) for p in list_images(photo_dir, include_all_files=True))


def test_an_out_folder_that_already_holds_images_is_not_marked(capsys, tmp_path, photo_dir, tiny_tokenizer_dir):
    """Marking it would hide the user's images from every later run (attacker review)."""
    import shutil

    from vit_vq.data import list_images
    from vit_vq.files import OUTPUT_MARKER

    data = tmp_path / "data"
    shutil.copytree(photo_dir, data)
    mine = data / "y2023"
    mine.mkdir()
    shutil.copy(list_images(photo_dir)[0], mine / "keep.png")
    assert main(tokenize_argv(data, mine, tiny_tokenizer_dir)) == 0
    assert not (mine / OUTPUT_MARKER).exists()
    assert mine / "keep.png" in list_images(data)
