"""The codes file written by `vit-vq encode` and read by `vit-vq decode`.

A codes file is one safetensors file, codes in the smallest unsigned dtype that holds
`codebook_size - 1`, and string metadata (JSON values). Two layouts:

- every grid has one shape (any square run, and any run whose images came out one shape):
  format 2, one tensor `codes` `[N, h, w]` and metadata `grid` `[h, w]`. Exactly what vit_vq
  wrote before grids of many shapes, so older vit_vq versions read these files;
- grids of several shapes (`--resize native` / `budget` over images of several aspect ratios):
  format 3, two tensors, `codes` `[T]` (every grid row-major, one after another in image order,
  `T = sum(h_i * w_i)`) and `shapes` `[N, 2]` (each grid's `(h_i, w_i)`), and metadata
  `token_budget` (the tokenizer's tokens-per-image bound when written) instead of `grid`.
  Older vit_vq versions refuse them ("upgrade vit_vq").

Metadata of both:

    format            "vit_vq.codes"      format_version   "2" or "3"
    names             ["a.png", ...]      grid [h, w] (2) or token_budget 4096 (3)
    codebook_size     8192                image_size       256
    model_id, revision, config_hash       (which tokenizer made the codes)
    decoder_hash                          (the decoding weights as loaded, whatever the precision)
    lookup_backend, lookup_precision, precision, vit_vq_version

`load_codes` returns int64 codes (`CodesFile.grids`: one `[h_i, w_i]` grid per image, any format)
and refuses files that are not codes files, with one line naming the file and the key: unknown
tensors, shapes that do not add up to the codes, sides below 1, grids over the recorded
`token_budget` or over `MAX_GRID_SIZE ** 2` tokens, codes out of range. Format 1 files still
load; their `decoder_hash` was taken after the cast to the compute precision, so it cannot be
compared with today's and is dropped (`None`) with a warning.
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
from ..config import MAX_GRID_SIZE, MAX_SIZES
from ..files import atomic_write
from .runtime import ModelInfo

CODES_FORMAT = "vit_vq.codes"
CODES_FORMAT_VERSION = 3  # 2: decoder_hash taken before the precision cast; 3: grids of several shapes
UNIFORM_FORMAT_VERSION = 2  # what a file whose grids share one shape is written as
MAX_GRID_TOKENS = MAX_GRID_SIZE**2  # the largest token budget any config allows


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
    """A loaded codes file: one name and one int64 grid per image, and the producer.

    `codes` is the stored tensor as int64: `[N, h, w]` when every grid has one shape (formats 1, 2),
    else (format 3) the flat `[T]` concatenation of the grids, whose shapes are `shapes` `[N, 2]`.
    `grids` gives each image's `[h_i, w_i]` grid whatever the layout.
    """

    codes: torch.Tensor
    names: list[str]
    codebook_size: int
    image_size: int
    model: ModelInfo
    vit_vq_version: str
    format_version: int = UNIFORM_FORMAT_VERSION
    shapes: torch.Tensor | None = None  # int64 [N, 2] for the flat layout (format 3), else None
    token_budget: int | None = None  # format 3: the tokens-per-image bound recorded by the writer

    @property
    def weights_checkable(self) -> bool:
        """Whether the file records the decoder weights that made it (format 1's hash cannot be compared)."""
        return bool(self.model.decoder_hash)

    @property
    def grid_shapes(self) -> list[tuple[int, int]]:
        """Each image's grid `(h, w)`, in order."""
        if self.shapes is None:
            return [(int(self.codes.shape[1]), int(self.codes.shape[2]))] * int(self.codes.shape[0])
        return [(int(h), int(w)) for h, w in self.shapes.tolist()]

    @property
    def uniform(self) -> bool:
        """Whether every grid has one shape (then `codes` is `[N, h, w]`)."""
        return self.shapes is None or len(set(self.grid_shapes)) <= 1

    @property
    def grid(self) -> tuple[int, int]:
        """The one grid shape of a uniform file.

        Raises:
            ValueError: grids of several shapes (read `grids` / `grid_shapes`).
        """
        shapes = set(self.grid_shapes)
        if len(shapes) > 1:
            raise ValueError(f"the codes file holds grids of {len(shapes)} shapes; read .grids or .grid_shapes")
        if self.shapes is None:
            return int(self.codes.shape[1]), int(self.codes.shape[2])
        return shapes.pop() if shapes else (0, 0)

    @property
    def grids(self) -> list[torch.Tensor]:
        """One int64 `[h_i, w_i]` grid per image, in order (views of `codes`)."""
        if self.shapes is None:
            return list(self.codes)
        shapes = self.grid_shapes
        parts = torch.split(self.codes, [h * w for h, w in shapes])
        return [part.view(h, w) for part, (h, w) in zip(parts, shapes, strict=True)]


def _as_grids(codes: torch.Tensor | Sequence[torch.Tensor], count: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """`(stacked [N, h, w] or None, the N grids)` of `codes` given as `[N, h, w]` or a list of `[h, w]`.

    Raises:
        ValueError: not 3-D / a grid not 2-D, or not one grid per name.
    """
    if isinstance(codes, torch.Tensor):
        if codes.ndim != 3 or codes.shape[0] != count:
            raise ValueError(f"expected codes [N, h, w] with N = {count} names, got {tuple(codes.shape)}")
        return codes, list(codes)
    grids = list(codes)
    if len(grids) != count or any(not isinstance(g, torch.Tensor) or g.ndim != 2 for g in grids):
        raise ValueError(f"expected {count} code grids [h, w] (one per name), got "
                         f"{[tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__ for g in grids][:5]}")
    if len({tuple(g.shape) for g in grids}) <= 1 and grids:
        return torch.stack(grids), grids
    return None, grids


def save_codes(
    path: str | Path,
    codes: torch.Tensor | Sequence[torch.Tensor],
    names: Sequence[str],
    *,
    info: ModelInfo,
    codebook_size: int,
    image_size: int,
    token_budget: int | None = None,
) -> Path:
    """Atomically write a codes file (format 2 when every grid has one shape, else format 3).

    Args:
        codes: int `[N, h, w]`, or N int `[h_i, w_i]` grids, in `[0, codebook_size)`.
        names: N image names (file names for `vit-vq decode` to reuse).
        token_budget: the tokenizer's `config.token_budget`, recorded by format 3 (default: the
            largest grid's tokens).

    Raises:
        ValueError: shape/name-count mismatch; a grid without tokens or over `token_budget`.
    """
    from safetensors.numpy import save_file

    from .. import __version__

    stacked, grids = _as_grids(codes, len(names))
    meta = {
        "format": CODES_FORMAT,
        "names": json.dumps(list(names)),
        "codebook_size": str(codebook_size),
        "image_size": str(image_size),
        **{k: json.dumps(v) for k, v in info.to_dict().items()},
        "vit_vq_version": __version__,
    }
    if stacked is not None or not grids:
        shape = [int(stacked.shape[1]), int(stacked.shape[2])] if stacked is not None else [0, 0]
        meta.update(format_version=str(UNIFORM_FORMAT_VERSION), grid=json.dumps(shape))
        array = stacked if stacked is not None else torch.zeros(0, 0, 0, dtype=torch.int64)
        tensors = {"codes": to_storage(array, codebook_size)}
    else:
        shapes = np.array([g.shape for g in grids], dtype=np.int64)  # (N, 2)
        tokens = shapes.prod(axis=1)
        budget = int(tokens.max()) if token_budget is None else int(token_budget)
        if int(shapes.min()) < 1 or int(tokens.max()) > budget:
            raise ValueError(f"every code grid must have between 1 and {budget} tokens (token_budget), "
                             f"got grids of {int(tokens.min())} to {int(tokens.max())}")
        meta.update(format_version=str(CODES_FORMAT_VERSION), token_budget=str(budget))
        flat = torch.cat([g.detach().cpu().reshape(-1) for g in grids])  # (T,)
        tensors = {"codes": to_storage(flat, codebook_size), "shapes": shapes}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_codes(path: str | Path) -> CodesFile:
    """Read a codes file written by `save_codes` (formats 1, 2 and 3).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file, or not a vit_vq codes file (missing tensor or metadata),
            a format newer than this library reads, or tensors and metadata that disagree (see the
            module docstring); one line naming the file and the key.
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
            if extra := sorted(set(f.keys()) - {"codes", "shapes"}):
                raise ValueError(f"{path} holds tensors other than 'codes' ({', '.join(map(repr, extra[:5]))}); a vit_vq "
                                 "codes file holds only its codes (and, in format 3, their grid 'shapes')")
            array = f.get_tensor("codes")
            shapes = f.get_tensor("shapes") if "shapes" in f.keys() else None
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
    if version < 2:  # always said: a format-1 file is also how a forged file would dodge the weights check
        why = "whose decoder_hash depends on the compute precision" if fields.get("decoder_hash") else "with no decoder_hash"
        warnings.warn(
            f"{path} was written by an older vit_vq (codes format {version}) {why}; the decoder weights cannot be "
            "checked (the config hash still is)",
            stacklevel=2,
        )
        fields["decoder_hash"] = None
    if array.dtype.kind not in "ui":  # float codes would be truncated silently by the int64 cast
        raise ValueError(f"{path}: codes must be stored as integers, got dtype {array.dtype}")
    budget = None
    if version >= 3:
        budget = _field(meta, "token_budget", source,
                        functools.partial(json_fields.integer_text, low=1, high=MAX_GRID_TOKENS))
        shapes = _check_shapes(path, shapes, array, len(names), budget)
    elif shapes is not None:
        raise ValueError(f"{path}: codes format {version} has no 'shapes' tensor (only format 3 does)")
    elif array.ndim != 3 or array.shape[0] != len(names):
        raise ValueError(f"{path}: codes of shape {array.shape} do not match {len(names)} names")
    elif len(names) and min(array.shape[1:]) < 1:
        raise ValueError(f"{path}: codes of shape {array.shape} hold grids with no tokens")
    if "grid" in meta and version < 3:
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
        shapes=None if shapes is None else torch.from_numpy(shapes),
        token_budget=budget,
    )


def _check_shapes(path: Path, shapes: np.ndarray | None, codes: np.ndarray, count: int, budget: int) -> np.ndarray:
    """Format 3's `shapes` tensor as int64 `[N, 2]`, checked against the flat `codes` and the budget.

    Raises:
        ValueError: a missing or non-integer tensor, a shape other than `[N, 2]`, `[T]` codes that are not
            1-D, a side below 1, a grid over `budget` tokens, or tokens that do not add up to `T`.
    """
    if shapes is None:
        raise ValueError(f"{path}: codes format 3 needs a 'shapes' tensor [N, 2] (each grid's h, w); it has none")
    if shapes.dtype.kind not in "ui":
        raise ValueError(f"{path}: tensor 'shapes' must hold integers, got dtype {shapes.dtype}")
    if shapes.ndim != 2 or shapes.shape != (count, 2):
        raise ValueError(f"{path}: tensor 'shapes' is {list(shapes.shape)} but {count} names need [{count}, 2]")
    if codes.ndim != 1:
        raise ValueError(f"{path}: codes format 3 stores tensor 'codes' flat [T], got shape {list(codes.shape)}")
    if shapes.size and (int(shapes.min()) < 1 or int(shapes.max()) > budget):
        raise ValueError(f"{path}: tensor 'shapes' holds sides in [{int(shapes.min())}, {int(shapes.max())}]; "
                         f"each side must be in [1, {budget}] (metadata 'token_budget')")
    shapes = shapes.astype(np.int64)  # sides <= 2**16: products fit
    tokens = shapes.prod(axis=1) if shapes.size else np.zeros(0, np.int64)
    if tokens.size and int(tokens.max()) > budget:
        i = int(tokens.argmax())
        raise ValueError(f"{path}: tensor 'shapes' row {i} is a {shapes[i, 0]}x{shapes[i, 1]} grid of {int(tokens[i])} "
                         f"tokens, over the file's token_budget of {budget}")
    if int(tokens.sum()) != codes.shape[0]:
        raise ValueError(f"{path}: tensor 'shapes' adds up to {int(tokens.sum())} codes but tensor 'codes' holds "
                         f"{codes.shape[0]}")
    return shapes


__all__ = [
    "CodesFile",
    "CODES_FORMAT_VERSION",
    "save_codes",
    "load_codes",
    "smallest_uint_dtype",
    "to_storage",
]
