"""`LookupFreeQuantizer`: LFQ (MAGVIT-v2, Yu et al. 2023), one bit per latent channel.

A latent `[..., d]` becomes the code `sign(z)` in {-1, +1}^d; its index is the bits `z_i > 0`
read with the first channel least significant, `index = sum_i [z_i > 0] 2^i` (vit_vq's FSQ order:
LFQ is FSQ with every level 2). vector-quantize-pytorch's `LFQ` reads the first channel as the
MOST significant bit, so its indices are these with the d bits reversed.

The entropy penalty (the paper's): `entropy_weight * (H_sample - diversity_weight * H_batch)`, where,
with `p(c | z) = softmax_c(-|z - c|^2 / temperature)` over the 2^d codes,
- `H_sample` is the mean over latents of the entropy of `p(. | z)` (pushes each latent to one code);
- `H_batch` is the entropy of the batch's mean distribution (pushes the batch to use every code).

How it is computed without 2^d probabilities per latent:
- `|z - c|^2` is a sum over channels, so `p(. | z)` is a product of per-bit Bernoullis with
  `P(bit i = 1) = sigmoid(4 z_i / temperature)`. `H_sample` is therefore exactly the sum of binary
  entropies, from `logsigmoid` (finite for any z, no `log 0`).
- `H_batch` needs the mean of products, which does not factorise. Its exact value comes from
  splitting the bits in two halves A and B: `mean_p[a, b] = (1/N) sum_n pA[n, a] pB[n, b]`, one
  `[2^|A|, N] @ [N, 2^|B|]` matmul, so the largest tensors are `N x 2^(d/2)` and the `2^d` mean
  itself. This is exact up to `EXACT_ENTROPY_BITS` = 16 bits (N x 256 and 65536 floats). Above that
  the bits are cut into the fewest near-equal groups of at most 16 bits and `H_batch` is the sum of
  the groups' exact entropies: an upper bound (a joint entropy is at most the sum of its parts'),
  which is tight when the groups are used independently and which, maximised, still spreads every
  group's codes out (Open-MAGVIT2's factorised 2^18 codebook is the same idea).
- All of it in float32 with autocast off, so fp16/bf16 training gives no NaN (vector-quantize-pytorch #85).

Distributed: in training, `H_batch` uses the global batch (the group means are all-reduced), and
its gradient is scaled so that, after DDP averages the ranks' gradients, it equals one process's
gradient on the concatenated batch. Eval mode runs no collectives. There is no codebook state:
`update_codebook()` is a no-op and the module has no `state_dict` entries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .config import ViTVQConfig
from .fsq import _autocast_device, code_metrics
from .ops import LookupPrecision
from .quantizer import QuantizerOutput

EXACT_ENTROPY_BITS = 16  # H_batch is exact up to this many bits; above, a sum over groups of at most this many


class LookupFreeQuantizer(nn.Module):
    """LFQ over `bits` channels and `2^bits` implicit codes `{-1, +1}^bits`.

    Build it from a tokenizer config with `quantizer="lfq"` (`LookupFreeQuantizer(config)`: `bits` is
    `codebook_dim`, the weights are `commitment_beta` and the `lfq_*` fields) or standalone,
    `LookupFreeQuantizer(bits=12)`. The same interface as `VectorQuantizer`.

    Args:
        config: a `ViTVQConfig` with `quantizer="lfq"`.
        bits: code dimension d; `2^bits` codes (standalone form).
        commitment_beta, entropy_weight, diversity_weight, temperature: standalone settings, default
            `ViTVQConfig`'s `commitment_beta`, `lfq_entropy_weight`, `lfq_diversity_weight`, `lfq_temperature`.

    Raises:
        TypeError: both a config and settings, neither a config nor `bits`, or a config of another type.
        ValueError: a config whose quantizer is not "lfq", or settings out of range (see `ViTVQConfig`).
    """

    def __init__(
        self,
        config: ViTVQConfig | None = None,
        *,
        bits: int | None = None,
        commitment_beta: float | None = None,
        entropy_weight: float | None = None,
        diversity_weight: float | None = None,
        temperature: float | None = None,
    ) -> None:
        super().__init__()
        settings = {"commitment_beta": commitment_beta, "lfq_entropy_weight": entropy_weight,
                    "lfq_diversity_weight": diversity_weight, "lfq_temperature": temperature}  # fmt: skip
        settings = {k: v for k, v in settings.items() if v is not None}
        if config is not None and (settings or bits is not None):
            given = sorted(settings) or ["bits"]
            raise TypeError(f"LookupFreeQuantizer takes a config or keyword settings, not both; got a config and {given}")
        if config is None:
            if bits is None:
                raise TypeError("LookupFreeQuantizer needs a config or bits=, e.g. LookupFreeQuantizer(bits=12)")
            if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 22:
                raise ValueError(f"bits must be an int in [1, 22] (at most 2^22 codes, vit_vq.config.MAX_SIZES), got {bits!r}")
            config = ViTVQConfig(quantizer="lfq", codebook_size=2**bits, codebook_dim=bits, **settings)
        if not isinstance(config, ViTVQConfig):
            raise TypeError(f"LookupFreeQuantizer(config) expects a ViTVQConfig, got {type(config).__name__}")
        if config.quantizer != "lfq":
            raise ValueError(f"LookupFreeQuantizer needs a config with quantizer='lfq', got {config.quantizer!r}")
        self.bits = config.codebook_dim
        self.codebook_size = config.codebook_size
        self.commitment_beta = config.commitment_beta
        self.entropy_weight = config.lfq_entropy_weight
        self.diversity_weight = config.lfq_diversity_weight
        self.temperature = config.lfq_temperature
        self.auto_update = True  # the trainer sets it; LFQ has nothing to update either way
        self.register_buffer("place", 2 ** torch.arange(self.bits, dtype=torch.int64), persistent=False)  # (d,)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, entropy_weight={self.entropy_weight:g}, diversity_weight={self.diversity_weight:g}"

    # -- lookup ----------------------------------------------------------------------
    def prepare(self, z: torch.Tensor) -> torch.Tensor:
        """Latents in float32 (LFQ needs no normalisation)."""
        return z.float()

    def lookup(self, z: torch.Tensor, precision: LookupPrecision = "exact") -> torch.Tensor:
        """Indices for latents `[..., d]` -> int64 `[...]`: the bits `z_i > 0`, the first channel least significant.

        `precision` is accepted for the common interface; LFQ takes signs, it does no search.
        """
        self._check(z)
        return ((z.detach() > 0).long() * self.place).sum(-1)

    def embed_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Code values for int64 indices `[...]` -> float32 `[..., d]` in {-1, +1} (no codebook table)."""
        bits = torch.bitwise_and(indices.long().unsqueeze(-1), self.place) > 0  # (..., d)
        return bits.float() * 2 - 1

    # -- forward ---------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize latents `[..., d]`: `quantized = sign(z)` (+1 for z > 0, else -1), straight through.

        `commit_loss` is `commitment_beta * |z - sg(sign z)|^2`; `codebook_loss` holds the entropy
        penalty (LFQ has no codebook to move; this is the term that shapes code use).
        """
        self._check(z)
        with torch.autocast(device_type=_autocast_device(z), enabled=False):
            z = self.prepare(z)
            flat = z.reshape(-1, self.bits)  # (N, d)
            q = torch.where(flat > 0, 1.0, -1.0)
            quantized = flat + (q - flat).detach()  # straight-through
            indices = ((flat.detach() > 0).long() * self.place).sum(-1)
            if flat.shape[0] == 0:
                commit_loss = flat.sum() * 0
            else:
                commit_loss = self.commitment_beta * F.mse_loss(flat, q)
            if self.entropy_weight > 0:
                sample, batch = entropy_terms(flat, self.temperature, global_batch=self.training)
                codebook_loss = self.entropy_weight * (sample - self.diversity_weight * batch)
            else:
                codebook_loss = flat.sum() * 0
            metrics = code_metrics(indices, self.codebook_size)
        return QuantizerOutput(
            quantized=quantized.view(z.shape), indices=indices.view(z.shape[:-1]),
            codebook_loss=codebook_loss, commit_loss=commit_loss, metrics=metrics,
        )  # fmt: skip

    def update_codebook(self) -> None:
        """A no-op: LFQ's codes are fixed."""

    def _check(self, z: torch.Tensor) -> None:
        if z.ndim < 1 or z.shape[-1] != self.bits:
            raise ValueError(f"expected latents [..., {self.bits}] (one channel per LFQ bit), got {tuple(z.shape)}")


