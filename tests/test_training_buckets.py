"""Training at many shapes: the law of view shapes, one-shape batches, ranks, resume, and a Trainer run."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from accelerate.data_loader import BatchSamplerShard
from safetensors.torch import load_file
from torch.utils.data import BatchSampler, DataLoader

from vit_vq import ViTVQConfig
from vit_vq.training import TrainConfig, Trainer
from vit_vq.training.buckets import BucketBatchSampler, ViewShapes, build_bucket_loader, view_shapes
from vit_vq.training.data import EpochSampler, TrainImageDataset, TrainTransform, build_train_loader, train_collate


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def photos(n: int, seed: int = 0) -> list[dict]:
    """`n` in-memory items of several shapes (uint8, landscape and portrait)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [(48, 80), (80, 48), (60, 60), (40, 120)]
    return [{"pixels": torch.randint(0, 256, (3, *sizes[i % 4]), generator=gen, dtype=torch.uint8), "key": f"p{i}",
             "label": -1, "error": None} for i in range(n)]


SHAPES = ViewShapes(8, (0.5, 2.0), (256, 256))


def test_shapes_follow_the_configured_aspect_law_and_token_budget():
    sizes = SHAPES.draw(4000, torch.Generator().manual_seed(0))
    assert all(H % 8 == 0 and W % 8 == 0 for H, W in sizes)
    tokens = torch.tensor([H * W / 64 for H, W in sizes])
    assert tokens.max() <= 256 and tokens.min() >= 0.8 * 256, (tokens.min(), tokens.max())  # near the budget, aspect kept
    log_aspect = torch.tensor([math.log(W / H) for H, W in sizes])
    lo, hi = math.log(0.5), math.log(2.0)
    assert log_aspect.min() >= lo - 0.05 and log_aspect.max() <= hi + 0.05  # within the range, up to a patch
    assert abs(log_aspect.mean()) < 0.03  # log-uniform on a range symmetric about 1: mean 0 ...
    assert abs(log_aspect.std() - (hi - lo) / math.sqrt(12)) < 0.02  # ... and the uniform's spread
    quarters = torch.histc(log_aspect.clamp(lo, hi), bins=4, min=lo, max=hi) / len(sizes)
    assert torch.all((quarters - 0.25).abs() < 0.03), quarters
    assert (16 * 8, 16 * 8) in sizes and len(set(sizes)) >= 8  # the square among many shapes


def test_token_counts_are_log_uniform_between_the_fewest_and_the_most():
    sizes = ViewShapes(4, (1.0, 1.0), (16, 256)).draw(3000, torch.Generator().manual_seed(1))
    assert all(H == W for H, W in sizes)  # square views at many sizes
    tokens = torch.tensor([H * W / 16 for H, W in sizes], dtype=torch.float64)
    assert tokens.min() >= 16 and tokens.max() <= 256
    # a square grid under 8 x 8 means a drawn budget under 64, the geometric middle of 16 .. 256
    assert abs((tokens < 64).double().mean() - 0.5) < 0.04
    assert {(16, 16), (64, 64)} <= set(sizes)


def test_every_batch_holds_one_shape_and_the_stream_is_seeded():
    def batches(seed: int, epoch: int = 0) -> list[list[tuple]]:
        sampler = EpochSampler(40, seed)
        sampler.set_epoch(epoch)
        return list(BucketBatchSampler(sampler, 4, SHAPES))

    a = batches(3)
    assert len(a) == 10 and all(len(b) == 4 for b in a)
    assert all(len({k[2:] for k in b}) == 1 for b in a)  # one shape per batch ...
    assert len({b[0][2:] for b in a}) > 3  # ... and many shapes over the epoch
    assert sorted(k[0] for b in a for k in b) == list(range(40))  # every item once per epoch
    assert a == batches(3) and a != batches(4) and a != batches(3, epoch=1)


