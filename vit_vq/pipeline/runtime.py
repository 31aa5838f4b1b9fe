"""Loading a tokenizer for inference: provenance, device, precision, torch.compile.

`ModelInfo` is what every output of the pipeline records about the model that made it
(id, revision, config hash) and how it ran (lookup backend and precision), so that
codes are never decoded by a tokenizer they were not made with.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..files import NotRegularFileError
from ..fingerprint import decoder_hash, model_files_fingerprint
from ..loading import not_a_model_file
from ..tokenizer import ViTVQTokenizer

ComputeDtype = Literal["fp32", "bf16", "fp16"]  # the encoder/decoder dtype (the lookup's precision is ops.LookupPrecision)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOOKUP_PRECISION = "exact"  # what ViTVQTokenizer.encode asks nearest_code for


@dataclass(frozen=True)
class ModelInfo:
    """Provenance and run settings recorded beside every set of codes.

    model_id: the Hub id or the folder the tokenizer came from (`vit_vq:default` for the bundled one).
    revision: the Hub commit (resolved from the cache when possible), else the requested revision,
        else `None` (local folders).
    config_hash: `ViTVQConfig.config_hash()`; decoding checks it.
    lookup_backend / lookup_precision: how nearest codes were searched.
    precision: the encoder/decoder compute dtype (`fp32`, `bf16`, `fp16`).
    decoder_hash: sha256 (16 hex) of the weights that turn codes into pixels (codebook and
        decoder) as loaded, before any cast to `precision` (see `decoder_hash`); decoding checks
        it, so re-exported weights under the same name are caught while codes made at any
        precision on any device decode at any other.
    """

    model_id: str
    revision: str | None
    config_hash: str
    lookup_backend: str
    lookup_precision: str
    precision: str
    decoder_hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_revision(name: str, revision: str | None) -> str | None:
    """The commit a Hub id resolves to in the local cache, else `revision` (None for local folders)."""
    from .. import hub

    try:
        if isinstance(hub.resolve_model_name(name), Path):  # a folder, `vit_vq:default` included
            return None
        cfg, _ = hub.resolve_files(name, revision=revision, local_files_only=True)
    except Exception:  # provenance is best-effort: loading already succeeded
        return revision
    match = re.search(r"snapshots[/\\]([0-9a-f]{40})[/\\]", str(cfg))
    return match.group(1) if match else revision


def load_tokenizer(name: str, *, revision: str | None = None) -> ViTVQTokenizer:
    """`ViTVQTokenizer.from_pretrained` for a Hub id or a local folder (eval mode, on CPU).

    Raises:
        FileNotFoundError: a missing local folder, or one without `config.json`/`model.safetensors`.
        ValueError: unreadable weights or a config mismatch.
    """
    return ViTVQTokenizer.from_pretrained(name, revision=revision)


def pick_device(device: str = "auto") -> torch.device:
    """`auto` -> `cuda:$LOCAL_RANK` when CUDA is available, else CPU; otherwise `torch.device(device)`.

    Raises:
        ValueError: a CUDA device was asked for on a machine without one.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a device name; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asks for CUDA, which is not available on this machine; use cpu")
    return dev


def pick_precision(precision: str, device: torch.device) -> ComputeDtype:
    """`auto` -> `bf16` on CUDA, `fp32` elsewhere.

    Raises:
        ValueError: an unknown name.
    """
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {sorted(DTYPES)} or 'auto', got {precision!r}")
    return precision  # type: ignore[return-value]


def lookup_backend(device: torch.device) -> str:
    """The nearest-code backend `nearest_code` picks for `device` (`"auto"` if it cannot say)."""
    try:
        from ..ops.nearest import resolve_backend

        return str(resolve_backend(device, None))
    except (ImportError, TypeError, ValueError, RuntimeError):
        return os.environ.get("VIT_VQ_BACKEND") or "auto"


def cast_for_inference(tok: ViTVQTokenizer, precision: ComputeDtype) -> ViTVQTokenizer:
    """Cast the encoder and decoder to `precision`; the quantizer's codebook stays float32.

    Casting the whole module would round the codebook to bf16 and change the codes.
    """
    dtype = DTYPES[precision]
    tok.encoder.to(dtype)
    tok.decoder.to(dtype)
    return tok


def prepare_for_inference(
    tok: ViTVQTokenizer,
    *,
    model_id: str,
    revision: str | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    compile: bool = False,
) -> tuple[ViTVQTokenizer, ModelInfo]:
    """Move, cast and optionally compile a tokenizer; return it with its `ModelInfo`."""
    dev = device if isinstance(device, torch.device) else pick_device(device)
    prec = pick_precision(precision, dev)
    weights = decoder_hash(tok)  # before the cast: the weights' identity, not the compute dtype's
    tok = cast_for_inference(tok.to(dev).eval(), prec)
    if compile:
        tok.compile()
    info = ModelInfo(
        model_id=model_id,
        revision=resolve_revision(model_id, revision),
        config_hash=tok.config.config_hash(),
        lookup_backend=lookup_backend(dev),
        lookup_precision=LOOKUP_PRECISION,
        precision=prec,
        decoder_hash=weights,
    )
    return tok, info


def weights_fingerprint(name: str, revision: str | None = None) -> str | None:
    """sha256 (16 hex) of a model's `config.json` and `model.safetensors` bytes as stored
    (`fingerprint.model_files_fingerprint`).

    For `vit_vq:default`, a folder, or a Hub id already in the local cache (no download);
    None when the files cannot be found locally.

    Raises:
        ValueError: a model file (links followed) that is not a regular file, such as a FIFO
            or a link to a device, which would never finish reading; the message names it.
    """
    from .. import hub

    try:
        files = hub.resolve_files(name, revision=revision, local_files_only=True)
        for f in files:
            os.stat(f)
    except Exception:  # not local (yet): a fingerprint without the weights, as before loading
        return None
    try:
        return model_files_fingerprint(files)
    except NotRegularFileError as err:
        raise not_a_model_file(err) from None


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (for timing); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = [
    "ModelInfo",
    "ComputeDtype",
    "DTYPES",
    "load_tokenizer",
    "resolve_revision",
    "pick_device",
    "pick_precision",
    "lookup_backend",
    "cast_for_inference",
    "prepare_for_inference",
    "decoder_hash",
    "weights_fingerprint",
    "synchronize",
]
