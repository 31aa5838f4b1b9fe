"""Turning image collections into codes: code files, sharded pre-tokenization, data-engine hooks.

- `runtime`: load a tokenizer for inference (device, precision, `torch.compile`) and record
  its provenance (`ModelInfo`).
- `codes`: the single-file codes format of `vit-vq encode` / `vit-vq decode`.
- `shards`, `manifest`, `tokenize`: resumable, multi-process sharded tokenization (`vit-vq tokenize`);
  `outdir`: its output folder's lock, and keeping that folder out of the inputs.
- `mapper`: `TokenizeBatch`, a picklable callable for `datasets.Dataset.map` and Ray Data.
- `sources`: image sources at the model's resolution (resize policy).
"""

from ..files import FolderInUseError
from .codes import CodesFile, load_codes, save_codes, smallest_uint_dtype
from .manifest import iter_shards, load_manifest, verify_shards
from .mapper import TokenizeBatch
from .runtime import ModelInfo, prepare_for_inference
from .tokenize import TokenizeOptions, TokenizeResult, tokenize_dataset

__all__ = [
    "CodesFile",
    "load_codes",
    "save_codes",
    "smallest_uint_dtype",
    "iter_shards",
    "load_manifest",
    "verify_shards",
    "TokenizeBatch",
    "FolderInUseError",
    "ModelInfo",
    "prepare_for_inference",
    "TokenizeOptions",
    "TokenizeResult",
    "tokenize_dataset",
]