def test_loader_batches_are_tensors_of_their_shape():
    items = photos(12)
    dataset = TrainImageDataset(items, TrainTransform(32, scales="log_uniform", whole_prob=0.25), seed=0)
    sampler = BucketBatchSampler(EpochSampler(12, 0), 3, ViewShapes(4, (0.5, 2.0), (64, 64)))
    shapes = []
    for batch in DataLoader(dataset, batch_sampler=sampler, collate_fn=train_collate):
        B, C, H, W = batch["pixels"].shape
        shapes.append((H, W))
        assert (B, C) == (3, 3) and H % 4 == 0 and W % 4 == 0 and H * W <= 64 * 16
        assert 0 <= batch["pixels"].min() and batch["pixels"].max() <= 1
    assert shapes == sampler.epoch_shapes(0) and len(set(shapes)) > 1


def test_resuming_mid_epoch_gives_the_batches_an_uninterrupted_run_would():
    sampler = EpochSampler(40, 5)
    sampler.set_epoch(2)
    straight = list(BucketBatchSampler(sampler, 4, SHAPES))
    fresh = EpochSampler(40, 5)  # a new process after a crash: same settings, set to the saved epoch
    fresh.set_epoch(2)
    batches = iter(BucketBatchSampler(fresh, 4, SHAPES))
    for _ in range(6):  # what accelerate's skip_first_batches does: draw and drop
        next(batches)
    assert list(batches) == straight[6:]