def bit_groups(bits: int) -> list[tuple[int, int]]:
    """`[start, stop)` channel ranges whose batch entropies are summed: one group up to `EXACT_ENTROPY_BITS`."""
    count = math.ceil(bits / EXACT_ENTROPY_BITS)
    edges = [round(i * bits / count) for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def entropy_terms(z: torch.Tensor, temperature: float, *, global_batch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`(H_sample, H_batch)` in nats for float32 latents `[N, d]`; see the module docstring.

    `global_batch=True` takes `H_batch` over every rank's latents (a collective under
    `torch.distributed`; every rank must call it). An empty batch gives zeros.
    """
    logit = 4 * z.float() / temperature  # (N, d): log P(bit=1) - log P(bit=0)
    log_one, log_zero = F.logsigmoid(logit), F.logsigmoid(-logit)
    bit_entropy = -(log_one.exp() * log_one + log_zero.exp() * log_zero)  # (N, d)
    sample = bit_entropy.sum(1).sum() / max(z.shape[0], 1)
    sums = [_group_sum(log_one[:, a:b], log_zero[:, a:b]) for a, b in bit_groups(z.shape[1])]  # each (2^g1, 2^g2)
    count = torch.tensor(float(z.shape[0]), device=z.device)
    if global_batch and distributed.is_distributed():
        flat = torch.cat([s.detach().reshape(-1) for s in sums] + [count.view(1), torch.ones(1, device=z.device)])
        distributed.all_reduce_sum_(flat)
        count, ranks = flat[-2], flat[-1]
        offset, reduced = 0, []
        for s in sums:  # the global value; the local gradient times the rank count (DDP then averages)
            total = flat[offset : offset + s.numel()].view_as(s)
            reduced.append(total + ranks * (s - s.detach()))
            offset += s.numel()
        sums = reduced
    batch = z.new_zeros(())
    if float(count) > 0:
        for s in sums:
            p = s / count
            batch = batch - (p * torch.log(p.clamp(min=1e-30))).sum()
    return sample, batch


def _group_sum(log_one: torch.Tensor, log_zero: torch.Tensor) -> torch.Tensor:
    """`sum_n p(code | z_n)` over one group's `2^g` codes, as `[2^g1, 2^g2]` (rows: the low g1 bits).

    Each half's code probabilities are `exp` of a sum of per-bit log-probabilities (`[N, 2^half]`), and
    the sum over latents of their outer products is one matmul.
    """
    g = log_one.shape[1]
    g1 = (g + 1) // 2
    halves = []
    for lo, hi in ((0, g1), (g1, g)):
        codes = torch.arange(2 ** (hi - lo), device=log_one.device)
        bits = ((codes.unsqueeze(1) >> torch.arange(hi - lo, device=log_one.device)) & 1).float()  # (2^h, h)
        log_p = log_one[:, lo:hi] @ bits.T + log_zero[:, lo:hi] @ (1 - bits).T  # (N, 2^h)
        halves.append(log_p.exp())
    return halves[0].T @ halves[1]  # (2^g1, 2^g2)
