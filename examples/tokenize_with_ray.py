"""Tokenize an image collection with Ray Data, on as many machines and GPUs as the cluster has.

`vit_vq.pipeline.TokenizeBatch` is a callable class: Ray builds one per actor (each loads
the tokenizer once, on its own GPU) and feeds it batches of decoded images. Every output
row keeps its `path`, and carries `codes` `[h, w]` (smallest unsigned dtype), `ok` and
`error` (unreadable or wrong-size images are kept as rows with `ok=False` and the reason).

    pip install 'vit_vq[ray]'
    python examples/tokenize_with_ray.py --data s3://bucket/images --out s3://bucket/codes \
        --model org/tokenizer --workers 8 --gpus-per-worker 1

The output is Parquet, one file per block. Read it back with

    import pyarrow.dataset as pads
    table = pads.dataset("codes/").to_table(filter=pads.field("ok"))
    codes = np.stack(table["codes"].to_numpy(zero_copy_only=False))   # [N, h, w]

Single-machine jobs need no Ray: `vit-vq tokenize` (or `torchrun ... vit-vq tokenize`)
writes resumable shards with a manifest; see docs/tokenizing.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vit_vq.pipeline import TokenizeBatch


def build_pipeline(ray: Any, args: argparse.Namespace) -> Any:
    """The Ray Data pipeline: read images -> TokenizeBatch actors -> Parquet (returned unexecuted)."""
    # Images stay at their own size here; TokenizeBatch resizes the short side and center-crops.
    ds = ray.data.read_images(args.data, mode="RGB", include_paths=True)
    gpu = args.gpus_per_worker > 0
    return ds.map_batches(
        TokenizeBatch,
        fn_constructor_kwargs={
            "model": args.model,
            "revision": args.revision,
            "passthrough": ("path",),
            "device": "cuda" if gpu else "cpu",
            "precision": args.precision,
            "resize": args.resize,
        },
        batch_size=args.batch_size,
        batch_format="numpy",
        concurrency=args.workers,
        num_gpus=args.gpus_per_worker if gpu else 0,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Tokenize images with Ray Data and vit_vq.")
    p.add_argument("--data", required=True, help="image folder or URI that ray.data.read_images accepts")
    p.add_argument("--out", required=True, help="output folder or URI for Parquet files")
    p.add_argument("--model", required=True, help="tokenizer: Hub id or a folder every worker can read")
    p.add_argument("--revision", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="tokenizer actors (one model copy each)")
    p.add_argument("--gpus-per-worker", type=float, default=1.0, help="0 runs on CPU")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--resize", default="crop", choices=("crop", "none"))
    args = p.parse_args(argv)
    try:
        import ray
    except ImportError:
        print("this example needs Ray Data: pip install 'vit_vq[ray]'", file=sys.stderr)
        return 2
    ray.init(ignore_reinit_error=True)
    build_pipeline(ray, args).write_parquet(args.out)
    print(f"wrote Parquet files with codes to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