def test_two_ranks_share_each_steps_shape_and_split_the_items():
    sampler = EpochSampler(50, 7)
    everyone = BucketBatchSampler(sampler, 3, SHAPES, world=2)
    ranks = [list(BucketBatchSampler(sampler, 3, SHAPES, world=2, rank=r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 8  # 50 // (3 x 2)
    for step, (b0, b1) in enumerate(zip(*ranks, strict=True)):
        assert b0[0][2:] == b1[0][2:], step  # the same shape at every step: DDP's collectives match
        assert not {k[0] for k in b0} & {k[0] for k in b1}
    seen = [k[0] for r in ranks for b in r for k in b]
    assert len(seen) == len(set(seen)) == 48
    # accelerate's split of the all-ranks sampler gives each rank its own part ...
    for r in range(2):
        assert list(BatchSamplerShard(everyone, num_processes=2, process_index=r)) == ranks[r]
    # ... and the same items the square path's split gives it (only the shapes are new)
    square = BatchSampler(sampler, 3, drop_last=True)
    for r in range(2):
        items = [[i for i, _ in b] for b in BatchSamplerShard(square, num_processes=2, process_index=r)]
        assert items == [[k[0] for k in b] for b in ranks[r]]
    with pytest.raises(ValueError, match="rank must be in"):
        BucketBatchSampler(sampler, 3, SHAPES, world=2, rank=2)


def test_shaped_views_cover_native_resolution_to_the_whole_photo():
    image = torch.rand(3, 120, 200)
    whole = TrainTransform(32, whole_prob=1.0, random_crop=False, hflip=False)(image, shape=(24, 48))
    expected = F.interpolate(image[None, :, 10:110, :], size=(24, 48), mode="bicubic", antialias=True,
                             align_corners=False)[0].clamp(0, 1)  # the largest 1:2 region, centered
    torch.testing.assert_close(whole, expected, rtol=0, atol=1e-6)
    crops = TrainTransform(32, scales="log_uniform", hflip=False)
    views = [crops(image, torch.Generator().manual_seed(s), (16, 48)) for s in range(64)]
    assert all(v.shape == (3, 16, 48) for v in views)
    fixed = TrainTransform(32, resize_ratio=1.0, random_crop=False, hflip=False)(image, shape=(40, 16))
    assert fixed.shape == (3, 40, 16)  # the photo scaled to cover 40 x 16 (height 40), then cropped


def test_defaults_keep_square_training_and_new_settings_are_checked(tmp_path):
    model = ViTVQConfig.from_preset("tiny")
    square = TrainConfig(preset="tiny", data="x", batch_size=2, num_workers=0)
    assert not square.many_shapes and view_shapes(square, model) is None
    loader, _ = build_train_loader(photos(4), square, 32)
    assert type(loader.batch_sampler) is BatchSampler  # today's sampler, untouched
    mixed = TrainConfig(preset="tiny", data="x", aspect_range=[0.5, 2], train_tokens=64, min_train_tokens=32)
    assert mixed.aspect_range == (0.5, 2.0) and view_shapes(mixed, model) == ViewShapes(4, (0.5, 2.0), (32, 64))
    path = tmp_path / "run.yaml"
    path.write_text(mixed.to_yaml())
    assert TrainConfig.from_file(path) == mixed
    assert view_shapes(TrainConfig(preset="tiny", aspect_range=(0.5, 2)), model).tokens == (64, 64)  # the model's grid
    with pytest.raises(ValueError, match="above the model's budget of 1024"):
        view_shapes(TrainConfig(preset="tiny", train_tokens=2048), model)
    with pytest.raises(ValueError, match="square views at the model's image_size only"):
        TrainConfig(data_views="device", crop_scales="log_uniform", aspect_range=(0.5, 2))
    for bad in ((2, 0.5), (0, 1), (1, float("inf")), (1,)):
        with pytest.raises(ValueError, match="aspect_range"):
            TrainConfig(aspect_range=bad)
    with pytest.raises(ValueError, match="min_train_tokens=64 is above"):
        TrainConfig(train_tokens=32, min_train_tokens=64)
    with pytest.raises(ValueError, match="fewer than one batch"):
        build_bucket_loader(photos(3), mixed, 32, ViewShapes(4, (0.5, 2.0), (32, 64)), num_processes=2)


def test_cli_flags_set_the_shapes():
    import argparse

    from vit_vq.cli.train import add_parser, config_from_args

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "--preset", "tiny", "--aspect-range", "0.5", "2", "--train-tokens", "64"])
    args.config = None
    config = config_from_args(args)
    assert config.aspect_range == (0.5, 2.0) and config.train_tokens == 64 and config.min_train_tokens is None


class Crash(Exception):
    pass


def run_config(tmp_path, data, name, **kw) -> TrainConfig:
    base = dict(
        preset="tiny", data=str(data), output=str(tmp_path / name), batch_size=4, num_workers=0, max_steps=4,
        warmup_steps=1, lr=1e-3, log_every=1, image_every=0, save_every=2, trackers="none", progress=False,
        mixed_precision="no", crop_scales="log_uniform", aspect_range=(0.5, 2.0), train_tokens=64, min_train_tokens=32,
    )
    return TrainConfig(**{**base, **kw})


class ShapeRecorder(Trainer):
    """Records every micro-batch's shape; crashes after the checkpoint at `crash_at`."""

    def __init__(self, *args, crash_at: int = -1, **kwargs):
        super().__init__(*args, **kwargs)
        self.crash_at, self.shapes_seen = crash_at, []

    def train_step(self, pixels):
        self.shapes_seen.append(tuple(pixels.shape))
        return super().train_step(pixels)

    def _save(self):
        super()._save()
        if self.state.step == self.crash_at:
            raise Crash


@pytest.mark.slow
def test_a_run_at_mixed_shapes_learns(tmp_path, train_photo_dir, caplog):
    caplog.set_level(logging.INFO, logger="vit_vq")
    trainer = ShapeRecorder(run_config(tmp_path, train_photo_dir, "learn", max_steps=24, batch_size=6, lr=2e-3,
                                       warmup_steps=3, log_every=3, save_every=100))
    result = trainer.train()
    assert len(set(trainer.shapes_seen)) > 3, trainer.shapes_seen
    assert all(h * w <= 64 * 16 and h % 4 == 0 and w % 4 == 0 for _, _, h, w in trainer.shapes_seen)
    first, last = result.history[0], result.history[-1]
    assert last["l2"] < 0.6 * first["l2"], (first, last)
    assert any(r.getMessage().startswith("views: aspect 0.5-2 (width/height, log-uniform), 32-64 tokens per view")
               for r in caplog.records)


@pytest.mark.slow
def test_a_run_at_mixed_shapes_resumes_bitwise(tmp_path, train_photo_dir):
    """4 steps straight vs 2, a crash, resume, 2 more: mid-epoch (12 images, batch 4)."""
    straight_trainer = ShapeRecorder(run_config(tmp_path, train_photo_dir, "straight"))
    straight = straight_trainer.train()
    with pytest.raises(Crash):
        ShapeRecorder(run_config(tmp_path, train_photo_dir, "resumed"), crash_at=2).train()
    again = ShapeRecorder(run_config(tmp_path, train_photo_dir, "resumed", resume="latest"))
    second = again.train()
    assert second.step == 4 and again.shapes_seen == straight_trainer.shapes_seen[2:]
    a, b = load_file(straight.checkpoint / "model.safetensors"), load_file(second.checkpoint / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_train_default_example_trains_at_mixed_shapes_and_scores_native_aspect(tmp_path, photos):
    """examples/train_default.py --aspect-range 0.5 2 --train-tokens 192: two steps, export, held-out scores."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from conftest import write_mini_pack

    pack = write_mini_pack(tmp_path / "pack", photos)
    script = Path(__file__).resolve().parents[1] / "examples" / "train_default.py"
    args = [sys.executable, script, "--steps", "2", "--batch-size", "4", "--device", "cpu", "--data", pack,
            "--output", tmp_path / "run", "--eval-crops", "8", "--aspect-range", "0.5", "2", "--train-tokens", "192"]
    proc = subprocess.run(list(map(str, args)), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "final" / "eval.json").read_text())
    assert record["run"]["aspect_range"] == [0.5, 2.0] and record["run"]["train_tokens"] == 192
    assert 0 < record["scores"]["heldout_native_psnr"] < 60


DDP_WORKER = '''
import json, sys
from vit_vq.training import TrainConfig, Trainer

class Recorder(Trainer):
    def _run_epoch(self, bar):
        loader = self.loader
        seen = self.seen
        class Spy:
            def __init__(self, inner):
                self.inner = inner
            def set_epoch(self, e):
                self.inner.set_epoch(e)
            def __iter__(self):
                for batch in self.inner:
                    seen.append([list(batch["pixels"].shape), batch["keys"]])
                    yield batch
        self.loader = Spy(loader)
        try:
            super()._run_epoch(bar)
        finally:
            self.loader = loader

data, out = sys.argv[1], sys.argv[2]
cfg = TrainConfig(preset="tiny", data=data, output=out, batch_size=2, num_workers=0, max_steps=4, warmup_steps=1,
                  lr=1e-3, log_every=1, image_every=0, save_every=100, trackers="none", progress=False,
                  mixed_precision="no", crop_scales="log_uniform", aspect_range=(0.5, 2.0), train_tokens=64,
                  min_train_tokens=32)
trainer = Recorder(cfg)
trainer.seen = []
trainer.train()
rank = trainer.accelerator.process_index
model = trainer.unwrapped
checksum = {k: float(v.double().sum()) for k, v in model.state_dict().items()}
json.dump({"seen": trainer.seen, "weights": checksum}, open(f"{out}/rank{rank}.json", "w"))
'''


@pytest.mark.slow
def test_two_processes_train_at_mixed_shapes_in_step(tmp_path, train_photo_dir):
    """accelerate launch, 2 gloo ranks: the same shape at every step on both, different items, same weights."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(script), str(train_photo_dir), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "ACCELERATE_LOG_LEVEL": "warning"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    assert len(r0["seen"]) == len(r1["seen"]) == 4
    assert [s for s, _ in r0["seen"]] == [s for s, _ in r1["seen"]]  # one shape per step on both ranks
    assert len({tuple(s) for s, _ in r0["seen"]}) > 1  # and more than one shape over the run
    for (_, k0), (_, k1) in zip(r0["seen"], r1["seen"], strict=True):
        assert not set(k0) & set(k1)  # each rank its own items
    assert r0["weights"] == r1["weights"]  # DDP kept the ranks identical
