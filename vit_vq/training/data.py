"""Training data: sources, seeded augmentations, an epoch sampler and the loader.

Built on `vit_vq.data`: sources yield `{"pixels", "key", "label", "error"}` items and
unreadable ones carry an `error` instead of raising. For training, `TrainImageDataset`
replaces an unreadable item by the next readable one (so every batch is full and every rank
runs the same number of steps) and reports what it skipped under the batch's `skipped` list.

Reproducibility: the sampler yields `(index, epoch)` keys, and each item's crop and flip come
from a generator seeded by `(seed, epoch, index)`. The data stream therefore does not depend on
worker processes or on the global RNG, and resuming mid-epoch (skipping the batches already
seen) replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data import HFImageDataset, ImageFolder, collate_images, open_image_source
from ..preprocess import to_tensor
from .config import TrainConfig
from .download import socket_timeout

logger = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


Scales = Literal["fixed", "log_uniform"]


class TrainTransform:
    """`[3, H, W]` image -> float `[3, size, size]` in [0, 1] (or `[3, *shape]`): a view at one scale, then a flip.

    Two kinds of view, plus an optional share of whole photos:

    * `scales="fixed"`: resize the short side to `round(size * resize_ratio)`, then crop
      (random or center) -- every view at one scale.
    * `scales="log_uniform"` (random-resized crops across scales): a crop whose side is
      log-uniform between `size` px (native resolution) and the photo's short side (the whole
      photo), with aspect `exp(U(-0.2, 0.2))` (0.82-1.22), at a random place (or centered),
      resized to `size`.
    * `whole_prob`: with this probability the view is instead the whole photo as users feed it:
      the largest square (at a random place along the long side, or centered), resized to `size`
      -- centered, exactly `vit_vq.preprocess.resize_center_crop`.

    A call with `shape=(h, w)` makes the same kinds of view at that shape instead of the square (training
    at many shapes, `vit_vq.training.buckets`): the fixed scale resizes the photo just enough to cover
    `shape` (times `resize_ratio`); a log-uniform crop has the view's aspect ratio (with the same jitter)
    and a scale log-uniform between native resolution and the largest such region of the photo; a whole
    view is the largest region of the view's aspect ratio. Without `shape` the views are the square ones,
    bit for bit.

    uint8 inputs are converted after cropping, so a large photo costs only its crop.

    Args:
        size: output side.
        resize_ratio: for `scales="fixed"`, the short side is resized to `round(size * resize_ratio)` (>= 1).
        random_crop: random crop position (else the center).
        hflip: flip horizontally with probability 1/2.
        scales: `"fixed"` or `"log_uniform"` (above).
        whole_prob: probability of a whole-photo view, in [0, 1].

    Raises:
        ValueError: `scales` unknown or `whole_prob` outside [0, 1].
    """

    def __init__(
        self,
        size: int,
        *,
        resize_ratio: float = 1.0,
        random_crop: bool = True,
        hflip: bool = True,
        scales: Scales = "fixed",
        whole_prob: float = 0.0,
    ) -> None:
        if scales not in ("fixed", "log_uniform"):
            raise ValueError(f"scales must be 'fixed' or 'log_uniform', got {scales!r}")
        if not 0.0 <= whole_prob <= 1.0:
            raise ValueError(f"whole_prob must be in [0, 1], got {whole_prob!r}")
        self.size, self.resize_ratio, self.random_crop, self.hflip = size, resize_ratio, random_crop, hflip
        self.scales, self.whole_prob = scales, whole_prob

    def __call__(
        self, image: torch.Tensor, generator: torch.Generator | None = None, shape: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """A view of `image` at `shape` `(h, w)` px (default: the `size` square)."""
        _, H, W = image.shape
        if self.whole_prob > 0 and bool(torch.rand((), generator=generator) < self.whole_prob):
            if shape is None:
                ch = cw = min(H, W)
            else:  # the largest region of the view's aspect ratio
                ch, cw = min(H, max(1, round(W * shape[0] / shape[1]))), min(W, max(1, round(H * shape[1] / shape[0])))
        elif self.scales == "log_uniform":
            u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
            aspect = math.exp((u[1] - 0.5) * 0.4)  # 0.82 .. 1.22
            if shape is None:
                short = max(min(H, W), self.size)
                side = math.exp(math.log(self.size) + u[0] * (math.log(short) - math.log(self.size)))
                ch, cw = min(H, max(self.size, round(side * aspect))), min(W, max(self.size, round(side / aspect)))
            else:  # scale 1 (native resolution) .. the largest region of the view's aspect ratio
                h, w = shape
                scale = math.exp(u[0] * math.log(max(1.0, min(H / h, W / w))))
                ch, cw = min(H, max(h, round(h * scale * aspect))), min(W, max(w, round(w * scale / aspect)))
        else:
            ch = cw = None
        if ch is None:
            image = self._rescaled_crop(image, generator, shape)
        elif shape is None:
            image = self._crop_resize(image, ch, cw, generator)
        else:
            image = self._crop_to(image, ch, cw, generator, shape)
        if self.hflip and bool(torch.rand((), generator=generator) < 0.5):
            image = image.flip(-1)
        return image.clamp(0, 1).contiguous()

    def _offset(self, room: int, generator: torch.Generator | None) -> int:
        return int(torch.randint(room + 1, (), generator=generator)) if self.random_crop else room // 2

    def _rescaled_crop(self, image: torch.Tensor, generator: torch.Generator | None,
                       shape: tuple[int, int] | None = None) -> torch.Tensor:
        """`scales="fixed"`: short side -> `round(size * resize_ratio)`, then a `size` crop; with `shape`, the
        photo scaled by `resize_ratio` times what covers `shape`, then a `shape` crop."""
        image = _as_float(image)
        _, H, W = image.shape
        if shape is None:
            h = w = self.size
            short = max(self.size, round(self.size * self.resize_ratio))
            scale = short / min(H, W)
            nh, nw = max(short, round(H * scale)), max(short, round(W * scale))
        else:
            h, w = shape
            scale = self.resize_ratio * max(h / H, w / W)
            nh, nw = max(h, round(H * scale)), max(w, round(W * scale))
        if (nh, nw) != (H, W):
            image = F.interpolate(image[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
        top, left = self._offset(nh - h, generator), self._offset(nw - w, generator)
        return image[:, top : top + h, left : left + w]

    def _crop_resize(self, image: torch.Tensor, ch: int, cw: int, generator: torch.Generator | None) -> torch.Tensor:
        """A `ch x cw` crop (random or centered), resized to `size x size` (bicubic, antialiased)."""
        return self._crop_to(image, ch, cw, generator, (self.size, self.size))

    def _crop_to(self, image: torch.Tensor, ch: int, cw: int, generator: torch.Generator | None,
                 out: tuple[int, int]) -> torch.Tensor:
        """A `ch x cw` crop (random or centered), resized to `out` `(h, w)` (bicubic, antialiased)."""
        _, H, W = image.shape
        out = tuple(out)
        top, left = self._offset(H - ch, generator), self._offset(W - cw, generator)
        crop = _as_float(image[:, top : top + ch, left : left + cw])  # (3, ch, cw)
        if (ch, cw) != out:
            crop = F.interpolate(crop[None], size=out, mode="bicubic", antialias=True, align_corners=False)[0]
        return crop


def _as_float(image: torch.Tensor) -> torch.Tensor:
    return image.float() / 255 if image.dtype == torch.uint8 else image


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one item's augmentation, from the run seed, the epoch and the item index."""
    return (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % (2**63)


class EpochSampler(Sampler):
    """Yields `(index, epoch)` keys in a permutation seeded by `(seed, epoch)`; call `set_epoch` per epoch."""

    def __init__(self, size: int, seed: int = 0, *, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, -1))
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = range(self.size)
        return iter([(i, self.epoch) for i in order])


