"""Train the tokenizer that ships inside vit_vq (`ViTVQTokenizer.default()`), through the project's Trainer.

Data: the photo pack written by `examples/prepare_default_data.py` (`train/` and `heldout/`
JPEGs plus `manifest.json`). Training sees random crops of the `train/` photos only: a square
of random size (between the model's side and the photo's short side, log-uniform) and aspect
jitter, at a random place, resized to the model's side, then flipped at random. Every crop is
seeded by `(seed, index)` and every flip by `(seed, epoch, index)`, so a run with the same
`--steps` and `--seed` sees the same data.

    # CPU, in the background (1-2 threads on a shared machine):
    nohup python examples/train_default.py --minutes 40 --threads 2 --output runs/default &
    # one GPU:
    python examples/train_default.py --device cuda --minutes 5 --output runs/default-gpu

`--minutes` times a few steps first and turns the budget into `--steps` (printed, so the run
can be repeated exactly). At the end the script evaluates the exported model on the held-out
photos (never trained on) and on seeded training crops, and writes `eval.json` and the model
card (`README.md`) into `<output>/final/`. Shipping it is a copy:

    cp runs/default/final/{config.json,model.safetensors,README.md} vit_vq/assets/default/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

# The shipped architecture: 128 px, patch 8 -> 16x16 tokens; an l2-normalised EMA codebook.
MODEL = dict(
    image_size=128, patch_size=8,
    encoder_width=256, encoder_depth=4, encoder_heads=4,
    decoder_width=256, decoder_depth=4, decoder_heads=4,
    codebook_size=4096, codebook_dim=8, l2_normalize=True,
    use_ema=True, ema_decay=0.99, dead_code_threshold=0.03, commitment_beta=0.25,
    perceptual_weight=0.0,
)
EVAL_TRAIN_CROPS = 1024  # seeded training crops for the training-PSNR and codebook-usage numbers
EVAL_SEED = 12345


# -- data --------------------------------------------------------------------------------
def read_photos(folder: Path) -> tuple[list[str], list[torch.Tensor]]:
    """Every JPEG/PNG in `folder` as uint8 `[3, H, W]`, sorted by name."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise FileNotFoundError(f"no photos in {folder}; run examples/prepare_default_data.py first")
    photos = []
    for f in files:
        with Image.open(f) as im:
            photos.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous())  # (3, H, W)
    return [f.stem for f in files], photos


