"""The codes file written by `vit-vq encode` and read by `vit-vq decode`.

A codes file is one safetensors file with one tensor, `codes` `[N, h, w]` in the smallest
unsigned dtype that holds `codebook_size - 1`, and string metadata (JSON values):

    format            "vit_vq.codes"      format_version   "2"
    names             ["a.png", ...]      grid             [h, w]
    codebook_size     8192                image_size       256
    model_id, revision, config_hash       (which tokenizer made the codes)
    decoder_hash                          (the decoding weights as loaded, whatever the precision)
    lookup_backend, lookup_precision, precision, vit_vq_version

`load_codes` returns int64 codes and refuses files that are not codes files. Format 1
files still load; their `decoder_hash` was taken after the cast to the compute precision,
so it cannot be compared with today's and is dropped (`None`) with a warning.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import json_fields
from ..config import MAX_SIZES
from ..files import atomic_write
from .runtime import ModelInfo

CODES_FORMAT = "vit_vq.codes"
CODES_FORMAT_VERSION = 2  # 2: decoder_hash taken before the precision cast


MAX_FIELD_CHARS = 4096  # a model id, revision, hash or one image name
MAX_IMAGES = 1 << 24
MAX_NAMES_CHARS = 1 << 28  # the JSON list of every image name
NULLABLE = ("revision", "decoder_hash")  # the other ModelInfo fields are strings


def _field(meta: dict[str, str], key: str, source: str, check: Callable[..., Any]) -> Any:
    """Metadata value `key` (a string, as safetensors stores it) through `check(value, source=, key=)`.

    Raises:
        ValueError: the key is missing, or `check` refuses it; names the file and the key.
    """
    if key not in meta:
        raise ValueError(f"{source}: codes metadata has no {key!r}; it is not a complete vit_vq codes file")
    return check(meta[key], source=f"{source}: codes metadata field", key=key)


def _json(meta: dict[str, str], key: str, source: str, max_chars: int, check: Callable[..., Any]) -> Any:
    """Metadata value `key` parsed as JSON (`json_fields.parse`), then through `check(value, source=, key=)`."""

    def parse_then_check(text: str, *, source: str, key: str) -> Any:
        return check(json_fields.parse(text, source=source, key=key, max_chars=max_chars), source=source, key=key)

    return _field(meta, key, source, parse_then_check)


def smallest_uint_dtype(codebook_size: int) -> np.dtype:
    """The smallest unsigned numpy dtype that holds every code in `[0, codebook_size)`."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if codebook_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def to_storage(codes: torch.Tensor, codebook_size: int) -> np.ndarray:
    """int codes (any device) -> a contiguous numpy array in `smallest_uint_dtype(codebook_size)`."""
    return np.ascontiguousarray(codes.detach().cpu().numpy().astype(smallest_uint_dtype(codebook_size)))


@dataclass
class CodesFile:
    """A loaded codes file: int64 `codes` `[N, h, w]`, one name per image, and the producer."""

    codes: torch.Tensor
    names: list[str]
    codebook_size: int
    image_size: int
    model: ModelInfo
    vit_vq_version: str
    format_version: int = CODES_FORMAT_VERSION

    @property
    def weights_checkable(self) -> bool:
        """Whether the file records the decoder weights that made it (format 1's hash cannot be compared)."""
        return bool(self.model.decoder_hash)

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.codes.shape[1]), int(self.codes.shape[2])


def save_codes(
    path: str | Path, codes: torch.Tensor, names: Sequence[str], *, info: ModelInfo, codebook_size: int, image_size: int
) -> Path:
    """Atomically write a codes file.

    Args:
        codes: int `[N, h, w]` in `[0, codebook_size)`.
        names: N image names (file names for `vit-vq decode` to reuse).

    Raises:
        ValueError: shape/name-count mismatch.
    """
    from safetensors.numpy import save_file

    from .. import __version__

    if codes.ndim != 3 or codes.shape[0] != len(names):
        raise ValueError(f"expected codes [N, h, w] with N = {len(names)} names, got {tuple(codes.shape)}")
    meta = {
        "format": CODES_FORMAT,
        "format_version": str(CODES_FORMAT_VERSION),
        "names": json.dumps(list(names)),
        "grid": json.dumps([int(codes.shape[1]), int(codes.shape[2])]),
        "codebook_size": str(codebook_size),
        "image_size": str(image_size),
        **{k: json.dumps(v) for k, v in info.to_dict().items()},
        "vit_vq_version": __version__,
    }
    array = to_storage(codes, codebook_size)
    return atomic_write(path, lambda tmp: save_file({"codes": array}, str(tmp), metadata=meta))


