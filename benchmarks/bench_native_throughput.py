"""Throughput of grids of many shapes against the square path, on the same number of pixels.

A folder of photos at six aspect ratios (4:3, 3:4, 3:2, 2:3, 16:9, 1:1), each stored at its native
size for the model (short side `image_size`, sides rounded to the patch, as `--resize native` makes
them), against a folder of square `image_size` crops holding the same total number of pixels
(tokens). Both are stored at the size they are coded at, so neither pays for resizing.

- `encode`: the model alone, `pipeline.batching.encode_images` over the decoded tensors (passes of one
  shape, at most `--batch-size` images and the default token budget), against `[B, 3, S, S]` batches.
- `cli`: `vit-vq encode` end to end (PNG decoding, grouping, writing the codes file), `--resize
  native` against `--resize crop`.

Throughput is tokens (patches) per second; the target (issue 20) is mixed within 25% of square.

    python benchmarks/bench_native_throughput.py --images 48 --repeats 3 [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from vit_vq import ViTVQTokenizer
from vit_vq.cli.main import main as cli_main
from vit_vq.pipeline.batching import encode_images
from vit_vq.preprocess import native_size, resize_center_crop, resize_to, to_tensor

ASPECTS = ((3, 4), (4, 3), (2, 3), (3, 2), (9, 16), (1, 1))  # (h, w)


def photos() -> list[torch.Tensor]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina")
    arrays = [getattr(skimage.data, n)()[..., :3] for n in names] + list(load_sample_images().images)
    return [to_tensor(a) for a in arrays]


def mixed_images(count: int, size: int, patch: int) -> list[torch.Tensor]:
    """`count` photo crops `[3, H, W]` at the aspect ratios of `ASPECTS`, at their native size for the model."""
    base = photos()
    out = []
    for i in range(count):
        img = base[i % len(base)]
        ah, aw = ASPECTS[i % len(ASPECTS)]
        H, W = img.shape[1:]
        scale = min(H / ah, W / aw)
        crop = img[:, : int(ah * scale), : int(aw * scale)]
        out.append(resize_to(crop, native_size(ah * 100, aw * 100, size, patch)))
    return out


def square_images(total_tokens: int, size: int, patch: int) -> list[torch.Tensor]:
    """Square `[3, size, size]` crops holding `total_tokens` tokens (rounded to whole images)."""
    per_image = (size // patch) ** 2
    base = photos()
    return [resize_center_crop(base[i % len(base)], size) for i in range(round(total_tokens / per_image))]


def tokens(images: list[torch.Tensor], patch: int) -> int:
    return sum((t.shape[1] // patch) * (t.shape[2] // patch) for t in images)


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def save_folder(images: list[torch.Tensor], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, t in enumerate(images):
        Image.fromarray((t.permute(1, 2, 0) * 255).round().byte().numpy()).save(folder / f"{i:04d}.png")
    return folder


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_vq:default")
    p.add_argument("--images", type=int, default=48, help="mixed-shape images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    tok = ViTVQTokenizer.from_pretrained(args.model).to(args.device).eval()
    cfg = tok.config
    mixed = mixed_images(args.images, cfg.image_size, cfg.patch_size)
    square = square_images(tokens(mixed, cfg.patch_size), cfg.image_size, cfg.patch_size)
    shapes = sorted({tuple(t.shape[1:]) for t in mixed})
    print(f"model {args.model}: {cfg.image_size} px, patch {cfg.patch_size}; device {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"mixed: {len(mixed)} images, {len(shapes)} shapes, {tokens(mixed, cfg.patch_size)} tokens; "
          f"square: {len(square)} images of {cfg.image_size}x{cfg.image_size}, {tokens(square, cfg.patch_size)} tokens")

    stacked = torch.stack(square)

    def square_encode() -> None:
        for s in range(0, len(stacked), args.batch_size):
            tok.encode(stacked[s : s + args.batch_size].to(args.device))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def mixed_encode() -> None:
        encode_images(tok, mixed, batch_size=args.batch_size)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    rows = []
    for name, fn, images in (("encode square", square_encode, square), ("encode mixed", mixed_encode, mixed)):
        t = statistics.median(timed(fn, args.repeats))
        rows.append((name, t, tokens(images, cfg.patch_size) / t))

    with tempfile.TemporaryDirectory() as tmp:
        sq_dir = save_folder(square, Path(tmp) / "square")
        mx_dir = save_folder(mixed, Path(tmp) / "mixed")
        common = ["--model", args.model, "--device", args.device, "--num-workers", "0", "--overwrite",
                  "--batch-size", str(args.batch_size)]

        def cli(folder: Path, resize: str) -> None:
            with contextlib.redirect_stderr(io.StringIO()):
                code = cli_main(["encode", str(folder), "-o", str(Path(tmp) / f"{resize}.safetensors"),
                                 "--resize", resize, *common])
            if code != 0:
                raise SystemExit(f"vit-vq encode failed ({resize})")

        for name, folder, resize, images in (("cli square", sq_dir, "crop", square), ("cli mixed", mx_dir, "native", mixed)):
            t = statistics.median(timed(lambda f=folder, r=resize: cli(f, r), args.repeats))
            rows.append((name, t, tokens(images, cfg.patch_size) / t))

    print(f"{'path':<16}{'median s':>10}{'tokens/s':>12}")
    for name, t, rate in rows:
        print(f"{name:<16}{t:>10.3f}{rate:>12.0f}")
    for kind in ("encode", "cli"):
        sq, mx = (r[2] for r in rows if r[0].startswith(kind))
        print(f"{kind}: mixed at {mx / sq:.0%} of square throughput")


if __name__ == "__main__":
    main()
