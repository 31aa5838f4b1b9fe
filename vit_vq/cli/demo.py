"""`vit-vq demo`: reconstruct the bundled held-out photos with a real tokenizer, in seconds.

With no `--model` it uses the tokenizer that ships inside the package (no download).
It prints PSNR and SSIM per photo, the codebook usage and tokens per image, and writes
one PNG grid: a row per photo, original on the left and reconstruction on the right. The
grid carries a marker in its PNG text metadata (`vit-vq: demo`), so that running the demo
again replaces the grid an earlier demo wrote; any other existing file at `-o` is replaced
only with `--overwrite` (checked before any work).
"""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import torch

from ..default_model import sample_photos
from ..metrics import psnr, ssim
from ..pipeline.runtime import pick_device
from ..tokenizer import ViTVQTokenizer
from .common import MODEL_HELP, add_overwrite_arg, image_grid, load_model, refuse_existing, to_uint8
from .main import CLIError

MARK_KEY, MARK_VALUE = "vit-vq", "demo"  # PNG text chunk that identifies a grid written by this command
MAX_OWN_GRID_BYTES = 64 * 2**20  # larger files are not read to look for the marker


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="reconstruct the bundled sample photos; print PSNR/SSIM/usage and write a PNG grid",
        description="Reconstruct the bundled held-out sample photos with the built-in tokenizer (or --model), "
        "print PSNR, SSIM, codebook usage and tokens per image, and write one PNG grid "
        "(original | reconstruction per row).",
    )
    p.add_argument("--model", "-m", default=None, help=MODEL_HELP)
    p.add_argument("-o", "--output", default="demo.png", help="the PNG grid to write (default: demo.png)")
    add_overwrite_arg(p)
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, ...")
    p.set_defaults(func=run)


def load_photos(paths: list[Path]) -> tuple[list[str], list[tuple[int, int]], list]:
    from PIL import Image

    names, sizes, images = [], [], []
    for path in paths:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
        names.append(path.stem)
        sizes.append(images[-1].size)
    return names, sizes, images


def run(args: argparse.Namespace) -> int:
    output = Path(args.output).expanduser()
    if output.suffix.lower() != ".png":
        raise CLIError(f"-o {args.output}: the demo writes one PNG grid; give a path ending in .png")
    replacing = os.path.lexists(output) and written_by_demo(output)
    refuse_existing([output], args.overwrite or replacing)
    device = pick_device(args.device)
    tok: ViTVQTokenizer = load_model(args.model)
    tok = tok.to(device).eval()
    cfg = tok.config
    names, sizes, images = load_photos(sample_photos())
    x = tok.preprocess(images)  # (B, 3, S, S): short side resized to S, then center-cropped
    codes = tok.encode(x)  # (B, h, w)
    recon = tok.decode(codes)  # (B, 3, S, S)
    p, s = psnr(recon, x).tolist(), ssim(recon, x).tolist()

    source = "the built-in default tokenizer" if args.model is None else args.model
    print(f"vit-vq demo: {source} on {device.type}")
    print(
        f"{cfg.image_size}x{cfg.image_size} px, patch {cfg.patch_size}: {cfg.grid_size}x{cfg.grid_size} = "
        f"{cfg.num_tokens} tokens per image, codebook of {cfg.codebook_size} codes (dim {cfg.codebook_dim})"
    )
    print(f"the {len(names)} held-out photos were resized (short side -> {cfg.image_size} px) and center-cropped")
    width = max(len(n) for n in names)
    print(f"\n{'photo':<{width}}  {'original':>9}  {'PSNR dB':>7}  {'SSIM':>5}")
    for name, (w, h), pv, sv in zip(names, sizes, p, s, strict=True):
        print(f"{name:<{width}}  {f'{w}x{h}':>9}  {pv:7.2f}  {sv:5.3f}")
    print(f"{'mean':<{width}}  {'':>9}  {sum(p) / len(p):7.2f}  {sum(s) / len(s):5.3f}")
    used = int(codes.unique().numel())
    total = codes.numel()
    print(
        f"\ncodebook usage: {used} distinct codes of {cfg.codebook_size} ({100 * used / cfg.codebook_size:.1f}%) "
        f"across {total} tokens ({len(names)} images x {cfg.num_tokens} tokens per image)"
    )
    scale = max(1, 256 // cfg.image_size)  # small models are shown at 2x, pixel for pixel
    rows = [torch.stack([a, b]) for a, b in zip(x.float().cpu(), recon.float().cpu(), strict=True)]
    grid = image_grid(rows, pad=4)
    if scale > 1:
        grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    save_grid(grid, output, overwrite=args.overwrite or replacing)
    again = " (replacing the grid an earlier vit-vq demo wrote)" if replacing else ""
    print(f"wrote {output}{again}: {len(rows)} rows, original (left) | reconstruction (right)")
    return 0


def written_by_demo(path: Path) -> bool:
    """True when `path` is a regular PNG file (not a link) that carries this command's metadata marker."""
    from PIL import Image, UnidentifiedImageError

    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_OWN_GRID_BYTES:
            return False
        with Image.open(path) as im:
            return im.format == "PNG" and getattr(im, "text", {}).get(MARK_KEY) == MARK_VALUE
    except (OSError, UnidentifiedImageError, ValueError):
        return False


def save_grid(grid: torch.Tensor, path: Path, *, overwrite: bool) -> None:
    """Write float `[3, H, W]` in [0, 1] as an RGB PNG with the demo's marker, atomically.

    Raises:
        CLIError: `path` exists and `overwrite` is False (it appeared since the check before the work).
    """
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from ..files import atomic_write

    refuse_existing([path], overwrite)
    meta = PngInfo()
    meta.add_text(MARK_KEY, MARK_VALUE)
    array = to_uint8(grid).numpy()  # (H, W, 3)
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG", pnginfo=meta))
