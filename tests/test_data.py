"""Image sources skip and report unreadable items instead of raising."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vit_vq.data import HFImageDataset, ImageFolder, collate_images


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