def random_crop(photo: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 `[3, H, W]` -> float `[3, size, size]` in [0, 1]: a crop of random scale, aspect and place."""
    _, H, W = photo.shape
    u = torch.rand(4, generator=gen).tolist()
    short = min(H, W)
    side = math.exp(math.log(size) + u[0] * (math.log(short) - math.log(size)))  # log-uniform in [size, short]
    aspect = math.exp((u[1] - 0.5) * 0.4)  # 0.82 .. 1.22
    ch, cw = min(H, max(size, round(side * aspect))), min(W, max(size, round(side / aspect)))
    top, left = int(u[2] * (H - ch + 1)), int(u[3] * (W - cw + 1))
    crop = photo[:, top : top + ch, left : left + cw].float()[None] / 255  # (1, 3, ch, cw)
    crop = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return crop[0].clamp(0, 1)


class PhotoCrops(Dataset):
    """`length` seeded random crops of `photos` (item j: photo `j % len(photos)`), as Trainer items."""

    def __init__(self, names: list[str], photos: list[torch.Tensor], size: int, length: int, seed: int) -> None:
        self.names, self.photos, self.size, self.length, self.seed = names, photos, size, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, j: int) -> dict[str, Any]:
        k = j % len(self.photos)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + j)
        return {"pixels": random_crop(self.photos[k], self.size, gen), "key": f"{self.names[k]}#{j}", "label": -1, "error": None}


# -- evaluation --------------------------------------------------------------------------
@torch.no_grad()
def run_model(tok, x: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstructions `[N, 3, S, S]` (CPU, float) and codes `[N, h, w]` of images `[N, 3, S, S]`."""
    device = next(tok.parameters()).device
    recons, codes = [], []
    for i in range(0, len(x), batch):
        c = tok.encode(x[i : i + batch].to(device))
        recons.append(tok.decode(c).float().cpu())
        codes.append(c.cpu())
    return torch.cat(recons), torch.cat(codes)


def evaluate(tok, pack: Path) -> dict[str, Any]:
    """Held-out PSNR/SSIM (whole photo resized + center-cropped; and 5 crops at the pack's scale),
    training-crop PSNR, and codebook usage over the held-out photos plus seeded training crops."""
    from vit_vq.metrics import psnr, ssim
    from vit_vq.preprocess import resize_center_crop

    S = tok.config.image_size
    h_names, h_photos = read_photos(pack / "heldout")
    t_names, t_photos = read_photos(pack / "train")
    views = torch.stack([resize_center_crop(p.float() / 255, S) for p in h_photos])  # (n, 3, S, S)
    gen = torch.Generator().manual_seed(EVAL_SEED)
    patches = []
    for p in h_photos:  # 4 corners + center, no resizing: the photo's fine detail
        _, H, W = p.shape
        for top, left in ((0, 0), (0, W - S), (H - S, 0), (H - S, W - S), ((H - S) // 2, (W - S) // 2)):
            patches.append(p[:, top : top + S, left : left + S].float() / 255)
    patches = torch.stack(patches)
    crops = torch.stack([random_crop(t_photos[i % len(t_photos)], S, gen) for i in range(EVAL_TRAIN_CROPS)])
    r_views, c_views = run_model(tok, views)
    r_patches, c_patches = run_model(tok, patches)
    r_crops, c_crops = run_model(tok, crops)
    p_views, s_views = psnr(r_views, views), ssim(r_views, views)
    K = tok.config.codebook_size
    used_heldout = torch.cat([c_views.flatten(), c_patches.flatten()]).unique().numel()
    used_all = torch.cat([c_views.flatten(), c_patches.flatten(), c_crops.flatten()]).unique().numel()
    return {
        "heldout_psnr": p_views.mean().item(),
        "heldout_ssim": s_views.mean().item(),
        "heldout_per_photo": {n: {"psnr": round(a, 2), "ssim": round(b, 4)}
                              for n, a, b in zip(h_names, p_views.tolist(), s_views.tolist(), strict=True)},
        "heldout_crops_psnr": psnr(r_patches, patches).mean().item(),
        "heldout_crops_ssim": ssim(r_patches, patches).mean().item(),
        "train_crops_psnr": psnr(r_crops, crops).mean().item(),
        "train_crops_ssim": ssim(r_crops, crops).mean().item(),
        "usage_heldout_plus_train_crops": used_all / K,
        "usage_heldout_only": used_heldout / K,
        "tokens_counted": int(c_views.numel() + c_patches.numel() + c_crops.numel()),
        "num_heldout": len(h_names), "num_heldout_crops": len(patches), "num_train_crops": len(crops),
    }


# -- run ---------------------------------------------------------------------------------
def seconds_per_step(tok, batch_size: int, device: torch.device, lr: float) -> float:
    """Wall time of one optimizer step of a throwaway copy of `tok` (median of 3, after 1 warm-up)."""
    import copy

    model = copy.deepcopy(tok).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    x = torch.rand(batch_size, 3, tok.config.image_size, tok.config.image_size, device=device)
    times = []
    for _ in range(4):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(x, validate=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path(".data/default_pack"), help="the photo pack (train/, heldout/)")
    p.add_argument("--output", type=Path, default=Path("runs/default"))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="optimizer steps")
    g.add_argument("--minutes", type=float, help="time budget for training; turned into --steps by timing a few steps")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--batch-size", type=int, help="default: 16 on CPU, 128 on CUDA")
    p.add_argument("--lr", type=float, help="peak learning rate; default: 6e-4 at batch 16, scaled by sqrt(batch/16)")
    p.add_argument("--workers", type=int, help="data-loader processes; default 0 on CPU, 8 on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-ema", type=float, default=0.0, help="weight-EMA decay of the exported model (0: off)")
    args = p.parse_args(argv)

    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before accelerate picks a device
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    torch.set_num_threads(args.threads)
    from vit_vq import ViTVQConfig, ViTVQTokenizer
    from vit_vq.training import TrainConfig, Trainer

    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    batch = args.batch_size or (128 if device.type == "cuda" else 16)
    lr = args.lr or 6e-4 * math.sqrt(batch / 16)
    workers = args.workers if args.workers is not None else (8 if device.type == "cuda" else 0)
    torch.manual_seed(args.seed)
    tok = ViTVQTokenizer(ViTVQConfig(**MODEL))
    steps = args.steps
    if steps is None:
        minutes = args.minutes or 40.0
        per_step = seconds_per_step(tok, batch, device, lr)
        steps = max(10, int(minutes * 60 * 0.92 / per_step))  # ~8% for data loading and logging
        print(f"{per_step:.3f} s/step at batch {batch} on {device}: {minutes:g} minutes -> --steps {steps}", flush=True)

    names, photos = read_photos(args.data / "train")
    dataset = PhotoCrops(names, photos, MODEL["image_size"], length=steps * batch, seed=args.seed)
    config = TrainConfig(
        output=str(args.output), max_steps=steps, batch_size=batch, lr=lr, weight_decay=0.0,
        warmup_steps=min(200, steps // 10), min_lr_ratio=0.05, max_grad_norm=1.0, seed=args.seed,
        num_workers=workers, model_ema_decay=args.model_ema, l2_weight=1.0, perceptual_weight=0.0,
        trackers="none", log_every=max(1, steps // 50), image_every=max(1, steps // 5),
        save_every=max(1, steps // 4), keep_checkpoints=1, resume="latest",
    )
    start = time.time()
    result = Trainer(config, model=tok, dataset=dataset).train()
    train_seconds = time.time() - start
    if result.export_dir is None:
        return 0
    final = ViTVQTokenizer.from_pretrained(result.export_dir, map_location=device)
    scores = evaluate(final, args.data)
    run = {
        "steps": result.step, "batch_size": batch, "images_seen": result.step * batch, "lr": lr, "seed": args.seed,
        "train_minutes": round(train_seconds / 60, 1), "device": torch.cuda.get_device_name() if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}), {args.threads} threads",
        "torch": torch.__version__, "num_train_photos": len(names), "model_ema": args.model_ema,
        "last_log": result.history[-1] if result.history else {},
    }
    (result.export_dir / "eval.json").write_text(json.dumps({"run": run, "scores": scores}, indent=1) + "\n")
    print(json.dumps(scores | {"run": run}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
