"""Training at many shapes: a law of view shapes, and a batch sampler whose every batch holds one shape.

A ViT codes any grid of patches (`docs/shapes.md`), so it can be trained on views of many aspect
ratios and sizes. Images of different shapes cannot share a batch tensor, so views are grouped by
shape (bucketed): each *global* batch (`batch_size` items on each of `world` ranks) draws one shape,
and every item of it, on every rank, is viewed at that shape. All ranks therefore run the same
shapes at the same step, as DDP's collectives need.

The shape of a batch: an aspect ratio `width / height` drawn log-uniformly from `aspect_range`, a
token count drawn log-uniformly from `tokens`, and then the largest grid of that aspect ratio with at
most that many tokens (`vit_vq.preprocess.budget_size`, as `preprocess(resize="budget")` sizes a
photo); each side is that grid times the patch size.

Reproducibility: the items of an epoch are `EpochSampler`'s permutation, and the shapes of its
batches come from a generator seeded by `(seed, epoch)`, so the stream depends on neither worker
processes nor the global RNG, and a run resumed mid-epoch (skipping the batches already seen) sees
exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..preprocess import budget_size
from .data import EpochSampler, TrainImageDataset, item_seed, loader_settings, train_transform

if TYPE_CHECKING:
    from ..config import ViTVQConfig
    from .config import TrainConfig

ASPECT_SCALE = 1 << 20  # the reference height whose width carries a drawn aspect ratio into budget_size
SHAPES_STREAM = -3  # item_seed's index for an epoch's shape draws (-1: its permutation, -2: device views)


@dataclass(frozen=True)
class ViewShapes:
    """The law of the view shapes of a run: per batch, an aspect ratio and a token budget, then a grid.

    Args:
        patch_size: the model's patch side; view sides are multiples of it.
        aspect_range: `(lo, hi)`, width / height, drawn log-uniformly (`(1, 1)`: square views).
        tokens: `(fewest, most)` tokens a batch's grid is sized for, drawn log-uniformly.

    Raises:
        ValueError: a non-positive patch size or token count, or an empty or non-positive range.
    """

    patch_size: int
    aspect_range: tuple[float, float]
    tokens: tuple[int, int]

    def __post_init__(self) -> None:
        lo, hi = self.aspect_range
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"aspect_range must be two positive numbers, low <= high, got {self.aspect_range!r}")
        if not 1 <= self.tokens[0] <= self.tokens[1]:
            raise ValueError(f"tokens must be two positive counts, fewest <= most, got {self.tokens!r}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be positive, got {self.patch_size!r}")

    def grid(self, aspect: float, tokens: int) -> tuple[int, int]:
        """`(h, w)` patches: the largest grid of `aspect` (width / height) with at most `tokens` patches."""
        return budget_size(ASPECT_SCALE, max(1, round(ASPECT_SCALE * aspect)), tokens, 1)

    def draw(self, count: int, generator: torch.Generator) -> list[tuple[int, int]]:
        """`count` view sizes `(H, W)` in pixels, one draw of aspect and tokens each."""
        u = torch.rand(count, 2, generator=generator, dtype=torch.float64).tolist()
        (a0, a1), (t0, t1), p = self.aspect_range, self.tokens, self.patch_size
        sizes = []
        for ua, ut in u:
            aspect = math.exp(math.log(a0) + ua * (math.log(a1) - math.log(a0)))
            tokens = min(t1, max(t0, math.floor(math.exp(math.log(t0) + ut * (math.log(t1 + 1) - math.log(t0))))))
            h, w = self.grid(aspect, tokens)
            sizes.append((h * p, w * p))
        return sizes

    def describe(self) -> str:
        """One line for the log: the ranges the shapes are drawn from."""
        (a0, a1), (t0, t1) = self.aspect_range, self.tokens
        tokens = f"{t1}" if t0 == t1 else f"{t0}-{t1}"
        return f"aspect {a0:g}-{a1:g} (width/height, log-uniform), {tokens} tokens per view, one shape per batch"


def view_shapes(config: TrainConfig, model: ViTVQConfig) -> ViewShapes | None:
    """The run's `ViewShapes`, or None when it trains on the model's own square (the defaults).

    Raises:
        ValueError: a token count above the model's budget (`token_budget`), or a fewest above the most.
    """
    if not config.many_shapes:
        return None
    most = config.train_tokens if config.train_tokens is not None else model.num_tokens
    fewest = config.min_train_tokens if config.min_train_tokens is not None else most
    if most > model.token_budget:
        raise ValueError(f"train_tokens={most} is above the model's budget of {model.token_budget} tokens per image "
                         "(ViTVQConfig.max_tokens)")
    if fewest > most:
        raise ValueError(f"min_train_tokens={fewest} is above the most tokens per view, {most} (train_tokens)")
    return ViewShapes(model.patch_size, tuple(config.aspect_range), (fewest, most))


class BucketBatchSampler(Sampler[list[tuple[int, int, int, int]]]):
    """Batches of `(index, epoch, height, width)` keys: every batch one view shape, `(height, width)` px.

    The items are `sampler`'s (an `EpochSampler`: call its `set_epoch`, or the loader's). Global batch g
    of an epoch is items `g * batch_size * world` on, one shape for all of them; rank r's part is the
    r-th `batch_size` of them (the split of `EpochSampler` batches that accelerate makes).

    Args:
        sampler: the epoch's items.
        batch_size: items per rank per batch.
        shapes: the law of the shapes.
        world: ranks.
        rank: yield only this rank's part of each global batch; None (for accelerate, whose
            `BatchSamplerShard` gives rank r every `world`-th batch) yields every rank's part in rank order.

    Raises:
        ValueError: fewer items than one global batch; a rank outside `[0, world)`.
    """

    drop_last = True  # read by accelerate: only full batches

    def __init__(self, sampler: EpochSampler, batch_size: int, shapes: ViewShapes, *, world: int = 1,
                 rank: int | None = None) -> None:
        if len(sampler) < batch_size * world:
            raise ValueError(f"{len(sampler)} items are fewer than one batch ({batch_size} per rank x {world} ranks)")
        if rank is not None and not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        self.sampler, self.batch_size, self.shapes, self.world, self.rank = sampler, batch_size, shapes, world, rank

    @property
    def global_batches(self) -> int:
        """Global batches per epoch (a partial last one is dropped)."""
        return len(self.sampler) // (self.batch_size * self.world)

    def __len__(self) -> int:
        return self.global_batches * (self.world if self.rank is None else 1)

    def epoch_shapes(self, epoch: int) -> list[tuple[int, int]]:
        """The `(H, W)` of every global batch of `epoch`."""
        gen = torch.Generator().manual_seed(item_seed(self.sampler.seed, epoch, SHAPES_STREAM))
        return self.shapes.draw(self.global_batches, gen)

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        keys = list(self.sampler)  # (index, epoch), the epoch's permutation
        ranks = range(self.world) if self.rank is None else (self.rank,)
        B = self.batch_size
        for g, (H, W) in enumerate(self.epoch_shapes(self.sampler.epoch)):
            for r in ranks:
                start = (g * self.world + r) * B
                yield [(i, e, H, W) for i, e in keys[start : start + B]]


def build_bucket_loader(
    source: Dataset, config: TrainConfig, image_size: int, shapes: ViewShapes, *, num_processes: int = 1,
    pin_memory: bool = False,
) -> tuple[DataLoader, EpochSampler]:
    """A loader of full one-shape batches `{"pixels": [B, 3, H, W], ...}` over `source`, and its epoch sampler.

    Its batch sampler yields every rank's part of each global batch; accelerate's `prepare` hands each
    rank its own (see `BucketBatchSampler`).

    Raises:
        ValueError: the source has fewer items than one global batch.
    """
    if len(source) < config.batch_size * num_processes:
        raise ValueError(
            f"the training data has {len(source)} items, fewer than one batch "
            f"({config.batch_size} per process x {num_processes} processes); lower --batch-size"
        )
    sampler = EpochSampler(len(source), config.seed)
    batches = BucketBatchSampler(sampler, config.batch_size, shapes, world=num_processes)
    dataset = TrainImageDataset(source, train_transform(config, image_size), config.seed)
    return DataLoader(dataset, batch_sampler=batches, **loader_settings(config, pin_memory)), sampler


__all__ = ["ViewShapes", "BucketBatchSampler", "view_shapes", "build_bucket_loader"]