class TrainImageDataset(Dataset):
    """A source of raw items viewed through a seeded `TrainTransform`; keys are `(index, epoch)`, or
    `(index, epoch, height, width)` for a view of that shape (`buckets.BucketBatchSampler`).

    An unreadable item is replaced by the next readable one (wrapping around) and reported
    under the item's `skipped` list as `{"path", "reason"}` dicts.

    Raises (from `__getitem__`):
        ValueError: no item of the whole source is readable.
    """

    def __init__(self, source: Dataset, transform: TrainTransform, seed: int = 0) -> None:
        self.source, self.transform, self.seed = source, transform, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int] | tuple[int, int, int, int] | int) -> dict[str, Any]:
        index, epoch = key[:2] if isinstance(key, tuple) else (key, 0)
        shape = tuple(key[2:]) if isinstance(key, tuple) and len(key) == 4 else None
        n, skipped = len(self.source), []
        for attempt in range(n):
            j = (index + attempt) % n
            item = self.source[j]
            if item["pixels"] is not None:
                try:
                    gen = torch.Generator().manual_seed(item_seed(self.seed, epoch, j))
                    pixels = self.transform(item["pixels"], gen, shape)
                except (ValueError, RuntimeError) as err:  # e.g. an image with zero width
                    item = {**item, "error": f"{item['key']}: cannot be transformed ({err})"}
                else:
                    return {**item, "pixels": pixels, "skipped": skipped}
            skipped.append({"path": item["key"], "reason": item["error"]})
        raise ValueError(f"none of the {n} items of the dataset is a readable image; the first error was: {skipped[0]['reason']}")


