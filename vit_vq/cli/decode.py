"""`vit-vq decode codes.safetensors -o DIR`: a codes file -> one PNG per image.

Without `--model`, the model recorded in the codes file is used. Codes are decoded only
by a tokenizer with the same config hash as the one that made them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..pipeline.codes import load_codes
from .common import add_model_args, device_of, output_names, progress, save_png, setup_model
from .main import CLIError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "decode", help="decode a codes file into PNG images",
        description="Decode a codes file written by `vit-vq encode` into one PNG per image, named after the inputs.",
    )
    p.add_argument("codes", metavar="CODES", help="a .safetensors codes file from `vit-vq encode`")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the PNG images")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    codes = load_codes(args.codes)
    out = Path(args.output).expanduser()
    if out.exists() and not out.is_dir():
        raise CLIError(f"-o {args.output} is a file; name a folder for the decoded images")
    name = args.model
    if name is None and codes.model.model_id not in ("default", "<in-memory>"):
        name = codes.model.model_id
        if args.revision is None:
            args.revision = codes.model.revision  # the commit that made the codes
        print(f"using the model recorded in {args.codes}: {name}", file=sys.stderr)
    tok, info = setup_model(args, name)
    if info.config_hash != codes.model.config_hash:
        raise CLIError(
            f"{args.codes} was made by a tokenizer with config hash {codes.model.config_hash} "
            f"({codes.model.model_id}), but {info.model_id} has config hash {info.config_hash}; "
            "decode with the model that encoded them"
        )
    if codes.model.decoder_hash and info.decoder_hash != codes.model.decoder_hash:
        raise CLIError(
            f"{args.codes} was made with decoder weights {codes.model.decoder_hash}, but {info.model_id} now has "
            f"{info.decoder_hash}: the weights changed since encoding; decode with the model that encoded them"
        )
    device = device_of(tok)
    paths = output_names(codes.names)
    bar = progress(None, len(paths), "decode")
    for start in range(0, len(paths), args.batch_size):
        images = tok.decode(codes.codes[start : start + args.batch_size].to(device))  # (b, 3, S, S)
        for img, rel in zip(images, paths[start : start + args.batch_size], strict=True):
            save_png(img, out / rel)
        bar.update(len(images))
    bar.close()
    print(f"wrote {len(paths)} images to {out}", file=sys.stderr)
    return 0
