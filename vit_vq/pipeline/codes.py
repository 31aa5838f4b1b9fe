"""The codes file written by `vit-vq encode` and read by `vit-vq decode`, and atomic file writes.

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

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..hub import current_umask
from .runtime import ModelInfo

CODES_FORMAT = "vit_vq.codes"
CODES_FORMAT_VERSION = 2  # 2: decoder_hash taken before the precision cast


def smallest_uint_dtype(codebook_size: int) -> np.dtype:
    """The smallest unsigned numpy dtype that holds every code in `[0, codebook_size)`."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if codebook_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def to_storage(codes: torch.Tensor, codebook_size: int) -> np.ndarray:
    """int codes (any device) -> a contiguous numpy array in `smallest_uint_dtype(codebook_size)`."""
    return np.ascontiguousarray(codes.detach().cpu().numpy().astype(smallest_uint_dtype(codebook_size)))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` for a temporary file beside `path`, fsync it, then `os.replace` it in.

    A reader never sees a half-written `path`; a crash leaves at most a hidden temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp (and safetensors) create 0600 files
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path



def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON, atomically."""
    text = json.dumps(data, indent=2) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


@dataclass
class CodesFile:
    """A loaded codes file: int64 `codes` `[N, h, w]`, one name per image, and the producer."""

    codes: torch.Tensor
    names: list[str]
    codebook_size: int
    image_size: int
    model: ModelInfo
    vit_vq_version: str

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
            array = f.get_tensor("codes")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors codes file: {err}") from err
    if meta.get("format") != CODES_FORMAT:
        raise ValueError(f"{path} is a safetensors file but not a vit_vq codes file (metadata format={meta.get('format')!r})")
    text = meta.get("format_version", "")
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ValueError(f"{path}: codes metadata format_version must be a whole number >= 1, got {text!r}")
    version = int(text)
    if version > CODES_FORMAT_VERSION:
        raise ValueError(f"{path} uses codes format {version}; this vit_vq reads up to {CODES_FORMAT_VERSION}: upgrade vit_vq")
    try:
        names = json.loads(meta["names"])
        fields = {k: json.loads(meta[k]) for k in ModelInfo.__dataclass_fields__ if k in meta or k != "decoder_hash"}
        codebook_size, image_size = int(meta["codebook_size"]), int(meta["image_size"])
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path}: codes metadata is missing or malformed ({err})") from err
    for key, value in fields.items():  # every ModelInfo field is a string; revision and decoder_hash may be null
        if not (isinstance(value, str) or (value is None and key in ("revision", "decoder_hash"))):
            raise ValueError(f"{path}: codes metadata field {key!r} must be a string, got {type(value).__name__} {value!r:.80}")
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
    return CodesFile(
        codes=torch.from_numpy(array.astype(np.int64)),
        names=names,
        codebook_size=codebook_size,
        image_size=image_size,
        model=ModelInfo(**fields),
        vit_vq_version=meta.get("vit_vq_version", "unknown"),
    )


__all__ = [
    "CodesFile",
    "save_codes",
    "load_codes",
    "smallest_uint_dtype",
    "to_storage",
    "sha256_file",
    "atomic_write",
    "atomic_write_json",
]