def train_collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`collate_images`, plus the items that `TrainImageDataset` skipped, under `skipped`."""
    batch = collate_images(items)
    batch["skipped"] = batch["skipped"] + [s for it in items for s in it.get("skipped", [])]
    return batch


class CIFAR10Source(Dataset):
    """torchvision's CIFAR-10 as raw items; downloaded into `root` if absent (bounded by `timeout`)."""

    def __init__(self, root: str | Path, *, train: bool = True, timeout: float = 10.0) -> None:
        from torchvision.datasets import CIFAR10

        from .download import probe

        root = Path(root).expanduser()
        try:
            self.ds = CIFAR10(str(root), train=train, download=False)
        except RuntimeError:
            if timeout <= 0:
                raise FileNotFoundError(f"CIFAR-10 is not in {root} and downloads are off (download_timeout=0)") from None
            try:
                probe(CIFAR10_URL, timeout)
                with socket_timeout(timeout):
                    self.ds = CIFAR10(str(root), train=train, download=True)
            except OSError as err:
                raise FileNotFoundError(
                    f"CIFAR-10 is not in {root} and cannot be downloaded ({err}); put torchvision's "
                    f"cifar-10-batches-py folder there (TrainConfig.data_root), or train on an image folder"
                ) from err

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, label = self.ds[i]
        return {"pixels": to_tensor(image), "key": f"cifar10/{i}", "label": int(label), "error": None}


def open_training_source(config: TrainConfig) -> Dataset:
    """The raw image source named by `config.data` / `config.data_format`.

    Raises:
        ValueError: no `data` given, or the source holds no items.
        FileNotFoundError: a local path that does not exist; CIFAR-10 neither present nor downloadable.
    """
    if not config.data:
        raise ValueError("no training data: set TrainConfig.data (an image folder, a datasets name or saved folder, or cifar10)")
    fmt = config.data_format
    if fmt == "auto" and config.data.lower() == "cifar10":
        fmt = "cifar10"
    if fmt == "cifar10":
        root = config.data_root if config.data.lower() == "cifar10" else config.data
        source: Dataset = CIFAR10Source(root, train=config.split == "train", timeout=config.download_timeout)
    elif fmt == "folder":
        source = ImageFolder(config.data)
    elif fmt == "hf":
        source = HFImageDataset(config.data, split=config.split, image_column=config.image_column)
    else:
        source = open_image_source(config.data, split=config.split, image_column=config.image_column)
    if len(source) == 0:
        raise ValueError(f"the training data {config.data!r} is empty: no files or rows were found")
    return source


def build_train_loader(
    source: Dataset, config: TrainConfig, image_size: int, *, num_processes: int = 1, pin_memory: bool = False
) -> tuple[DataLoader, EpochSampler]:
    """A loader of full batches `{"pixels": [B, 3, S, S], ...}` over `source`, and its sampler.

    Raises:
        ValueError: the source has fewer items than one global batch.
    """
    need = config.batch_size * num_processes
    if len(source) < need:
        raise ValueError(
            f"the training data has {len(source)} items, fewer than one batch "
            f"({config.batch_size} per process x {num_processes} processes); lower TrainConfig.batch_size"
        )
    sampler = EpochSampler(len(source), config.seed)
    loader = DataLoader(
        TrainImageDataset(source, train_transform(config, image_size), config.seed),
        batch_size=config.batch_size, sampler=sampler, drop_last=True, **loader_settings(config, pin_memory),
    )
    return loader, sampler


def train_transform(config: TrainConfig, image_size: int) -> TrainTransform:
    """The `TrainTransform` that `config` describes, at `image_size`."""
    return TrainTransform(
        image_size, resize_ratio=config.resize_ratio, random_crop=config.random_crop, hflip=config.hflip,
        scales=config.crop_scales, whole_prob=config.whole_prob,
    )


def loader_settings(config: TrainConfig, pin_memory: bool) -> dict[str, Any]:
    """The `DataLoader` keywords of every training loader: workers, collation, pinning, worker seeds."""
    return dict(
        num_workers=config.workers, collate_fn=train_collate, pin_memory=pin_memory, persistent_workers=config.workers > 0,
        generator=torch.Generator().manual_seed(config.seed),  # worker seeds: keeps the global RNG untouched
    )


def preview_images(source: Dataset, image_size: int, count: int) -> torch.Tensor:
    """The first `count` readable items, center-cropped: float `[count', 3, S, S]` for reconstruction grids."""
    transform = TrainTransform(image_size, random_crop=False, hflip=False)
    images = []
    for i in range(len(source)):
        item = source[i]
        if item["pixels"] is not None:
            images.append(transform(item["pixels"]))
        if len(images) == count:
            break
    if not images:
        raise ValueError(f"none of the {len(source)} items of the dataset is a readable image")
    return torch.stack(images)


__all__ = [
    "TrainTransform",
    "EpochSampler",
    "TrainImageDataset",
    "CIFAR10Source",
    "train_collate",
    "open_training_source",
    "build_train_loader",
    "train_transform",
    "loader_settings",
    "preview_images",
    "item_seed",
]
