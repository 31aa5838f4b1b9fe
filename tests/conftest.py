"""Shared fixtures: real photos shipped inside scikit-image / scikit-learn."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# One thread for every test: OpenMP threads stall when the cores are shared (CI, a busy machine).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses the tests start

PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "cat")


def load_photos() -> list[np.ndarray]:
    """Real RGB photos as uint8 `[H, W, 3]` arrays (scikit-image's bundled data + scikit-learn's samples)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = [getattr(skimage.data, name)() for name in PHOTO_NAMES]
    photos += list(load_sample_images().images)
    return [p[..., :3] for p in photos]


def photo_crops(size: int, count: int, seed: int = 0) -> torch.Tensor:
    """`count` float crops `[count, 3, size, size]` in [0, 1]: each photo downscaled, then a random crop."""
    from vit_vq.preprocess import resize_center_crop, to_tensor

    gen = torch.Generator().manual_seed(seed)
    photos = load_photos()
    out = []
    for i in range(count):
        img = resize_center_crop(to_tensor(photos[i % len(photos)]), size * 2)
        top, left = (int(v) for v in torch.randint(0, size + 1, (2,), generator=gen))
        out.append(img[:, top : top + size, left : left + size])
    return torch.stack(out)


@pytest.fixture(autouse=True)
def online_hub_settings(monkeypatch):
    """Every test starts with the Hub online, whatever the shell sets (HF_HUB_OFFLINE=1 on firewalled machines).

    huggingface_hub reads HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) once, into `huggingface_hub.constants`,
    at import, and transformers asks it; so both the variables (for subprocesses) and the constant are
    reset here. A test that needs offline behaviour sets both itself; no test reaches the real Hub.
    """
    import huggingface_hub.constants as hc

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    return load_photos()


@pytest.fixture
def photo_dir(tmp_path, photos):
    """A folder of real photos as PNG files (some in a subfolder)."""
    from PIL import Image

    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i, p in enumerate(photos[:6]):
        folder = root / "sub" if i % 2 else root
        Image.fromarray(p).resize((96, 96)).save(folder / f"photo{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A randomly initialised `tiny`-preset tokenizer (32 px, 8x8 codes, 256 codes) saved to a folder."""
    from vit_vq import ViTVQConfig, ViTVQTokenizer

    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ViTVQTokenizer(ViTVQConfig.from_preset("tiny")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def train_photo_dir(tmp_path_factory):
    """12 real-photo crops (40x40 PNG, half in a subfolder): a small clean training set (read-only)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("train_photos")
    (root / "sub").mkdir()
    for i, img in enumerate(photo_crops(40, 12, seed=1)):
        array = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()  # (H, W, 3)
        Image.fromarray(array).save((root / "sub" if i % 2 else root) / f"crop{i:02d}.png")
    return root


@pytest.fixture
def single_thread():
    """Run a small model on one thread: avoids OpenMP spin-waits when the 2 CI cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- rFID as published: torchmetrics on torch-fidelity's TF-Inception. Its weights cannot be downloaded
# here, so the network is built locally with random weights (batch-norm scales raised so that the
# features are O(1) rather than vanishing) and loaded through the real code path from a file. --------
@pytest.fixture(scope="session")
def tf_inception_file(tmp_path_factory):
    from unittest import mock

    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    pytest.importorskip("torchmetrics")
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])  # random init, nothing loaded
    state = {k: v * 2.5 if k.endswith("bn.weight") else v for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("fid") / "tf-inception-random.pth"
    torch.save(state, path)
    return path


def write_mini_pack(root, photos, *, excluded_packages=()):
    """A 6-photo training pack in `examples/prepare_default_data.py`'s layout (2 held out), at `root`."""
    import json

    from PIL import Image

    entries = []
    for i, (name, photo) in enumerate(zip(PHOTO_NAMES[:6], photos[:6], strict=True)):
        split = "heldout" if i < 2 else "train"
        (root / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo).resize((192, 160)).save(root / split / f"{name}.jpg", quality=95)
        entries.append(dict(name=name, split=split, source="scikit-image", origin=f"skimage.data.{name}()",
                            licence="CC0-1.0", attribution="scikit-image", original_size=[192, 160], stored_size=[192, 160]))
    (root / "manifest.json").write_text(json.dumps({"short_side": 160, "excluded_packages": list(excluded_packages),
                                                   "heldout": [e["name"] for e in entries[:2]], "demo_samples": [],
                                                   "photos": entries}))
    return root