def load_codes(path: str | Path) -> CodesFile:
    """Read a codes file written by `save_codes`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file, or not a vit_vq codes file (missing tensor or metadata),
            or a format newer than this library reads.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such codes file: {str(path)!r}")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if "codes" not in f.keys():
                raise ValueError(f"{path} has no 'codes' tensor; it is not a vit_vq codes file (written by vit-vq encode)")
            if extra := sorted(set(f.keys()) - {"codes"}):
                raise ValueError(f"{path} holds tensors other than 'codes' ({', '.join(map(repr, extra[:5]))}); "
                                 "a vit_vq codes file holds only its codes")
            array = f.get_tensor("codes")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors codes file: {err}") from err
    if meta.get("format") != CODES_FORMAT:
        raise ValueError(f"{path} is a safetensors file but not a vit_vq codes file (metadata format={meta.get('format')!r})")
    source = str(path)
    version = _field(meta, "format_version", source, functools.partial(json_fields.integer_text, low=1, high=1 << 30))
    if version > CODES_FORMAT_VERSION:
        raise ValueError(f"{path} uses codes format {version}; this vit_vq reads up to {CODES_FORMAT_VERSION}: upgrade vit_vq")
    names = _json(meta, "names", source, MAX_NAMES_CHARS,
                  functools.partial(json_fields.string_list, max_items=MAX_IMAGES, max_chars=MAX_FIELD_CHARS))
    sizes = {
        key: _field(meta, key, source, functools.partial(json_fields.integer_text, low=1, high=MAX_SIZES[key]))
        for key in ("codebook_size", "image_size")
    }
    fields = {
        key: _json(meta, key, source, MAX_FIELD_CHARS,
                   functools.partial(json_fields.string, max_chars=MAX_FIELD_CHARS, nullable=key in NULLABLE))
        for key in ModelInfo.__dataclass_fields__
        if key in meta or key != "decoder_hash"  # format 1 may lack it
    }
    if version < 2 and fields.get("decoder_hash"):
        warnings.warn(
            f"{path} was written by an older vit_vq (codes format {version}) whose decoder_hash depends on the "
            f"compute precision; the decoder weights cannot be checked (the config hash still is)",
            stacklevel=2,
        )
        fields["decoder_hash"] = None
    if array.dtype.kind not in "ui":  # float codes would be truncated silently by the int64 cast
        raise ValueError(f"{path}: codes must be stored as integers, got dtype {array.dtype}")
    if array.ndim != 3 or array.shape[0] != len(names):
        raise ValueError(f"{path}: codes of shape {array.shape} do not match {len(names)} names")
    if "grid" in meta:
        grid = _json(meta, "grid", source, MAX_FIELD_CHARS, lambda v, **kw: v)
        if grid != list(array.shape[1:]):
            raise ValueError(f"{path}: metadata 'grid' is {json_fields.shown(grid)} but the codes are {list(array.shape[1:])}")
    if array.size and (int(array.min()) < 0 or int(array.max()) >= sizes["codebook_size"]):
        raise ValueError(
            f"{path}: codes must lie in [0, {sizes['codebook_size']}) (metadata 'codebook_size'), "
            f"got values in [{int(array.min())}, {int(array.max())}]"
        )
    return CodesFile(
        codes=torch.from_numpy(array.astype(np.int64)),
        names=names,
        codebook_size=sizes["codebook_size"],
        image_size=sizes["image_size"],
        model=ModelInfo(**fields),
        vit_vq_version=meta.get("vit_vq_version", "unknown"),
        format_version=version,
    )


__all__ = [
    "CodesFile",
    "save_codes",
    "load_codes",
    "smallest_uint_dtype",
    "to_storage",
]
