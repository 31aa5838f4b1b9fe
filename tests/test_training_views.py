"""Views cut on the training device: exact against a float64 reference, the recipe's distribution, seeding, resume."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vit_vq.training import TrainConfig, Trainer
from vit_vq.training import views as views_module
from vit_vq.training.data import TrainTransform
from vit_vq.training.views import DeviceViews, ViewBatches, ViewsTooLarge, cut_windows


def reference_views(views: DeviceViews, photos: list[torch.Tensor], plan) -> torch.Tensor:
    """Each chosen box cropped, resized by torch's antialiased bicubic in float64, mirrored, clamped."""
    out = []
    for k in range(len(plan)):
        top, left, h, w = (int(v[k]) for v in (plan.top, plan.left, plan.height, plan.width))
        crop = photos[int(plan.photo[k])][:, top : top + h, left : left + w].double() / 255  # (3, h, w)
        view = F.interpolate(crop[None], size=(views.size, views.size), mode="bicubic", antialias=True, align_corners=False)[0]
        out.append((view.flip(-1) if plan.flip[k] else view).clamp(0, 1))
    return torch.stack(out)


@pytest.fixture(scope="module")
def real_photos(photos):
    """Real photos as uint8 [3, H, W] (several sizes and aspects), plus two smaller than the views."""
    out = [torch.from_numpy(p).permute(2, 0, 1).contiguous() for p in photos[:5]]
    out += [out[0][:, :20, :50].contiguous(), out[1][:, :45, :24].contiguous()]
    return out


@pytest.mark.parametrize("by_copy", [True, False])  # the CPU's way of cutting windows, and the GPU's
@pytest.mark.parametrize("chunk_bytes", [1, 64 * 2**20])  # each view alone; every view in one padded window
def test_views_match_a_float64_crop_and_resize_of_the_boxes_they_chose(real_photos, chunk_bytes, by_copy, monkeypatch):
    monkeypatch.setattr(views_module, "cut_windows", functools.partial(cut_windows, by_copy=by_copy))
    views = DeviceViews(real_photos, 32, seed=7, whole_prob=0.25, chunk_bytes=chunk_bytes)
    plan = views.plan(3, 48)
    got = views.render(plan)
    assert got.shape == (48, 3, 32, 32) and got.dtype == torch.float32
    err = (got.double() - reference_views(views, real_photos, plan)).abs().max().item()
    assert err < 2e-6, err
    # the cases were there: whole photos, crops, flips, upsampled boxes, windows moved at the canvas's edge
    small = (plan.height < 32) | (plan.width < 32)
    assert plan.whole.any() and (~plan.whole).any() and plan.flip.any() and (~plan.flip).any() and small.any()
    corner = views._place[plan.photo] + torch.stack([plan.top, plan.left], 1)
    moved = (corner[:, 0] + plan.height.max() > views.canvas.shape[0]) | (corner[:, 1] + plan.width.max() > views.canvas.shape[2])
    assert moved.any()


