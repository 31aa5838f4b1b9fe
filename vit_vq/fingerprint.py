"""Fingerprints: what identifies a file, a set of decoding weights, a saved model, or a run's inputs.

Every fingerprint is sha256; the short ones are its first 16 hex characters (`short_digest`).

- `sha256_file`: a file's bytes (regular files only: a FIFO would never end).
- `decoder_hash`: the weights that turn codes into pixels (codebook and decoder), in a canonical
  float32 form, so it does not depend on the device or on the dtype the weights were stored in.
  Codes record it; decoding checks it.
- `model_files_fingerprint`: a saved model's `config.json` and `model.safetensors` bytes, cached
  by size, times and inode so that a long job hashes each file once.
- `inputs_fingerprint` / `files_stat_fingerprint`: which inputs sit where, and whether any of
  them was replaced since (sizes, times, inodes), for tokenize's resume.

`ViTVQConfig.config_hash` (the architecture's identity) lives with the config, below this layer.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from .files import open_regular

SHORT = 16  # hex characters of a short digest


def short_digest(*parts: bytes | str) -> str:
    """sha256 (16 hex) of `parts`, each followed by a NUL (so `("ab", "c")` and `("a", "bc")` differ)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update((part.encode() if isinstance(part, str) else part) + b"\0")
    return digest.hexdigest()[:SHORT]


def text_digest(text: str) -> str:
    """sha256 (16 hex) of one string's UTF-8 bytes (a run's JSON, a dataset's fingerprint)."""
    return hashlib.sha256(text.encode()).hexdigest()[:SHORT]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes.

    Raises:
        FileNotFoundError / PermissionError: a missing or unreadable file.
        ValueError: not a regular file (a FIFO or device would never finish reading).
    """
    digest = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def decoder_hash(model: nn.Module) -> str:
    """sha256 (16 hex) of the weights that turn codes into pixels, in a canonical form.

    Covers `quantizer.embed` (the stored codebook, when the quantizer has one), FSQ's `quantizer.levels`
    (which define its implicit codebook; LFQ's is fixed by the decoder's input width) and every `decoder.*`
    tensor: for each, in name order, its name, its shape and its values as little-endian float32
    bytes. The hash does not depend on the device, and float32 holds every fp16/bf16 value exactly,
    so weights stored in fp16 and loaded into float32 hash the same as when loaded in fp16. Take it
    before casting to a lower compute precision: a bf16 copy of float32 weights holds other numbers.
    """
    state = {f"decoder.{k}": v for k, v in model.decoder.state_dict().items()}
    embed = getattr(model.quantizer, "embed", None)
    if embed is not None:
        state["quantizer.embed"] = embed
    levels = getattr(model.quantizer, "levels", None)
    if isinstance(levels, torch.Tensor):  # FSQ's implicit codebook: [8, 6, 5] and [5, 6, 8] decode codes differently
        state["quantizer.levels"] = levels
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        values = tensor.detach().cpu()
        array = (values.float() if values.is_floating_point() else values).contiguous().numpy()
        digest.update(f"{name}:{array.shape}:{array.dtype.name}\0".encode())
        digest.update(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return digest.hexdigest()[:SHORT]


def model_files_fingerprint(files: Sequence[Path]) -> str:
    """sha256 (16 hex) of some files' bytes (a saved model's config and weights), each hashed once per version.

    A file is hashed again only when its size, modification or change time or inode change.

    Raises:
        FileNotFoundError / PermissionError / ValueError: see `sha256_file`.
    """
    digests = []
    for f in files:
        st = os.stat(f)
        digests.append(_cached_sha256(str(f), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return short_digest(*digests)


@functools.lru_cache(maxsize=64)
def _cached_sha256(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    """`sha256_file(path)`; the other arguments key the cache."""
    return sha256_file(path)


def inputs_fingerprint(files: Iterable[Path | str]) -> str:
    """sha256 (16 hex) of which files sit at which position (any name the OS allows, UTF-8 or not)."""
    return short_digest(*(os.fsencode(f) for f in files))


def files_stat_fingerprint(files: Iterable[Path | str]) -> str:
    """sha256 (16 hex) of the size, modification and change times and inode of each file.

    A file replaced under the same name changes it, even when the replacement kept the size and
    the modification time (`cp -p`, `rsync -t`, `os.utime`): writing a file or swapping it in sets
    its change time, which no user call can set back. An unreadable file counts by its error.
    """
    parts = []
    for f in files:
        try:
            st = os.stat(f)
            parts.append(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}")
        except OSError as err:
            parts.append(f"unreadable:{err.errno}")
    return short_digest(*parts)


__all__ = [
    "short_digest", "text_digest", "sha256_file", "decoder_hash", "model_files_fingerprint", "inputs_fingerprint",
    "files_stat_fingerprint", "SHORT",
]
