"""`Trainer`: trains or fine-tunes a `ViTVQTokenizer` on accelerate.

The same code runs on CPU, one GPU, DDP, FSDP and several nodes (`accelerate launch`).
Per micro-batch: forward under autocast (the quantizer keeps its codebook math in fp32),
losses weighted by `TrainConfig`, backward; optionally a discriminator step. Per optimizer
step (when `accelerator.sync_gradients`): a NaN/Inf check agreed by all ranks, gradient
clipping, AdamW and scheduler steps, then `quantizer.update_codebook()` on every rank, which
all-reduces the EMA statistics so codebooks stay identical; then the optional weight EMA.

DDP does not sync buffers on each forward: the quantizer synchronises its own buffers, and a
per-forward broadcast would overwrite each rank's accumulated codebook statistics.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..config import ViTVQConfig
from ..files import mark_output
from ..metrics import psnr
from ..tokenizer import ViTVQTokenizer
from .buckets import build_bucket_loader, view_shapes
from .checkpoint import EMA_NAME, TrainerState, list_checkpoints, load_checkpoint, remove_stale_temporaries, resolve_resume
from .checkpoint import save_checkpoint as _save_checkpoint
from .config import TrainConfig
from .data import build_train_loader, open_training_source, preview_images
from .discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss
from .losses import LPIPSLoss, PerceptualLoss, build_perceptual_loss, pixel_losses
from .model_ema import ModelEMA
from .tracking import MetricMeter, log_grid, reconstruction_grid, save_grid, step_summary, tracker_config
from .views import DeviceViews, ViewBatches, ViewsTooLarge

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or Inf; training stopped without saving."""


@dataclass
class TrainResult:
    """What `Trainer.train` leaves behind: the final step, checkpoint, exported folder, logged scalars and
    the last reconstruction grid (`<output>/samples/step-N.png`; None on other ranks than the main one)."""

    step: int
    checkpoint: Path | None
    export_dir: Path | None
    history: list[dict[str, float]] = field(default_factory=list)
    sample: Path | None = None


def build_model(config: TrainConfig) -> ViTVQTokenizer:
    """The tokenizer named by `config.init`, `config.init_vit` or `config.preset` (+ `model_overrides`).

    Raises:
        ValueError: none of the three is given.
    """
    if config.init:
        return ViTVQTokenizer.from_pretrained(config.init).train()
    if config.init_vit:
        base = ViTVQConfig.from_preset(config.preset or "seed", **config.model_overrides)
        return ViTVQTokenizer.from_vit(config.init_vit, base)
    if config.preset:
        return ViTVQTokenizer(ViTVQConfig.from_preset(config.preset, **config.model_overrides))
    raise ValueError("choose a model: TrainConfig.preset (a preset name) to train from scratch, TrainConfig.init (a Hub "
                     "id or folder) to fine-tune, or TrainConfig.init_vit (a Hugging Face ViT) to start the encoder from it")


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Any:
    """Linear warmup over `warmup` steps, then cosine decay to `min_ratio` at `total` steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def ddp_kwargs() -> Any:
    """accelerate's DDP settings for the Trainer: no buffer sync on forward (the quantizer syncs its own).

    torch 2.13 renamed DDP's `broadcast_buffers` to `forward_sync_buffers` and warns (FutureWarning, once
    per rank) when the old name is passed; accelerate (1.16) only knows the old name, so on such a torch
    the new one is passed through a subclass of its kwargs handler (set as `Accelerator.ddp_handler`,
    which `prepare` reads). Unlike `broadcast_buffers=False`, it
    still syncs buffers once when DDP wraps the model, which is harmless here: every rank builds the
    same weights and codebook from the same seed, and resumed per-rank state is loaded after wrapping.
    """
    from accelerate import DistributedDataParallelKwargs
    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" not in inspect.signature(DistributedDataParallel.__init__).parameters:
        return DistributedDataParallelKwargs(broadcast_buffers=False)

    @dataclass
    class ForwardSyncKwargs(DistributedDataParallelKwargs):
        forward_sync_buffers: bool | None = None

    return ForwardSyncKwargs(forward_sync_buffers=False)


def param_groups(model: ViTVQTokenizer, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: decayed matrices; undecayed biases, norms, embeddings; a learnable codebook at `codebook_lr`."""
    decay, no_decay, codebook = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name == "quantizer.embed":
            codebook.append(p)
        elif p.ndim < 2 or name.endswith(("pos_embed", "cls_token")):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if codebook:
        groups.append({"params": codebook, "weight_decay": 0.0, "lr": config.codebook_lr or config.lr})
    return groups


