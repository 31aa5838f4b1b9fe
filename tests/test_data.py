"""Image sources skip and report unreadable items instead of raising."""

import io
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

from vit_vq.data import HFImageDataset, ImageFolder, collate_images, load_image, looks_like_path, open_image_source
from vit_vq.pipeline.sources import FileImages


def test_a_corrupt_row_in_a_datasets_dataset_is_skipped(tmp_path):
    datasets = pytest.importorskip("datasets")
    buf = io.BytesIO()
    Image.fromarray((np.random.rand(20, 20, 3) * 255).astype("uint8")).save(buf, format="PNG")
    rows = [{"bytes": buf.getvalue(), "path": None}, {"bytes": b"not an image", "path": None}]
    ds = datasets.Dataset.from_dict({"image": rows, "label": [3, 4]}).cast_column("image", datasets.Image())
    ds.save_to_disk(tmp_path / "ds")
    source = HFImageDataset(str(tmp_path / "ds"), label_column="label")
    batch = collate_images([source[0], source[1]])
    assert batch["pixels"].shape == (1, 3, 20, 20)
    assert batch["labels"].tolist() == [3]
    assert [s["path"] for s in batch["skipped"]] == ["1"] and "not a readable image" in batch["skipped"][0]["reason"]


def test_a_corrupt_file_in_a_folder_is_skipped(photo_dir):
    (photo_dir / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    source = ImageFolder(photo_dir)
    batch = collate_images([source[i] for i in range(len(source))])
    assert len(batch["skipped"]) == 1 and batch["skipped"][0]["path"] == "broken.jpg"
    assert batch["pixels"].shape[0] == len(source) - 1
    assert torch.isfinite(batch["pixels"]).all()


def _skipped_after_loading(folder):
    source = ImageFolder(folder)
    batch = collate_images([source[i] for i in range(len(source))])
    return batch["keys"], batch["skipped"]


def test_an_unreadable_subfolder_is_reported_not_skipped(photo_dir, monkeypatch):
    """Simulated (works as root, which ignores permissions): listing `locked/` fails."""
    Image.fromarray(np.zeros((96, 96, 3), dtype=np.uint8)).save(photo_dir / "sub" / "locked.png")
    (photo_dir / "locked").mkdir()
    real_scandir = os.scandir

    def scandir(path="."):
        if os.path.basename(os.fspath(path)) == "locked":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    keys, skipped = _skipped_after_loading(photo_dir)
    assert [s["path"] for s in skipped] == ["locked"]
    assert "a folder that cannot be read (PermissionError: Permission denied)" in skipped[0]["reason"]
    assert len(keys) == 7 and "sub/locked.png" in keys
    files = FileImages([photo_dir])  # the command-line inputs of `encode` / `reconstruct`
    assert [files[i]["error"] is not None for i in range(len(files))].count(True) == 1 and "locked" in files.keys


# Lists and loads a folder in a child process; as root it first drops to `nobody` (after
# importing everything it needs), since root ignores permissions.
CHILD_UNPRIVILEGED = """
import json, os, sys
from PIL import ExifTags, Image, ImageOps
from vit_vq.data import ImageFolder, collate_images
Image.init()
if os.geteuid() == 0:
    os.setgid(65534)
    os.setuid(65534)
source = ImageFolder(sys.argv[1])
batch = collate_images([source[i] for i in range(len(source))])
print(json.dumps([batch["keys"], batch["skipped"]]))
"""


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_a_subfolder_without_permissions_is_reported(photos):
    """Real permissions (`chmod 0`), checked by an unprivileged process."""
    with tempfile.TemporaryDirectory() as tmp:  # not under pytest's 0700 base: `nobody` must reach it
        root = os.path.join(tmp, "photos")
        os.makedirs(os.path.join(root, "locked"))
        for folder in (tmp, root):
            os.chmod(folder, 0o755)
        for name in ("a.png", "locked/b.png"):
            Image.fromarray(photos[0][:16, :16]).save(os.path.join(root, name))
            os.chmod(os.path.join(root, name), 0o644)
        os.chmod(os.path.join(root, "locked"), 0)
        try:
            done = subprocess.run([sys.executable, "-c", CHILD_UNPRIVILEGED, root], capture_output=True, text=True, timeout=600)
        finally:
            os.chmod(os.path.join(root, "locked"), 0o755)
    assert done.returncode == 0, done.stderr[-2000:]
    keys, skipped = json.loads(done.stdout.strip().splitlines()[-1])
    assert keys == ["a.png"]
    assert [s["path"] for s in skipped] == ["locked"] and "PermissionError: Permission denied" in skipped[0]["reason"]


@pytest.mark.parametrize("data", ["tokins/", "./tokins", "~/no-such-tokins", "data/tokins/train", "/no/such/tokins"])
def test_a_missing_path_is_no_such_folder_not_a_hub_lookup(monkeypatch, data):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=f"^no such folder: '{data}'$"):
        open_image_source(data)


def test_hub_style_names_still_reach_datasets():
    assert not looks_like_path("org/name") and not looks_like_path("cifar10")
    assert looks_like_path("org/name/") and looks_like_path("a\\b")


def test_corrupt_file_among_real_photos_in_a_datasets_image_column(tmp_path, photo_dir):
    datasets = pytest.importorskip("datasets")
    (photo_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    files = sorted(photo_dir.rglob("*.png"))
    ds = datasets.Dataset.from_dict({"image": [str(f) for f in files], "label": list(range(len(files)))})
    ds.cast_column("image", datasets.Image()).save_to_disk(tmp_path / "ds")
    source = open_image_source(tmp_path / "ds", label_column="label")
    assert isinstance(source, HFImageDataset)
    batch = collate_images([source[i] for i in range(len(source))])
    bad = files.index(photo_dir / "broken.png")
    assert [s["path"] for s in batch["skipped"]] == [str(bad)] and "not a readable image" in batch["skipped"][0]["reason"]
    good = [f for f in files if f.name != "broken.png"]
    assert torch.equal(batch["pixels"], torch.stack([load_image(f) for f in good]))
    assert batch["labels"].tolist() == [i for i in range(len(files)) if i != bad]
