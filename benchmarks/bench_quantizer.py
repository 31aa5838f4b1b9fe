"""Quantizer settings in matched runs on the tiny preset: gradient (ste / rotation), dead-code rule.

    OMP_NUM_THREADS=1 python benchmarks/bench_quantizer.py --steps 400 --seeds 0,1,2
    OMP_NUM_THREADS=1 python benchmarks/bench_quantizer.py \
        --variants "dead_code_rule=relative;dead_code_rule=absolute,dead_code_threshold=2"

Trains the `tiny` preset (32 px, 256 codes of dim 8) with Adam on random crops of real photos
(scikit-image and scikit-learn samples; scikit-learn's two photos are held out), once per variant
(config overrides) and seed with everything else equal (same init, same batches), and reports
held-out PSNR, codebook perplexity and usage. Prints a markdown table; `--json` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vit_vq import ViTVQConfig, ViTVQTokenizer  # noqa: E402
from vit_vq.preprocess import resize_center_crop, to_tensor  # noqa: E402

# scikit-image's `cat` is bit-identical to `chelsea` (np.array_equal), so it is never held out beside it.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
HELD_OUT = 2  # the last photos: china and flower (scikit-learn), never trained on


def photos() -> list[torch.Tensor]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    arrays = [getattr(skimage.data, name)()[..., :3] for name in PHOTOS] + list(load_sample_images().images)
    return [to_tensor(a) for a in arrays]  # (3, H, W) floats in [0, 1]


def crops(images: list[torch.Tensor], count: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """`[count, 3, size, size]`: a random photo, downscaled to 1.5-4x `size`, then a random crop."""
    out = []
    for _ in range(count):
        img = images[int(torch.randint(len(images), (1,), generator=gen))]
        scale = int(size * (1.5 + 2.5 * float(torch.rand(1, generator=gen))))
        img = resize_center_crop(img, scale)
        top, left = (int(v) for v in torch.randint(0, scale - size + 1, (2,), generator=gen))
        out.append(img[:, top : top + size, left : left + size])
    return torch.stack(out)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1).numpy()
    return float(np.mean(10 * np.log10(1.0 / mse)))


def parse_variant(text: str) -> dict:
    """`"a=1,b=x"` -> `{"a": 1, "b": "x"}` (numbers parsed as JSON, everything else a string)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run(variant: str, seed: int, steps: int, train: torch.Tensor, held_out: torch.Tensor, batch: int) -> dict:
    torch.manual_seed(seed)
    tok = ViTVQTokenizer(ViTVQConfig.from_preset("tiny", **parse_variant(variant)))
    opt = torch.optim.Adam(tok.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1000 + seed)  # the same batches for every variant
    start = time.perf_counter()
    tok.train()
    for _ in range(steps):
        x = train[torch.randint(len(train), (batch,), generator=gen)]
        out = tok(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    tok.eval()
    with torch.no_grad():
        codes = tok.encode(held_out)
        rec = tok.decode(codes)
    counts = torch.bincount(codes.flatten(), minlength=tok.config.codebook_size).double()
    p = counts / counts.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    return {
        "variant": variant, "seed": seed, "steps": steps, "psnr": psnr(rec, held_out),
        "perplexity": perplexity, "usage": float((counts > 0).double().mean()),
        "seconds": time.perf_counter() - start,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--variants",
        default="quantizer_gradient=ste;quantizer_gradient=rotation",
        help="semicolon-separated config overrides, one run per variant and seed",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    images = photos()
    gen = torch.Generator().manual_seed(0)
    train = crops(images[:-HELD_OUT], 2048, 32, gen)
    held_out = crops(images[-HELD_OUT:], 96, 32, gen)
    rows = []
    variants = args.variants.split(";")
    for seed in (int(s) for s in args.seeds.split(",")):
        for variant in variants:
            rows.append(run(variant, seed, args.steps, train, held_out, args.batch))
            r = rows[-1]
            print(
                f"{variant} seed {seed}: {r['psnr']:.2f} dB, perplexity {r['perplexity']:.1f}, "
                f"usage {r['usage']:.2f} ({r['seconds']:.0f} s)",
                flush=True,
            )
    print(f"\n| variant | held-out PSNR (dB), seeds {args.seeds} | mean | perplexity (mean) | usage (mean) |")
    print("|---|---|---|---|---|")
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        values = ", ".join(f"{r['psnr']:.2f}" for r in mine)
        print(
            f"| {variant} | {values} | {statistics.mean(r['psnr'] for r in mine):.2f} "
            f"| {statistics.mean(r['perplexity'] for r in mine):.1f} | {statistics.mean(r['usage'] for r in mine):.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
