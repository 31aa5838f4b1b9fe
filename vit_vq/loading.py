"""Reading a saved tokenizer strictly: weights before architecture.

`from_pretrained` never trusts `config.json` with memory. In order:

1. `config.json` must be a regular file under `MAX_CONFIG_BYTES` holding a JSON object whose
   values pass `ViTVQConfig`'s types and upper bounds (`vit_vq.config.MAX_SIZES`).
2. The safetensors header (names, shapes, dtypes; no tensor data) is read, and the config's
   depths must equal the number of stored blocks.
3. The model is built on the `meta` device (no memory) and every expected tensor shape is
   compared with the stored one. Only then are the weights read and the real model built.
4. Every stored tensor must have a dtype its parameter takes without surprise (any float for a
   float parameter, the exact dtype otherwise) and be finite AFTER the cast into the model's
   dtype (a float64 1e300 becomes Inf in float32); the first bad tensors are named.

Every error names the file, is one line, and lists at most `MAX_LISTED` keys before a count.
Nothing is unpickled: only `model.safetensors` is read.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .config import ViTVQConfig

MAX_CONFIG_BYTES = 1 << 20
MAX_LISTED = 5
MAX_MESSAGE_CHARS = 500
DEPTH_KEYS = {"encoder_depth": "encoder.transformer.blocks.", "decoder_depth": "decoder.transformer.blocks."}

_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder",
}


def listing(items: Iterable[str], limit: int = MAX_LISTED) -> str:
    """`[a, b, c, ...] (N in all)`: a few items, then the count, so messages stay short."""
    items = list(items)
    head = ", ".join(items[:limit])
    return f"[{head}]" if len(items) <= limit else f"[{head}, ...] ({len(items)} in all)"


def check_regular_file(path: Path) -> int:
    """The size of `path`, which must be a regular, readable file (checked without opening a FIFO).

    Raises:
        FileNotFoundError: it does not exist (a dangling link included).
        ValueError: it is a FIFO, socket, device or folder.
        PermissionError: it cannot be read.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist (or is a link to nothing)") from None
    except PermissionError:
        raise PermissionError(f"cannot read {path}: permission denied") from None
    if not stat.S_ISREG(info.st_mode):
        kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
        raise ValueError(f"{path} is {kind}; vit_vq reads tokenizer files only from regular files")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise PermissionError(f"cannot read {path}: permission denied") from None
    return info.st_size


def read_config(path: Path) -> ViTVQConfig:
    """Parse and validate `config.json`.

    Raises:
        ValueError: too large, not UTF-8 JSON, nested too deeply, not an object, or a field of the
            wrong type or out of bounds (the message names the file and the field).
    """
    size = check_regular_file(path)
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is {size} bytes; a vit_vq config.json is under {MAX_CONFIG_BYTES} bytes")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    except RecursionError:
        raise ValueError(f"{path} nests JSON too deeply to be a vit_vq config") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    try:
        return ViTVQConfig.from_dict(data)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {_short(str(err))}") from None


def _short(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A message cut to `limit` characters (a hostile value can be a megabyte long)."""
    return message if len(message) <= limit else f"{message[:limit]}... ({len(message)} characters)"


def read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors header; no tensor data is read.

    Raises:
        ValueError: the file is not a readable safetensors file (truncated, corrupted, not a file).
        PermissionError: it cannot be read.
    """
    from safetensors import SafetensorError, safe_open

    size = check_regular_file(path)
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"{path} ({size} bytes) is truncated or corrupted and cannot be read as safetensors: {err}") from None


