"""Images are size-checked from their header, and one image's memory trouble is that image's error."""

import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

import vit_vq.data
import vit_vq.preprocess
from vit_vq.data import ImageFolder, collate_images, load_image
from vit_vq.pipeline.sources import ModelSizedImages, collate_sized

# Loads a folder through the pipeline's dataset at 128 px in a child process whose address
# space is capped at 1.5 GB above what the imports took, so that a regression fails with an
# allocation error instead of touching gigabytes; prints the batch and the peak RSS.
CHILD = """
import json, resource, sys
from vit_vq.data import ImageFolder
from vit_vq.pipeline.sources import ModelSizedImages, collate_sized
out = {}
if sys.argv[1] != "-":
    with open("/proc/self/statm") as f:
        vsize = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (vsize + 1536 * 2**20, resource.RLIM_INFINITY))
    ds = ModelSizedImages(ImageFolder(sys.argv[1]), 128)
    batch = collate_sized([ds[i] for i in range(len(ds))])
    out = {"keys": batch["keys"], "skipped": batch["skipped"]}
out["peak_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(out))
"""


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` 8-bit grey pixels but holds none of them."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _run_child(arg: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, arg], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc and caps the address space with RLIMIT_AS")
def test_a_one_pixel_strip_is_skipped_with_bounded_memory(tmp_path, photos):
    Image.new("L", (60000, 1), 200).save(tmp_path / "strip.png")  # 11.8 GB if its short side went to 128 px
    assert (tmp_path / "strip.png").stat().st_size < 1000
    Image.fromarray(photos[0]).resize((96, 96)).save(tmp_path / "photo.png")
    baseline, run = _run_child("-"), _run_child(str(tmp_path))
    assert run["keys"] == ["photo.png"]
    [skipped] = run["skipped"]
    assert skipped["path"] == "strip.png" and "60000x1 px, an aspect ratio above the limit of 32:1" in skipped["reason"]
    grown_mb = (run["peak_kb"] - baseline["peak_kb"]) / 1024
    assert grown_mb < 300, f"peak RSS grew {grown_mb:.0f} MB over an import-only process"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns above 89 M pixels; we refuse first
def test_a_huge_image_is_refused_from_its_header(tmp_path, photo_dir):
    (photo_dir / "huge.png").write_bytes(_png_header(12000, 12000))  # no pixel data: decoding would fail otherwise
    limit = r"huge\.png: image is 12000x12000 px = 144,000,000 pixels, above the limit of 67,108,864"
    with pytest.raises(ValueError, match=limit):
        load_image(photo_dir / "huge.png")
    source = ImageFolder(photo_dir)
    batch = collate_images([source[i] for i in range(len(source))])
    assert [s["path"] for s in batch["skipped"]] == ["huge.png"] and "MAX_IMAGE_PIXELS" in batch["skipped"][0]["reason"]
    assert batch["pixels"].shape[0] == len(source) - 1


def test_the_pixel_limit_is_read_at_each_load(tmp_path, monkeypatch):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    monkeypatch.setattr(vit_vq.preprocess, "MAX_IMAGE_PIXELS", 399)
    with pytest.raises(ValueError, match="400 pixels, above the limit of 399"):
        load_image(tmp_path / "a.png")
    monkeypatch.setattr(vit_vq.preprocess, "MAX_IMAGE_PIXELS", 400)
    assert load_image(tmp_path / "a.png").shape == (3, 20, 20)


def test_an_allocation_failure_is_one_images_error(photo_dir, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 11811160064 bytes")

    monkeypatch.setattr("vit_vq.pipeline.sources.resize_center_crop", out_of_memory)
    dataset = ModelSizedImages(ImageFolder(photo_dir), 32)
    batch = collate_sized([dataset[i] for i in range(len(dataset))])
    assert batch["pixels"] is None and len(batch["skipped"]) == len(dataset)
    assert "cannot be resized (RuntimeError: DefaultCPUAllocator: can't allocate memory" in batch["skipped"][0]["reason"]

    def no_memory(image):
        raise MemoryError()

    monkeypatch.setattr(vit_vq.data, "to_tensor", no_memory)
    with pytest.raises(ValueError, match=r"photo0\.png: out of memory while loading \(MemoryError"):
        load_image(photo_dir / "photo0.png")
    assert ImageFolder(photo_dir)[0]["error"].endswith("out of memory while loading (MemoryError: )")


def test_only_known_decoders_are_used(tmp_path):
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "a.pcx")  # Pillow reads PCX, we do not
    with pytest.raises(ValueError, match=r"a\.pcx: not a readable image \(UnidentifiedImageError"):
        load_image(tmp_path / "a.pcx")


CHILD_LOAD = """
import sys
from vit_vq.data import load_image
try:
    load_image(sys.argv[1])
except ValueError as err:
    print(err)
"""


def test_the_environment_sets_the_limit_for_new_processes(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    env = {**os.environ, "VIT_VQ_MAX_IMAGE_PIXELS": "399"}
    command = [sys.executable, "-c", CHILD_LOAD, str(tmp_path / "a.png")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert "400 pixels, above the limit of 399" in done.stdout, done.stderr[-2000:]


def test_the_environment_is_read_at_each_load(tmp_path, monkeypatch):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    monkeypatch.setenv("VIT_VQ_MAX_IMAGE_PIXELS", "399")
    with pytest.raises(ValueError, match="400 pixels, above the limit of 399"):
        load_image(tmp_path / "a.png")
    monkeypatch.setenv("VIT_VQ_MAX_ASPECT_RATIO", "0")
    with pytest.raises(ValueError, match=r"^the environment variable 'VIT_VQ_MAX_ASPECT_RATIO' must be in \[1, \d+\], got 0$"):
        ImageFolder(tmp_path)  # the job's error, before any image is loaded


def test_a_malformed_limit_in_the_environment_is_a_one_line_command_error(tmp_path, tiny_tokenizer_dir):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    env = {**os.environ, "VIT_VQ_MAX_IMAGE_PIXELS": "abc"}
    command = [sys.executable, "-m", "vit_vq", "encode", str(tmp_path / "a.png"), "-o", str(tmp_path / "codes.safetensors"),
               "--model", str(tiny_tokenizer_dir), "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [
        "vit-vq encode: error: the environment variable 'VIT_VQ_MAX_IMAGE_PIXELS' must be a whole number, got 'abc'"
    ]
    assert not (tmp_path / "codes.safetensors").exists()
