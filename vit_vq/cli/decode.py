"""`vit-vq decode codes.safetensors -o DIR`: a codes file -> one PNG per image.

The model is the one the user names with `--model` (the bundled `vit_vq:default` when left
out); the model id and revision recorded in the codes file are used only with
`--model-from-codes`, so a codes file never makes the command fetch a repository on its
own. Codes are decoded only by a tokenizer with the same config hash and the same decoder
weights as the one that made them (the precision may differ). No existing file is
replaced unless `--overwrite` is given; that is checked before anything is decoded.

Each image comes back at its own grid's size (`h * p` x `w * p` px): a file of grids of several
shapes (`vit-vq encode --resize native`) gives images of several shapes. Grids of one shape are
decoded together, at most `--batch-size` images and `--batch-tokens` tokens per pass, so a model
with large grids decodes fewer images at a time on its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..pipeline.batching import shape_chunks
from ..pipeline.codes import CodesFile, load_codes
from ..registry import bundled_hint, bundled_name_for_id
from .common import (
    add_model_args,
    add_overwrite_arg,
    check_writable,
    device_of,
    output_names,
    plural,
    progress,
    refuse_existing,
    save_png,
    setup_model,
)
from .main import CLIError

UNNAMED_MODELS = ("<in-memory>",)  # recorded when codes came from a tokenizer object, not a name


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "decode", help="decode a codes file into PNG images",
        description="Decode a codes file written by `vit-vq encode` into one PNG per image, named after the inputs.",
    )
    p.add_argument("codes", metavar="CODES", help="a .safetensors codes file from `vit-vq encode`")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the PNG images")
    p.add_argument(
        "--model-from-codes", action="store_true",
        help="decode with the model id and revision recorded in the codes file (may download it) instead of --model",
    )
    p.add_argument(
        "--no-weights-check", action="store_true",
        help="decode a codes file that records no decoder_hash (so the decoder weights cannot be checked); "
             "only for files you trust to match --model",
    )
    add_overwrite_arg(p)
    add_model_args(p)
    p.set_defaults(func=run)


def recorded_model(codes: CodesFile, path: str) -> str:
    """The model name a codes file records, as `--model` would take it.

    Raises:
        CLIError: the file names no loadable model.
    """
    name = codes.model.model_id
    if name in UNNAMED_MODELS:
        raise CLIError(f"{path} records no loadable model (made by a tokenizer object in Python); pass --model")
    # a bundled name (or 0.1's `default`): the default it meant may since have been replaced by another
    return bundled_name_for_id(name, codes.model.config_hash, codes.model.decoder_hash) or name


def printable(name: str) -> str:
    """`name` as is when it prints as one plain line, else its repr (a codes file is someone else's file)."""
    return name if name.isprintable() else repr(name)


def run(args: argparse.Namespace) -> int:
    if args.model_from_codes and args.model is not None:
        raise CLIError("give either --model or --model-from-codes, not both")
    codes = load_codes(args.codes)
    if codes.format_version >= 2 and not codes.weights_checkable and not args.no_weights_check:
        raise CLIError(
            f"{args.codes} records no decoder_hash (codes format {codes.format_version} always does), so the decoder "
            "weights cannot be checked against the model that made the codes; a fine-tune with the same config would "
            "decode them into other images without a word. Pass --no-weights-check to decode it anyway"
        )
    out = Path(args.output).expanduser()
    if out.exists() and not out.is_dir():
        raise CLIError(f"-o {args.output} is a file; name a folder for the decoded images")
    paths = output_names(codes.names)
    refuse_existing([out / rel for rel in paths], args.overwrite)
    name = args.model
    if args.model_from_codes:
        name = recorded_model(codes, args.codes)
        if args.revision is None:
            args.revision = codes.model.revision  # the commit that made the codes
        if name == codes.model.model_id:
            print(f"using the model recorded in {args.codes}: {printable(name)}", file=sys.stderr)
        else:
            print(f"using {name}, whose hashes match {args.codes} (it records {codes.model.model_id!r})", file=sys.stderr)
    tok, info = setup_model(args, name)
    if info.config_hash != codes.model.config_hash:
        how = "--model NAME" if args.model_from_codes else "--model NAME, or --model-from-codes"
        raise CLIError(
            f"{args.codes} was made by {printable(codes.model.model_id)} with config hash {codes.model.config_hash!r}, "
            f"but {printable(info.model_id)} here has config hash {info.config_hash}; decode with the model that "
            f"encoded them ({how}){bundled_hint(codes.model.config_hash, codes.model.decoder_hash, info.model_id)}"
        )
    if codes.codebook_size != tok.config.codebook_size:
        raise CLIError(
            f"{args.codes} records codebook_size {codes.codebook_size}, but {printable(info.model_id)} has "
            f"{tok.config.codebook_size} codes; the file's metadata contradicts its config hash"
        )
    if codes.weights_checkable and info.decoder_hash != codes.model.decoder_hash:
        raise CLIError(
            f"{args.codes} was made with decoder weights {printable(codes.model.decoder_hash)}, but {info.model_id} has "
            f"decoder weights {info.decoder_hash}: the weights changed since encoding; decode with the model that "
            f"encoded them{bundled_hint(codes.model.config_hash, codes.model.decoder_hash, info.model_id)}"
        )
    shapes = codes.grid_shapes
    budget = tok.config.token_budget
    if over := [(i, h, w) for i, (h, w) in enumerate(shapes) if h * w > budget]:
        i, h, w = over[0]
        raise CLIError(
            f"{args.codes}: grid {i} ({printable(codes.names[i])}) is {h}x{w} = {h * w} tokens, above "
            f"{printable(info.model_id)}'s budget of {budget} tokens per image"
            + (f" (and {len(over) - 1} more grids)" if len(over) > 1 else "")
        )
    check_writable(out, "the decoded images")
    device = device_of(tok)
    grids = codes.grids
    bar = progress(None, len(paths), "decode")
    for chunk in shape_chunks(shapes, args.batch_size, args.batch_tokens):
        images = tok.decode(torch.stack([grids[i] for i in chunk]).to(device))  # (b, 3, h*p, w*p)
        for img, i in zip(images, chunk, strict=True):
            save_png(img, out / paths[i], overwrite=args.overwrite)
        bar.update(len(images))
    bar.close()
    print(f"wrote {plural(len(paths), 'image')} to {out}", file=sys.stderr)
    return 0
