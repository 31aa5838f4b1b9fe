"""Training views cut on the training device: photos decoded once, batches cut in a few tensor operations.

The worker loader (`data.build_train_loader`) crops and resizes every view in Python, one at a
time, in data-loader processes; on a fast GPU the model waits for it. `DeviceViews` instead holds
every photo as uint8 in one canvas on the training device (3 bytes a pixel: 2.65 MB for a
768 x 1152 photo, plus the slack of packing photos of several shapes), and cuts a batch thus:

1. On the CPU, from a generator seeded by `(seed, batch index)`: each view's photo (passes over
   the photos in the order `EpochSampler` gives an epoch), its box and its flip, drawn as
   `TrainTransform(scales="log_uniform", whole_prob=...)` draws them (`draw_boxes`).
2. On the device, per chunk of views of similar size: one gather of the boxes' windows (each padded
   to the chunk's largest box), and two batched matmuls with resampling matrices whose weights are
   those of `F.interpolate(mode="bicubic", antialias=True)` on the crop (`resample_weights`); the
   matrices also flip and scale to [0, 1].

The same seed and batch index give the same boxes on every device, and a resumed run the same
batches. Memory: the canvas, plus per chunk at most `chunk_bytes` of float32 windows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from .data import item_seed

DEFAULT_MAX_BYTES = 8 * 10**9
DEFAULT_CHUNK_BYTES = 256 * 2**20
ASPECT_JITTER = 0.2  # log-aspect uniform in [-0.2, 0.2], as TrainTransform


class ViewsTooLarge(ValueError):
    """The decoded photos need more memory than the views were allowed."""


@dataclass
class ViewPlan:
    """One batch's views, each a `[B]` tensor on the CPU: the photo, the box `(top, left, height, width)`
    in that photo's pixels, whether the view is mirrored, and whether it is a whole-photo view."""

    photo: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor
    whole: torch.Tensor

    def __len__(self) -> int:
        return self.photo.shape[0]


def draw_boxes(hw: torch.Tensor, u: torch.Tensor, size: int, *, whole_prob: float, random_crop: bool = True,
               hflip: bool = True) -> tuple[torch.Tensor, ...]:
    """Boxes of `TrainTransform(size, scales="log_uniform", whole_prob=...)` from uniform draws.

    Args:
        hw: int64 `[B, 2]`, each view's photo height and width.
        u: float64 `[B, 6]` in [0, 1): whole-photo, scale, aspect, top, left and flip draws.

    Returns:
        int64 `[B]` top, left, height, width; bool `[B]` flip and whole. A crop's side is log-uniform
        between `size` and the photo's short side, its aspect `exp(U(-0.2, 0.2))`, clamped to the photo
        and to at least `size`; a whole-photo view is the largest square. Both sit at a random place
        (or centered).
    """
    H, W = hw[:, 0], hw[:, 1]
    short = torch.minimum(H, W)
    lo = math.log(size)
    side = torch.exp(lo + u[:, 1] * (torch.log(short.clamp(min=size).double()) - lo))
    aspect = torch.exp((u[:, 2] - 0.5) * 2 * ASPECT_JITTER)
    ch = torch.minimum(H, (side * aspect).round().long().clamp(min=size))
    cw = torch.minimum(W, (side / aspect).round().long().clamp(min=size))
    whole = u[:, 0] < whole_prob
    ch, cw = torch.where(whole, short, ch), torch.where(whole, short, cw)
    if random_crop:
        top, left = (u[:, 3] * (H - ch + 1)).long(), (u[:, 4] * (W - cw + 1)).long()
    else:
        top, left = (H - ch) // 2, (W - cw) // 2
    flip = (u[:, 5] < 0.5) & hflip
    return top, left, ch, cw, flip, whole


def resample_weights(length: torch.Tensor, shift: torch.Tensor, out: int, pad: int) -> torch.Tensor:
    """Antialiased bicubic resampling matrices: float32 `[n, out, pad]`; matrix k weighs inputs
    `shift[k] .. shift[k] + length[k] - 1` of a window of `pad` into `out` outputs (the rest get 0).

    The weights of `F.interpolate(mode="bicubic", antialias=True, align_corners=False)` on those inputs:
    a Keys cubic (a = -0.5) widened by the scale when shrinking, cut at the crop's edges, normalised to sum 1.
    """
    L = length.to(torch.float32)[:, None, None]  # (n, 1, 1)
    scale = L / out
    inv = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    centre = scale * (torch.arange(out, dtype=torch.float32, device=length.device)[None, :, None] + 0.5)  # (n, out, 1)
    j = torch.arange(pad, device=length.device)[None, None, :] - shift[:, None, None]  # (n, 1, pad): place in the crop
    x = ((j - centre + 0.5) * inv).abs()  # (n, out, pad)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    w = torch.where(x < 1, near, torch.where(x < 2, far, 0.0)) * ((j >= 0) & (j < L))
    return w / w.sum(-1, keepdim=True)


