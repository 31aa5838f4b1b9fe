"""Code grids <-> flat token ids for sequence models, with optional BOS/EOS and conditioning tokens.

A tokenizer turns an image into a grid of codes `[h, w]` in `[0, codebook_size)`. A
language-model-style generator wants flat sequences of token ids. `TokenLayout` fixes
the mapping once, so that training and sampling agree:

    token id of code c          = offset + c            (row-major over the grid)
    BOS (when `bos`)            = offset + codebook_size
    EOS (when `eos`)            = offset + codebook_size + bos
    conditioning value k        = offset + codebook_size + bos + eos + k    (0 <= k < num_conditions)
    vocab_size                  = offset + codebook_size + bos + eos + num_conditions

    a sequence                  = [BOS] cond_1 .. cond_n  c_0 .. c_{h*w-1}  [EOS]     (n = condition_len)

Conditioning tokens (a class label, an aspect-ratio bucket, ...) sit after BOS and before the
codes, so that `prompt(conditions)` -- BOS and the conditions -- is what a sampler starts from.
`offset` lets codes share a vocabulary with other tokens (text) placed below them.

Example:
    >>> layout = TokenLayout(codebook_size=256, grid_size=8, bos=True, eos=True)
    >>> tokens = layout.to_tokens(codes)      # int64 [B, 1 + 64 + 1]
    >>> codes = layout.to_codes(tokens)       # int64 [B, 8, 8]; also takes BOS + codes (a `generate` output)
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
        num_conditions: distinct conditioning values (e.g. 1000 class labels, or classes x aspect
            buckets); each gets one token id above the codes and BOS/EOS.
        condition_len: conditioning tokens per sequence, between BOS and the codes (0: unconditional).

    Raises:
        ValueError: non-positive sizes, a negative offset or count, or conditioning tokens per sequence
            without conditioning values.
    """

    codebook_size: int
    grid_size: int
    bos: bool = False
    eos: bool = False
    offset: int = 0
    num_conditions: int = 0
    condition_len: int = 0

    def __post_init__(self) -> None:
        for name in ("codebook_size", "grid_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TokenLayout.{name} must be a positive int, got {value!r}")
        for name in ("offset", "num_conditions", "condition_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TokenLayout.{name} must be an int >= 0, got {value!r}")
        if self.condition_len and not self.num_conditions:
            raise ValueError(f"TokenLayout.condition_len={self.condition_len} needs num_conditions >= 1 (the values "
                             "a conditioning token can take), got num_conditions=0")

    @classmethod
    def for_config(
        cls, config: ViTVQConfig, *, bos: bool = False, eos: bool = False, offset: int = 0, num_conditions: int = 0,
        condition_len: int = 0,
    ) -> TokenLayout:
        """The layout for a tokenizer config (its codebook size and grid)."""
        return cls(codebook_size=config.codebook_size, grid_size=config.grid_size, bos=bos, eos=eos, offset=offset,
                   num_conditions=num_conditions, condition_len=condition_len)

    # -- ids -------------------------------------------------------------------------
    @property
    def num_codes(self) -> int:
        """Codes per image: `grid_size ** 2`."""
        return self.grid_size**2

    @property
    def prefix_len(self) -> int:
        """Tokens before the codes: BOS (when `bos`) and the `condition_len` conditioning tokens."""
        return int(self.bos) + self.condition_len

    @property
    def seq_len(self) -> int:
        """Tokens per image, BOS, conditioning tokens and EOS included."""
        return self.prefix_len + self.num_codes + int(self.eos)

    @property
    def bos_id(self) -> int | None:
        return self.offset + self.codebook_size if self.bos else None

    @property
    def eos_id(self) -> int | None:
        return self.offset + self.codebook_size + int(self.bos) if self.eos else None

    @property
    def condition_offset(self) -> int:
        """Token id of conditioning value 0."""
        return self.offset + self.codebook_size + int(self.bos) + int(self.eos)

    @property
    def vocab_size(self) -> int:
        """Smallest vocabulary that holds every id of this layout (ids below `offset` included)."""
        return self.condition_offset + self.num_conditions

    @property
    def special_ids(self) -> list[int]:
        """The BOS/EOS ids in use."""
        return [i for i in (self.bos_id, self.eos_id) if i is not None]

    @property
    def non_code_ids(self) -> list[int]:
        """Every id of the vocabulary that is not a code (below `offset`, BOS/EOS, conditioning values):
        pass it as `suppress_tokens` when sampling code positions."""
        return [*range(self.offset), *self.special_ids, *range(self.condition_offset, self.vocab_size)]

    def condition_ids(self, conditions: torch.Tensor | list[int] | int) -> torch.Tensor:
        """Conditioning values (ints in `[0, num_conditions)`, shape `[B]` or `[B, condition_len]`) -> token ids
        int64 `[B, condition_len]`.

        Raises:
            TypeError: non-integer values. ValueError: a wrong shape, or values outside `[0, num_conditions)`.
        """
        values = torch.as_tensor(conditions)
        values = self._check_int(values, "conditions").long()
        if values.ndim == 0:
            values = values.view(1)
        if values.ndim == 1 and self.condition_len == 1:
            values = values[:, None]  # (B, 1)
        n = self.condition_len
        if n == 0 or values.ndim != 2 or values.shape[1] != n:
            raise ValueError(f"expected conditions of shape [B, {n}]{' or [B]' if n == 1 else ''} for a layout with "
                             f"condition_len={n}, got {tuple(values.shape)}")
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= self.num_conditions):
            raise ValueError(f"conditions must be in [0, {self.num_conditions}), got values in "
                             f"[{int(values.min())}, {int(values.max())}]")
        return values + self.condition_offset  # (B, condition_len)

    def prompt(self, conditions: torch.Tensor | list[int] | int | None = None, batch_size: int = 1) -> torch.Tensor:
        """What a sampler starts from: BOS and the conditioning tokens, int64 `[B, prefix_len]`.

        Pass it as `input_ids` to `generate(..., min_new_tokens=num_codes, max_new_tokens=num_codes,
        suppress_tokens=non_code_ids)`; `to_codes` takes the whole output. `batch_size` is used when the
        layout has no conditioning tokens.

        Raises:
            ValueError: conditions missing for a conditional layout, given for an unconditional one, or bad.
        """
        if self.condition_len == 0 and conditions is not None:
            raise ValueError("this layout has no conditioning tokens (condition_len=0); leave conditions out")
        if self.condition_len and conditions is None:
            raise ValueError(f"this layout starts with {self.condition_len} conditioning token(s): pass conditions")
        parts = []
        if conditions is not None:
            cond = self.condition_ids(conditions)  # (B, condition_len)
            batch_size = cond.shape[0]
        if self.bos:
            parts.append(torch.full((batch_size, 1), self.bos_id, dtype=torch.long))
        if conditions is not None:
            parts.append(cond)
        return torch.cat(parts, dim=1) if parts else torch.zeros(batch_size, 0, dtype=torch.long)  # (B, prefix_len)

    # -- conversion ------------------------------------------------------------------
    def to_tokens(self, codes: torch.Tensor, conditions: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """Code grids int `[B, h, w]` (or `[B, h*w]`) -> token ids int64 `[B, seq_len]`.

        `conditions` (`[B]` or `[B, condition_len]` values in `[0, num_conditions)`) are required exactly
        when the layout has conditioning tokens.

        Raises:
            TypeError: non-integer codes. ValueError: wrong grid, codes outside `[0, codebook_size)`, or
                conditions missing, unexpected or bad.
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
        prefix = self.prompt(conditions, batch_size=flat.shape[0]).to(flat.device)  # (B, prefix_len)
        if prefix.shape[0] != flat.shape[0]:
            raise ValueError(f"expected conditions for each of the {flat.shape[0]} code grids, got {prefix.shape[0]}")
        parts = [prefix, flat + self.offset]
        if self.eos:
            parts.append(flat.new_full((flat.shape[0], 1), self.eos_id))
        return torch.cat(parts, dim=1)  # (B, seq_len)

    def to_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids int `[B, L]` -> code grids int64 `[B, h, w]`.

        `L` is one of
          - `seq_len`: a whole sequence (BOS, conditioning tokens and EOS where the layout has them);
          - `seq_len - 1` when the layout has EOS: the sequence without it -- what `generate` returns
            when it starts from `prompt()` and stops after `num_codes` new tokens;
          - `num_codes`: bare code tokens (e.g. only a sampler's new tokens).
        BOS, conditioning and EOS positions are checked; the conditioning values are not returned.

        Raises:
            TypeError: non-integer ids.
            ValueError: a wrong length, a missing BOS/EOS, a conditioning position that holds no
                conditioning id, or a code position holding an id that is not a code (e.g. a sampled EOS).
        """
        tokens = self._check_int(tokens, "tokens")
        full, no_eos = self.seq_len, self.prefix_len + self.num_codes
        lengths = sorted({full, no_eos, self.num_codes})
        if tokens.ndim != 2 or tokens.shape[1] not in lengths:
            parts = ("BOS" if self.bos else "", f"{self.condition_len} conditioning" if self.condition_len else "",
                     f"{self.num_codes} codes", "EOS" if self.eos else "")
            raise ValueError(
                f"expected token ids of shape [B, L] with L in {lengths} ({' + '.join(p for p in parts if p)}, "
                f"the same without EOS, or the codes alone), got {tuple(tokens.shape)}"
            )
        tokens = tokens.long()
        if tokens.shape[1] != self.num_codes or self.num_codes == no_eos:
            if self.eos and tokens.shape[1] == full and not bool((tokens[:, -1] == self.eos_id).all()):
                raise ValueError(f"expected EOS id {self.eos_id} at the last position of every sequence")
            if self.bos and not bool((tokens[:, 0] == self.bos_id).all()):
                raise ValueError(f"expected BOS id {self.bos_id} at position 0 of every sequence")
            cond = tokens[:, int(self.bos) : self.prefix_len]  # (B, condition_len)
            if cond.numel() and bool(((cond < self.condition_offset) | (cond >= self.vocab_size)).any()):
                raise ValueError(f"expected conditioning ids in [{self.condition_offset}, {self.vocab_size}) at "
                                 f"positions {int(self.bos)}..{self.prefix_len - 1} of every sequence")
            tokens = tokens[:, self.prefix_len : self.prefix_len + self.num_codes]
        codes = tokens - self.offset  # (B, h*w)
        if codes.numel():
            bad = (codes < 0) | (codes >= self.codebook_size)
            if bool(bad.any()):
                row, col = (int(i) for i in bad.nonzero()[0])
                raise ValueError(
                    f"token id {int(tokens[row, col])} at sequence {row}, code position {col} is not a code id "
                    f"(codes are [{self.offset}, {self.offset + self.codebook_size})); "
                    f"suppress {_ids_text(self.non_code_ids) or 'ids outside that range'} when sampling code positions "
                    "(layout.non_code_ids)"
                )
        return codes.view(codes.shape[0], self.grid_size, self.grid_size)

    @staticmethod
    def _check_int(t: torch.Tensor, name: str) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"expected {name} as an integer torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _INT_DTYPES:
            raise TypeError(f"expected integer {name} (e.g. torch.int64), got dtype {t.dtype}")
        return t


def _ids_text(ids: list[int]) -> str:
    """`ids [16, 17]`, or `ids [0, 1, 2]...[1017, 1018, 1019] (1020 ids)` for long lists, for error messages."""
    if len(ids) <= 8:
        return f"ids {ids}" if ids else ""
    return f"ids {ids[:3]}...{ids[-3:]} ({len(ids)} ids)"


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
