"""`vit-vq` entry point: dispatches to one module per subcommand.

A subcommand module defines `add_parser(subparsers)` (which registers its parser and
sets `func`) and is listed in `SUBCOMMANDS`. Errors a user can fix exit with status 2
and a one-line reason, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = ("train", "encode", "decode", "reconstruct", "tokenize", "eval", "demo")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vit-vq", description="ViT-VQ image tokenizers: train, encode, decode, evaluate.")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"vit_vq.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"vit_vq.cli.{name}":
                continue  # subcommand not part of this build
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CLIError, OSError, ValueError, TypeError) as err:
        print(f"vit-vq {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m vit_vq.cli.main` (e.g. under torchrun): run the importable module's main, so the
    # CLIError the subcommands raise is the class that main() catches.
    from vit_vq.cli.main import main as _main

    sys.exit(_main())