def cut_windows(canvas: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, h: int, w: int, *,
                by_copy: bool | None = None) -> torch.Tensor:
    """uint8 `[n, h, 3, w]`: the blocks of `canvas` `[R, 3, Wc]` whose top-left corners are `(rows[k], cols[k])`.

    One gather, or (`by_copy`; default on a CPU, where it is about 4x faster) one copy per block.
    """
    if by_copy if by_copy is not None else canvas.device.type == "cpu":
        out = torch.empty(rows.shape[0], h, 3, w, dtype=torch.uint8)
        for k, (r, c) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
            out[k] = canvas[r : r + h, :, c : c + w]
        return out
    blocks = canvas.unfold(0, h, 1).unfold(2, w, 1)  # (R - h + 1, 3, Wc - w + 1, h, w), a view
    return blocks[rows, :, cols].permute(0, 2, 1, 3).contiguous()  # (n, h, 3, w)


def shelf_pack(shapes: Sequence[tuple[int, int]]) -> tuple[list[tuple[int, int]], int, int]:
    """Places `(row, col)` for photos of `shapes` `(H, W)` on one canvas, with its rows and width.

    Shelves filled left to right, tallest photos first; of a few canvas widths (1, 1.5, 2 and 3 times the
    widest photo) the one with the least area wins, so landscape and portrait photos waste little.
    """
    widest = max(w for _, w in shapes)
    order = sorted(range(len(shapes)), key=lambda i: -shapes[i][0])
    best: tuple[list[tuple[int, int]], int, int] | None = None
    for width in (widest, widest * 3 // 2, 2 * widest, 3 * widest):
        places, y, x, shelf = [(0, 0)] * len(shapes), 0, 0, 0
        for i in order:
            h, w = shapes[i]
            if x + w > width:
                y, x, shelf = y + shelf, 0, 0
            places[i], x, shelf = (y, x), x + w, max(shelf, h)
        if best is None or (y + shelf) * width < best[1] * best[2]:
            best = (places, y + shelf, width)
    return best


class DeviceViews:
    """Photos held as uint8 on `device`; batches of seeded random-resized views cut there.

    Args:
        photos: uint8 `[3, H, W]` tensors.
        size: the views' side.
        seed: seed of the photo order, boxes and flips.
        whole_prob: share of whole-photo views (the largest square, resized).
        hflip: mirror half the views.
        random_crop: boxes at random places (else centered).
        device: where the photos are held and the views cut (default: the CPU).
        max_bytes: the most the canvas of photos may take.
        chunk_bytes: float32 windows cut at once (views of similar size are cut together).

    Raises:
        ValueError: no photos, a photo that is not uint8 `[3, H, W]` with pixels, `whole_prob` outside [0, 1].
        ViewsTooLarge: the canvas would exceed `max_bytes`.
    """

    def __init__(self, photos: Sequence[torch.Tensor], size: int, *, seed: int = 0, whole_prob: float = 0.0,
                 hflip: bool = True, random_crop: bool = True, device: torch.device | str | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if not photos:
            raise ValueError("no photos to cut views from")
        for i, p in enumerate(photos):
            if p.dtype != torch.uint8 or p.ndim != 3 or p.shape[0] != 3 or p.shape[1] * p.shape[2] == 0:
                raise ValueError(f"photo {i}: expected uint8 [3, H, W] with pixels, got {p.dtype} {tuple(p.shape)}")
        if not 0.0 <= whole_prob <= 1.0:
            raise ValueError(f"whole_prob must be in [0, 1], got {whole_prob!r}")
        self.size, self.seed, self.whole_prob, self.hflip, self.random_crop = size, seed, whole_prob, hflip, random_crop
        self.chunk_bytes = chunk_bytes
        shapes = [(int(p.shape[1]), int(p.shape[2])) for p in photos]
        places, rows, width = shelf_pack(shapes)
        self.nbytes = rows * 3 * width
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.nbytes > max_bytes:
            raise ViewsTooLarge(
                f"the {len(photos)} decoded photos need {self.nbytes / 1e9:.2f} GB on {self.device}, more than the "
                f"{max_bytes / 1e9:g} GB allowed for views cut there"
            )
        self.canvas = torch.zeros(rows, 3, width, dtype=torch.uint8, device=self.device)  # (R, 3, Wc)
        for p, (y, x) in zip(photos, places, strict=True):
            self.canvas[y : y + p.shape[1], :, x : x + p.shape[2]] = p.permute(1, 0, 2).to(self.device)
        self.shapes = torch.tensor(shapes, dtype=torch.int64)  # (N, 2) on the CPU, for drawing boxes
        self._place = torch.tensor(places, device=self.device)  # (N, 2): row, col on the canvas
        self._orders: dict[int, torch.Tensor] = {}

    @classmethod
    def from_source(cls, source: Dataset, size: int, *, max_bytes: int = DEFAULT_MAX_BYTES,
                    **kwargs: Any) -> tuple[DeviceViews, list[dict[str, str]]]:
        """Decode every readable item of a `{"pixels", "key", "error"}` source (float [0, 1] pixels are
        rounded to 8 bits); returns the views and the unreadable items as `{"path", "reason"}` dicts.

        Raises:
            ViewsTooLarge: the decoded photos exceed `max_bytes` (raised as soon as they do).
            ValueError: no item is readable.
        """
        photos, skipped, total = [], [], 0
        for i in range(len(source)):
            item = source[i]
            pixels = item["pixels"]
            if pixels is None or pixels.ndim != 3 or pixels.shape[0] != 3 or pixels.shape[1] * pixels.shape[2] == 0:
                reason = item.get("error") or f"expected [3, H, W] pixels, got {None if pixels is None else tuple(pixels.shape)}"
                skipped.append({"path": item["key"], "reason": reason})
                continue
            if pixels.dtype != torch.uint8:
                pixels = (pixels.float() * 255).round_().clamp_(0, 255).to(torch.uint8)
            photos.append(pixels)
            total += pixels.numel()
            if total > max_bytes:
                raise ViewsTooLarge(
                    f"the first {i + 1} of {len(source)} photos already need {total / 1e9:.2f} GB decoded, more than "
                    f"the {max_bytes / 1e9:g} GB allowed for views cut on the training device"
                )
        if not photos:
            reason = skipped[0]["reason"] if skipped else "the source is empty"
            raise ValueError(f"none of the {len(source)} items is a readable image; the first error was: {reason}")
        return cls(photos, size, max_bytes=max_bytes, **kwargs), skipped

    def __len__(self) -> int:
        return self.shapes.shape[0]

    # -- which views -----------------------------------------------------------------------
    def _order(self, epoch: int) -> torch.Tensor:
        """The photos' order in pass `epoch`: `EpochSampler`'s permutation for that epoch."""
        if epoch not in self._orders:
            if len(self._orders) > 4:
                self._orders.pop(min(self._orders))
            gen = torch.Generator().manual_seed(item_seed(self.seed, epoch, -1))
            self._orders[epoch] = torch.randperm(len(self), generator=gen)
        return self._orders[epoch]

    def plan(self, index: int, batch_size: int, *, rank: int = 0, world: int = 1) -> ViewPlan:
        """The views of global batch `index` (`batch_size * world` views), this rank's share of them."""
        total, n = batch_size * world, len(self)
        gen = torch.Generator().manual_seed(item_seed(self.seed, index, -2))
        u = torch.rand(total, 6, generator=gen, dtype=torch.float64)[rank * batch_size : (rank + 1) * batch_size]
        first = index * total + rank * batch_size
        seen = torch.arange(first, first + batch_size)  # global view numbers: pass v // n, place v % n
        photo = torch.empty(batch_size, dtype=torch.int64)
        for e in range(first // n, (first + batch_size - 1) // n + 1):
            mine = seen // n == e
            photo[mine] = self._order(e)[seen[mine] % n]
        boxes = draw_boxes(self.shapes[photo], u, self.size, whole_prob=self.whole_prob,
                           random_crop=self.random_crop, hflip=self.hflip)
        return ViewPlan(photo, *boxes)

    # -- cutting them ----------------------------------------------------------------------
    def render(self, plan: ViewPlan) -> torch.Tensor:
        """float32 `[B, 3, size, size]` in [0, 1] on the device: each box resized (bicubic, antialiased), mirrored
        where the plan says."""
        B, S = len(plan), self.size
        out = torch.empty(B, 3, S, S, device=self.device)
        fields = torch.stack([plan.photo, plan.top, plan.left, plan.height, plan.width, plan.flip.long()])
        on_device = fields.to(self.device, non_blocking=True)  # (6, B)
        heights, widths = plan.height.tolist(), plan.width.tolist()
        chunk: list[int] = []
        hmax = wmax = 0
        for i in sorted(range(B), key=lambda k: heights[k] * widths[k]):
            h, w = max(hmax, heights[i]), max(wmax, widths[i])
            if chunk and (len(chunk) + 1) * h * w * 12 > self.chunk_bytes:  # 3 channels x float32
                self._cut(on_device, chunk, hmax, wmax, out)
                chunk, h, w = [], heights[i], widths[i]
            chunk.append(i)
            hmax, wmax = h, w
        self._cut(on_device, chunk, hmax, wmax, out)
        return out.clamp_(0, 1)

    def _cut(self, fields: torch.Tensor, chunk: list[int], hmax: int, wmax: int, out: torch.Tensor) -> None:
        """Cut the views `chunk` (indices into the batch) through windows of `hmax x wmax` into `out`."""
        S, n, dev = self.size, len(chunk), self.device
        idx = torch.tensor(chunk, device=dev)
        photo, top, left, height, width, flip = fields[:, idx]  # each (n,)
        row, col = self._place[photo].unbind(1)
        # windows of the chunk's size, moved up and left where they would leave the canvas; what lies
        # beyond a box (its neighbours on the canvas) gets zero weight
        y, x = row + top, col + left  # the boxes' corners on the canvas
        y0, x0 = y.clamp(max=self.canvas.shape[0] - hmax), x.clamp(max=self.canvas.shape[2] - wmax)
        win = cut_windows(self.canvas, y0, x0, hmax, wmax).float()  # (n, hmax, 3, wmax)
        wy = resample_weights(height, y - y0, S, hmax) / 255  # (n, S, hmax)
        wx = resample_weights(width, x - x0, S, wmax)  # (n, S, wmax)
        wx = torch.where(flip.bool()[:, None, None], wx.flip(1), wx)
        if wmax < hmax:  # the cheaper order: the narrower side of the window first
            t = torch.bmm(wy, win.view(n, hmax, 3 * wmax))  # (n, S, 3 * wmax)
            views = torch.bmm(t.view(n, S * 3, wmax), wx.transpose(1, 2))  # (n, S * 3, S)
        else:
            t = torch.bmm(win.view(n, hmax * 3, wmax), wx.transpose(1, 2))  # (n, hmax * 3, S)
            views = torch.bmm(wy, t.view(n, hmax, 3 * S))  # (n, S, 3 * S)
        out.index_copy_(0, idx, views.view(n, S, 3, S).permute(0, 2, 1, 3))  # (n, 3, S, S)

    def batch(self, index: int, batch_size: int, *, rank: int = 0, world: int = 1) -> torch.Tensor:
        """This rank's share of global batch `index`: float32 `[batch_size, 3, size, size]` in [0, 1] on the device."""
        return self.render(self.plan(index, batch_size, rank=rank, world=world))


class ViewBatches:
    """`DeviceViews` as the Trainer's loader: epochs of `max(1, photos // (batch_size * world))` batches
    `{"pixels": [batch_size, 3, S, S], "skipped": []}`, each this rank's share of a global batch."""

    def __init__(self, views: DeviceViews, batch_size: int, *, rank: int = 0, world: int = 1) -> None:
        self.views, self.batch_size, self.rank, self.world = views, batch_size, rank, world

    def __len__(self) -> int:
        return max(1, len(self.views) // (self.batch_size * self.world))

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of `epoch` from its `start`-th on."""
        for b in range(start, len(self)):
            pixels = self.views.batch(epoch * len(self) + b, self.batch_size, rank=self.rank, world=self.world)
            yield {"pixels": pixels, "skipped": []}


__all__ = [
    "DeviceViews", "ViewBatches", "ViewPlan", "ViewsTooLarge", "cut_windows", "draw_boxes", "resample_weights", "shelf_pack",
]
