"""`vit-vq eval --data PATH [--json FILE]`: how well a tokenizer reconstructs a data set.

Reports, over every readable image at the size `--resize` gives it (in [0, 1]; the model's square by
default, the whole image at its own aspect ratio with `--resize native`, coded in passes of one shape):
- `psnr` (dB) and `ssim`: per-image values, averaged;
- `codebook_usage`: the fraction of codes used at least once over the whole set;
- `perplexity`: `exp` of the entropy of the code frequencies over the whole set;
- `images` and `images_per_second` (encode + decode time on the device; the first batch
  is left out of the timing when there are several, so compilation is not counted);
- `lpips` and `rfid`, only when their network weights are available locally; `rfid_network` says
  which network gave `rfid`: `tf-inception` (torchmetrics on torch-fidelity's TF-Inception, as
  published FIDs) or, without those, `torchvision-inception` (comparable within vit_vq only).

`--json` writes exactly those keys (the optional ones only when computed). A PNG grid of
originals above their reconstructions is written too. Neither output replaces an existing
file unless `--overwrite` is given (checked before any work).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..data import open_image_source
from ..files import atomic_write_json
from ..metrics import (
    CodebookUsage,
    FeatureStatistics,
    InceptionFeatures,
    MeanAccumulator,
    MetricUnavailable,
    PublishedFID,
    frechet_distance,
    lpips_network,
    psnr,
    ssim,
)
from ..pipeline.runtime import synchronize
from ..pipeline.sources import resize_notice
from .common import (
    add_model_args,
    add_overwrite_arg,
    add_resize_arg,
    device_of,
    image_grid,
    images_per_read,
    loader,
    positive_int,
    progress,
    refuse_existing,
    save_png,
    setup_model,
    shape_passes,
    sized_images,
)
from .main import CLIError

FID_MIN_IMAGES = 10_000  # below this, FID is noticeably biased upward


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate reconstructions: PSNR, SSIM, codebook usage, perplexity, speed",
        description="Evaluate a tokenizer on an image folder or a `datasets` data set.",
    )
    p.add_argument("--data", required=True, help="image folder, saved `datasets` folder, or Hub dataset name")
    p.add_argument("--json", default=None, metavar="FILE", help="write the metrics as JSON here")
    p.add_argument("--grid", default=None, metavar="PNG", help="grid PNG (default: beside --json, else ./eval_grid.png)")
    p.add_argument("--grid-images", type=positive_int, default=16, help="images in the grid (default 16)")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N inputs")
    p.add_argument("--split", default="train", help="`datasets` split (default train)")
    p.add_argument("--image-column", default="image", help="`datasets` image column (default image)")
    p.add_argument("--fid-weights", default=None, metavar="FILE",
                   help="TF-Inception weights for rFID as published (torchmetrics + torch-fidelity; default: "
                   "weights-inception-2015-12-05-6726825d.pth in the torch hub cache)")
    p.add_argument("--inception-weights", default=None, metavar="FILE",
                   help="torchvision Inception-v3 weights, for an rFID comparable within vit_vq only (used when the "
                   "TF-Inception one cannot be computed)")
    p.add_argument("--lpips-net", choices=("alex", "vgg"), default="alex", help="LPIPS backbone (default alex)")
    add_overwrite_arg(p)
    add_model_args(p)
    add_resize_arg(p)
    p.set_defaults(func=run)


def _optional_networks(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """LPIPS and rFID networks that can be built from local files; prints why others cannot.

    rFID: the published one (`PublishedFID`, `rfid_network` "tf-inception") when it can be had, else
    torchvision's Inception-v3 ("torchvision-inception").
    """
    nets: dict[str, Any] = {}
    try:
        nets["lpips"] = lpips_network(args.lpips_net).to(device)
    except MetricUnavailable as err:
        print(f"lpips: not computed ({err})", file=sys.stderr)
    reasons = []
    builders = {"tf-inception": lambda: PublishedFID(args.fid_weights),
                "torchvision-inception": lambda: InceptionFeatures(args.inception_weights)}
    for network, build in builders.items():
        try:
            nets["rfid"], nets["rfid_network"] = build().to(device), network
            break
        except MetricUnavailable as err:
            reasons.append(str(err))
    if "rfid" not in nets:
        print(f"rfid: not computed ({'; '.join(reasons)})", file=sys.stderr)
    elif reasons:
        print(f"rfid: on torchvision's Inception-v3, comparable within vit_vq only ({reasons[0]})", file=sys.stderr)
    return nets


def _throughput(timings: list[tuple[int, float]]) -> float:
    """Images per second, leaving out the first (warm-up, compile) batch when there are several."""
    steady = timings[1:] if len(timings) > 1 else timings
    seconds = sum(t for _, t in steady)
    return sum(n for n, _ in steady) / seconds if seconds > 0 else float("nan")


def output_paths(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The grid PNG (`--grid`, else beside `--json`, else ./eval_grid.png) and the JSON report."""
    report = Path(args.json).expanduser() if args.json else None
    grid = Path(args.grid).expanduser() if args.grid else (report.with_suffix(".png") if report else Path("eval_grid.png"))
    return grid, report


