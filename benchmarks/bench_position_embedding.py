"""Learned (resampled) position embeddings against 2D RoPE: train at one size, code other sizes and shapes (issue 20).

    python benchmarks/bench_position_embedding.py --out bench/ --preset tiny --steps 1500 --seeds 0 1 2

Each (position embedding, seed) trains a fresh preset model on square `image_size` crops only, with
the same data, batches and schedule (AdamW, linear warmup then cosine; EMA codebook updated after each
step). Then it codes held-out crops of other sizes and aspect ratios (`--shapes`, in pixels) and
reports PSNR per shape. Photos: scikit-image / scikit-learn / matplotlib sample photos, scaled so the
short side is `--short-side` px (the same pixel scale for training and evaluation, so only the token
grid changes); training on `TRAIN`, evaluating on `HELDOUT`.

Writes `position_embedding.json` and `position_embedding.md` into `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from vit_vq import ViTVQConfig, ViTVQTokenizer
from vit_vq.metrics import psnr
from vit_vq.preprocess import native_size, resize_to, to_tensor

TRAIN = ("skimage:rocket", "skimage:hubble_deep_field", "skimage:immunohistochemistry", "skimage:retina",
         "skimage:coffee", "skimage:chelsea", "sklearn:flower")  # fmt: skip
HELDOUT = ("skimage:astronaut", "sklearn:china", "matplotlib:grace_hopper")
SHAPES = ("32x32", "48x48", "64x64", "128x128", "32x64", "64x32", "16x64", "64x128", "128x64")


def load(name: str, short_side: int) -> torch.Tensor:
    """A sample photo `package:name` as float `[3, H, W]`, short side `short_side`."""
    package, stem = name.split(":")
    if package == "skimage":
        import skimage.data

        image = getattr(skimage.data, stem)()
    elif package == "sklearn":
        from sklearn.datasets import load_sample_images

        data = load_sample_images()
        image = data.images[[Path(f).stem for f in data.filenames].index(stem)]
    else:
        import matplotlib
        from PIL import Image

        image = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / f"{stem}.jpg")
    t = to_tensor(image)
    return resize_to(t, native_size(t.shape[1], t.shape[2], short_side, 1))


def random_crops(photos: list[torch.Tensor], count: int, size: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    out = []
    for _ in range(count):
        img = photos[int(torch.randint(len(photos), (1,), generator=gen))]
        top = int(torch.randint(img.shape[1] - size[0] + 1, (1,), generator=gen))
        left = int(torch.randint(img.shape[2] - size[1] + 1, (1,), generator=gen))
        crop = img[:, top : top + size[0], left : left + size[1]]
        out.append(crop.flip(-1) if bool(torch.randint(2, (1,), generator=gen)) else crop)
    return torch.stack(out)


def train(config: ViTVQConfig, photos: list[torch.Tensor], steps: int, batch: int, lr: float, seed: int) -> ViTVQTokenizer:
    torch.manual_seed(seed)
    tok = ViTVQTokenizer(config).train()
    tok.quantizer.auto_update = False
    opt = torch.optim.AdamW(tok.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )
    gen = torch.Generator().manual_seed(1000 + seed)  # the same batches for both position embeddings
    S = config.image_size
    for _ in range(steps):
        out = tok(random_crops(photos, batch, (S, S), gen))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(tok.parameters(), 1.0)
        opt.step()
        sched.step()
        tok.quantizer.update_codebook()
    return tok.eval()


def evaluate(tok: ViTVQTokenizer, photos: list[torch.Tensor], shapes: list[tuple[int, int]], per_photo: int) -> dict:
    scores = {}
    for h, w in shapes:
        gen = torch.Generator().manual_seed(h * 1000 + w)  # the same crops for every model
        crops = torch.cat([random_crops([p], per_photo, (h, w), gen) for p in photos])
        recon = tok.decode(tok.encode(crops))
        scores[f"{h}x{w}"] = float(psnr(recon, crops).mean())
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--short-side", type=int, default=128, help="photos are scaled to this short side first")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="evaluation crops, HxW in pixels")
    parser.add_argument("--per-photo", type=int, default=8, help="evaluation crops per photo and shape")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_photos = [load(n, args.short_side) for n in TRAIN]
    eval_photos = [load(n, args.short_side) for n in HELDOUT]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    runs = []
    for seed in args.seeds:
        for kind in ("learned", "rope2d"):
            config = ViTVQConfig.from_preset(args.preset, position_embedding=kind)
            start = time.perf_counter()
            tok = train(config, train_photos, args.steps, args.batch, args.lr, seed)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                scores = evaluate(tok, eval_photos, shapes, args.per_photo)
            runs.append({"position_embedding": kind, "seed": seed, "train_seconds": round(seconds, 1), "psnr": scores})
            print(json.dumps(runs[-1]), flush=True)
    S = ViTVQConfig.from_preset(args.preset).image_size
    names = [f"{h}x{w}" for h, w in shapes]
    lines = [
        f"Preset `{args.preset}` trained on {S}x{S} crops only, {args.steps} steps of batch {args.batch}, lr {args.lr}, "
        f"seeds {args.seeds}; PSNR (dB) of {args.per_photo} held-out crops per photo and shape "
        f"({len(eval_photos)} photos at short side {args.short_side}); torch {torch.__version__}, {platform.machine()}.",
        "",
        "| position embedding | seed | " + " | ".join(names) + " |",
        "|---|---" + "|---" * len(names) + "|",
    ]
    for r in runs:
        lines.append(f"| {r['position_embedding']} | {r['seed']} | " + " | ".join(f"{r['psnr'][n]:.2f}" for n in names) + " |")
    for kind in ("learned", "rope2d"):
        mine = [r for r in runs if r["position_embedding"] == kind]
        means = [statistics.mean(r["psnr"][n] for r in mine) for n in names]
        lines.append(f"| **{kind}, mean** | | " + " | ".join(f"{m:.2f}" for m in means) + " |")
    diffs = {n: [b["psnr"][n] - a["psnr"][n] for a, b in zip(runs[::2], runs[1::2], strict=True)] for n in names}
    lines.append("| **rope2d - learned** (per seed: min, max) | | " + " | ".join(
        f"{statistics.mean(d):+.2f} ({min(d):+.2f}, {max(d):+.2f})" for d in diffs.values()) + " |")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"args": vars(args) | {"out": str(args.out)}, "runs": runs}
    (args.out / "position_embedding.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "position_embedding.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
