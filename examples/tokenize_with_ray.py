"""Tokenize an image collection with Ray Data, on as many machines and GPUs as the cluster has.

Ray reads the files as bytes (`read_binary_files`), and `vit_vq.pipeline.TokenizeBatch`
decodes them: an unreadable file becomes a row with `ok=False` and the reason, instead of
an exception in Ray's image reader that ends the job. `TokenizeBatch` is a callable class:
Ray builds one per actor (each loads the tokenizer once, on its own GPU; the class pickles by
model name, not weights). Every output row keeps its `path`, and carries `codes` `[h, w]`
(smallest unsigned dtype), `ok` and `error`. With `--resize native` (or `budget`) each image is
coded whole at its own aspect ratio: grids of many shapes, and a `shape` column `(h, w)`.

    pip install "ray[data]"          # or, in a vit_vq checkout: pip install ".[ray]"
    python examples/tokenize_with_ray.py --data s3://bucket/images --out s3://bucket/codes \
        --model org/tokenizer --workers 8 --gpus-per-worker 1

The output is Parquet, one file per block. Read it back, without Ray, with `read_codes`:

    from tokenize_with_ray import read_codes
    codes, paths = read_codes("codes/")      # uint [N, h, w] and N paths, the readable images only
                                             # (--resize native: a list of N [h_i, w_i] grids)

Single-machine jobs need no Ray: `vit-vq tokenize` (or `torchrun ... vit-vq tokenize`)
writes resumable shards with a manifest; see docs/tokenizing.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import numpy as np

from vit_vq.pipeline import TokenizeBatch


def build_pipeline(ray: Any, args: argparse.Namespace) -> Any:
    """The Ray Data pipeline: read bytes -> TokenizeBatch actors (decode, code) -> rows (returned unexecuted)."""
    # Every file is read as bytes (unreadable ones included, so they are reported); TokenizeBatch
    # decodes, resizes the short side and center-crops.
    ds = ray.data.read_binary_files(args.data, include_paths=True)  # columns: bytes, path
    gpu = args.gpus_per_worker > 0
    return ds.map_batches(
        TokenizeBatch,
        fn_constructor_kwargs={
            "model": args.model,
            "revision": args.revision,
            "image_column": "bytes",
            "passthrough": ("path",),
            "device": "cuda" if gpu else "cpu",
            "precision": args.precision,
            "resize": args.resize,
            "short_side": args.short_side,
        },
        batch_size=args.batch_size,
        batch_format="numpy",
        concurrency=args.workers,
        num_gpus=args.gpus_per_worker if gpu else 0,
    )


def read_codes(out: str) -> tuple[np.ndarray | list[np.ndarray], list[str]]:
    """The Parquet output -> (codes, N paths) of the rows with `ok`, in file order: codes uint `[N, h, w]`,
    or, for a run with a `shape` column (`--resize native` / `budget`), a list of N `[h_i, w_i]` grids.

    Needs only pyarrow. Ray stores each row's codes as a tensor column that plain pyarrow reads
    as a flat list of `h * w` values (a variable-shaped one as a struct whose `data` field holds
    them); the shape comes from the `shape` column, or, without it, from square grids.
    """
    import pyarrow as pa
    import pyarrow.dataset as pads

    table = pads.dataset(out, format="parquet").to_table(filter=pads.field("ok"))
    chunks = [c.storage if isinstance(c.type, pa.ExtensionType) else c for c in table["codes"].chunks]
    chunks = [c.field("data") if pa.types.is_struct(c.type) else c for c in chunks]
    flat = [np.asarray(c.flatten()) for c in chunks]
    values = np.concatenate(flat) if flat else np.zeros(0, np.uint8)
    n = table.num_rows
    if "shape" in table.column_names:
        shapes = [tuple(s) for s in table["shape"].to_pylist()]
        sizes = [h * w for h, w in shapes]
        if sum(sizes) != values.size:
            raise ValueError(f"{out}: {values.size} code values do not make the {n} grids of the 'shape' column")
        parts = np.split(values, np.cumsum(sizes)[:-1]) if n else []
        return [part.reshape(shape) for part, shape in zip(parts, shapes, strict=True)], table["path"].to_pylist()
    side = math.isqrt(values.size // n) if n else 0
    if side * side * n != values.size:
        raise ValueError(f"{out}: {values.size} code values do not make {n} square grids")
    return values.reshape(n, side, side), table["path"].to_pylist()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Tokenize images with Ray Data and vit_vq.")
    p.add_argument("--data", required=True, help="image folder or URI that ray.data.read_binary_files accepts")
    p.add_argument("--out", required=True, help="output folder or URI for Parquet files")
    p.add_argument(
        "--model", default="vit_vq:default", help="tokenizer: vit_vq:default, a Hub id, or a folder every worker can read"
    )
    p.add_argument("--revision", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="tokenizer actors (one model copy each)")
    p.add_argument("--gpus-per-worker", type=float, default=1.0, help="0 runs on CPU")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--resize", default="crop", choices=("crop", "native", "budget", "none"),
                   help="crop: square crops (default); native / budget: whole images at their own aspect ratio")
    p.add_argument("--short-side", type=int, default=None, help="with --resize native: the short side in pixels")
    args = p.parse_args(argv)
    try:
        import ray
    except ImportError:
        print('this example needs Ray Data: pip install "ray[data]"', file=sys.stderr)
        return 2
    ray.init(ignore_reinit_error=True)
    build_pipeline(ray, args).write_parquet(args.out)
    print(f"wrote Parquet files with codes to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
