"""The Trainer on CPU with the tiny preset and real photos: learning, resume, NaN, accumulation, checkpoints."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from vit_vq import ViTVQTokenizer
from vit_vq.training import NonFiniteLossError, PerceptualWeightsUnavailable, TrainConfig, Trainer
from vit_vq.training.checkpoint import list_checkpoints
from vit_vq.training.losses import PerceptualLoss, vgg16_features


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; tests with other settings need a clean slate."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def make_config(tmp_path, data, name="run", **kw) -> TrainConfig:
    base = dict(
        preset="tiny", data=str(data), output=str(tmp_path / name), batch_size=4, num_workers=0, max_steps=4,
        warmup_steps=1, lr=1e-3, log_every=1, image_every=0, save_every=100, trackers="none", progress=False,
        mixed_precision="no",
    )
    return TrainConfig(**{**base, **kw})


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.mark.slow
def test_short_run_lowers_the_loss_and_keeps_usage_far_above_a_plain_codebook(tmp_path, train_photo_dir):
    """30 steps on 12 photo crops. Ours: EMA codebook on the unit sphere with dead-code restarts, its EMA
    decay set for a run this short (0.9); baseline: a learnable codebook, no l2, no restarts."""
    common = dict(max_steps=30, batch_size=6, lr=2e-3, log_every=3, warmup_steps=3)
    ours = Trainer(make_config(tmp_path, train_photo_dir, "ours", model_overrides={"ema_decay": 0.9}, **common)).train()
    plain_model = {"use_ema": False, "l2_normalize": False, "dead_code_threshold": 0.0}
    plain = Trainer(make_config(tmp_path, train_photo_dir, "plain", model_overrides=plain_model, **common)).train()
    o, p = ours.history, plain.history
    assert o[-1]["loss"] < 0.5 * o[0]["loss"] and o[-1]["l2"] < 0.5 * o[0]["l2"], (o[0], o[-1])
    assert all(a["usage"] > b["usage"] for a, b in zip(o, p, strict=True)), ([a["usage"] for a in o], [b["usage"] for b in p])
    usage_ours, usage_plain = (sum(h["usage"] for h in run[-3:]) / 3 for run in (o, p))
    assert usage_ours > 3 * usage_plain and usage_ours > 0.2, (usage_ours, usage_plain)
    assert o[-1]["perplexity"] > 3 * p[-1]["perplexity"]
    assert o[-1]["l2"] < p[-1]["l2"]  # the used codes also reconstruct better
    assert {"lr", "grad_norm", "dead_codes", "commit", "codebook"} <= set(o[-1])


class Crash(Exception):
    """Simulated crash (a killed job) right after a checkpoint."""


class CrashingTrainer(Trainer):
    def __init__(self, *args, crash_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.crash_at = crash_at

    def _save(self):
        super()._save()
        if self.state.step == self.crash_at:
            raise Crash


@pytest.mark.slow
def test_resume_gives_bitwise_the_same_weights_as_an_uninterrupted_run(tmp_path, train_photo_dir, caplog):
    """4 steps straight vs 2 steps, a crash, resume, 2 more; mid-epoch (12 images, batch 4: 3 batches per
    epoch), with a discriminator, a weight EMA and dead-code restarts in play."""
    extra = dict(adversarial_weight=0.1, disc_start_step=1, disc_channels=8, model_ema_decay=0.9,
                 model_overrides={"dead_code_threshold": 0.5}, save_every=2)
    straight = Trainer(make_config(tmp_path, train_photo_dir, "straight", **extra)).train()
    with pytest.raises(Crash):
        CrashingTrainer(make_config(tmp_path, train_photo_dir, "resumed", **extra), crash_at=2).train()
    caplog.set_level(logging.INFO, logger="vit_vq")
    caplog.clear()
    second = Trainer(make_config(tmp_path, train_photo_dir, "resumed", resume="latest", **extra)).train()
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("vit_vq")]
    assert ours[0] == "resumed from step 2"
    assert second.step == 4
    a, b = straight.checkpoint, second.checkpoint
    for name in ("model.safetensors", "model_1.safetensors", "model_ema.safetensors"):  # tokenizer, discriminator, EMA
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    at_crash = load_file(tmp_path / "resumed" / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert not torch.equal(at_crash["quantizer.embed"], load_file(a / "model.safetensors")["quantizer.embed"])
    assert torch.equal(weights(straight.export_dir)["quantizer.embed"], weights(second.export_dir)["quantizer.embed"])


def test_a_nan_loss_stops_training_and_leaves_the_last_checkpoint_intact(tmp_path, train_photo_dir):
    cfg = make_config(tmp_path, train_photo_dir, max_steps=6, save_every=2)
    trainer = Trainer(cfg)
    calls = []

    def poison(module, inputs, output):
        calls.append(1)
        return output * float("nan") if len(calls) == 3 else output

    trainer.unwrapped.decoder.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match="at step 3") as info:
        trainer.train()
    assert "checkpoint-2" in str(info.value) and "TrainConfig.resume='latest'" in str(info.value)
    assert [s for s, _ in list_checkpoints(cfg.output)] == [2]
    saved = weights(list_checkpoints(cfg.output)[0][1])
    assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in trainer.unwrapped.parameters())  # no update was applied
    assert not (tmp_path / "run" / "final").exists()
    resumed = Trainer(make_config(tmp_path, train_photo_dir, max_steps=4, save_every=2, resume="latest")).train()
    assert resumed.step == 4


def test_gradient_accumulation_matches_one_large_batch(tmp_path, train_photo_dir):
    """2 x 2 accumulated images must give the step that 4 images give (the codebook update included)."""
    from vit_vq import ViTVQConfig

    big = Trainer(make_config(tmp_path, train_photo_dir, "big", max_steps=2, batch_size=4)).train()
    acc = Trainer(make_config(tmp_path, train_photo_dir, "acc", max_steps=2, batch_size=2, grad_accum_steps=2)).train()
    wa, wb = weights(big.export_dir), weights(acc.export_dir)
    torch.manual_seed(0)  # the trainer's seed: the initial weights
    init = ViTVQTokenizer(ViTVQConfig.from_preset("tiny")).state_dict()
    moved = max((wa[k] - init[k]).abs().max().item() for k in wa if wa[k].is_floating_point())
    differ = max((wa[k] - wb[k]).abs().max().item() for k in wa if wa[k].is_floating_point())
    assert moved > 1e-3 and differ < 2e-5, (moved, differ)


def test_checkpoint_weights_are_safetensors_and_trainer_state_loads_weights_only(tmp_path, train_photo_dir):
    from accelerate.utils.other import load

    cfg = make_config(tmp_path, train_photo_dir, max_steps=2, adversarial_weight=0.1, disc_start_step=0, disc_channels=8)
    result = Trainer(cfg).train()
    files = {p.name for p in result.checkpoint.iterdir()}
    assert {"model.safetensors", "model_1.safetensors", "trainer_state.json", "quantizer_pool_0.safetensors",
            "optimizer.bin", "optimizer_1.bin", "scheduler.bin", "scheduler_1.bin", "random_states_0.pkl"} <= files
    pickled = [n for n in files if not n.endswith((".safetensors", ".json"))]
    assert not any(n.startswith("model") for n in pickled)
    for name in pickled:
        load(result.checkpoint / name)  # accelerate's reader: torch.load(weights_only=True) (+ numpy RNG arrays)
    torch.load(result.checkpoint / "optimizer.bin", weights_only=True)
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_existing_checkpoints_need_resume_and_resume_reads_only_its_own_folder(tmp_path, train_photo_dir):
    Trainer(make_config(tmp_path, train_photo_dir, max_steps=1)).train()
    with pytest.raises(ValueError, match="TrainConfig.resume='latest'"):
        Trainer(make_config(tmp_path, train_photo_dir, max_steps=2))
    elsewhere = str(tmp_path / "run" / "checkpoints" / "checkpoint-1")
    other = make_config(tmp_path, train_photo_dir, "other", max_steps=2, resume=elsewhere)
    with pytest.raises(ValueError, match="read only from this run's own folder"):
        Trainer(other).train()
    fresh = Trainer(make_config(tmp_path, train_photo_dir, "fresh", max_steps=1, resume="latest")).train()
    assert fresh.step == 1  # 'latest' with nothing saved yet starts from scratch


@pytest.mark.timeout(300)  # a guard against a hang, not a speed assertion
def test_perceptual_weight_without_vgg_weights_stops_before_training(tmp_path, train_photo_dir, monkeypatch):
    import torch.hub

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(PerceptualWeightsUnavailable, match="TrainConfig.perceptual_weight=0"):
        Trainer(make_config(tmp_path, train_photo_dir, perceptual_weight=1.0, download_timeout=1.0))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_perceptual_loss_and_weight_ema_take_part_when_configured(tmp_path, train_photo_dir):
    torch.manual_seed(0)
    perceptual = PerceptualLoss(vgg16_features())
    cfg = make_config(tmp_path, train_photo_dir, max_steps=2, perceptual_weight=0.1, model_ema_decay=0.5)
    trainer = Trainer(cfg, perceptual=perceptual)
    result = trainer.train()
    assert result.history[-1]["perceptual"] > 0
    live, exported = trainer.unwrapped.state_dict(), weights(result.export_dir)
    assert not torch.equal(live["decoder.to_pixels.weight"], exported["decoder.to_pixels.weight"])  # the EMA was exported
    assert torch.equal(live["quantizer.embed"].cpu(), exported["quantizer.embed"])  # buffers are copied, not averaged


def test_bf16_autocast_keeps_the_codebook_in_fp32(tmp_path, train_photo_dir):
    trainer = Trainer(make_config(tmp_path, train_photo_dir, max_steps=2, mixed_precision="bf16"))
    result = trainer.train()
    q = trainer.unwrapped.quantizer
    assert trainer.accelerator.mixed_precision == "bf16"
    assert q.embed.dtype == q.ema_sum.dtype == q.ema_count.dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(v)) for v in result.history[-1].values())


def test_fine_tuning_starts_from_the_given_folder(tmp_path, train_photo_dir, tiny_tokenizer_dir):
    start = weights(tiny_tokenizer_dir)
    trainer = Trainer(make_config(tmp_path, train_photo_dir, max_steps=2, preset=None, init=str(tiny_tokenizer_dir)))
    assert torch.equal(trainer.unwrapped.state_dict()["decoder.to_pixels.weight"], start["decoder.to_pixels.weight"])
    result = trainer.train()
    tuned = ViTVQTokenizer.from_pretrained(result.export_dir)
    assert tuned.config == ViTVQTokenizer.from_pretrained(tiny_tokenizer_dir).config
    assert not torch.equal(tuned.state_dict()["decoder.to_pixels.weight"], start["decoder.to_pixels.weight"])


def test_encoder_can_start_from_a_hugging_face_vit(tmp_path):
    from transformers import ViTConfig, ViTModel

    from vit_vq.training.trainer import build_model

    torch.manual_seed(0)
    hf = ViTModel(ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=256), add_pooling_layer=False)
    hf.save_pretrained(tmp_path / "vit")
    model = build_model(TrainConfig(preset="tiny", init_vit=str(tmp_path / "vit")))
    assert torch.equal(model.encoder.patch_embed.weight, hf.embeddings.patch_embeddings.projection.weight)
    assert model.config.codebook_size == 256  # the rest of the architecture comes from the preset


def test_reconstruction_grids_and_tensorboard_scalars_are_written(tmp_path, train_photo_dir, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pushed = []
    monkeypatch.setattr(ViTVQTokenizer, "push_to_hub", lambda self, repo_id, **kw: pushed.append(repo_id))
    cfg = make_config(tmp_path, train_photo_dir, max_steps=2, image_every=2, num_log_images=3, trackers="tensorboard",
                      push_to_hub="me/my-tokenizer")
    trainer = Trainer(cfg)
    trainer.train()
    grid = tmp_path / "run" / "samples" / "step-0000002.png"
    from PIL import Image

    assert Image.open(grid).size == (3 * 32 + 4 * 2, 2 * 32 + 3 * 2)  # originals over reconstructions
    assert trainer.unwrapped.training  # back in train mode after the eval-mode grid
    events = EventAccumulator(str(tmp_path / "run" / "logs")).Reload()
    tags = events.Tags()
    assert {"loss", "l2", "usage", "perplexity", "dead_codes", "lr", "grad_norm"} <= set(tags["scalars"])
    assert "reconstructions" in tags["images"]
    assert pushed == ["me/my-tokenizer"]


def test_every_run_ends_with_a_sample_of_the_exported_model_and_logs_every_n_steps(tmp_path, train_photo_dir, caplog):
    """No `image_every` step is reached (0), yet the run ends with a grid; the log has one line per `log_every`
    steps (none per epoch: 12 images in batches of 4 make 3 epochs), and the default warmup (1 of 10 steps)
    lets the learning rate reach its peak at once."""
    import numpy as np
    from PIL import Image

    caplog.set_level(logging.INFO, logger="vit_vq")
    cfg = make_config(tmp_path, train_photo_dir, max_steps=10, log_every=5, warmup_steps=None, num_log_images=3)
    assert cfg.warmup == 1
    trainer = Trainer(cfg)
    result = trainer.train()
    assert result.sample == tmp_path / "run" / "samples" / "step-0000010.png"
    assert (tmp_path / "run" / ".vit_vq-output").is_file()  # marked: a run inside its data never reads it back
    with Image.open(result.sample) as im:
        grid = np.asarray(im.convert("RGB"))  # (2 rows, 3 columns) of 32 px images, 2 px padding
    assert grid.shape == (2 * 34 + 2, 3 * 34 + 2, 3)
    exported = ViTVQTokenizer.from_pretrained(result.export_dir).eval()
    with torch.no_grad():
        recon = exported(trainer.preview).reconstruction.clamp(0, 1)  # (3, 3, 32, 32)
    for i in range(3):
        tile = grid[36:68, 2 + 34 * i : 34 + 34 * i].astype(int)  # bottom row: reconstructions
        ours = (recon[i].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy().astype(int)
        assert np.abs(tile - ours).max() <= 1
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("vit_vq")]
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split(" |")[0] for s in steps] == ["step 5/10", "step 10/10"], lines
    assert not [line for line in lines if "epoch" in line], lines
    assert any(str(result.sample) in line and "PSNR" in line for line in lines), lines
    assert result.history[0]["lr"] > 0.8 * cfg.lr  # averaged over steps 1-5: past the warmup, near the peak


def test_warmup_and_workers_defaults_follow_the_run_and_the_machine(monkeypatch):
    import os
    import warnings

    assert [TrainConfig(max_steps=n).warmup for n in (5, 200, 2000, 100_000)] == [0, 20, 200, 500]
    assert TrainConfig(max_steps=200, warmup_steps=7).warmup == 7
    with pytest.warns(UserWarning, match=r"warmup_steps=200 >= max_steps=200: the learning rate never reaches its peak"):
        TrainConfig(max_steps=200, warmup_steps=200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainConfig(max_steps=200, warmup_steps=199)
    for cpus, expected in ((1, 1), (2, 2), (16, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        assert TrainConfig().workers == expected
    assert TrainConfig(num_workers=0).workers == 0 and TrainConfig(num_workers=8).workers == 8


def test_ddp_gets_no_deprecated_buffer_argument():
    """One gloo process: wrapping a model with buffers as the Trainer does raises no FutureWarning, and the
    buffers are not synced on forward (a rank's change survives a forward)."""
    import tempfile
    import warnings

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from vit_vq.training.trainer import ddp_kwargs

    model = torch.nn.BatchNorm1d(3)  # running statistics are buffers
    with tempfile.NamedTemporaryFile() as f:
        dist.init_process_group("gloo", init_method=f"file://{f.name}", rank=0, world_size=1)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                ddp = DistributedDataParallel(model, **ddp_kwargs().to_kwargs())
            sync = getattr(ddp, "forward_sync_buffers", getattr(ddp, "broadcast_buffers", None))
            assert sync is False
            ddp(torch.randn(4, 3))
        finally:
            dist.destroy_process_group()


def test_the_log_names_the_perceptual_loss_in_use(tmp_path, train_photo_dir, caplog):
    """LPIPS through the `lpips` package on a locally saved VGG16 (random weights: the pretrained backbone
    cannot be downloaded here), selected by the config and named in the first log line."""
    pytest.importorskip("lpips")
    torch.manual_seed(0)
    vgg = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in vgg16_features().state_dict().items()}, vgg)
    caplog.set_level(logging.INFO, logger="vit_vq")
    cfg = make_config(tmp_path, train_photo_dir, max_steps=1, perceptual_weight=0.1, perceptual_weights_path=str(vgg),
                      perceptual_loss="lpips", download_timeout=0)
    result = Trainer(cfg).train()
    assert result.history[-1]["perceptual"] > 0
    header = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("model "))
    assert "perceptual 0.1 (perceptual: LPIPS-VGG (lpips 0.1" in header, header
