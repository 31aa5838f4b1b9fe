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

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hub, json_fields
from .config import ViTVQConfig
from .files import (
    NotRegularFileError,
    has_leftovers,
    lost_to_a_crash,
    open_regular,
    open_snapshot,
    real_folder,
    recover,
    regular_file_size,
)
from .hub import MAX_LISTED, listing

MAX_CONFIG_BYTES = 1 << 20
SWAP_WAITS = 20  # saves in a row a load waits out before it gives up
MAX_MESSAGE_CHARS = 500
DEPTH_KEYS = {"encoder_depth": "encoder.transformer.blocks.", "decoder_depth": "decoder.transformer.blocks."}

def check_regular_file(path: Path, *, via: Path | None = None) -> int:
    """The size of `path`, which must be a regular, readable file (checked without opening a FIFO).

    Raises:
        FileNotFoundError: it does not exist (a dangling link included).
        ValueError: it is a FIFO, socket, device or folder.
        PermissionError: it cannot be read.
    """
    try:
        return regular_file_size(via or path)
    except NotRegularFileError as err:
        raise not_a_model_file(err, path) from None


def not_a_model_file(err: NotRegularFileError, path: Path | None = None) -> ValueError:
    """The one message for a tokenizer file that is not a regular file (`path`: its name, when opened via another)."""
    return ValueError(f"{path or err.path} is {err.kind}; vit_vq reads tokenizer files only from regular files")


def read_config(path: Path, *, via: Path | None = None) -> ViTVQConfig:
    """Parse and validate `config.json` (through `vit_vq.json_fields`, as codes metadata is).

    Raises:
        ValueError: too large, not UTF-8 JSON, nested too deeply, not an object, or a field of the
            wrong type or out of bounds (the message names the file and the field).
    """
    size = check_regular_file(path, via=via)
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is {size} bytes; a vit_vq config.json is under {MAX_CONFIG_BYTES} bytes")
    with open_regular(via or path) as f:
        data = json_fields.parse(f.read(MAX_CONFIG_BYTES + 1), source=str(path), max_chars=MAX_CONFIG_BYTES)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    try:
        return ViTVQConfig.from_dict(data)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {_short(str(err))}") from None


def _short(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A message cut to `limit` characters (a hostile value can be a megabyte long)."""
    return message if len(message) <= limit else f"{message[:limit]}... ({len(message)} characters)"


def read_header(path: Path, *, via: Path | None = None) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors header; no tensor data is read.

    Raises:
        ValueError: the file is not a readable safetensors file (truncated, corrupted, not a file).
        PermissionError: it cannot be read.
    """
    from safetensors import SafetensorError, safe_open

    size = check_regular_file(path, via=via)
    try:
        with safe_open(via or path, framework="pt") as f:
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


def read_weights(path: Path, *, via: Path | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file on the CPU, as stored (see `cast_to_model` for the value checks).

    Raises:
        ValueError: a truncated or corrupted file.
        PermissionError: the file cannot be read.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    size = check_regular_file(path, via=via)
    try:
        return load_file(via or path, device="cpu")
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


def resolve_for_loading(name: str | Path, **hub_kwargs: Any) -> tuple[Path, Path]:
    """`hub.resolve_files`, after restoring a local folder that a crash mid-save left missing.

    Raises:
        FileNotFoundError: no such folder, a folder without the files (the message lists what it
            holds), or a Hub repo or file that cannot be found.
        ValueError: an unknown `vit_vq:` name, a path that is not a folder, or an invalid Hub id.
    """
    where = hub.resolve_model_name(name)
    if not isinstance(where, Path):
        return hub.resolve_files(name, **hub_kwargs)
    for _ in range(SWAP_WAITS):
        if lost_to_a_crash(where):
            recover(where)  # takes the folder's lock: waits out a save mid-swap, or restores after a crash
        try:
            config_path, weights_path = hub.resolve_files(name, **hub_kwargs)
            missing = [f.name for f in (config_path, weights_path) if not f.exists() and not f.is_symlink()]
            if not missing:
                return config_path, weights_path
        except FileNotFoundError:
            if not has_leftovers(real_folder(where)):
                raise
            recover(where)  # between the two renames of a save (waits for it), or stale temporaries (removed)
            continue
        if not has_leftovers(real_folder(where)):
            others = sorted(p.name for p in where.iterdir())
            raise FileNotFoundError(
                f"{where} has no {' or '.join(missing)} (found: {listing(others)}); vit_vq reads only safetensors weights"
            )
    raise FileNotFoundError(f"{where} kept changing under {SWAP_WAITS} saves in a row; try loading it again")


@contextmanager
def open_model_files(config_path: Path, weights_path: Path) -> Iterator[tuple[Path, Path]]:
    """Paths that read `config.json` and `model.safetensors` from one save of their folder (`files.open_snapshot`):
    a load racing a save never combines one save's config with another's weights."""
    folder = config_path.parent
    if weights_path.parent != folder:
        yield config_path, weights_path
        return
    try:
        with open_snapshot(folder, (config_path.name, weights_path.name)) as opened:
            yield opened[config_path.name], opened[weights_path.name]
    except NotRegularFileError as err:
        raise not_a_model_file(err) from None


def load_pretrained(
    cls: type[nn.Module], name: str | Path, *, map_location: str | torch.device = "cpu",
    torch_dtype: torch.dtype | None = None, **hub_kwargs: Any,
) -> nn.Module:
    """Read a saved tokenizer strictly (steps 1-4 above) into `cls(config)`, in eval mode on `map_location`.

    `torch_dtype` casts the encoder and decoder (the codebook stays float32) and checks the cast
    weights are finite. See `ViTVQTokenizer.from_pretrained` for the arguments and errors.
    """
    if torch_dtype is not None and not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
        raise ValueError(f"torch_dtype must be a floating torch.dtype such as torch.bfloat16, got {torch_dtype!r}")
    config_path, weights_path = resolve_for_loading(name, **hub_kwargs)
    with open_model_files(config_path, weights_path) as (config_via, weights_via):
        config = read_config(config_path, via=config_via)
        check_header(cls, config, read_header(weights_path, via=weights_via), weights_path)
        state = read_weights(weights_path, via=weights_via)
    model = cls(config)
    load_state_strict(model, state, weights_path)
    model = model.to(map_location).eval()
    if torch_dtype is not None:
        model.encoder.to(torch_dtype)
        model.decoder.to(torch_dtype)
        cast = {f"{part}.{k}": v for part in ("encoder", "decoder") for k, v in getattr(model, part).state_dict().items()}
        check_finite(cast, weights_path, f" once cast to torch_dtype={torch_dtype} (values beyond its range)")
    return model


__all__ = [
    "load_pretrained", "resolve_for_loading", "read_config", "read_header", "check_header", "read_weights",
    "load_state_strict", "cast_to_model", "check_finite", "check_regular_file", "listing", "MAX_CONFIG_BYTES", "MAX_LISTED",
]
