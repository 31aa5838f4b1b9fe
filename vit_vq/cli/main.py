"""`vit-vq` entry point: dispatches to one module per subcommand.

A subcommand module defines `add_parser(subparsers)` (which registers its parser and
sets `func`) and is listed in `SUBCOMMANDS`. Every failure prints one line on stderr,
never a traceback (`vit-vq -v ...` adds the traceback): errors a user can fix (bad input,
missing files, out of memory, a wrong launch) exit with status 2, anything else with 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pickle
import re
import sys
import traceback
import typing

SUBCOMMANDS = ("train", "encode", "decode", "reconstruct", "tokenize", "eval", "demo")
MAX_MESSAGE_CHARS = 1000  # one readable line, even for errors that list many keys


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (with where to find the usage), exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = OneLineParser(prog="vit-vq", description="ViT-VQ image tokenizers: train, encode, decode, evaluate.")
    parser.add_argument("--version", action="version", version=f"vit-vq {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging, and a traceback with every error")
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


# The library states which bundled model some codes match; the command line adds the flag that picks it.
BUNDLED_MATCH = re.compile(r"they match the bundled (vit_vq:[\w.-]+)")
# The training library names its settings as TrainConfig fields (`TrainConfig.lr`, `TrainConfig.resume='latest'`);
# every field is a `vit-vq train` flag of the same name.
TRAIN_FIELD = re.compile(r"TrainConfig\.(\w+)(?:=('[^']*'|[\w./-]+))?")


def _as_flag(match: re.Match[str]) -> str:
    flag = "--" + match.group(1).replace("_", "-")
    return flag if match.group(2) is None else f"{flag} {match.group(2).strip(chr(39))}"


def one_line(err: BaseException) -> str:
    """The error as one line: its last line when it carries a traceback (DataLoader workers), capped in length."""
    text = str(err).strip() or type(err).__name__
    if "Traceback (most recent call last)" in text:
        text = [line for line in text.splitlines() if line.strip()][-1]
    text = BUNDLED_MATCH.sub(r"\g<0>: --model \1", " ".join(text.split()))
    text = TRAIN_FIELD.sub(_as_flag, text)
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


def _is_out_of_memory(err: BaseException) -> bool:
    """MemoryError, or torch's allocation failures (`DefaultCPUAllocator: can't allocate memory`, CUDA OOM)."""
    text = str(err).lower()
    return isinstance(err, MemoryError) or (
        isinstance(err, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)
    )


def _unpickler_reason(err: BaseException) -> str:
    """What torch's weights-only unpickler objected to, without its advice to disable the check."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    return " ".join(text.split()) or type(err).__name__


# Optional packages -> the extra that installs them.
EXTRAS = {"accelerate": "train", "torchvision": "train", "tensorboard": "train", "tqdm": "train", "yaml": "train",
          "datasets": "train", "skimage": "train", "sklearn": "train", "matplotlib": "train", "ray": "ray", "triton": "triton",
          "lpips": "lpips", "torchmetrics": "metrics", "torch_fidelity": "metrics"}


def describe(err: BaseException) -> tuple[str, int]:
    """The one-line message and exit status for an exception that ended a command."""
    if isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] in EXTRAS:
        extra = EXTRAS[err.name.split(".")[0]]
        return (f"this command needs the {err.name.split('.')[0]!r} package: pip install 'vit_vq[{extra}]' "
                f"(from a checkout: pip install '.[{extra}]')"), 2
    if isinstance(err, (CLIError, OSError, ValueError, TypeError)):
        return one_line(err), 2
    if _is_out_of_memory(err):
        return f"out of memory ({type(err).__name__}: {one_line(err)}); try a smaller --batch-size", 2
    if isinstance(err, RecursionError):
        return f"input nested too deeply to read ({one_line(err)})", 2
    if isinstance(err, pickle.UnpicklingError):
        return f"refused to unpickle a file that holds more than tensors and plain values ({_unpickler_reason(err)})", 2
    if isinstance(err, RuntimeError):  # torch, accelerate and launch errors: their message is the explanation
        return one_line(err), 2
    return f"{type(err).__name__}: {one_line(err)} (run `vit-vq -v ...` for the traceback)", 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not args.verbose:  # its retries and HEAD-request warnings repeat what our one-line error says
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"vit-vq {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the command-line boundary: one line, never a traceback unless -v
        if args.verbose:
            traceback.print_exc(file=sys.stderr)
        message, status = describe(err)
        sys.stderr.write(f"vit-vq {args.command}: error: {message}\n")  # one write: ranks' lines do not interleave
        sys.stderr.flush()
        return status


if __name__ == "__main__":
    # `python -m vit_vq.cli.main` (e.g. under torchrun): run the importable module's main, so the
    # CLIError the subcommands raise is the class that main() catches.
    from vit_vq.cli.main import main as _main

    sys.exit(_main())