def run(args: argparse.Namespace) -> int:
    grid_path, report = output_paths(args)
    if grid_path == report:
        raise CLIError(f"--grid and --json name the same file {str(report)!r}")
    refuse_existing([p for p in (grid_path, report) if p is not None], args.overwrite)
    tok, info = setup_model(args)
    device = device_of(tok)
    cfg = tok.config
    source = open_image_source(args.data, split=args.split, image_column=args.image_column)
    indices = range(min(len(source), args.limit)) if args.limit else None
    dataset = sized_images(source, tok, args, indices)
    if len(dataset) == 0:
        raise CLIError(f"{args.data!r} holds no images")
    nets = _optional_networks(args, device)

    psnr_acc, ssim_acc, lpips_acc = MeanAccumulator(), MeanAccumulator(), MeanAccumulator()
    usage = CodebookUsage(cfg.codebook_size)
    real_stats, fake_stats = FeatureStatistics(), FeatureStatistics()
    originals: list[torch.Tensor] = []
    recons: list[torch.Tensor] = []
    skipped: list[dict[str, str]] = []
    timings: list[tuple[int, float]] = []  # (images, seconds) per batch
    resized = 0
    bar = progress(None, len(dataset), "eval")
    for batch in shape_passes(loader(dataset, args, device, images_per_read(tok, args)), tok, args):
        skipped += batch["skipped"]
        bar.update(len(batch["keys"]) + len(batch["skipped"]))
        if batch["pixels"] is None:
            continue
        resized += batch["resized"]
        x = batch["pixels"].to(device, non_blocking=True).float()  # (b, 3, H, W) in [0, 1], one shape per pass
        synchronize(device)
        t0 = time.perf_counter()
        codes = tok.encode(x)  # (b, h, w)
        recon = tok.decode(codes).float()  # (b, 3, S, S)
        synchronize(device)
        timings.append((x.shape[0], time.perf_counter() - t0))
        psnr_acc.update(psnr(recon, x))
        ssim_acc.update(ssim(recon, x))
        usage.update(codes)
        if "lpips" in nets:
            with torch.inference_mode():
                lpips_acc.update(nets["lpips"](x * 2 - 1, recon * 2 - 1).flatten())
        if nets.get("rfid_network") == "tf-inception":
            nets["rfid"].update(x, recon)
        elif "rfid" in nets:
            real_stats.update(nets["rfid"](x))
            fake_stats.update(nets["rfid"](recon))
        same_shape = not originals or originals[0].shape[1:] == x.shape[1:]  # the grid shows the first shape only
        if sum(len(o) for o in originals) < args.grid_images and same_shape:
            take = args.grid_images - sum(len(o) for o in originals)
            originals.append(x[:take].cpu())
            recons.append(recon[:take].cpu())
    bar.close()
    if psnr_acc.count == 0:
        raise CLIError(f"no readable images in {args.data!r}: {skipped[0]['reason'] if skipped else 'empty'}")

    metrics: dict[str, Any] = {
        "psnr": psnr_acc.mean,
        "ssim": ssim_acc.mean,
        "codebook_usage": usage.usage,
        "perplexity": usage.perplexity,
        "images": psnr_acc.count,
        "images_per_second": _throughput(timings),
    }
    if "lpips" in nets:
        metrics["lpips"] = lpips_acc.mean
    if "rfid" in nets:
        published = nets["rfid_network"] == "tf-inception"
        n = nets["rfid"].n if published else real_stats.n
        if n < 2:
            print("rfid: not computed (needs at least 2 images)", file=sys.stderr)
        else:
            metrics["rfid"] = nets["rfid"].compute() if published else frechet_distance(
                *real_stats.mean_cov(), *fake_stats.mean_cov())
            metrics["rfid_network"] = nets["rfid_network"]
            if n < FID_MIN_IMAGES:
                print(f"rfid: only {n} images; FID is biased upward below ~{FID_MIN_IMAGES}", file=sys.stderr)

    _write_grid(torch.cat(originals), torch.cat(recons), min(8, args.grid_images), grid_path, args.overwrite)
    if report is not None:
        refuse_existing([report], args.overwrite)
        atomic_write_json(report, metrics)

    notice = resize_notice(resized, psnr_acc.count, dataset.size, args.resize)
    if notice:
        print(notice, file=sys.stderr)
    for item in skipped[:10]:
        print(f"skipped {item['path']}: {item['reason']}", file=sys.stderr)
    print(f"model {info.model_id} (config {info.config_hash}, {info.precision}) on {psnr_acc.count} images of {args.data}")
    _print_table(metrics)
    print(f"reconstruction grid (originals above reconstructions): {grid_path}", file=sys.stderr)
    return 0


def _write_grid(originals: torch.Tensor, recons: torch.Tensor, per_row: int, path: Path, overwrite: bool) -> None:
    """Rows of `per_row` originals, each above the row of their reconstructions."""
    rows = [t[i : i + per_row] for i in range(0, len(originals), per_row) for t in (originals, recons)]
    save_png(image_grid(rows), path, overwrite=overwrite)


def _print_table(metrics: dict[str, Any]) -> None:
    for key, label, fmt in (
        ("psnr", "PSNR (dB)", "{:.3f}"), ("ssim", "SSIM", "{:.4f}"), ("codebook_usage", "codebook usage", "{:.2%}"),
        ("perplexity", "perplexity", "{:.1f}"), ("images_per_second", "images/s", "{:.1f}"),
        ("lpips", "LPIPS", "{:.4f}"), ("rfid", "rFID", "{:.2f}"),
    ):
        if key in metrics:
            network = f" ({metrics['rfid_network']})" if key == "rfid" else ""
            print(f"  {label:<16}{fmt.format(metrics[key])}{network}")