def check_header(cls: type[nn.Module], config: ViTVQConfig, shapes: dict[str, tuple[int, ...]], source: Path) -> None:
    """Compare the config with the stored tensors before anything is allocated.

    Depths are checked against the number of stored blocks first, so building the shape-only
    (`meta`) model costs no more than the file already holds.

    Raises:
        ValueError: a depth, a missing or unexpected key, or a shape that differs; names a few of each.
    """
    for field, prefix in DEPTH_KEYS.items():
        stored = {m.group(1) for k in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
        if getattr(config, field) != len(stored):
            raise ValueError(
                f"the config beside {source} says {field}={getattr(config, field)} "
                f"but the weights hold {len(stored)} blocks under {prefix}*"
            )
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
    mismatch(expected, shapes, source)


def mismatch(expected: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]], source: Path) -> None:
    """Raise when keys or shapes differ, naming at most `MAX_LISTED` of each kind.

    Raises:
        ValueError: missing keys, unexpected keys, or shape mismatches.
    """
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    shapes = [
        f"{k}: file {stored[k]} vs config {expected[k]}"
        for k in sorted(set(expected) & set(stored))
        if tuple(stored[k]) != tuple(expected[k])
    ]
    parts = [
        f"{what} {listing(keys)}"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if keys
    ]
    if parts:
        raise ValueError(f"the weights in {source} do not match its config: " + "; ".join(parts))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file on the CPU, as stored (see `cast_to_model` for the value checks).

    Raises:
        ValueError: a truncated or corrupted file.
        PermissionError: the file cannot be read.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    size = check_regular_file(path)
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"{path} ({size} bytes) is truncated or corrupted and cannot be read as safetensors: {err}") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_finite(tensors: dict[str, torch.Tensor], source: Path, where: str = "") -> None:
    """Refuse floating-point tensors holding NaN/Inf, naming the first few and their counts.

    Raises:
        ValueError: `<source> holds NaN/Inf weights<where> in [name (bad of numel), ...]`.
    """
    bad = [
        f"{k} ({int((~torch.isfinite(t)).sum())} of {t.numel()})"
        for k, t in sorted(tensors.items())
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise ValueError(
            f"{source} holds NaN/Inf weights{where} in {listing(bad)}; refusing to load a tokenizer that would output NaN"
        )


def cast_to_model(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """The stored tensors cast to the dtypes of `model`'s state, checked before and after the cast.

    A float parameter takes any stored float dtype (the packaged default stores float16); an
    integer, bool or complex tensor for it is refused, and so is any other dtype for a non-float
    buffer. Values must be finite as stored and after the cast (float64 1e300 -> float32 Inf).

    Raises:
        ValueError: wrong dtypes, or non-finite values; names a few tensors of each.
    """
    expected = model.state_dict()

    def takes(t: torch.Tensor, e: torch.Tensor) -> bool:
        return t.is_floating_point() and e.is_floating_point() or t.dtype == e.dtype

    wrong = [
        f"{k}: file {_dtype_name(t.dtype)} vs model {_dtype_name(expected[k].dtype)}"
        for k, t in sorted(state.items())
        if k in expected and not takes(t, expected[k])
    ]
    if wrong:
        raise ValueError(
            f"the weights in {source} have dtypes the model cannot take: {listing(wrong)}; "
            "float parameters take float16, bfloat16, float32 or float64 tensors"
        )
    check_finite(state, source)
    cast = {k: t.to(expected[k].dtype) if k in expected else t for k, t in state.items()}
    # Only a narrowing cast (float64 -> float32, ...) can turn finite values into Inf.
    narrowed = {
        k: cast[k] for k, t in state.items()
        if k in expected and t.is_floating_point() and expected[k].is_floating_point()
        and torch.finfo(expected[k].dtype).max < torch.finfo(t.dtype).max
    }
    check_finite(narrowed, source, " once cast to the model's dtype (stored values beyond its range)")
    return cast


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """`load_state_dict(strict=True)` of the checked, cast tensors, with errors that name them.

    Raises:
        ValueError: missing or unexpected keys, shape mismatches, wrong dtypes or non-finite values.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mismatch(expected, {k: tuple(v.shape) for k, v in state.items()}, source)
    model.load_state_dict(cast_to_model(model, state, source), strict=True)


__all__ = [
    "read_config", "read_header", "check_header", "read_weights", "load_state_strict", "cast_to_model", "check_finite",
    "check_regular_file",
    "listing", "MAX_CONFIG_BYTES", "MAX_LISTED",
]
