"""`vit-vq reconstruct IMG... -o OUT`: side-by-side PNGs (original | reconstruction) and PSNR.

With one image and `-o name.png` the PNG is written there; otherwise `OUT` is a folder
holding one PNG per input. The left half is the input at the size `--resize` gives it (the
model's square by default, the whole image at its own aspect ratio with `--resize native`), the
right half its reconstruction; PSNR (dB) compares the two in [0, 1]. No existing file is
replaced unless `--overwrite` is given (checked before any work), and when `OUT` lies inside
an input folder, the PNGs found there are not read back as inputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..metrics import psnr
from ..pipeline.batching import decode_grids, encode_images
from .common import (
    add_model_args,
    add_overwrite_arg,
    add_resize_arg,
    add_strict_arg,
    check_writable,
    image_batches,
    input_images,
    output_names,
    refuse_existing,
    save_png,
    setup_model,
)
from .main import CLIError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "reconstruct", help="encode and decode images; write original | reconstruction PNGs and print PSNR",
        description="Encode and decode images, write side-by-side PNGs (original | reconstruction) and print PSNR.",
    )
    p.add_argument("inputs", nargs="+", metavar="IMG", help="image files and/or folders")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="a .png file (one input) or a folder")
    add_overwrite_arg(p)
    add_model_args(p)
    add_resize_arg(p)
    add_strict_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    out = Path(args.output).expanduser()
    single_file = out.suffix.lower() == ".png"
    if single_file and (len(args.inputs) != 1 or Path(args.inputs[0]).is_dir()):
        raise CLIError(f"-o {args.output} names one PNG but several images were given; pass a folder to -o")
    images = input_images(args.inputs, output_dir=None if single_file else out)
    all_targets = [out] if single_file else [out / p for p in output_names(images.keys)]
    refuse_existing(all_targets, args.overwrite)
    target_of = dict(zip(images.keys, all_targets, strict=True))
    check_writable(out.parent if single_file else out, "the PNGs")  # skipped images leave their target unused
    tok, _ = setup_model(args)
    scores: list[tuple[str, float]] = []
    budget = {"batch_size": args.batch_size, "batch_tokens": args.batch_tokens}
    for batch in image_batches(images, tok, args, desc="reconstruct"):
        originals = list(batch["pixels"])  # (3, H, W) each, shapes may differ
        recons = decode_grids(tok, encode_images(tok, batch["pixels"], **budget), **budget)  # (3, H, W) each
        targets = [target_of[key] for key in batch["keys"]]
        for x, recon, target, key in zip(originals, recons, targets, batch["keys"], strict=True):
            x = x.to(recon.device).float()
            value = float(psnr(recon[None].float(), x[None]))
            pair = torch.cat([x, recon.float()], dim=2)  # (3, H, 2W): original | reconstruction
            save_png(pair, target, overwrite=args.overwrite)
            scores.append((key, value))
            tqdm.write(f"{key}: PSNR {value:.2f} dB -> {target}")  # on its own line, above the progress bar
    if len(scores) > 1:
        print(f"mean PSNR over {len(scores)} images: {sum(v for _, v in scores) / len(scores):.2f} dB")
    n = len(scores)
    print(f"wrote {n} side-by-side PNG{'' if n == 1 else 's'} (original | reconstruction)", file=sys.stderr)
    return 0
