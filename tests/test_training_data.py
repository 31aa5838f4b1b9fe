"""Training data: seeded transforms, the epoch sampler, sources, and bad or empty data."""

from __future__ import annotations

import shutil

import pytest
import torch

from vit_vq.data import ImageFolder
from vit_vq.training.config import TrainConfig
from vit_vq.training.data import (
    EpochSampler,
    TrainImageDataset,
    TrainTransform,
    build_train_loader,
    open_training_source,
    preview_images,
    train_collate,
)


def _config(data, **kw) -> TrainConfig:
    return TrainConfig(**{"preset": "tiny", "data": str(data), "batch_size": 2, "num_workers": 0, **kw})


@pytest.fixture
def mixed_dir(tmp_path, train_photo_dir):
    """The clean photos plus a corrupt PNG, a truncated JPEG and a text file."""
    root = tmp_path / "mixed"
    shutil.copytree(train_photo_dir, root)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    jpeg = (train_photo_dir / "crop00.png").read_bytes()
    (root / "sub" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "notes.txt").write_text("not an image")
    return root


def test_transform_output_and_seeded_randomness():
    image = torch.rand(3, 50, 80)
    t = TrainTransform(32, resize_ratio=1.25)
    a = t(image, torch.Generator().manual_seed(1))
    assert a.shape == (3, 32, 32) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, t(image, torch.Generator().manual_seed(1)))
    outs = {t(image, torch.Generator().manual_seed(s)).sum().item() for s in range(8)}
    assert len(outs) > 1  # different seeds give different crops/flips
    center = TrainTransform(32, random_crop=False, hflip=False)
    small = torch.rand(3, 20, 24)  # smaller than the output: upsampled
    assert center(small).shape == (3, 32, 32)


def test_flip_is_a_mirror_image():
    image = torch.rand(3, 32, 32)
    t = TrainTransform(32, random_crop=False, hflip=True)
    flips = [t(image, torch.Generator().manual_seed(s)) for s in range(16)]
    kinds = {(torch.equal(f, image), torch.equal(f, image.flip(-1))) for f in flips}
    assert kinds == {(True, False), (False, True)}  # both happened, and nothing else


def test_epoch_sampler_is_a_seeded_permutation_per_epoch():
    s = EpochSampler(10, seed=3)
    e0 = list(s)
    assert sorted(i for i, _ in e0) == list(range(10)) and {e for _, e in e0} == {0}
    assert list(s) == e0
    s.set_epoch(1)
    e1 = list(s)
    assert [i for i, _ in e1] != [i for i, _ in e0] and {e for _, e in e1} == {1}
    assert list(EpochSampler(10, seed=4)) != e0


def test_unreadable_files_are_replaced_and_reported(mixed_dir):
    source = open_training_source(_config(mixed_dir))
    assert isinstance(source, ImageFolder) and len(source) == 15
    ds = TrainImageDataset(source, TrainTransform(32), seed=0)
    items = [ds[(i, 0)] for i in range(len(ds))]
    assert all(it["pixels"].shape == (3, 32, 32) for it in items)
    skipped = {s["path"] for it in items for s in it["skipped"]}
    assert skipped == {"corrupt.png", "notes.txt", "sub/truncated.jpg"}
    batch = train_collate(items[:4])
    assert batch["pixels"].shape == (4, 3, 32, 32)
    assert {s["path"] for s in batch["skipped"]} == {s["path"] for it in items[:4] for s in it["skipped"]}


def test_loader_gives_full_batches_and_the_same_stream_for_the_same_epoch(mixed_dir):
    cfg = _config(mixed_dir, batch_size=4)
    source = open_training_source(cfg)
    loader, sampler = build_train_loader(source, cfg, 32)
    first = [b["pixels"] for b in loader]
    assert len(first) == 15 // 4 and all(p.shape == (4, 3, 32, 32) for p in first)
    assert all(torch.equal(a, b["pixels"]) for a, b in zip(first, loader, strict=True))
    sampler.set_epoch(1)
    assert not torch.equal(first[0], next(iter(loader))["pixels"])
    total = {s["path"] for b in loader for s in b["skipped"]}
    assert total <= {"corrupt.png", "notes.txt", "sub/truncated.jpg"} and total


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        open_training_source(_config(tmp_path / "empty"))


