"""Forward passes within an activation budget: code grids of one shape per pass, at most `batch_size`
images and `batch_tokens` tokens per pass, in input order on the way out.

Activation memory grows with the tokens in a forward pass. Two bounds keep it known:

- one image: `ViTVQConfig.token_budget` tokens (the model refuses more, before any forward);
- one pass: `batch_tokens` tokens, `DEFAULT_BATCH_TOKENS` (2**16 = `MAX_GRID_SIZE ** 2`, the most
  tokens one image of any vit_vq model can have) unless given. A pass takes
  `images_per_pass = max(1, min(batch_size, batch_tokens // tokens_per_image))` images of one
  shape, so a model with huge grids (a 256x256 grid is 2**16 tokens) codes and decodes one image
  at a time whatever `batch_size` says, and the default model at its 16x16 grid keeps its
  batches of 64.

Pixels waiting to be coded are bounded the same way: `lookahead` is how many images a pipeline
reads before grouping them by shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import MAX_GRID_SIZE, ViTVQConfig
from ..tokenizer import ViTVQTokenizer

DEFAULT_BATCH_TOKENS = MAX_GRID_SIZE**2
LOOKAHEAD = 4  # at mixed shapes, a pipeline reads up to this many passes' worth of images before grouping


def check_batch_tokens(batch_tokens: int | None) -> int:
    """`batch_tokens`, or `DEFAULT_BATCH_TOKENS` for None.

    Raises:
        ValueError: not a positive int.
    """
    if batch_tokens is None:
        return DEFAULT_BATCH_TOKENS
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ValueError(f"batch_tokens must be a positive int, got {batch_tokens!r}")
    return batch_tokens


def images_per_pass(tokens_per_image: int, batch_size: int, batch_tokens: int | None = None) -> int:
    """How many images of `tokens_per_image` tokens one forward pass takes: at least 1."""
    return max(1, min(batch_size, check_batch_tokens(batch_tokens) // max(1, tokens_per_image)))


def lookahead(config: ViTVQConfig, batch_size: int, batch_tokens: int | None = None, *, uniform: bool = True) -> int:
    """Images a pipeline reads at once: one pass's worth at the native grid when every image has it
    (`uniform`), else up to `LOOKAHEAD` passes' worth of images at the token budget (at least 1)."""
    if uniform:
        return images_per_pass(config.num_tokens, batch_size, batch_tokens)
    per_pass = check_batch_tokens(batch_tokens) // config.token_budget
    return max(1, min(LOOKAHEAD * batch_size, LOOKAHEAD * per_pass))


def shape_chunks(
    shapes: Sequence[tuple[int, int]], batch_size: int, batch_tokens: int | None = None
) -> list[list[int]]:
    """Positions of `shapes` (token grids `(h, w)`) grouped by shape in first-seen order, each group cut
    into passes of `images_per_pass(h * w, ...)` positions (in input order within a group)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault((int(shape[0]), int(shape[1])), []).append(i)
    chunks = []
    for (h, w), positions in groups.items():
        n = images_per_pass(h * w, batch_size, batch_tokens)
        chunks += [positions[s : s + n] for s in range(0, len(positions), n)]
    return chunks


def encode_images(
    tok: ViTVQTokenizer,
    images: torch.Tensor | Sequence[torch.Tensor],
    *,
    batch_size: int,
    batch_tokens: int | None = None,
    out_device: torch.device | str | None = None,
) -> list[torch.Tensor]:
    """Images (`[B, 3, H, W]`, or a list of `[3, H, W]` of any shapes) -> one int64 `[H/p, W/p]` grid per
    image, in input order, coded in passes of `shape_chunks`, on `out_device` (default: the tokenizer's;
    one copy per pass).

    Raises:
        see `ViTVQTokenizer.encode` (a grid over `config.token_budget` before its pass runs).
    """
    p = tok.config.patch_size
    device = next(tok.parameters()).device
    items = list(images)
    out: list[torch.Tensor] = [torch.empty(0)] * len(items)
    for chunk in shape_chunks([(t.shape[-2] // p, t.shape[-1] // p) for t in items], batch_size, batch_tokens):
        if isinstance(images, torch.Tensor):  # one shape: the chunks are consecutive slices, no copy
            x = images[chunk[0] : chunk[-1] + 1]
        else:
            x = torch.stack([items[i] for i in chunk])
        codes = tok.encode(x.to(device, non_blocking=True))  # (n, h, w)
        if out_device is not None:
            codes = codes.to(out_device)
        for j, i in enumerate(chunk):
            out[i] = codes[j]
    return out


def decode_grids(
    tok: ViTVQTokenizer, grids: Sequence[torch.Tensor], *, batch_size: int, batch_tokens: int | None = None
) -> list[torch.Tensor]:
    """Code grids int `[h, w]` of any shapes -> float images `[3, h*p, w*p]` in [0, 1], in input order,
    decoded in passes of `shape_chunks`.

    Raises:
        see `ViTVQTokenizer.decode`.
    """
    device = next(tok.parameters()).device
    out: list[torch.Tensor] = [torch.empty(0)] * len(grids)
    for chunk in shape_chunks([tuple(g.shape) for g in grids], batch_size, batch_tokens):
        images = tok.decode(torch.stack([grids[i] for i in chunk]).to(device))  # (n, 3, h*p, w*p)
        for j, i in enumerate(chunk):
            out[i] = images[j]
    return out


__all__ = [
    "DEFAULT_BATCH_TOKENS",
    "LOOKAHEAD",
    "check_batch_tokens",
    "images_per_pass",
    "lookahead",
    "shape_chunks",
    "encode_images",
    "decode_grids",
]
