"""Quantizer settings in matched runs on the tiny preset: gradient (ste / rotation), dead-code rule, VQ / FSQ / LFQ.

    OMP_NUM_THREADS=1 python benchmarks/bench_quantizer.py --steps 400 --seeds 0,1,2
    OMP_NUM_THREADS=1 python benchmarks/bench_quantizer.py \
        --variants "dead_code_rule=relative;dead_code_rule=absolute,dead_code_threshold=2"
    OMP_NUM_THREADS=1 python benchmarks/bench_quantizer.py --family --jobs 2 --plot docs/img/quantizer_family.png
    python benchmarks/bench_quantizer.py --check-vqp   # needs vector-quantize-pytorch (not a vit_vq dependency)

`--family` runs VQ (EMA, rotation gradient; and ste at 8 bits), FSQ and LFQ at 8 and 12 bits
(`FAMILY`). Each run is its own process (`--jobs` at a time), so its peak memory is its own: peak
RSS on CPU, `max_memory_allocated` on CUDA. `--check-vqp` compares FSQ and LFQ indices with
vector-quantize-pytorch's on the same latents; `--vqp` adds its FSQ and LFQ as trained variants.

Trains the `tiny` preset (32 px, 256 codes of dim 8) with Adam on random crops of real photos
(scikit-image and scikit-learn samples; scikit-learn's two photos are held out), once per variant
(config overrides) and seed with everything else equal (same init, same batches), and reports
held-out PSNR and SSIM, codebook perplexity and usage, step time and peak memory. Prints markdown
tables (every seed, and paired differences against the first variant of the same bits); `--json`
also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vit_vq import ViTVQConfig, ViTVQTokenizer  # noqa: E402
from vit_vq.metrics import ssim  # noqa: E402
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


# name -> (bits, tiny-preset overrides). VQ: EMA codebook of dim 8; FSQ: the FSQ paper's levels for ~2^8 and ~2^12.
FAMILY: dict[str, tuple[int, str]] = {
    "vq rotation 8b": (8, "codebook_size=256"),
    "vq ste 8b": (8, "codebook_size=256,quantizer_gradient=ste"),
    "fsq 8b": (8, "quantizer=fsq,fsq_levels=[8,6,5]"),
    "lfq 8b": (8, "quantizer=lfq,codebook_size=256"),
    "vq rotation 12b": (12, "codebook_size=4096"),
    "fsq 12b": (12, "quantizer=fsq,fsq_levels=[7,5,5,5,5]"),
    "lfq 12b": (12, "quantizer=lfq,codebook_size=4096"),
}
VQP = {"vqp fsq 8b": (8, "quantizer=fsq,fsq_levels=[8,6,5]"), "vqp lfq 8b": (8, "quantizer=lfq,codebook_size=256")}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1).numpy()
    return float(np.mean(10 * np.log10(1.0 / mse)))


def parse_variant(text: str) -> dict:
    """`"a=1,b=x,c=[8,6,5]"` -> `{"a": 1, "b": "x", "c": [8, 6, 5]}` (values parsed as JSON, else strings)."""
    out = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", text)):  # commas outside brackets
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


class VqpQuantizer(torch.nn.Module):
    """vector-quantize-pytorch's `FSQ` or `LFQ` behind vit_vq's quantizer interface (training forward only)."""

    def __init__(self, config: ViTVQConfig) -> None:
        super().__init__()
        from vector_quantize_pytorch import FSQ, LFQ

        self.kind, self.auto_update = config.quantizer, True
        if config.quantizer == "fsq":
            self.inner = FSQ(levels=list(config.fsq_levels))
        else:  # the same loss: entropy weight, diversity, commitment beta, softmax(-|z - c|^2 / temperature)
            self.inner = LFQ(
                dim=config.codebook_dim, codebook_size=config.codebook_size, entropy_loss_weight=config.lfq_entropy_weight,
                diversity_gamma=config.lfq_diversity_weight, commitment_loss_weight=config.commitment_beta,
            )  # fmt: skip
            self.inv_temperature = 1 / config.lfq_temperature
        self.codebook_size = config.codebook_size

    def forward(self, z: torch.Tensor):
        from vit_vq.fsq import code_metrics
        from vit_vq.quantizer import QuantizerOutput

        zero = z.sum() * 0
        if self.kind == "fsq":
            quantized, indices = self.inner(z)
            loss = zero
        else:
            quantized, indices, loss = self.inner(z, inv_temperature=self.inv_temperature)
        return QuantizerOutput(quantized, indices, loss, zero, code_metrics(indices, self.codebook_size))

    def update_codebook(self) -> None:
        pass


def run(task: tuple) -> dict:
    """One matched run (in its own process under `--jobs`): train, then evaluate the held-out crops."""
    name, variant, seed, steps, batch, vqp, data = task
    torch.set_num_threads(1)
    train, held_out = torch.load(data)
    torch.manual_seed(seed)
    tok = ViTVQTokenizer(ViTVQConfig.from_preset("tiny", **parse_variant(variant)))
    if vqp:
        tok.quantizer = VqpQuantizer(tok.config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok.to(device)
    opt = torch.optim.Adam(tok.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1000 + seed)  # the same batches for every variant
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tok.train()
    times = []
    for _ in range(steps):
        x = train[torch.randint(len(train), (batch,), generator=gen)].to(device)
        start = time.perf_counter()
        out = tok(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    tok.eval()
    with torch.no_grad():
        out = tok(held_out.to(device))  # eval forward: the codes encode() gives, decoded and clamped
        rec, codes = out.reconstruction.cpu(), out.indices.cpu()
    counts = torch.bincount(codes.flatten(), minlength=tok.config.codebook_size).double()
    p = counts / counts.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # fmt: skip
    return {
        "name": name, "variant": variant, "seed": seed, "steps": steps, "psnr": psnr(rec, held_out),
        "ssim": float(ssim(rec, held_out).mean()), "perplexity": perplexity, "usage": float((counts > 0).double().mean()),
        "ms_per_step": 1000 * statistics.median(times[5:] or times), "peak_mb": peak, "rss_before_mb": rss_before,
        "seconds": sum(times),
    }  # fmt: skip


def datasets() -> tuple[torch.Tensor, torch.Tensor]:
    """2048 training crops of the training photos and 96 held-out crops of china and flower, 32 px, seeded."""
    images = photos()
    gen = torch.Generator().manual_seed(0)
    return crops(images[:-HELD_OUT], 2048, 32, gen), crops(images[-HELD_OUT:], 96, 32, gen)


def check_vqp(count: int = 100_000) -> None:
    """Indices of vit_vq's FSQ and LFQ against vector-quantize-pytorch's on the same random latents."""
    from vector_quantize_pytorch import FSQ, LFQ

    from vit_vq import FiniteScalarQuantizer, LookupFreeQuantizer

    z = torch.randn(count, 5, generator=torch.Generator().manual_seed(0)) * 2
    from importlib.metadata import version

    print(f"vector-quantize-pytorch {version('vector-quantize-pytorch')}")
    for levels in ([8, 6, 5], [7, 5, 5, 5, 5], [8, 5, 5, 5]):
        x = z[:, : len(levels)]
        ours = FiniteScalarQuantizer(levels=levels).eval()(x)
        quantized, theirs = FSQ(levels=levels).eval()(x[None])  # vqp wants [B, N, D]
        same = int((ours.indices == theirs[0]).sum())
        values = float((ours.quantized - quantized[0]).abs().max())
        print(f"FSQ {levels}: {same} of {count} indices identical; code values differ by at most {values:.1e}")
    for bits in (8, 12):
        x = torch.randn(count, bits, generator=torch.Generator().manual_seed(1))
        ours = LookupFreeQuantizer(bits=bits).eval()(x).indices
        _, theirs, _ = LFQ(dim=bits, codebook_size=2**bits).eval()(x[None])
        reversed_bits = sum(((theirs[0] >> i) & 1) << (bits - 1 - i) for i in range(bits))
        print(f"LFQ {bits} bits: {int((ours == theirs[0]).sum())} of {count} indices identical as they stand, "
              f"{int((ours == reversed_bits).sum())} after reversing the bit order")  # fmt: skip


def report(rows: list[dict], names: list[str], seeds: list[int]) -> None:
    """Markdown: every seed, means, and paired PSNR differences against the first variant of the same bits."""
    cell = {(r["name"], r["seed"]): r for r in rows}
    print(f"\n| variant | held-out PSNR (dB), seeds {', '.join(map(str, seeds))} | mean | SSIM (mean) | usage (mean) "
          "| perplexity (mean) | ms / step (median) | peak MB |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        mine = [cell[name, s] for s in seeds]
        each = ", ".join(f"{r['psnr']:.2f}" for r in mine)
        print(
            f"| {name} | {each} | {statistics.mean(r['psnr'] for r in mine):.2f} "
            f"| {statistics.mean(r['ssim'] for r in mine):.3f} | {statistics.mean(r['usage'] for r in mine):.2f} "
            f"| {statistics.mean(r['perplexity'] for r in mine):.1f} | {statistics.mean(r['ms_per_step'] for r in mine):.0f} "
            f"| {max(r['peak_mb'] for r in mine):.0f} |"
        )
    bits = {name: (FAMILY | VQP).get(name, (0, ""))[0] for name in names}
    print("\n| paired PSNR difference | per seed (dB) | mean |\n|---|---|---:|")
    for name in names:
        base = next(n for n in names if bits[n] == bits[name])
        if base == name:
            continue
        diffs = [cell[name, s]["psnr"] - cell[base, s]["psnr"] for s in seeds]
        print(f"| {name} − {base} | {', '.join(f'{d:+.2f}' for d in diffs)} | {statistics.mean(diffs):+.2f} |")


def plot(rows: list[dict], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    for i, name in enumerate(names):
        mine = [r for r in rows if r["name"] == name]
        ax.scatter([r["psnr"] for r in mine], [i] * len(mine), s=18, color="C0" if "8b" in name else "C1")
        ax.plot([statistics.mean(r["psnr"] for r in mine)] * 2, [i - 0.3, i + 0.3], color="k", lw=1.5)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("held-out PSNR (dB): every seed (dots) and mean (bar)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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
    parser.add_argument("--family", action="store_true", help="the VQ / FSQ / LFQ comparison (FAMILY) instead of --variants")
    parser.add_argument("--only", help="with --family: comma-separated FAMILY names to run")
    parser.add_argument("--vqp", action="store_true", help="also train vector-quantize-pytorch's FSQ and LFQ (8 bits)")
    parser.add_argument("--check-vqp", action="store_true", help="only compare indices with vector-quantize-pytorch")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, help="with --family: a PNG of every seed's held-out PSNR")
    args = parser.parse_args()
    if args.check_vqp:
        check_vqp()
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.family:
        table = {**FAMILY, **(VQP if args.vqp else {})}
        names = [n for n in table if not args.only or n in args.only.split(",")]
        variants = {n: table[n][1] for n in names}
    else:
        names = args.variants.split(";")
        variants = {n: n for n in names}
    data = Path(tempfile.mkdtemp()) / "crops.pt"  # made once: every run trains on the same crops
    torch.save(datasets(), data)
    tasks = [(n, variants[n], seed, args.steps, args.batch, n.startswith("vqp"), data) for seed in seeds for n in names]
    rows = []
    with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
        for r in pool.imap(run, tasks):
            rows.append(r)
            print(
                f"{r['name']} seed {r['seed']}: {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}, perplexity {r['perplexity']:.1f}, "
                f"usage {r['usage']:.2f}, {r['ms_per_step']:.0f} ms/step, peak {r['peak_mb']:.0f} MB ({r['seconds']:.0f} s)",
                flush=True,
            )
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    report(rows, names, seeds)
    if args.plot:
        plot(rows, names, args.plot)


if __name__ == "__main__":
    main()
