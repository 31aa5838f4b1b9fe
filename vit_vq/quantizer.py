"""`VectorQuantizer`: nearest code, straight-through gradient, EMA codebook, restarts, k-means init.

Design:
- `forward` only *accumulates* EMA statistics (counts via `bincount`, sums via `index_add_`);
  `update_codebook()` applies them. With `auto_update=True` (default) `forward` calls it in
  training mode, so a plain loop works; a trainer turns it off and calls it once per
  optimizer step, which keeps gradient accumulation exact.
- All EMA state is in buffers; with `use_ema` the codebook itself is a buffer, so no
  optimizer ever sees it.
- Under `torch.distributed`, `update_codebook()` all-reduces the statistics in one
  bucketed call and restart/k-means choices are made on rank 0 and broadcast, so
  codebooks stay bitwise identical across ranks. Eval mode runs no collectives.
- Codebook math is float32 whatever the autocast or module dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D
from .config import ViTVQConfig
from .ops import codebook_statistics, nearest_code


@dataclass
class QuantizerOutput:
    """Result of `VectorQuantizer.forward` for latents `[..., D]`.

    quantized: `[..., D]` code vectors with a straight-through gradient to the input.
    indices: int64 `[...]`.
    codebook_loss: `||sg(z) - e||^2` (moves a learnable codebook; no gradient under EMA).
    commit_loss: `beta * ||z - sg(e)||^2` (moves the encoder).
    metrics: `perplexity`, `usage` (fraction of codes used in the batch), `dead_codes`.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    codebook_loss: torch.Tensor
    commit_loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class VectorQuantizer(nn.Module):
    """Vector quantizer over a `[codebook_size, codebook_dim]` codebook.

    Args:
        config: the tokenizer config (codebook size/dim, l2, beta, EMA, dead-code, k-means).
        auto_update: call `update_codebook()` at the end of every training `forward`.
        restart_pool: how many recent encoder outputs to keep for dead-code restarts.
    """

    def __init__(self, config: ViTVQConfig, *, auto_update: bool = True, restart_pool: int | None = None):
        super().__init__()
        self.config = config
        self.auto_update = auto_update
        K, Dm = config.codebook_size, config.codebook_dim
        init = torch.randn(K, Dm)
        init = F.normalize(init, dim=1) if config.l2_normalize else init * Dm**-0.5
        if config.use_ema:
            self.register_buffer("embed", init)
        else:
            self.embed = nn.Parameter(init)
        # usage EMA (all modes) and sum EMA (EMA mode). They start at zero, so the first
        # update_codebook() restarts every code the first batch left unused from encoder
        # outputs: a cheap data-dependent init.
        self.register_buffer("ema_count", torch.zeros(K))
        self.register_buffer("ema_sum", torch.zeros(K, Dm) if config.use_ema else torch.zeros(0))
        self.register_buffer("initialized", torch.tensor(not config.kmeans_init))
        # scratch accumulators between updates
        self.register_buffer("acc_count", torch.zeros(K), persistent=False)
        self.register_buffer("acc_sum", torch.zeros(K, Dm) if config.use_ema else torch.zeros(0), persistent=False)
        pool = restart_pool or max(K, 4096)
        self.register_buffer("recent", torch.zeros(pool, Dm), persistent=False)
        self.register_buffer("recent_len", torch.zeros((), dtype=torch.int64), persistent=False)
        self._kmeans_samples: list[torch.Tensor] = []

    _FP32_STATE = ("embed", "ema_count", "ema_sum", "acc_count", "acc_sum", "recent")

    def _apply(self, fn, recurse=True):
        """Moves follow `.to(device)`, but codebook state stays float32 under `.half()` / `.to(bf16)`.

        Rounding the codebook to 16 bits would silently change which code is nearest.
        """
        before = {name: getattr(self, name).detach() for name in self._FP32_STATE}  # keeps the fp32 storage
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:  # a dtype cast: keep the float32 values, follow the device
                kept = old.detach().to(new.device)
                if isinstance(new, nn.Parameter):
                    new.data = kept
                else:
                    self._buffers[name] = kept
        return self

    # -- lookup ----------------------------------------------------------------------
    @property
    def metric(self) -> str:
        return "cosine" if self.config.l2_normalize else "l2"

    def codebook(self) -> torch.Tensor:
        """The float32 codebook as used for lookup (`[K, D]`, unit rows when l2-normalised)."""
        e = self.embed.float()
        return F.normalize(e, dim=1) if self.config.l2_normalize and not self.config.use_ema else e

    def prepare(self, z: torch.Tensor) -> torch.Tensor:
        """Latents in float32, l2-normalised when the config says so."""
        z = z.float()
        return F.normalize(z, dim=-1) if self.config.l2_normalize else z

    def lookup(self, z: torch.Tensor, precision: Literal["exact", "fast"] = "exact") -> torch.Tensor:
        """Nearest-code indices for prepared latents `[..., D]` -> int64 `[...]`.

        `precision="fast"` lets the GPU kernel use tf32 matrix units (see `nearest_code`).
        """
        flat = z.reshape(-1, z.shape[-1])
        idx = nearest_code(flat.detach(), self.codebook().detach(), metric=self.metric, precision=precision)
        return idx.view(z.shape[:-1])

    def embed_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for int64 indices `[...]` -> float32 `[..., D]`."""
        return F.embedding(indices, self.codebook())

    # -- forward ---------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize latents `[..., D]`; accumulates EMA statistics in training mode."""
        device_type = z.device.type if z.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            z = self.prepare(z)
            flat = z.reshape(-1, z.shape[-1])  # (N, D)
            if self.training:
                self._observe(flat.detach())
            codebook = self.codebook()  # (K, D) float32
            idx = nearest_code(flat.detach(), codebook.detach(), metric=self.metric)  # (N,)
            e = F.embedding(idx, codebook)  # (N, D)
            codebook_loss = F.mse_loss(e, flat.detach())
            commit_loss = self.config.commitment_beta * F.mse_loss(flat, e.detach())
            quantized = flat + (e - flat).detach()  # straight-through
            if self.training and self.config.use_ema:
                counts, sums = codebook_statistics(idx, flat.detach(), self.config.codebook_size)
                self.acc_sum += sums
            else:
                counts = torch.bincount(idx, minlength=self.config.codebook_size).float()
            if self.training:
                self.acc_count += counts
            metrics = self._metrics(counts)
        if self.training and self.auto_update:
            self.update_codebook()
        return QuantizerOutput(
            quantized=quantized.view(z.shape),
            indices=idx.view(z.shape[:-1]),
            codebook_loss=codebook_loss,
            commit_loss=commit_loss,
            metrics=metrics,
        )

    def _metrics(self, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        p = counts / counts.sum().clamp(min=1)
        entropy = -(p * torch.log(p.clamp(min=1e-12))).sum()
        return {
            "perplexity": entropy.exp(),
            "usage": (counts > 0).float().mean(),
            "dead_codes": self.dead_mask().sum().float(),
        }

    def dead_mask(self) -> torch.Tensor:
        """Codes whose usage EMA is below `dead_code_threshold` times the mean code's usage."""
        return self.ema_count < self.config.dead_code_threshold * self.ema_count.mean()

    def _observe(self, flat: torch.Tensor) -> None:
        """Remember recent encoder outputs (restart pool) and k-means samples."""
        pool = self.recent.shape[0]
        take = flat[-pool:] if flat.shape[0] > pool else flat
        n = take.shape[0]
        start = int(self.recent_len) % pool
        first = min(n, pool - start)
        self.recent[start : start + first] = take[:first]
        if first < n:
            self.recent[: n - first] = take[first:]
        self.recent_len += n
        if not bool(self.initialized):
            self._kmeans_samples.append(flat.clone())

    # -- codebook update -------------------------------------------------------------
    @torch.no_grad()
    def update_codebook(self) -> None:
        """Apply accumulated statistics: EMA (Laplace-smoothed), dead-code restart, re-normalise.

        Call once per optimizer step on every rank. Under `torch.distributed` this
        all-reduces the statistics in one call and broadcasts rank 0's restart choices.
        A no-op outside training-time accumulation (nothing accumulated).
        """
        cfg = self.config
        if not bool(self.initialized) and self._maybe_kmeans_init():
            # statistics gathered against the old random codebook would blur the fresh centers
            self.acc_count.zero_()
            self.acc_sum.zero_()
            return
        D.all_reduce_sum_(self.acc_count, self.acc_sum)
        if float(self.acc_count.sum()) == 0:
            return
        decay = cfg.ema_decay
        self.ema_count.lerp_(self.acc_count, 1 - decay)
        if cfg.use_ema:
            self.ema_sum.lerp_(self.acc_sum, 1 - decay)
            n = self.ema_count.sum()
            smoothed = (self.ema_count + cfg.ema_eps) / (n + cfg.codebook_size * cfg.ema_eps) * n
            new = self.ema_sum / smoothed.unsqueeze(1)
            used = self.ema_count > 0  # never-used codes keep their vector until restarted
            new = F.normalize(new, dim=1) if cfg.l2_normalize else new
            self.embed.copy_(torch.where(used.unsqueeze(1), new, self.embed))
        self.acc_count.zero_()
        self.acc_sum.zero_()
        self._restart_dead_codes()

    def _restart_dead_codes(self) -> None:
        dead = self.dead_mask()
        num_dead = int(dead.sum())
        available = min(int(self.recent_len), self.recent.shape[0])
        if num_dead == 0 or available == 0:
            return
        # sampled on rank 0, broadcast: identical on every rank
        choice = torch.randint(available, (num_dead,), device=self.recent.device)
        vectors = self.recent[choice].clone()
        D.broadcast_(vectors, src=0)
        mean = self.ema_count.mean()
        self.embed.data[dead] = vectors.to(self.embed.dtype)
        self.ema_count[dead] = mean
        if self.config.use_ema:
            self.ema_sum[dead] = vectors * mean

    def _maybe_kmeans_init(self) -> bool:
        """Run k-means once every rank holds >= K samples; True when it ran (same answer on every rank)."""
        K = self.config.codebook_size
        have = sum(s.shape[0] for s in self._kmeans_samples)
        device = self.embed.device
        if D.all_reduce_min(have, device) < K:
            return False
        centers = torch.empty_like(self.embed, dtype=torch.float32)
        if D.rank() == 0:
            samples = torch.cat(self._kmeans_samples)
            centers = kmeans(samples, K, self.config.kmeans_iters, spherical=self.config.l2_normalize)
        D.broadcast_(centers, src=0)
        self.embed.data.copy_(centers.to(self.embed.dtype))
        self.ema_count.fill_(1.0)
        if self.config.use_ema:
            self.ema_sum.copy_(centers)
        self.initialized.fill_(True)
        self._kmeans_samples.clear()
        return True


def kmeans(samples: torch.Tensor, k: int, iters: int, *, spherical: bool) -> torch.Tensor:
    """Lloyd's k-means on `[N, D]` float32 samples (N >= k) -> `[k, D]` centers.

    Empty clusters keep their previous center. `spherical` re-normalises centers.
    """
    samples = samples.float()
    centers = samples[torch.randperm(samples.shape[0], device=samples.device)[:k]].clone()
    metric = "cosine" if spherical else "l2"
    for _ in range(iters):
        idx = nearest_code(samples, centers, metric=metric)
        counts, sums = codebook_statistics(idx, samples, k)
        filled = counts > 0
        centers[filled] = sums[filled] / counts[filled].unsqueeze(1)
        if spherical:
            centers = F.normalize(centers, dim=1)
    return centers
