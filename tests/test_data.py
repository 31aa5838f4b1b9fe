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

from vit_vq.data import HFImageDataset, ImageFolder, collate_images, list_images, load_image, open_image_source
from vit_vq.hub import looks_local
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
    assert not looks_local("org/name") and not looks_local("cifar10")
    assert looks_local("org/name/") and looks_local("a\\b")


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


# Loads a FIFO, and a folder / file list / `datasets` row holding one, in a child process: a
# regression opens the FIFO and blocks forever, which the parent's timeout turns into a failure.
CHILD_SPECIAL_FILES = """
import json, sys
from vit_vq.data import HFImageDataset, ImageFolder, collate_images, load_image
from vit_vq.pipeline.sources import FileImages
folder, fifo, ds = sys.argv[1:]
out = {}
try:
    load_image(fifo)
except ValueError as err:
    out["load_image"] = str(err)
for name, source in [("folder", ImageFolder(folder)), ("files", FileImages([folder, fifo])), ("datasets", HFImageDataset(ds))]:
    batch = collate_images([source[i] for i in range(len(source))])
    out[name] = [batch["keys"], batch["skipped"]]
print(json.dumps(out))
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="POSIX FIFOs and devices")
def test_fifos_and_links_to_devices_are_reported_unopened(tmp_path, photo_dir):
    datasets = pytest.importorskip("datasets")
    fifo = photo_dir / "fifo.png"
    os.mkfifo(fifo)
    (photo_dir / "sub" / "zero.png").symlink_to("/dev/zero")
    (photo_dir / "pipe").symlink_to(fifo)  # no image extension: listed only with include_all_files
    photo = photo_dir / "photo0.png"
    cells = [{"bytes": None, "path": str(fifo)}, {"bytes": None, "path": str(photo)}]  # a struct column: saved without reading
    features = datasets.Features({"image": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}})
    datasets.Dataset.from_dict({"image": cells}, features=features).save_to_disk(tmp_path / "ds")
    done = subprocess.run(
        [sys.executable, "-c", CHILD_SPECIAL_FILES, str(photo_dir), str(fifo), str(tmp_path / "ds")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["load_image"] == f"{fifo}: not a regular file: a FIFO (named pipe)"
    keys, skipped = out["folder"]
    assert len(keys) == 6 and "photo0.png" in keys
    assert {s["path"]: s["reason"] for s in skipped} == {
        "fifo.png": f"{fifo}: not a regular file: a FIFO (named pipe)",
        "pipe": f"{photo_dir / 'pipe'}: not a regular file: a FIFO (named pipe) (through a symbolic link)",
        "sub/zero.png": f"{photo_dir / 'sub' / 'zero.png'}: not a regular file: a character device (through a symbolic link)",
    }
    keys, skipped = out["files"]  # `encode` / `reconstruct` inputs: by extension in a folder, and a named file
    assert len(keys) == 6 and [s["path"] for s in skipped] == ["fifo.png", "sub/zero.png", "fifo.png"]
    keys, skipped = out["datasets"]
    assert keys == ["1"] and skipped == [{"path": "0", "reason": f"row 0: {fifo}: not a regular file: a FIFO (named pipe)"}]
    listed = list_images(photo_dir, include_all_files=True)  # listing never opens a file
    assert {photo_dir / "fifo.png", photo_dir / "pipe", photo_dir / "sub" / "zero.png"} <= set(listed)


@pytest.mark.parametrize("width", [1, 3, 4])
def test_narrow_images_in_a_datasets_image_column_are_read(tmp_path, width):
    """A `[3, 20, width]` tensor reads both ways round: it must not be converted a second time."""
    datasets = pytest.importorskip("datasets")
    pixels = np.random.default_rng(width).integers(0, 256, (20, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    ds = datasets.Dataset.from_dict({"image": [{"bytes": buf.getvalue(), "path": None}]}).cast_column("image", datasets.Image())
    ds.save_to_disk(tmp_path / "ds")
    item = HFImageDataset(str(tmp_path / "ds"))[0]
    assert item["error"] is None
    assert torch.equal(item["pixels"], torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)


def _labelled_dataset(tmp_path, labels, **extra):
    datasets = pytest.importorskip("datasets")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    cells = [{"bytes": buf.getvalue(), "path": None}] * len(labels)
    ds = datasets.Dataset.from_dict({"image": cells, "label": labels, **extra}).cast_column("image", datasets.Image())
    ds.save_to_disk(tmp_path / "ds")
    return tmp_path / "ds"


def test_a_missing_label_column_is_refused_listing_the_columns(tmp_path):
    data = _labelled_dataset(tmp_path, [1, 2])
    with pytest.raises(ValueError, match=r"^dataset has no label column 'nosuch'; its columns are \['image', 'label'\]$"):
        open_image_source(data, label_column="nosuch")
    assert [open_image_source(data, label_column="label")[i]["label"] for i in range(2)] == [1, 2]


def test_a_label_column_without_integers_is_refused_naming_its_type(tmp_path, photo_dir):
    data = _labelled_dataset(tmp_path, [1, 2], name=["cat", "dog"], score=[0.5, 1.5])
    with pytest.raises(ValueError, match=r"^label column 'name' holds string values; expected integer labels"):
        HFImageDataset(str(data), label_column="name")
    with pytest.raises(ValueError, match=r"^label column 'score' holds float64 values"):
        HFImageDataset(str(data), label_column="score")
    with pytest.raises(ValueError, match=r"needs a `datasets` dataset, but .* is image files, which have no labels"):
        open_image_source(photo_dir, label_column="label")


def test_empty_image_bytes_are_reported_as_such(tmp_path):
    datasets = pytest.importorskip("datasets")
    cells = [{"bytes": b"", "path": "zero.png"}]  # empty bytes: never fall back to a path
    ds = datasets.Dataset.from_dict({"image": cells}).cast_column("image", datasets.Image())
    ds.save_to_disk(tmp_path / "ds")
    assert HFImageDataset(str(tmp_path / "ds"))[0]["error"] == "row 0: image bytes: empty image bytes"
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.png: an empty file$"):
        load_image(tmp_path / "empty.png")