def test_window_gather_and_block_copies_agree():
    canvas = torch.randint(0, 256, (60, 3, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rows, cols = torch.tensor([0, 17, 39]), torch.tensor([0, 33, 21])
    expected = torch.stack([canvas[r : r + 21, :, c : c + 17] for r, c in zip(rows.tolist(), cols.tolist(), strict=True)])
    for by_copy in (True, False):
        assert torch.equal(cut_windows(canvas, rows, cols, 21, 17, by_copy=by_copy), expected)


def ks_uniform(q: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> float:
    """Largest gap between the empirical CDF of `q` and the uniform CDF, over [lo, hi] only."""
    q, _ = q.double().sort()
    n = q.numel()
    inside = (q >= lo) & (q <= hi)
    ecdf_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    return float(torch.maximum((ecdf_hi - q).abs(), (ecdf_hi - 1 / n - q).abs())[inside].max())


def test_boxes_follow_the_configured_scales_aspects_places_and_whole_photo_share():
    """20000 views of a landscape and a portrait photo, against the recipe's law: whole photo with
    probability 0.25; else a side log-uniform in [size, short side] and a log-aspect uniform in
    [-0.2, 0.2] (checked where no clamp applies), at a uniform place; flips half the time."""
    S, H, W = 32, 512, 768
    views = DeviceViews([torch.zeros(3, H, W, dtype=torch.uint8), torch.zeros(3, W, H, dtype=torch.uint8)], S,
                        seed=1, whole_prob=0.25)
    plans = [views.plan(i, 500) for i in range(40)]
    cat = {k: torch.cat([getattr(p, k) for p in plans]) for k in ("photo", "top", "left", "height", "width", "flip", "whole")}
    n = cat["photo"].numel()
    assert torch.equal(cat["photo"].bincount(), torch.tensor([n // 2, n // 2]))  # each pass shows every photo once
    assert abs(cat["whole"].double().mean() - 0.25) < 0.015  # binomial sd 0.003
    assert abs(cat["flip"].double().mean() - 0.5) < 0.015
    whole = cat["whole"]
    assert torch.equal(cat["height"][whole], torch.full_like(cat["height"][whole], H))
    assert torch.equal(cat["width"][whole], torch.full_like(cat["width"][whole], H))
    h, w = cat["height"][~whole].double(), cat["width"][~whole].double()
    side, log_aspect = (h * w).sqrt(), (h / w).log() / 2
    # side: below 1.25 S the floor at S, above 0.8 of the short side the photo's edge, may clamp a box
    t = (side.log() - math.log(S)) / (math.log(H) - math.log(S))
    t_lo, t_hi = (math.log(1.25 * S / S) / math.log(H / S), math.log(0.8 * H / S) / math.log(H / S))
    assert ks_uniform(t, t_lo, t_hi) < 0.02  # n = 15000: sd of the gap about 0.004
    assert (t < 0.02).any() and (t > 0.98).any()  # from native resolution up to the whole short side
    unclamped = (side > 2.5 * S) & (side < 0.8 * H)
    assert ks_uniform((log_aspect[unclamped] + 0.2) / 0.4) < 0.035  # rounding to whole pixels blurs it by < 0.01
    # places: the top row is uniform over the room left by the box (a uniform jitter makes the law continuous)
    room = torch.where(cat["photo"] == 0, H, W) - cat["height"]
    jitter = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert ks_uniform((cat["top"] + jitter) / (room + 1)) < 0.02


def test_boxes_are_distributed_as_the_loader_transform_draws_them(monkeypatch):
    """Two-sample check against `TrainTransform(scales="log_uniform", whole_prob=0.25)`: its boxes are recorded."""
    S, H, W, n = 32, 300, 450, 5000
    boxes = []

    def record(self, image, ch, cw, generator):
        boxes.append((ch, cw))
        return image[:, :S, :S]

    monkeypatch.setattr(TrainTransform, "_crop_resize", record)
    transform, photo = TrainTransform(S, scales="log_uniform", whole_prob=0.25), torch.zeros(3, H, W)
    for i in range(n):
        transform(photo, torch.Generator().manual_seed(i))
    theirs = torch.tensor(boxes, dtype=torch.float64)
    views = DeviceViews([torch.zeros(3, H, W, dtype=torch.uint8)], S, seed=2, whole_prob=0.25)
    ours = torch.cat([torch.stack([p.height, p.width], 1) for p in (views.plan(i, 500) for i in range(n // 500))]).double()
    for f in (lambda b: (b[:, 0] * b[:, 1]).log(), lambda b: (b[:, 0] / b[:, 1]).log(), lambda b: b[:, 0], lambda b: b[:, 1]):
        a, b = f(ours).sort().values, f(theirs).sort().values
        grid = torch.cat([a, b])
        gap = ((torch.searchsorted(a, grid, right=True) - torch.searchsorted(b, grid, right=True)).abs().max() / n).item()
        assert gap < 0.04, gap  # two-sample KS: 0.039 is the 0.1% critical value at n = 5000 each


def test_same_seed_and_batch_give_the_same_views_and_ranks_split_the_global_batch(real_photos):
    a = DeviceViews(real_photos, 24, seed=5, whole_prob=0.25)
    b = DeviceViews(real_photos, 24, seed=5, whole_prob=0.25)
    assert torch.equal(a.batch(9, 8), b.batch(9, 8))
    assert not torch.equal(a.batch(9, 8), a.batch(10, 8))
    assert not torch.equal(a.batch(9, 8), DeviceViews(real_photos, 24, seed=6, whole_prob=0.25).batch(9, 8))
    whole = a.plan(9, 8)
    for rank in (0, 1):
        part = a.plan(9, 4, rank=rank, world=2)
        for k in ("photo", "top", "left", "height", "width", "flip"):
            assert torch.equal(getattr(part, k), getattr(whole, k)[rank * 4 : (rank + 1) * 4]), k
        torch.testing.assert_close(a.batch(9, 4, rank=rank, world=2), a.batch(9, 8)[rank * 4 : (rank + 1) * 4], rtol=0, atol=1e-6)


def test_resuming_mid_epoch_gives_the_remaining_batches_of_an_uninterrupted_epoch():
    photos = [torch.randint(0, 256, (3, 40 + i, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i in range(12)]
    batches = ViewBatches(DeviceViews(photos, 16, seed=3, whole_prob=0.25), 2)
    assert len(batches) == 6
    straight = [b["pixels"] for e in (0, 1) for b in batches.epoch(e)]
    resumed = [b["pixels"] for b in batches.epoch(0, start=4)] + [b["pixels"] for b in batches.epoch(1)]
    assert all(torch.equal(x, y) for x, y in zip(straight[4:], resumed, strict=True))
    assert len({tuple(x.flatten()[:8].tolist()) for x in straight}) == len(straight)


def test_a_source_is_decoded_once_to_8_bits_and_the_memory_bound_is_enforced(real_photos):
    items = [{"pixels": p.float() / 255, "key": f"p{i}", "label": -1, "error": None} for i, p in enumerate(real_photos[:3])]
    items.insert(1, {"pixels": None, "key": "broken.png", "label": -1, "error": "cannot identify image file"})
    views, skipped = DeviceViews.from_source(items, 16)
    assert skipped == [{"path": "broken.png", "reason": "cannot identify image file"}]
    assert len(views) == 3
    place = views._place[2].tolist()
    H, W = real_photos[2].shape[1:]
    assert torch.equal(views.canvas[place[0] : place[0] + H, :, place[1] : place[1] + W].permute(1, 0, 2), real_photos[2])
    need = sum(p.numel() for p in real_photos[:2])
    with pytest.raises(ViewsTooLarge, match=r"the first 3 of 4 photos already need .* GB decoded, more than the"):
        DeviceViews.from_source(items, 16, max_bytes=need - 1)
    with pytest.raises(ValueError, match="none of the 1 items is a readable image"):
        DeviceViews.from_source(items[1:2], 16)


def test_device_views_need_the_recipe_crops():
    with pytest.raises(ValueError, match="data_views='device' makes random-resized crops across scales"):
        TrainConfig(preset="tiny", data_views="device")
    TrainConfig(preset="tiny", data_views="device", crop_scales="log_uniform")


@pytest.fixture
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class Crash(Exception):
    """A killed job, right after a checkpoint."""


class RecordingTrainer(Trainer):
    """Keeps every batch it trains on; can crash after saving at `crash_at`."""

    def __init__(self, *args, crash_at: int = -1, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen, self.crash_at = [], crash_at

    def train_step(self, pixels):
        self.seen.append(pixels.clone())
        return super().train_step(pixels)

    def _save(self):
        super()._save()
        if self.state.step == self.crash_at:
            raise Crash


def test_trainer_on_device_views_trains_on_them_and_resumes_bitwise(tmp_path, train_photo_dir, fresh_accelerate_state):
    """12 photos, batch 4: 3 batches an epoch; 4 steps straight against 2, a crash, a resume and 2 more."""

    def config(name, **kw):
        return TrainConfig(preset="tiny", data=str(train_photo_dir), output=str(tmp_path / name), batch_size=4,
                           max_steps=4, warmup_steps=1, lr=1e-3, log_every=1, image_every=0, save_every=2,
                           trackers="none", progress=False, mixed_precision="no", num_workers=0, data_views="device",
                           crop_scales="log_uniform", whole_prob=0.25, **kw)

    straight = RecordingTrainer(config("straight"))
    result = straight.train()
    views = straight.loader.views
    assert isinstance(straight.loader, ViewBatches) and len(straight.loader) == 3 and len(views) == 12
    assert all(torch.equal(x, views.batch(m, 4)) for m, x in enumerate(straight.seen))
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    with pytest.raises(Crash):
        RecordingTrainer(config("resumed"), crash_at=2).train()
    second = RecordingTrainer(config("resumed", resume="latest"))
    again = second.train()
    assert all(torch.equal(x, y) for x, y in zip(second.seen, straight.seen[2:], strict=True))
    wa, wb = load_file(result.checkpoint / "model.safetensors"), load_file(again.checkpoint / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
