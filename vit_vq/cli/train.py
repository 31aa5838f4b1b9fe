"""`vit-vq train`: train or fine-tune a tokenizer.

    vit-vq train --preset tiny --data photos/ --output runs/tiny --max-steps 2000
    vit-vq train --config my_run.yaml --data faces/ --init org/vit-vq-base --perceptual-weight 0.1
    accelerate launch --num_processes 8 -m vit_vq train --config my_run.yaml --resume latest

Every `TrainConfig` field has a flag (`field_name` -> `--field-name`), generated from the
dataclass so the two cannot drift apart. Values are taken from, in increasing priority:
the defaults, the `--config` YAML file, then the flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from typing import Any, Literal

from .main import CLIError

NONE_WORDS = ("none", "null")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `train` with all `TrainConfig` flags."""
    from ..training.config import RECIPES, TrainConfig

    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune a tokenizer",
        description="Train a tokenizer from a preset, or fine-tune one (--init). Flags override --config. "
        "Multi-GPU: accelerate launch --multi_gpu --num_processes N -m vit_vq train ... (see docs/training.md).",
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of training settings (any of the flags below)")
    parser.add_argument(
        "--recipe", choices=sorted(RECIPES), default=argparse.SUPPRESS,
        help="named settings, applied beneath --config and the flags: 'default' is how the bundled default model was "
        "trained (" + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in RECIPES["default"].items()) + ")",
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        _add_field(parser, f, hints[f.name])
    parser.set_defaults(func=run)
    return parser


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, hint: Any) -> None:
    flag = "--" + f.name.replace("_", "-")
    help_text = f.metadata.get("help", "")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": f"{help_text} (default: {default!r})"}
    base, optional = _unwrap_optional(hint)
    if base is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
    elif typing.get_origin(base) is Literal:
        parser.add_argument(flag, choices=typing.get_args(base), **kwargs)
    elif typing.get_origin(base) is tuple:
        parser.add_argument(flag, nargs=len(typing.get_args(base)), type=typing.get_args(base)[0], metavar="X", **kwargs)
    elif typing.get_origin(base) is dict:
        parser.add_argument(flag, nargs="*", type=_key_value, metavar="KEY=VALUE", **kwargs)
    else:
        parser.add_argument(flag, type=_nullable(base) if optional else base, metavar=base.__name__.upper(), **kwargs)


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _nullable(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in NONE_WORDS else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _key_value(text: str) -> tuple[str, Any]:
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def config_from_args(args: argparse.Namespace) -> Any:
    """The `TrainConfig` of defaults < `--config` file < explicit flags."""
    from ..training.config import TrainConfig

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if hasattr(args, "recipe"):
        given["recipe"] = args.recipe
    if "model_overrides" in given:
        given["model_overrides"] = dict(given["model_overrides"])
    if "adam_betas" in given:
        given["adam_betas"] = tuple(given["adam_betas"])
    if args.config:
        return TrainConfig.from_file(args.config, **given)
    return TrainConfig.from_dict({}, **given)


def run(args: argparse.Namespace) -> int:
    from ..training import NonFiniteLossError, PerceptualWeightsUnavailable, Trainer

    if not args.verbose:
        logging.getLogger("accelerate").setLevel(logging.WARNING)
    config = config_from_args(args)
    try:
        result = Trainer(config).train()
    except PerceptualWeightsUnavailable as err:
        raise CLIError(str(err)) from err
    except NonFiniteLossError as err:
        print(f"vit-vq train: stopped: {err}", file=sys.stderr)
        return 1
    if result.export_dir is not None:
        print(f"trained to step {result.step}; model exported to {result.export_dir}")
    if result.sample is not None:
        print(f"reconstructions (originals above): {result.sample}")
    return 0
