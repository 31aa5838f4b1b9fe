"""`vit-vq encode IMGS_OR_DIR... -o codes.safetensors`: images -> one codes file.

The codes file holds the code grids with the image names, the grid shape(s), the model id,
revision and config hash, and the lookup backend and precision (see
`vit_vq.pipeline.codes`). With `--resize native` (or `budget`) each image keeps its aspect ratio
and gets a grid of its own shape; images of one shape are coded together, within `--batch-tokens`.
`vit-vq decode` turns it back into images. An existing file at `-o` is replaced only with
`--overwrite` (checked before any work).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..pipeline.batching import encode_images
from ..pipeline.codes import save_codes
from .common import (
    add_model_args,
    add_overwrite_arg,
    add_resize_arg,
    add_strict_arg,
    check_writable,
    image_batches,
    input_images,
    refuse_existing,
    setup_model,
)
from .main import CLIError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "encode", help="encode images into a codes file",
        description="Encode image files (or folders of images) into one .safetensors codes file.",
    )
    p.add_argument("inputs", nargs="+", metavar="IMGS_OR_DIR", help="image files and/or folders (searched recursively)")
    p.add_argument("-o", "--output", required=True, help="the codes file to write (.safetensors)")
    add_overwrite_arg(p)
    add_model_args(p)
    add_resize_arg(p)
    add_strict_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.output).expanduser()
    if out.suffix != ".safetensors":
        raise CLIError(f"-o {args.output}: the codes file must end in .safetensors")
    if out.is_dir():
        raise CLIError(f"-o {args.output} is a folder; name a .safetensors file")
    refuse_existing([out], args.overwrite)
    check_writable(out.parent, "the codes file")
    images = input_images(args.inputs)
    tok, info = setup_model(args)
    grids: list[torch.Tensor] = []
    names: list[str] = []
    for batch in image_batches(images, tok, args, desc="encode"):
        grids += encode_images(tok, batch["pixels"], batch_size=args.batch_size, batch_tokens=args.batch_tokens,
                               out_device="cpu")  # (h, w) each, in input order
        names += batch["keys"]
    cfg = tok.config
    save_codes(out, grids, names, info=info, codebook_size=cfg.codebook_size, image_size=cfg.image_size,
               token_budget=cfg.token_budget)
    shapes = sorted({tuple(g.shape) for g in grids})
    shape_text = f"{shapes[0][0]}x{shapes[0][1]}" if len(shapes) == 1 else f"{len(shapes)} shapes"
    print(
        f"wrote {len(names)} code grid{'' if len(names) == 1 else 's'} of {shape_text} to {out} "
        f"(model {info.model_id}, config {info.config_hash}, {info.precision}, "
        f"lookup {info.lookup_backend}/{info.lookup_precision})",
        file=sys.stderr,
    )
    return 0