def test_a_folder_with_no_readable_image_is_an_error(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    for i in range(3):
        (root / f"x{i}.png").write_bytes(b"nope")
    source = open_training_source(_config(root))
    with pytest.raises(ValueError, match="none of the 3 items"):
        preview_images(source, 32, 4)
    with pytest.raises(ValueError, match="none of the 3 items"):
        TrainImageDataset(source, TrainTransform(32))[(0, 0)]


def test_fewer_items_than_a_batch_is_an_error(train_photo_dir):
    cfg = _config(train_photo_dir, batch_size=8)
    with pytest.raises(ValueError, match="fewer than one batch"):
        build_train_loader(open_training_source(cfg), cfg, 32, num_processes=2)


def test_missing_path_and_missing_data(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_training_source(_config(tmp_path / "nope"))
    with pytest.raises(ValueError, match="TrainConfig.data"):
        open_training_source(TrainConfig(preset="tiny"))


def test_hugging_face_dataset_from_a_saved_folder_with_a_custom_image_column(tmp_path, photos):
    import datasets
    from PIL import Image

    images = [Image.fromarray(p).resize((40, 40)) for p in photos[:5]]
    ds = datasets.Dataset.from_dict({"picture": images, "label": list(range(5))}).cast_column("picture", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="no image column 'image'"):
        open_training_source(_config(tmp_path / "hf"))
    source = open_training_source(_config(tmp_path / "hf", image_column="picture"))
    assert len(source) == 5
    item = TrainImageDataset(source, TrainTransform(32))[(2, 0)]
    assert item["pixels"].shape == (3, 32, 32) and item["skipped"] == []


def test_cifar10_goes_through_torchvision(tmp_path, monkeypatch):
    """CIFAR-10 cannot be downloaded here: torchvision's class is replaced by one that records its arguments."""
    import numpy as np
    import torchvision.datasets
    from PIL import Image

    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            self.images = [Image.fromarray(np.full((32, 32, 3), i * 20, np.uint8)) for i in range(6)]

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return self.images[i], i % 10

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    source = open_training_source(TrainConfig(preset="tiny", data="cifar10", data_root=str(tmp_path)))
    assert calls == [(str(tmp_path), True, False)]
    assert len(source) == 6 and source[3]["label"] == 3 and source[3]["pixels"].shape == (3, 32, 32)


def test_cifar10_absent_and_offline_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10 is not in"):
        open_training_source(TrainConfig(preset="tiny", data="cifar10", data_root=str(tmp_path), download_timeout=0))


def test_config_file_combines_with_a_data_override_and_yaml_numbers(tmp_path):
    from vit_vq.training import TrainConfig

    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\nlr: 1e-4\nmax_steps: 3\n")  # YAML reads 1e-4 as a string
    cfg = TrainConfig.from_file(path, data="photos/", output=str(tmp_path / "out"))
    assert cfg.data == "photos/" and cfg.lr == pytest.approx(1e-4) and isinstance(cfg.lr, float)
    path.write_text("preset: tiny\nlr: fast\n")
    with pytest.raises(ValueError, match="TrainConfig.lr must be a number, got 'fast'"):
        TrainConfig.from_file(path, data="photos/")


# -- the default model's recipe: whole photos and random-resized crops across scales ------------
def test_whole_photo_view_is_what_users_feed():
    from vit_vq.preprocess import resize_center_crop

    image = torch.rand(3, 50, 80, generator=torch.Generator().manual_seed(0))
    whole = TrainTransform(32, whole_prob=1.0, random_crop=False, hflip=False, scales="log_uniform")
    assert torch.equal(whole(image, torch.Generator().manual_seed(5)), resize_center_crop(image, 32))


def test_log_uniform_crops_span_native_resolution_to_the_whole_photo():
    """A horizontal ramp: the value range a view covers is the share of the width its crop took."""
    W = 512
    ramp = (torch.arange(W, dtype=torch.float32) / (W - 1)).expand(3, W, W).contiguous()
    t = TrainTransform(32, scales="log_uniform", hflip=False)
    shares = torch.tensor([float(v[0].amax() - v[0].amin()) for v in
                           (t(ramp, torch.Generator().manual_seed(s)) for s in range(300))])
    assert shares.min() < 32 / W * 1.3  # near native resolution: 32 px of 512
    assert shares.max() > 0.8  # near the whole photo
    # log-uniform side in [32, 512]: the median share is near sqrt(32 * 512) / 512 = 0.25
    assert 0.17 < shares.median() < 0.36


def test_whole_prob_sets_the_share_of_whole_photo_views():
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    whole = TrainTransform(32, whole_prob=1.0, hflip=False)(image)
    t = TrainTransform(32, scales="log_uniform", whole_prob=0.25, hflip=False)
    hits = sum(torch.equal(t(image, torch.Generator().manual_seed(s)), whole) for s in range(400))
    assert 60 <= hits <= 140  # 100 expected; binomial sd 8.7


def test_uint8_photos_give_the_same_views_as_floats():
    u8 = torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for kw in (dict(scales="log_uniform", whole_prob=0.5), dict(resize_ratio=1.5)):
        t = TrainTransform(32, **kw)
        for s in range(4):
            assert torch.equal(t(u8, torch.Generator().manual_seed(s)), t(u8.float() / 255, torch.Generator().manual_seed(s)))


@pytest.mark.parametrize("kw, match", [(dict(scales="random"), "scales must be 'fixed' or 'log_uniform', got 'random'"),
                                       (dict(whole_prob=1.5), r"whole_prob must be in \[0, 1\], got 1.5")])
def test_bad_recipe_options_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainTransform(32, **kw)


def test_the_trainer_config_selects_the_recipe_views(train_photo_dir):
    """`--crop-scales log_uniform --whole-prob 1` through the loader gives exactly the whole-photo view."""
    from vit_vq.data import load_image
    from vit_vq.preprocess import resize_center_crop

    cfg = _config(train_photo_dir, batch_size=2, crop_scales="log_uniform", whole_prob=1.0, hflip=False, num_workers=0)
    source = open_training_source(cfg)
    loader, _ = build_train_loader(source, cfg, 16)
    batch = next(iter(loader))
    expected = torch.stack([resize_center_crop(load_image(train_photo_dir / k), 16) for k in batch["keys"]])
    torch.testing.assert_close(batch["pixels"], expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="crop_scales"):
        _config(train_photo_dir, crop_scales="random")
    with pytest.raises(ValueError, match="whole_prob"):
        _config(train_photo_dir, whole_prob=1.5)
