"""Code grids <-> flat token ids for sequence models, with optional BOS/EOS tokens.

A tokenizer turns an image into a grid of codes `[h, w]` in `[0, codebook_size)`. A
language-model-style generator wants flat sequences of token ids. `TokenLayout` fixes
the mapping once, so that training and sampling agree:

    token id of code c          = offset + c            (row-major over the grid)
    BOS (when `bos`)            = offset + codebook_size
    EOS (when `eos`)            = offset + codebook_size + bos
    vocab_size                  = offset + codebook_size + bos + eos

`offset` lets codes share a vocabulary with other tokens (text, class labels) placed
below them.

Example:
    >>> layout = TokenLayout(codebook_size=256, grid_size=8, bos=True, eos=True)
    >>> tokens = layout.to_tokens(codes)      # int64 [B, 1 + 64 + 1]
    >>> codes = layout.to_codes(tokens)       # int64 [B, 8, 8]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ViTVQConfig

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32)


@dataclass(frozen=True)
class TokenLayout:
    """How a `[h, w]` code grid is laid out as a flat sequence of token ids.

    Args:
        codebook_size: number of codes K.
        grid_size: codes per side (h = w = grid_size).
        bos: prepend a begin-of-sequence token.
        eos: append an end-of-sequence token.
        offset: token id of code 0 (ids below it are left to other uses).

    Raises:
        ValueError: non-positive sizes or a negative offset.
    """

    codebook_size: int
    grid_size: int
    bos: bool = False
    eos: bool = False
    offset: int = 0

    def __post_init__(self) -> None:
        for name in ("codebook_size", "grid_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TokenLayout.{name} must be a positive int, got {value!r}")
        if not isinstance(self.offset, int) or isinstance(self.offset, bool) or self.offset < 0:
            raise ValueError(f"TokenLayout.offset must be an int >= 0, got {self.offset!r}")

    @classmethod
    def for_config(cls, config: ViTVQConfig, *, bos: bool = False, eos: bool = False, offset: int = 0) -> TokenLayout:
        """The layout for a tokenizer config (its codebook size and grid)."""
        return cls(codebook_size=config.codebook_size, grid_size=config.grid_size, bos=bos, eos=eos, offset=offset)

    # -- ids -------------------------------------------------------------------------
    @property
    def num_codes(self) -> int:
        """Codes per image: `grid_size ** 2`."""
        return self.grid_size**2

    @property
    def seq_len(self) -> int:
        """Tokens per image, BOS/EOS included."""
        return self.num_codes + int(self.bos) + int(self.eos)

    @property
    def bos_id(self) -> int | None:
        return self.offset + self.codebook_size if self.bos else None

    @property
    def eos_id(self) -> int | None:
        return self.offset + self.codebook_size + int(self.bos) if self.eos else None

    @property
    def vocab_size(self) -> int:
        """Smallest vocabulary that holds every id of this layout (ids below `offset` included)."""
        return self.offset + self.codebook_size + int(self.bos) + int(self.eos)

    @property
    def special_ids(self) -> list[int]:
        """The BOS/EOS ids in use (to suppress them when sampling code positions)."""
        return [i for i in (self.bos_id, self.eos_id) if i is not None]

    # -- conversion ------------------------------------------------------------------
    def to_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """Code grids int `[B, h, w]` (or `[B, h*w]`) -> token ids int64 `[B, seq_len]`.

        Raises:
            TypeError: non-integer codes. ValueError: wrong grid or codes outside `[0, codebook_size)`.
        """
        codes = self._check_int(codes, "codes")
        g = self.grid_size
        if codes.ndim == 3 and tuple(codes.shape[1:]) == (g, g):
            flat = codes.reshape(codes.shape[0], g * g)  # (B, h*w)
        elif codes.ndim == 2 and codes.shape[1] == g * g:
            flat = codes
        else:
            raise ValueError(f"expected codes of shape [B, {g}, {g}] or [B, {g * g}], got {tuple(codes.shape)}")
        flat = flat.long()
        if flat.numel():
            lo, hi = int(flat.min()), int(flat.max())
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(f"codes must be in [0, {self.codebook_size}), got values in [{lo}, {hi}]")
        parts = []
        if self.bos:
            parts.append(flat.new_full((flat.shape[0], 1), self.bos_id))
        parts.append(flat + self.offset)
        if self.eos:
            parts.append(flat.new_full((flat.shape[0], 1), self.eos_id))
        return torch.cat(parts, dim=1)  # (B, seq_len)

    def to_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids int `[B, L]` -> code grids int64 `[B, h, w]`.

        `L` is `seq_len` (BOS/EOS present where the layout has them) or `num_codes`
        (bare code tokens, e.g. a sampler's new tokens). BOS/EOS positions are checked.

        Raises:
            TypeError: non-integer ids.
            ValueError: a wrong length, a missing BOS/EOS, or a code position holding an id
                that is not a code (e.g. a sampled EOS).
        """
        tokens = self._check_int(tokens, "tokens")
        if tokens.ndim != 2 or tokens.shape[1] not in (self.seq_len, self.num_codes):
            raise ValueError(
                f"expected token ids of shape [B, {self.seq_len}] (with BOS/EOS) or [B, {self.num_codes}], "
                f"got {tuple(tokens.shape)}"
            )
        tokens = tokens.long()
        if tokens.shape[1] == self.seq_len and self.seq_len != self.num_codes:
            if self.bos and not bool((tokens[:, 0] == self.bos_id).all()):
                raise ValueError(f"expected BOS id {self.bos_id} at position 0 of every sequence")
            if self.eos and not bool((tokens[:, -1] == self.eos_id).all()):
                raise ValueError(f"expected EOS id {self.eos_id} at the last position of every sequence")
            tokens = tokens[:, int(self.bos) : int(self.bos) + self.num_codes]
        codes = tokens - self.offset  # (B, h*w)
        if codes.numel():
            bad = (codes < 0) | (codes >= self.codebook_size)
            if bool(bad.any()):
                row, col = (int(i) for i in bad.nonzero()[0])
                raise ValueError(
                    f"token id {int(tokens[row, col])} at sequence {row}, code position {col} is not a code id "
                    f"(codes are [{self.offset}, {self.offset + self.codebook_size})); "
                    f"suppress ids {self.special_ids or 'outside that range'} when sampling code positions"
                )
        return codes.view(codes.shape[0], self.grid_size, self.grid_size)

    @staticmethod
    def _check_int(t: torch.Tensor, name: str) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"expected {name} as an integer torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _INT_DTYPES:
            raise TypeError(f"expected integer {name} (e.g. torch.int64), got dtype {t.dtype}")
        return t


def codes_to_tokens(
    codes: torch.Tensor, codebook_size: int, *, bos: bool = False, eos: bool = False, offset: int = 0
) -> torch.Tensor:
    """Functional form of `TokenLayout.to_tokens` for square grids `[B, g, g]` (or `[B, g*g]`)."""
    g = codes.shape[-1] if codes.ndim == 3 else math.isqrt(codes.shape[-1])
    return TokenLayout(codebook_size, g, bos=bos, eos=eos, offset=offset).to_tokens(codes)


def tokens_to_codes(
    tokens: torch.Tensor, codebook_size: int, grid_size: int, *, bos: bool = False, eos: bool = False, offset: int = 0
) -> torch.Tensor:
    """Functional form of `TokenLayout.to_codes`."""
    return TokenLayout(codebook_size, grid_size, bos=bos, eos=eos, offset=offset).to_codes(tokens)


__all__ = ["TokenLayout", "codes_to_tokens", "tokens_to_codes"]
