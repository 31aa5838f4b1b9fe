"""`TokenizeBatch`: a picklable callable that codes a batch of images, for data engines.

It plugs into `datasets.Dataset.map(batched=True)` and Ray Data's `map_batches` (as a
callable class, so each actor loads the model once). The model is loaded lazily on
the first call, and pickling drops the loaded copy: only the model name, the settings and
a fingerprint of the weights travel (to workers, and into `datasets`' cache fingerprint,
so changed weights in the same folder are never answered from the cache).

Input batch: a dict of columns; `image_column` holds encoded image bytes (Ray's
`read_binary_files`), `datasets` `{"bytes", "path"}` dicts (`Image(decode=False)`), file
paths, PIL images, numpy `[H, W, C]` arrays (or one `[B, H, W, C]` array) or tensors
`[C, H, W]`. Output: a dict with one row per input row:

    codes   [B, h, w] in the smallest unsigned dtype for the codebook (zeros where not ok); under
            resize="native" / "budget" (grids of many shapes) a list of B uint arrays `[h_i, w_i]`
            (`[0, 0]` where not ok), which Ray stores as a variable-shaped tensor column and `datasets`
            as nested lists
    shape   (native / budget only) [B, 2] int64: each row's grid `(h, w)` (`(0, 0)` where not ok)
    ok      [B] bool: the image was readable (and of the right size under resize="none")
    error   [B] str: why not ("" when ok), starting with the row (`row 17 (photos/x.jpg): ...`: the
            dataset's row index under `map_dataset` or `map(..., with_indices=True)`, else the
            position in the batch, and the cell's file path when it has one)
    ...     plus any `passthrough` columns, copied unchanged (Ray replaces the batch; datasets merges)

A corrupt image is a row with `ok=False` as long as it reaches `TokenizeBatch` undecoded:
`datasets` decodes an `Image()` column before calling the function (and raises on a corrupt
file), so use `TokenizeBatch.map_dataset`, which reads the column undecoded.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import load_image, load_image_cell
from ..preprocess import to_tensor
from ..tokenizer import ViTVQTokenizer
from .batching import check_batch_tokens, encode_images
from .codes import smallest_uint_dtype, to_storage
from .runtime import ModelInfo, load_tokenizer, prepare_for_inference, weights_fingerprint
from .sources import RESIZE_MODES, WHOLE_IMAGE_MODES, ImageSizer, ResizeMode

# What one unreadable row may raise; anything else (a bug, a broken model) still stops the job.
ROW_ERRORS = (ValueError, TypeError, OSError, MemoryError, RuntimeError)


def _decode_image(value: Any) -> torch.Tensor:
    """One cell of an image column -> float `[3, H, W]` in [0, 1].

    Raises:
        ValueError: unreadable bytes or file, an empty cell. TypeError: an unsupported value.
    """
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        return load_image_cell(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return load_image(io.BytesIO(value))
    if isinstance(value, (str, Path)):
        return load_image(value)
    return to_tensor(value)


def _row_name(value: Any, position: int, indices: Sequence[int] | None) -> str:
    """`row 17` (the dataset index, else `batch row 3`), plus ` (path)` when the cell names a file."""
    name = f"row {int(indices[position])}" if indices is not None else f"batch row {position}"
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, (str, Path)) else None
    return f"{name} ({path})" if path else name


class TokenizeBatch:
    """Code a batch of images; see the module docstring for the columns.

    Args:
        model: `vit_vq:default`, a Hub id or a folder (loaded lazily on first call, through
            `ViTVQTokenizer.from_pretrained`), or a `ViTVQTokenizer`.
        image_column: the column with the images.
        passthrough: columns copied to the output (e.g. `("path", "label")` under Ray).
        revision: Hub revision. device: `"auto"`, `"cpu"`, `"cuda"`, ...
        precision: `"auto"` (bf16 on CUDA, else fp32), `"fp32"`, `"bf16"`, `"fp16"`.
        compile: `torch.compile` the encoder on first use.
        resize: `"crop"` (resize short side + center crop), `"native"` (whole image, short side to the
            model's, or `short_side`), `"budget"` (whole image, largest size within the token budget) or
            `"none"` (other sizes -> `ok=False`); see `sources.ImageSizer`. An image over the model's token
            budget is a row with `ok=False`.
        short_side: the short side (`"native"`) or square side (`"crop"`) in pixels.
        batch_tokens: tokens per forward pass (`batching`); a batch of many shapes is coded in passes
            of one shape each.

    Raises:
        ValueError: an unknown `resize`. KeyError (on call): a missing image or passthrough column.

    Example:
        >>> ds = TokenizeBatch("org/tokenizer").map_dataset(ds, batch_size=64)
    """

    def __init__(
        self,
        model: str | ViTVQTokenizer,
        *,
        image_column: str = "image",
        passthrough: Sequence[str] = (),
        revision: str | None = None,
        device: str = "auto",
        precision: str = "auto",
        compile: bool = False,
        resize: ResizeMode = "crop",
        short_side: int | None = None,
        batch_tokens: int | None = None,
    ) -> None:
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        ImageSizer(1, resize, short_side=short_side)  # the same checks as on first call, now
        self.short_side, self.batch_tokens = short_side, check_batch_tokens(batch_tokens)
        self.model = model
        self.image_column = image_column
        self.passthrough = tuple(passthrough)
        self.revision, self.device, self.precision, self.compile, self.resize = revision, device, precision, compile, resize
        self._tok: ViTVQTokenizer | None = None
        self._info: ModelInfo | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tok"] = state["_info"] = None  # workers reload from `model`
        if not isinstance(self.model, ViTVQTokenizer):  # an in-memory model pickles its weights itself
            state["_weights"] = weights_fingerprint(str(self.model), self.revision)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.pop("_weights", None)  # only there for fingerprints (datasets' cache)
        self.__dict__.update(state)

    def _load(self) -> tuple[ViTVQTokenizer, ModelInfo]:
        if self._tok is None:
            if isinstance(self.model, ViTVQTokenizer):
                tok, model_id = self.model, "<in-memory>"
            else:
                tok, model_id = load_tokenizer(str(self.model), revision=self.revision), str(self.model)
            self._tok, self._info = prepare_for_inference(
                tok, model_id=model_id, revision=self.revision, device=self.device,
                precision=self.precision, compile=self.compile,
            )
        return self._tok, self._info  # type: ignore[return-value]

    @property
    def info(self) -> ModelInfo:
        """Provenance of the codes (loads the model if needed)."""
        return self._load()[1]

    def __call__(self, batch: dict[str, Any], indices: Sequence[int] | None = None) -> dict[str, Any]:
        """Code `batch[image_column]`; returns `codes`, `ok`, `error` and the passthrough columns.

        `indices` are the rows' indices in the dataset (`datasets`' `with_indices=True`), named in errors.
        """
        tok, _ = self._load()
        for name in (self.image_column, *self.passthrough):
            if name not in batch:
                raise KeyError(f"batch has no column {name!r}; its columns are {sorted(batch)}")
        images = batch[self.image_column]
        cfg = tok.config
        sizer = ImageSizer(cfg.image_size, self.resize, patch_size=cfg.patch_size, max_tokens=cfg.token_budget,
                           short_side=self.short_side)
        pixels, rows, errors = [], [], []
        for i in range(len(images)):
            try:
                img, _ = sizer.fit(_decode_image(images[i]))
            except ROW_ERRORS as err:  # ValueErrors say what they are; others are named
                reason = str(err)[:500] if isinstance(err, ValueError) else f"{type(err).__name__}: {str(err)[:500]}"
                errors.append(f"{_row_name(images[i], i, indices)}: {reason}")
                continue
            pixels.append(img)
            rows.append(i)
            errors.append("")
        grids = encode_images(tok, pixels, batch_size=max(1, len(pixels)), batch_tokens=self.batch_tokens,
                              out_device="cpu")  # (h, w) each
        shape = np.zeros((len(images), 2), dtype=np.int64)
        shape[rows] = [tuple(g.shape) for g in grids] if grids else np.zeros((0, 2), np.int64)
        dtype = smallest_uint_dtype(cfg.codebook_size)
        out: dict[str, Any] = {name: batch[name] for name in self.passthrough}
        if self.resize in WHOLE_IMAGE_MODES:
            codes: Any = [np.zeros((0, 0), dtype=dtype) for _ in range(len(images))]
            for i, grid in zip(rows, grids, strict=True):
                codes[i] = to_storage(grid, cfg.codebook_size)
            out["shape"] = shape
        else:
            side = sizer.size // cfg.patch_size
            codes = np.zeros((len(images), side, side), dtype=dtype)
            if grids:
                codes[rows] = to_storage(torch.stack(grids), cfg.codebook_size)
        out.update(codes=codes, ok=np.array([e == "" for e in errors], dtype=bool),
                   error=np.array(errors, dtype=object))
        return out

    def map_dataset(self, ds: Any, *, batch_size: int = 64, **map_kwargs: Any) -> Any:
        """`ds.map(self, batched=True, ...)` for a `datasets.Dataset` or `DatasetDict`, corrupt rows included.

        An `Image()` column is read undecoded (`Image(decode=False)`) so that `TokenizeBatch`
        decodes it and turns a corrupt image into `ok=False`, then cast back: the result has
        the input's columns and features plus `codes`, `ok` and `error`.
        """
        import datasets

        if isinstance(ds, datasets.DatasetDict):
            return datasets.DatasetDict({k: self.map_dataset(v, batch_size=batch_size, **map_kwargs) for k, v in ds.items()})
        feature = ds.features.get(self.image_column)
        decoded = isinstance(feature, datasets.Image) and feature.decode
        if decoded:
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        out = ds.map(self, batched=True, batch_size=batch_size, with_indices=True, **map_kwargs)
        return out.cast_column(self.image_column, feature) if decoded else out


__all__ = ["TokenizeBatch"]
