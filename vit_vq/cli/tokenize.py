"""`vit-vq tokenize --data PATH --out DIR`: pre-tokenize a data set into resumable shards.

Input: an image folder, a folder saved by `datasets` (`save_to_disk`), or a Hub dataset.
Output: `codes-00000.safetensors` (or `.npy`) shards with their JSON records, and
`manifest.json`. `--resize native` (or `budget`) keeps each image's aspect ratio: one grid per
image with its own shape, stored flat with the shapes (manifest format 3, see
`vit_vq.pipeline.shards`). Re-running skips finished shards. For several GPUs or machines, launch
with `torchrun --nproc_per_node N -m vit_vq.cli.main tokenize ...` or `accelerate launch`.
"""

from __future__ import annotations

import argparse
import sys

from ..pipeline.runtime import pick_device
from ..pipeline.shards import SHARD_FORMATS
from ..pipeline.sources import resize_notice
from ..pipeline.tokenize import CONFLICT_ADVICE, TokenizeOptions, distributed, tokenize_dataset
from .common import add_model_args, add_resize_arg, plural, positive_int, setup_model
from .main import CLIError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tokenize", help="pre-tokenize a data set into shards for a generative model",
        description="Code every image of a folder or a `datasets` data set into sharded files plus manifest.json.",
    )
    p.add_argument("--data", required=True, help="image folder, saved `datasets` folder, or Hub dataset name")
    p.add_argument("--out", required=True, help="output folder (created; re-running resumes)")
    p.add_argument("--format", choices=SHARD_FORMATS, default="safetensors", help="shard file format (default safetensors)")
    p.add_argument("--shard-size", type=positive_int, default=4096, help="input images per shard (default 4096)")
    p.add_argument("--split", default="train", help="`datasets` split (default train)")
    p.add_argument("--image-column", default="image", help="`datasets` image column (default image)")
    p.add_argument("--label-column", default=None, help="`datasets` label column to store beside the codes")
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace files in --out that this run did not make (another run's shards or manifest) instead of refusing",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)
    add_resize_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.short_side is not None and args.resize not in ("crop", "native"):
        raise CLIError(f"--short-side goes with --resize native or crop, not --resize {args.resize}")
    opts = TokenizeOptions(
        data=args.data, out=args.out, shard_size=args.shard_size, batch_size=args.batch_size, fmt=args.format,
        resize=args.resize, short_side=args.short_side, batch_tokens=args.batch_tokens, split=args.split,
        image_column=args.image_column, label_column=args.label_column,
        num_workers=args.num_workers, overwrite=args.overwrite,
    )
    with distributed(pick_device(args.device)) as (rank, world):
        tok, info = setup_model(args)
        try:
            result = tokenize_dataset(tok, info, opts, rank=rank, world_size=world, progress=not args.no_progress)
        except FileExistsError as err:
            raise CLIError(str(err).replace(CONFLICT_ADVICE, "; use a new --out, or --overwrite to replace them")) from err
    if result.manifest is None:
        return 0
    m = result.manifest
    processes = plural(world, "process", "processes")
    print(
        f"coded {m['num_images']} of {plural(m['num_inputs'], 'input')} into {plural(len(m['shards']), 'shard')} in "
        f"{args.out} ({len(result.written)} written, {len(result.reused)} already complete; {processes})",
        file=sys.stderr,
    )
    side = args.short_side or m["image_size"]
    notice = resize_notice(m["num_resized"], m["num_images"], side, args.resize)
    if notice:
        print(notice, file=sys.stderr)
    for item in m["skipped"][:10]:
        print(f"skipped {item['path']}: {item['reason']}", file=sys.stderr)
    if m["num_skipped"] > 10:
        print(f"... and {m['num_skipped'] - 10} more skipped (see manifest.json)", file=sys.stderr)
    return 0
