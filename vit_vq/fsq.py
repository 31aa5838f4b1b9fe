"""`FiniteScalarQuantizer`: FSQ (Mentzer et al. 2023), a fixed grid of codes with nothing to learn.

Each of the D = `len(levels)` latent channels is bounded with `tanh` and rounded to one of
`levels[i]` values; the code is the tuple of rounded values and its index is mixed-radix, the
first channel least significant:

    index = d_0 + L_0 * (d_1 + L_1 * (d_2 + ...)),   d_i in [0, L_i) the i-th rounded value + L_i // 2

(the order of vector-quantize-pytorch's `FSQ`, so the two give identical indices). Code values are
`d_i - L_i // 2` divided by `L_i // 2`, in [-1, 1].

Design:
- The bound is the paper's: `tanh(z + shift) * h - offset` with `h = (L - 1)(1 + 1e-3) / 2`, and
  for even L the half-step `offset = 1/2` and `shift = atanh(offset / h)`, so that even levels
  round to L values, not L + 1, and z = 0 sits inside a cell.
- Bounding, rounding and the index are float32 with autocast off, and the digits are clamped to
  [0, L) as integers: a bf16 or fp16 input gives in-range indices (vector-quantize-pytorch #107).
- No `prod(levels) x D` table is ever built: `embed_codes` decodes indices digit by digit (#137).
- Rounding has a straight-through gradient: `quantized` equals the code values and its gradient
  reaches z through the bound, `d quantized / d z = tanh'(z + shift) * h / (L // 2)`.
- Nothing to learn, no state: `update_codebook()` is a no-op, `dead_codes` is 0, there is nothing
  to synchronise across ranks, and the module has no `state_dict` entries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .config import ViTVQConfig
from .ops import LookupPrecision
from .quantizer import QuantizerOutput

BOUND_EPS = 1e-3  # the paper's margin: tanh never quite reaches an outer level's rounding edge


class FiniteScalarQuantizer(nn.Module):
    """FSQ over `len(levels)` channels and `prod(levels)` implicit codes.

    Build it from a tokenizer config with `quantizer="fsq"` (`FiniteScalarQuantizer(config)`, levels
    from `config.fsq_levels`) or standalone, `FiniteScalarQuantizer(levels=[8, 5, 5, 5])` (1000 codes
    of dimension 4). The same interface as `VectorQuantizer`: `forward` -> `QuantizerOutput`,
    `prepare`, `lookup`, `embed_codes`, `update_codebook`.

    Args:
        config: a `ViTVQConfig` with `quantizer="fsq"`.
        levels: values per channel, each >= 2 (standalone form).

    Raises:
        TypeError: both or neither of `config` and `levels`, or a config of another type.
        ValueError: a config whose quantizer is not "fsq", or levels that are not ints >= 2 (see
            `ViTVQConfig`).
    """

    def __init__(self, config: ViTVQConfig | None = None, *, levels: Sequence[int] | None = None) -> None:
        super().__init__()
        if (config is None) == (levels is None):
            raise TypeError("FiniteScalarQuantizer takes a config or levels=, e.g. FiniteScalarQuantizer(levels=[8, 5, 5, 5])")
        if config is None:
            levels = list(levels)  # validated as the tokenizer config validates them
            config = ViTVQConfig(quantizer="fsq", fsq_levels=levels, codebook_size=math.prod(levels), codebook_dim=len(levels))
        if not isinstance(config, ViTVQConfig):
            raise TypeError(f"FiniteScalarQuantizer(config) expects a ViTVQConfig, got {type(config).__name__}")
        if config.quantizer != "fsq":
            raise ValueError(f"FiniteScalarQuantizer needs a config with quantizer='fsq', got {config.quantizer!r}")
        self.levels_list = list(config.fsq_levels)
        self.codebook_size = config.codebook_size
        self.codebook_dim = config.codebook_dim
        self.auto_update = True  # the trainer sets it; FSQ has nothing to update either way
        levels_t = torch.tensor(self.levels_list, dtype=torch.int64)
        basis = torch.tensor([math.prod(self.levels_list[:i]) for i in range(len(self.levels_list))], dtype=torch.int64)
        half = [(L - 1) * (1 + BOUND_EPS) / 2 for L in self.levels_list]
        offset = [0.5 if L % 2 == 0 else 0.0 for L in self.levels_list]
        shift = [math.atanh(o / h) for o, h in zip(offset, half, strict=True)]
        self.register_buffer("levels", levels_t, persistent=False)  # (D,)
        self.register_buffer("basis", basis, persistent=False)  # (D,) mixed-radix place values
        self.register_buffer("half_width", levels_t // 2, persistent=False)  # (D,) int
        self.register_buffer("_half", torch.tensor(half, dtype=torch.float32), persistent=False)
        self.register_buffer("_offset", torch.tensor(offset, dtype=torch.float32), persistent=False)
        self.register_buffer("_shift", torch.tensor(shift, dtype=torch.float32), persistent=False)

    def _apply(self, fn, recurse=True):
        """Moves follow `.to(device)`; the float32 bound constants stay float32 under `.half()` / `.to(bf16)`."""
        kept = {name: getattr(self, name) for name in ("_half", "_offset", "_shift")}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        return f"levels={self.levels_list}, codebook_size={self.codebook_size}"

    # -- lookup ----------------------------------------------------------------------
    def prepare(self, z: torch.Tensor) -> torch.Tensor:
        """Latents in float32 (FSQ needs no normalisation)."""
        return z.float()

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """float32 `[..., D]` -> bounded values whose rounding gives each channel's digit minus `L // 2`."""
        return torch.tanh(z + self._shift) * self._half - self._offset

    def _digits(self, bounded: torch.Tensor) -> torch.Tensor:
        """Bounded values -> int64 digits `[..., D]` in [0, L)."""
        digits = torch.round(bounded).long() + self.half_width
        return torch.minimum(digits.clamp(min=0), self.levels - 1)

    def lookup(self, z: torch.Tensor, precision: LookupPrecision = "exact") -> torch.Tensor:
        """Indices for prepared latents `[..., D]` -> int64 `[...]` in [0, codebook_size).

        `precision` is accepted for the common interface; FSQ rounds, it does no search.
        """
        self._check(z)
        with torch.autocast(device_type=_autocast_device(z), enabled=False):
            digits = self._digits(self.bound(z.detach().float()))
        return (digits * self.basis).sum(-1)

    def indices_to_digits(self, indices: torch.Tensor) -> torch.Tensor:
        """int64 indices `[...]` -> digits `[..., D]` in [0, L) (the first channel least significant)."""
        return torch.div(indices.long().unsqueeze(-1), self.basis, rounding_mode="floor") % self.levels

    def embed_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Code values for int64 indices `[...]` -> float32 `[..., D]` in [-1, 1] (no codebook table)."""
        digits = self.indices_to_digits(indices)
        return (digits - self.half_width).float() / self.half_width.float()

    # -- forward ---------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize latents `[..., D]`; `quantized` are the code values with a straight-through gradient.

        Both losses are zero (FSQ has no codebook and needs no commitment); the metrics are
        `perplexity` and `usage` of this batch's codes and `dead_codes` (always 0).
        """
        self._check(z)
        with torch.autocast(device_type=_autocast_device(z), enabled=False):
            z = self.prepare(z)
            bounded = self.bound(z)  # (..., D)
            rounded = bounded + (torch.round(bounded) - bounded).detach()  # straight-through rounding
            quantized = rounded / self.half_width.float()
            digits = self._digits(bounded.detach())
            indices = (digits * self.basis).sum(-1)
            zero = z.sum() * 0  # a graph-connected zero: backward through it is harmless
            metrics = code_metrics(indices, self.codebook_size)
        return QuantizerOutput(
            quantized=quantized, indices=indices, codebook_loss=zero, commit_loss=zero.clone(), metrics=metrics
        )

    def update_codebook(self) -> None:
        """A no-op: FSQ's codes are fixed."""

    def _check(self, z: torch.Tensor) -> None:
        if z.ndim < 1 or z.shape[-1] != self.codebook_dim:
            raise ValueError(f"expected latents [..., {self.codebook_dim}] (one channel per FSQ level), got {tuple(z.shape)}")


def code_metrics(indices: torch.Tensor, codebook_size: int) -> dict[str, torch.Tensor]:
    """`perplexity` and `usage` of a batch's codes, and `dead_codes` = 0 (an implicit codebook has none to restart).

    The counts are `bincount` over `codebook_size` (4 bytes a code); perplexity is exp of the entropy of the
    batch's code frequencies.
    """
    counts = torch.bincount(indices.reshape(-1), minlength=codebook_size).float()
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p * torch.log(p.clamp(min=1e-12))).sum()
    return {
        "perplexity": entropy.exp(),
        "usage": (counts > 0).float().mean(),
        "dead_codes": torch.zeros((), device=counts.device),
    }


def _autocast_device(z: torch.Tensor) -> str:
    return z.device.type if z.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