class Trainer:
    """Trains a `ViTVQTokenizer` as `config` says; `train()` runs the loop and exports the model.

    Args:
        config: the run's settings.
        model: a tokenizer to train instead of the one `config` names.
        dataset: a source of `{"pixels", "key", "label", "error"}` items instead of `config.data`.
        perceptual: a `PerceptualLoss` or `LPIPSLoss` to use instead of loading pretrained VGG16 weights.

    Raises:
        PerceptualWeightsUnavailable: the perceptual weight is > 0 and VGG16 weights cannot be had.
        ValueError / FileNotFoundError: bad data, a model that cannot be built, or an output
            folder that already holds checkpoints while `resume` is not set.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: ViTVQTokenizer | None = None,
        dataset: Dataset | None = None,
        perceptual: PerceptualLoss | LPIPSLoss | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, GradientAccumulationPlugin, set_seed

        self.config = cfg = config
        self.output = Path(cfg.output).expanduser().absolute()
        if cfg.resume is None and list_checkpoints(self.output):
            raise ValueError(f"{self.output} already holds checkpoints (latest step {list_checkpoints(self.output)[-1][0]}); "
                             "set TrainConfig.resume='latest' to continue that run, or choose another TrainConfig.output")
        mixed = cfg.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        self.accelerator = acc = Accelerator(
            mixed_precision=mixed,
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.grad_accum_steps, sync_with_dataloader=False),
            log_with=cfg.tracker_list() or None,
            project_dir=str(self.output),
            step_scheduler_with_optimizer=False,  # we step schedulers once per optimizer step, whatever the world size
        )
        acc.ddp_handler = ddp_kwargs()  # set after init: accelerate's handler lookup takes its own class only
        self._fsdp = acc.distributed_type == DistributedType.FSDP
        if acc.num_processes == 1 and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise RuntimeError(
                f"this is one of {torch.distributed.get_world_size()} processes, but accelerate configured a single-process "
                "run (the ranks would overwrite each other's files); on machines without GPUs launch with "
                "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N ..."
            )
        set_seed(cfg.seed)  # same on every rank: identical initial weights and codebooks
        if acc.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # few image sizes (one, or a bucket each): cuDNN tunes each once

        model = model if model is not None else build_model(cfg)
        model.train()
        model.quantizer.auto_update = False
        self.model_config = model.config
        self.perceptual_weight = cfg.perceptual_weight if cfg.perceptual_weight is not None else model.config.perceptual_weight
        self.perceptual = None
        if self.perceptual_weight > 0:
            self.perceptual = perceptual or build_perceptual_loss(
                cfg.perceptual_weights_path, download_timeout=cfg.download_timeout, weight=self.perceptual_weight,
                kind=cfg.perceptual_loss,
            )
            fmt = torch.channels_last if acc.device.type == "cuda" else torch.preserve_format
            self.perceptual.to(acc.device, memory_format=fmt)

        source = dataset if dataset is not None else open_training_source(cfg)
        self.num_items = len(source)
        self.preview = preview_images(source, model.config.image_size, cfg.num_log_images)
        unreadable: list[dict[str, str]] = []
        self.shapes = view_shapes(cfg, model.config)
        if cfg.data_views == "device":
            loader, unreadable = self._device_views(source, model.config.image_size)
        elif self.shapes is not None:
            loader, self.sampler = build_bucket_loader(
                source, cfg, model.config.image_size, self.shapes, num_processes=acc.num_processes,
                pin_memory=acc.device.type == "cuda",
            )
        else:
            loader, self.sampler = build_train_loader(
                source, cfg, model.config.image_size, num_processes=acc.num_processes, pin_memory=acc.device.type == "cuda"
            )

        model.to(acc.device)
        # fused AdamW on GPUs (on CPU, torch's fused kernel is slower than the default foreach one)
        fused = acc.device.type == "cuda" and not self._fsdp and acc.distributed_type != DistributedType.DEEPSPEED
        optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=cfg.adam_betas, fused=fused or None)
        schedule = lr_lambda(cfg.warmup, cfg.max_steps, cfg.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        if cfg.model_ema_decay > 0 and self._fsdp:
            raise ValueError("model_ema_decay > 0 is not supported under FSDP (the weights are sharded); set it to 0")
        self.ema = ModelEMA(model, cfg.model_ema_decay) if cfg.model_ema_decay > 0 else None
        if cfg.compile:
            model.compile(scope="blocks")  # identical blocks share one graph: compiles in seconds, not minutes
            if self.perceptual is not None:
                self.perceptual.compile()
        self.model, self.optimizer, self.loader, self.scheduler = acc.prepare(model, optimizer, loader, scheduler)
        self.discriminator = self.d_optimizer = self.d_scheduler = None
        if cfg.adversarial:
            disc = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers, model.config.in_channels).to(acc.device)
            d_lr = cfg.disc_lr or cfg.lr
            d_opt = torch.optim.AdamW(disc.parameters(), lr=d_lr, betas=(0.5, 0.9), weight_decay=0.0, fused=fused or None)
            d_sched = torch.optim.lr_scheduler.LambdaLR(d_opt, schedule)
            self.discriminator, self.d_optimizer, self.d_scheduler = acc.prepare(disc, d_opt, d_sched)
        self._models = [m for m in (self.model, self.discriminator) if m is not None]

        self.state = TrainerState()
        self.history: list[dict[str, float]] = []
        self.meter = MetricMeter()
        self._interval_start, self._interval_images = time.perf_counter(), 0
        self._nonfinite = torch.zeros((), device=acc.device)
        self._skipped: set[str] = set()
        self._note_skipped(unreadable)
        self._last_checkpoint: Path | None = None
        self._last_parts: dict[str, torch.Tensor] = {}
        self._sample: Path | None = None
        self._sample_step, self._sample_psnr = -1, float("nan")

    # -- helpers ---------------------------------------------------------------------------
    def _info(self, msg: str, *args: Any) -> None:
        if self.accelerator.is_main_process:
            logger.info(msg, *args)

    @property
    def unwrapped(self) -> ViTVQTokenizer:
        return self.accelerator.unwrap_model(self.model)

    def _device_views(self, source: Dataset, size: int) -> tuple[ViewBatches, list[dict[str, str]]]:
        """`data_views="device"`: the photos decoded into memory on the training device, and batches cut there."""
        acc, cfg = self.accelerator, self.config
        try:
            views, unreadable = DeviceViews.from_source(
                source, size, seed=cfg.seed, whole_prob=cfg.whole_prob, hflip=cfg.hflip, random_crop=cfg.random_crop,
                device=acc.device, max_bytes=int(cfg.views_max_gb * 1e9),
            )
        except ViewsTooLarge as err:
            raise ViewsTooLarge(f"{err} (views_max_gb); make the views in the data loader (data_views='loader'), "
                                "or allow more memory") from None
        self._info("views cut on %s from %d photos held there in %.2f GB", acc.device, len(views), views.nbytes / 1e9)
        return ViewBatches(views, cfg.batch_size, rank=acc.process_index, world=acc.num_processes), unreadable

    def _reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, "mean") if self.accelerator.num_processes > 1 else t

    # -- one step --------------------------------------------------------------------------
    def train_step(self, pixels: torch.Tensor) -> bool:
        """Forward and backward one micro-batch float `[B, 3, H, W]` in [0, 1] (on the device), any grid within
        the model's token budget (the square `[B, 3, S, S]` unless views of many shapes are configured).

        Returns True when this micro-batch completed an optimizer step.

        Raises:
            NonFiniteLossError: the loss or gradient norm became NaN/Inf (checked before the update).
        """
        acc, cfg = self.accelerator, self.config
        use_disc = self.discriminator is not None and self.state.step >= cfg.disc_start_step
        with acc.accumulate(*self._models):
            with acc.autocast():
                out = self.model(pixels, validate=False)
                recon = out.reconstruction  # (B, 3, H, W) float32, unclamped
                parts = pixel_losses(recon, pixels, cfg.l2_weight, cfg.l1_weight)
                if self.perceptual is not None:
                    parts["perceptual"] = self.perceptual(recon, pixels)
                weights = {"l2": cfg.l2_weight, "l1": cfg.l1_weight, "perceptual": self.perceptual_weight}
                nll = sum((weights[k] * v for k, v in parts.items()), recon.new_zeros(()))
                total = nll + cfg.codebook_weight * out.codebook_loss + cfg.commit_weight * out.commit_loss
                if use_disc:
                    parts["g_adv"] = hinge_g_loss(self._frozen_disc_logits(recon))
                    parts["adv_weight"] = self._adv_weight(nll, parts["g_adv"])
                    total = total + cfg.adversarial_weight * parts["adv_weight"] * parts["g_adv"]
            acc.backward(total)
            if use_disc:
                with acc.autocast():
                    logits = self.discriminator(torch.cat([pixels, recon.detach()]))  # one forward per backward (DDP)
                    real, fake = logits.chunk(2)
                    parts["d_loss"] = hinge_d_loss(real, fake)
                acc.backward(parts["d_loss"])
                self._nonfinite += (~torch.isfinite(parts["d_loss"].detach())).float()
            self._nonfinite += (~torch.isfinite(total.detach())).float()
            parts.update(loss=total, codebook=out.codebook_loss, commit=out.commit_loss, **out.metrics)
            self._last_parts = {k: v.detach() for k, v in parts.items()}
            self.meter.add(self._last_parts)
            if not acc.sync_gradients:
                return False
            self._optimizer_step(use_disc)
        return True

    def _frozen_disc_logits(self, recon: torch.Tensor) -> torch.Tensor:
        """Discriminator logits for the generator loss: gradients reach `recon`, not the discriminator."""
        disc = self.discriminator
        disc.requires_grad_(False)
        try:
            with self.accelerator.no_sync(disc):  # no DDP reduction is expected for this forward
                return disc(recon)
        finally:
            disc.requires_grad_(True)

    def _adv_weight(self, nll: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        if not self.config.adaptive_weight or not nll.requires_grad:
            return torch.ones((), device=g_loss.device)
        w = adaptive_weight(nll, g_loss, self.unwrapped.decoder.to_pixels.weight)
        return self._reduce_mean(w)  # the same weight on every rank

    def _optimizer_step(self, use_disc: bool) -> None:
        acc, cfg = self.accelerator, self.config
        max_norm = cfg.max_grad_norm or float("inf")
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
        bad = self._nonfinite.clone()
        if acc.mixed_precision != "fp16":  # fp16 overflows are expected: the grad scaler skips those steps
            bad += (~torch.isfinite(grad_norm)).float()
        if acc.num_processes > 1:
            bad = acc.reduce(bad, "sum")
        if bad.item() > 0:
            self._diverged()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if use_disc:
            self._discriminator_step(max_norm)
        self.unwrapped.quantizer.update_codebook()  # every rank: all-reduces statistics, broadcasts restarts
        if self.ema is not None:
            self.ema.update(self.unwrapped)
        self._nonfinite.zero_()
        self.state.step += 1
        lr = torch.tensor(self.scheduler.get_last_lr()[0], device=acc.device)
        self.meter.add({"grad_norm": grad_norm.float(), "lr": lr})

    def _discriminator_step(self, max_norm: float) -> None:
        acc = self.accelerator
        if acc.mixed_precision == "fp16" and acc.scaler is not None:
            # The clip above unscaled the gradients of every optimizer, this one's included, and the
            # generator's step has already updated the scale; the scaler would unscale these
            # gradients a second time, so step the plain optimizer and skip overflowed steps here.
            norm = torch.nn.utils.clip_grad_norm_(self.discriminator.parameters(), max_norm)
            if torch.isfinite(norm):
                self.d_optimizer.optimizer.step()
        else:
            acc.clip_grad_norm_(self.discriminator.parameters(), max_norm)
            self.d_optimizer.step()
        self.d_optimizer.zero_grad(set_to_none=True)
        self.d_scheduler.step()  # the discriminator's schedule starts with it

    def _diverged(self) -> None:
        parts = ", ".join(f"{k}={v.item():.4g}" for k, v in self._last_parts.items() if v.numel() == 1)
        last = self._last_checkpoint or (list_checkpoints(self.output)[-1][1] if list_checkpoints(self.output) else None)
        where = f"the last good checkpoint, {last}, is untouched" if last else "no checkpoint had been written yet"
        raise NonFiniteLossError(
            f"the loss or gradient norm became NaN/Inf at step {self.state.step + 1} ({parts}); training stopped "
            f"before updating the weights, and {where}. Try a lower TrainConfig.lr or "
            "TrainConfig.max_grad_norm, or bf16 instead of fp16 (TrainConfig.mixed_precision='bf16'), then continue with "
            "TrainConfig.resume='latest'"
        )

    # -- the loop --------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run until `max_steps`, checkpointing and logging on the way; export the model at the end."""
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        acc, cfg = self.accelerator, self.config
        self._resume()
        if acc.is_main_process:
            remove_stale_temporaries(self.output)
            self.output.mkdir(parents=True, exist_ok=True)
            mark_output(self.output, "vit-vq train")  # a run inside its own data folder never trains on its outputs
            (self.output / "train_config.yaml").write_text(cfg.to_yaml())
        acc.init_trackers("logs", config=tracker_config(cfg.to_dict()))
        self._log_header()
        show = acc.is_main_process and cfg.progress
        with tqdm(total=cfg.max_steps, initial=self.state.step, disable=not show, desc="train", dynamic_ncols=True) as bar:
            with logging_redirect_tqdm():
                while self.state.step < cfg.max_steps:
                    self._run_epoch(bar)
        if self._sample_step != self.state.step:  # every run ends with a reconstruction grid
            self._sample = self.log_reconstructions()
        if self._sample is not None:
            self._info("%s: the first %d training images (top) and their reconstructions (bottom), PSNR %.2f dB",
                       self._sample, self.preview.shape[0], self._sample_psnr)
        if self._last_checkpoint is None or not self._last_checkpoint.name.endswith(f"-{self.state.step}"):
            self._save()
        export_dir = self.export()
        acc.end_training()
        return TrainResult(self.state.step, self._last_checkpoint, export_dir, self.history, self._sample)

    def _run_epoch(self, bar: Any) -> None:
        acc, cfg, st = self.accelerator, self.config, self.state
        if isinstance(self.loader, ViewBatches):
            loader = self.loader.epoch(st.epoch, st.batch_in_epoch)
        else:
            self.loader.set_epoch(st.epoch)
            loader = acc.skip_first_batches(self.loader, st.batch_in_epoch) if st.batch_in_epoch else self.loader
            loader.set_epoch(st.epoch)
        for batch in loader:
            st.batch_in_epoch += 1
            self._note_skipped(batch["skipped"])
            self._interval_images += batch["pixels"].shape[0] * acc.num_processes
            st.samples_seen += batch["pixels"].shape[0] * acc.num_processes
            if not self.train_step(batch["pixels"]):
                continue
            bar.update(1)
            self._after_step(bar)
            if st.step >= cfg.max_steps:
                return
        st.epoch += 1
        st.batch_in_epoch = 0

    def _skipped_total(self) -> int:
        """Unreadable files seen so far, summed over ranks (collective)."""
        count = torch.tensor(len(self._skipped), device=self.accelerator.device)
        return int(self.accelerator.reduce(count, "sum").item()) if self.accelerator.num_processes > 1 else int(count)

    def _note_skipped(self, skipped: list[dict[str, str]]) -> None:
        for item in skipped:
            if item["path"] not in self._skipped:
                self._skipped.add(item["path"])
                logger.warning("skipped unreadable image %s: %s", item["path"], item["reason"])

    def _after_step(self, bar: Any) -> None:
        cfg, step = self.config, self.state.step
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            values = self.meter.read(self._reduce_mean)
            values["skipped"] = float(self._skipped_total())
            self.accelerator.log(values, step=step)
            self.history.append({"step": float(step), **values})
            bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4g}", usage=f"{values.get('usage', 0):.2f}")
            now = time.perf_counter()
            self._info(step_summary(step, cfg.max_steps, self._interval_images, now - self._interval_start, values))
            self._interval_start, self._interval_images = now, 0
        if cfg.image_every and step % cfg.image_every == 0:
            self._sample = self.log_reconstructions()
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            self._save()

    def log_reconstructions(self) -> Path | None:
        """Save (and log) a grid of preview images over their reconstructions, made in eval mode.

        Eval mode runs no collectives, so only the main process works, except under FSDP, where
        the sharded forward needs every rank. Returns the PNG path on the main process.
        """
        acc = self.accelerator
        if not (acc.is_main_process or self._fsdp):
            return None
        net = self.model if self._fsdp else self.unwrapped
        net.eval()
        try:
            with torch.no_grad(), acc.autocast():
                recon = net(self.preview.to(acc.device), validate=False).reconstruction
        finally:
            net.train()
        if not acc.is_main_process:
            return None
        grid = reconstruction_grid(self.preview, recon)
        path = self.output / "samples" / f"step-{self.state.step:07d}.png"
        save_grid(grid, path)
        log_grid(acc, grid, self.state.step)
        self._sample_step = self.state.step
        self._sample_psnr = float(psnr(recon.float().clamp(0, 1).cpu(), self.preview.float()).mean())
        return path

    # -- checkpoints and export ------------------------------------------------------------
    def _save(self) -> None:
        q = self.unwrapped.quantizer
        rank_tensors = {}
        if hasattr(q, "restart_pool"):  # VQ's recent latents; FSQ and LFQ keep no state
            rank_tensors["quantizer_pool"] = {"recent": q.restart_pool, "recent_len": q.restart_pool_len}
        main = {EMA_NAME: self.ema.state_dict()} if self.ema is not None else {}
        self.state.skipped_keys = sorted(self._skipped)
        self._last_checkpoint = _save_checkpoint(
            self.accelerator, self.output, self.state, rank_tensors=rank_tensors, main_tensors=main,
            keep=self.config.keep_checkpoints,
        )

    def _resume(self) -> None:
        if not self.config.resume:
            return
        folder = resolve_resume(self.output, self.config.resume)
        if folder is None:
            self._info("no checkpoint in %s yet: starting from step 0", self.output)
            return
        self.state, tensors = load_checkpoint(self.accelerator, folder)
        q = self.unwrapped.quantizer
        if "quantizer_pool" in tensors:
            pool = tensors["quantizer_pool"]
            q.restart_pool.copy_(pool["recent"])
            q.restart_pool_len.copy_(pool["recent_len"])
        if self.ema is not None:
            if "model_ema" in tensors:
                self.ema.load_state_dict(tensors["model_ema"])
            else:
                logger.warning("%s has no model EMA; the EMA restarts from the current weights", folder)
                self.ema = ModelEMA(self.unwrapped, self.config.model_ema_decay)
        self._skipped = set(self.state.skipped_keys)
        self._last_checkpoint = folder
        self._info("resumed from step %d", self.state.step)

    def _log_header(self) -> None:
        acc, cfg, mc = self.accelerator, self.config, self.model_config
        n_params = sum(p.numel() for p in self.unwrapped.parameters())
        codebook = "EMA" if mc.use_ema else "learnable"
        weights = {"l2": cfg.l2_weight, "l1": cfg.l1_weight, "perceptual": self.perceptual_weight,
                   "adversarial": cfg.adversarial_weight}
        losses = ", ".join(f"{k} {v:g}" for k, v in weights.items() if v > 0)
        if self.perceptual is not None:
            losses += f" (perceptual: {getattr(self.perceptual, 'description', type(self.perceptual).__name__)})"
        per_step = cfg.batch_size * cfg.grad_accum_steps * acc.num_processes
        self._info(
            "model %.1fM parameters, %dx%d px, %d %s codes of dim %d | data %d items, %d loader workers | %d process(es) "
            "x batch %d x accumulation %d = %d images/step | lr %g, warmup %d of %d steps | mixed precision %s | "
            "losses: %s | output %s",
            n_params / 1e6, mc.image_size, mc.image_size, mc.codebook_size, codebook, mc.codebook_dim, self.num_items,
            cfg.workers, acc.num_processes, cfg.batch_size, cfg.grad_accum_steps, per_step, cfg.lr, cfg.warmup,
            cfg.max_steps, acc.mixed_precision, losses, self.output,
        )
        if self.shapes is not None:
            self._info("views: %s", self.shapes.describe())

    def export(self) -> Path | None:
        """Write the trained (or weight-EMA) model with `save_pretrained` into `<output>/<export_name>`.

        Collective under FSDP (the full state dict is gathered). Returns the folder on the main process.
        """
        acc = self.accelerator
        acc.wait_for_everyone()
        state = self.ema.state_dict() if self.ema is not None else acc.get_state_dict(self.model)
        folder = None
        if acc.is_main_process:
            export = ViTVQTokenizer(self.model_config)
            export.load_state_dict({k: v.detach().cpu() for k, v in state.items()}, strict=True)
            folder = self.output / self.config.export_name
            repo = self.config.push_to_hub
            export.save_pretrained(folder, repo_id=repo, push_to_hub=repo is not None)
            self._info("exported the %smodel to %s%s", "weight-EMA " if self.ema else "", folder,
                       f" and pushed it to {repo}" if repo else "")
        acc.wait_for_everyone()
        return folder


__all__ = ["Trainer", "TrainResult", "NonFiniteLossError", "build_model", "lr_lambda", "param_groups"]
