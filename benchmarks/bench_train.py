"""Training throughput and peak memory: the reference training step vs the `Trainer`'s step.

    python benchmarks/bench_train.py --out results/            # GPU: seed preset, batch 64, 224 px
    python benchmarks/bench_train.py --out results/ --small    # CPU smoke run, well under a minute
    python benchmarks/bench_train.py --out results/ --views    # data time against model time (default model)

The reference step is re-implemented here, self-contained, as the baseline: a transformers
`ViTModel` (ViT-B/16, 224 px) encoder, a linear map to 512, a naive nearest code over a
1024 x 512 N(0, 1) codebook (argmin of |z|^2 - 2 z.e + |e|^2) with the legacy swapped
codebook/commitment losses and no straight-through estimator, a decoder of transformers
`ViTLayer`s, a linear head to 16 x 16 x 3 patches, MSE plus a VGG16 perceptual loss fed
normalised images, and Adam. VGG16 is randomly initialised (no weights here): same FLOPs.

Ours is `vit_vq.training.Trainer.train_step` on the `seed` preset (same geometry): bf16
autocast with the codebook in fp32, fused AdamW, the LPIPS-style loss on ImageNet-normalised
[0, 1] images with channels-last VGG16, EMA codebook update per step, NaN check; optionally
`torch.compile` of the transformer blocks and the perceptual loss (`--compile` of the Trainer).

Every configuration runs in this one process on the same device: warm-up steps, then timed
steps between `cuda.synchronize()` calls; peak memory is `torch.cuda.max_memory_allocated`.
Results are rewritten after every configuration into `--out` as `bench_train.json` and
`bench_train.md`, so a run cut short still leaves what it measured.

`--views` instead times where the default model's training views come from, against its
training step (`examples/train_default.py`: 128 px, batch 16 on CPU, 512 on CUDA): the
data-loader views (`TrainTransform` in `--workers` processes) and the views cut on the device
(`vit_vq.training.views.DeviceViews`), both from photos already decoded to uint8 (65 synthetic
photos shaped like the default pack's, two landscape 768 x 1152 to one portrait, or `--photos DIR`).
It writes `bench_views.json` and `bench_views.md`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

LPIPS_LAYERS = (3, 8, 15, 22, 29)


# -- the reference (baseline only) ------------------------------------------------------------
class RefTokenizer(nn.Module):
    """The reference design: HF ViT encoder -> linear -> naive VQ (no straight-through) -> HF ViT layers -> patches."""

    def __init__(self, image_size: int, patch: int, width: int, depth: int, heads: int, K: int, D: int) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTModel

        cfg = ViTConfig(image_size=image_size, patch_size=patch, hidden_size=width, num_hidden_layers=depth,
                        num_attention_heads=heads, intermediate_size=4 * width)
        self.patch, self.grid = patch, image_size // patch
        self.encoder = ViTModel(cfg, add_pooling_layer=False)
        self.to_latent = nn.Linear(width, D)
        self.codebook = nn.Embedding(K, D)
        nn.init.normal_(self.codebook.weight, 0.0, 1.0)
        self.dec_in = nn.Linear(D, width)
        self.dec_pos = nn.Parameter(torch.zeros(1, self.grid**2, width))
        decoder = ViTModel(cfg, add_pooling_layer=False)  # public `layers` and `layernorm` (transformers 5 has no .encoder)
        self.dec_layers, self.dec_norm = decoder.layers, decoder.layernorm
        self.to_pixels = nn.Linear(width, patch * patch * 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(pixel_values=x).last_hidden_state[:, 1:]  # (B, N, W), CLS dropped
        z = self.to_latent(h)  # (B, N, D)
        flat = z.reshape(-1, z.shape[-1]).float()  # (B*N, D)
        e = self.codebook.weight.float()  # (K, D)
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)  # (B*N, K)
        zq = self.codebook(dist.argmin(1)).view_as(z)  # no straight-through: the decoder sees zq itself
        vq_loss = 0.25 * F.mse_loss(zq, z.detach()) + F.mse_loss(zq.detach(), z)  # legacy: beta on the wrong term
        h = self.dec_in(zq) + self.dec_pos
        for layer in self.dec_layers:
            h = layer(h)
            h = h[0] if isinstance(h, tuple) else h
        p = self.to_pixels(self.dec_norm(h))  # (B, N, p*p*3)
        B, g, s = p.shape[0], self.grid, self.patch
        recon = p.view(B, g, g, s, s, 3).permute(0, 5, 1, 3, 2, 4).reshape(B, 3, g * s, g * s)  # (B, 3, H, W)
        return recon, vq_loss


def ref_perceptual(vgg: nn.Sequential, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The reference's LPIPS-like loss: normalised images straight into VGG, target not under no_grad."""
    loss, a, b = recon.new_zeros((), dtype=torch.float32), recon, target
    for i, layer in enumerate(vgg):
        a, b = layer(a), layer(b)
        if i in LPIPS_LAYERS:
            fa = a.float() / (a.float().pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fb = b.float() / (b.float().pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            loss = loss + (fa - fb).pow(2).sum(1).mean()
    return loss


def run_reference(shape: dict[str, int], batch: int, amp: bool, steps: int, warmup: int, device: torch.device) -> float:
    from torchvision.models.vgg import cfgs, make_layers

    with torch.device(device):
        model = RefTokenizer(shape["image"], shape["patch"], shape["width"], shape["depth"], shape["heads"],
                             shape["K"], shape["D"])
        vgg = make_layers(cfgs["D"])[:30].eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.rand(batch, 3, shape["image"], shape["image"], device=device)

    def step() -> None:
        x = images * 2 - 1  # the reference normalises to [-1, 1] and feeds that to VGG as well
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            recon, vq_loss = model(x)
            loss = F.mse_loss(recon.float(), x) + vq_loss + ref_perceptual(vgg, recon, x)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return timed(step, steps, warmup, device)


# -- ours --------------------------------------------------------------------------------------
def run_ours(shape: dict[str, int], batch: int, mixed: str, compile_: bool, steps: int, warmup: int,
             device: torch.device) -> float:
    from vit_vq import ViTVQConfig, ViTVQTokenizer
    from vit_vq.training import PerceptualLoss, TrainConfig, Trainer
    from vit_vq.training.losses import vgg16_features

    overrides = dict(image_size=shape["image"], patch_size=shape["patch"], codebook_size=shape["K"], codebook_dim=shape["D"])
    for part in ("encoder", "decoder"):
        overrides.update({f"{part}_width": shape["width"], f"{part}_depth": shape["depth"], f"{part}_heads": shape["heads"]})
    with torch.device(device):
        model = ViTVQTokenizer(ViTVQConfig.from_preset("seed", **overrides))
    images = torch.rand(batch, 3, shape["image"], shape["image"], device=device)
    source = [{"pixels": img, "key": str(i), "label": -1, "error": None} for i, img in enumerate(images.cpu())]
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(output=out, batch_size=batch, mixed_precision=mixed, compile=compile_, trackers="none",
                          progress=False, num_workers=0, perceptual_weight=1.0, warmup_steps=1, max_steps=10**6)
        trainer = Trainer(cfg, model=model, dataset=source, perceptual=PerceptualLoss(vgg16_features()))
        return timed(lambda: trainer.train_step(images), steps, warmup, device)


# -- where the views come from (--views) --------------------------------------------------------
def load_recipe() -> Any:
    """examples/train_default.py as a module: its MODEL, WHOLE_PROB, PhotoCrops and read_photos."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "train_default.py"
    spec = importlib.util.spec_from_file_location("train_default", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_photos(count: int = 65) -> list[torch.Tensor]:
    """uint8 `[3, H, W]` photos shaped like the default pack's (short side 768), smooth noise."""
    gen, photos = torch.Generator().manual_seed(0), []
    for i in range(count):
        h, w = (1152, 768) if i % 3 == 2 else (768, 1152)
        coarse = torch.rand(1, 3, h // 32, w // 32, generator=gen)
        photos.append((F.interpolate(coarse, size=(h, w), mode="bilinear")[0] * 255).round().to(torch.uint8))
    return photos


def run_views(args: argparse.Namespace, device: torch.device, out: Path) -> list[dict[str, Any]]:
    from torch.utils.data import DataLoader

    from vit_vq import ViTVQConfig, ViTVQTokenizer
    from vit_vq.training import TrainConfig, Trainer
    from vit_vq.training.data import train_collate

    recipe = load_recipe()
    S, cuda = recipe.MODEL["image_size"], device.type == "cuda"
    batch = args.batch_size or (512 if cuda else 16)
    steps, warmup = args.steps or (20 if cuda else 4), args.warmup or 2
    workers = args.workers if args.workers is not None else (min(12, (os.cpu_count() or 2) - 2) if cuda else 0)
    names, photos = recipe.read_photos(args.photos) if args.photos else (None, synthetic_photos())
    source = [{"pixels": p, "key": str(i), "label": -1, "error": None} for i, p in enumerate(photos)]
    meta = {"device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or 'cpu'}), "
            f"{torch.get_num_threads()} thread(s)", "torch": torch.__version__, "batch": batch, "image_size": S,
            "photos": len(photos), "photo_pixels": sum(p[0].numel() for p in photos), "workers": workers,
            "steps": steps, "warmup": warmup, "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(output=tmp, batch_size=batch, lr=5e-4, weight_decay=0.0, trackers="none", progress=False,
                          num_workers=0, perceptual_weight=0.0, warmup_steps=1, max_steps=10**6, data_views="device",
                          crop_scales="log_uniform", whole_prob=recipe.WHOLE_PROB, views_max_gb=args.views_max_gb)
        trainer = Trainer(cfg, model=ViTVQTokenizer(ViTVQConfig(**recipe.MODEL)), dataset=source)
        views = trainer.loader.views
        meta["canvas_bytes"] = views.nbytes
        meta["bytes_per_photo"] = views.nbytes / len(views)
        images = views.batch(0, batch)
        model_s = timed(lambda: trainer.train_step(images), steps, warmup, device)
        rows.append({"name": "model step (Trainer.train_step)", "ms": 1000 * model_s})
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        counter = iter(range(10**9))
        device_s = timed(lambda: views.batch(next(counter), batch), steps, warmup, device)
        peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
        rows.append({"name": "views cut on the device (DeviceViews)", "ms": 1000 * device_s, "peak_gb": peak})
        crops = recipe.PhotoCrops(names or [str(i) for i in range(len(photos))], photos, S,
                                  length=(steps + warmup) * batch, seed=0)
        loader = iter(DataLoader(crops, batch_size=batch, num_workers=workers, collate_fn=train_collate,
                                 pin_memory=cuda, persistent_workers=workers > 0))
        loader_s = timed(lambda: next(loader)["pixels"].to(device, non_blocking=True), steps, warmup, device)
        rows.append({"name": f"data-loader views (TrainTransform, {workers} workers)", "ms": 1000 * loader_s})
    for r in rows[1:]:
        r["vs_model"] = r["ms"] / rows[0]["ms"]
    lines = [f"Views against the model step, {meta['device']}, batch {batch}, {S} px, {len(photos)} photos", "",
             "| | ms per batch | data / model |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['ms']:.1f} | {r.get('vs_model', 1.0):.2f} |" for r in rows]
    lines += ["", f"Photos held on the device: {views.nbytes / 1e6:.0f} MB, {meta['bytes_per_photo'] / 1e6:.2f} MB a photo"
              f" ({meta['photo_pixels'] / len(photos) / 1e6:.2f} Mpixel a photo on average)"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_views.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    (out / "bench_views.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


# -- harness -----------------------------------------------------------------------------------
def timed(step: Any, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step over `steps` timed steps after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, fn: Any, batch: int, device: torch.device) -> dict[str, Any]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        seconds = fn()
    except Exception as err:  # one failing configuration must not lose the others
        traceback.print_exc()
        return {"name": name, "error": f"{type(err).__name__}: {err}"[:500]}
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
    return {"name": name, "images_per_s": batch / seconds, "step_ms": 1000 * seconds, "peak_gb": peak,
            "wall_s": time.perf_counter() - start}


def write(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    base = {r["name"]: r for r in rows}.get("ref bf16") or {r["name"]: r for r in rows}.get("ref fp32")
    lines = [f"Training throughput, {meta['device']}, {meta['shape_name']}, batch {meta['batch']}",
             "", "| configuration | images/s | ms/step | peak memory (GB) | vs reference |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:80]} | | | |")
            continue
        ratio = f"{r['images_per_s'] / base['images_per_s']:.2f}x" if base and "images_per_s" in base else ""
        peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "n/a"
        lines.append(f"| {r['name']} | {r['images_per_s']:.1f} | {r['step_ms']:.1f} | {peak} | {ratio} |")
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_train.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    (out / "bench_train.md").write_text(table)
    return table


SHAPES = {
    # the seed preset / the reference: ViT-B/16 at 224 px, 14x14 tokens, 1024 x 512 codebook
    "seed": dict(image=224, patch=16, width=768, depth=12, heads=12, K=1024, D=512),
    # a CPU smoke test of the same code paths
    "small": dict(image=32, patch=8, width=64, depth=2, heads=4, K=128, D=32),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for bench_train.json and bench_train.md")
    parser.add_argument("--small", action="store_true", help="small shapes, CPU-friendly (fp32 only)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 (4 with --small)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 10, 2 small)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, 1 small)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time ours with torch.compile (default: on with CUDA)")
    parser.add_argument("--budget-s", type=float, default=400.0,
                        help="start no further configuration after this many seconds (the results so far are kept)")
    parser.add_argument("--views", action="store_true", help="time the training views against the default model's step")
    parser.add_argument("--photos", type=Path, help="--views: a folder of JPEG/PNG photos (default: synthetic ones)")
    parser.add_argument("--workers", type=int, help="--views: data-loader processes (default 0 on CPU, up to 12 on CUDA)")
    parser.add_argument("--views-max-gb", type=float, default=8.0, help="--views: memory the photos may take on the device")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.views:
        run_views(args, device, args.out)
        return 0
    shape_name = "small" if args.small else "seed"
    shape = SHAPES[shape_name]
    batch = args.batch_size or (4 if args.small else 64)
    steps, warmup = args.steps or (2 if args.small else 10), args.warmup or (1 if args.small else 3)
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    amp = device.type == "cuda" and torch.cuda.is_bf16_supported() and not args.small
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})",
            "torch": torch.__version__, "python": sys.version.split()[0], "shape_name": shape_name, "shape": shape,
            "batch": batch, "steps": steps, "warmup": warmup}
    plan: list[tuple[str, Any]] = [("ref fp32", lambda: run_reference(shape, batch, False, steps, warmup, device))]
    if amp:
        plan.append(("ref bf16", lambda: run_reference(shape, batch, True, steps, warmup, device)))
    mixed = "bf16" if amp else "no"
    label = "bf16" if amp else "fp32"
    plan.append((f"ours {label}", lambda: run_ours(shape, batch, mixed, False, steps, warmup, device)))
    if use_compile:
        plan.append((f"ours {label} + compile", lambda: run_ours(shape, batch, mixed, True, steps, warmup + 2, device)))
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for name, fn in plan:
        if time.perf_counter() - start > args.budget_s:
            rows.append({"name": name, "error": f"skipped: the {args.budget_s:g} s budget was spent"})
            continue
        rows.append(measure(name, fn, batch, device))
        table = write(args.out, meta, rows)
        print(f"{name}: {rows[-1]}", flush=True)
    print("\n" + table)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
