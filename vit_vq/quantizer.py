"""`VectorQuantizer`: nearest code, straight-through or rotation-trick gradient, EMA codebook, restarts, k-means init.

Design:
- Built from a tokenizer config (`VectorQuantizer(config)`) or on its own with keyword settings
  (`VectorQuantizer(dim=8, codebook_size=256)`, for your own encoder); both become one
  `QuantizerConfig`, so the two constructions are the same module with the same numerics.
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
- Nothing a pending backward needs is written in place: with a learnable codebook and
  `auto_update`, the forward's graph uses a copy of the codebook, and restarts and k-means write
  the parameter in place (never through `.data`), so autograd's version check sees every write.
- Eval mode changes no state at all.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .config import DeadCodeRule, QuantizerGradient, ViTVQConfig
from .ops import LookupPrecision, codebook_statistics, nearest_code

RESTART_NOISE = 0.01  # noise on restart copies, relative to the pool's root-mean-square entry


@dataclass(frozen=True)
class QuantizerConfig:
    """The quantizer's own settings: the codebook fields of `ViTVQConfig`, same names and defaults.

    Validated by `ViTVQConfig` itself, so the bounds and ranges are the tokenizer's.

    Raises:
        ValueError: on a size outside (0, `MAX_SIZES`], a non-bool flag, a decay outside (0, 1), a
            weight, threshold or eps outside `FLOAT_RANGES`, or an unknown gradient or dead-code rule.
    """

    codebook_size: int
    codebook_dim: int
    l2_normalize: bool = True
    commitment_beta: float = 0.25
    use_ema: bool = True
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    dead_code_threshold: float = 0.03
    kmeans_init: bool = False
    kmeans_iters: int = 10
    quantizer_gradient: QuantizerGradient = "ste"
    dead_code_rule: DeadCodeRule = "relative"

    def __post_init__(self) -> None:
        # One source of truth: the tokenizer config validates these fields (types, ranges, bounds).
        try:
            ViTVQConfig(**dataclasses.asdict(self))
        except ValueError as err:
            raise ValueError(str(err).replace("ViTVQConfig.", "")) from None

    @classmethod
    def from_config(cls, config: ViTVQConfig) -> QuantizerConfig:
        """The quantizer fields of a tokenizer config."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


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

    Build it from a config, `VectorQuantizer(config)`, or with keyword settings named as the
    config fields, `VectorQuantizer(codebook_dim=8, codebook_size=256, l2_normalize=False)`;
    settings left out take `ViTVQConfig`'s defaults (cosine metric, EMA codebook).

    Args:
        config: a `ViTVQConfig` (the tokenizer's) or a `QuantizerConfig`.
        codebook_dim: code dimension D (keyword form).
        codebook_size: number of codes K (keyword form).
        l2_normalize: compare directions (the cosine metric: both sides l2-normalised) instead of
            plain l2 distances.
        commitment_beta: weight of the commitment loss `||z - sg(e)||^2`.
        use_ema: EMA codebook (a buffer) instead of a learnable one (a parameter, trained by the
            codebook loss).
        ema_decay: EMA decay in (0, 1).
        ema_eps: Laplace smoothing of the code counts.
        dead_code_threshold: codes whose usage EMA falls below this restart; see `dead_code_rule`.
        dead_code_rule: `"relative"` (the threshold times the mean code's usage) or `"absolute"`
            (the threshold itself, in latents per update).
        kmeans_init: initialise the codebook by k-means once K latents have been seen.
        kmeans_iters: Lloyd iterations of that k-means.
        quantizer_gradient: `"ste"` (straight-through) or `"rotation"` (the rotation trick).
        auto_update: call `update_codebook()` at the end of every training `forward`.
        restart_pool_size: how many recent encoder outputs to keep for dead-code restarts
            (the `restart_pool` buffer; default `max(codebook_size, 4096)`).

    The keywords of vit_vq 0.2, `dim`, `metric`, `gradient` and `restart_pool`, still work for
    this release, with a `DeprecationWarning`.

    Raises:
        TypeError: when both a config and keyword settings are given, or neither a config nor
            `dim` and `codebook_size`, or a config of another type.
        ValueError: on invalid settings (see `QuantizerConfig`).
    """

    def __init__(
        self,
        config: ViTVQConfig | QuantizerConfig | None = None,
        *,
        codebook_dim: int | None = None,
        codebook_size: int | None = None,
        l2_normalize: bool | None = None,
        commitment_beta: float | None = None,
        use_ema: bool | None = None,
        ema_decay: float | None = None,
        ema_eps: float | None = None,
        dead_code_threshold: float | None = None,
        dead_code_rule: DeadCodeRule | None = None,
        kmeans_init: bool | None = None,
        kmeans_iters: int | None = None,
        quantizer_gradient: QuantizerGradient | None = None,
        auto_update: bool = True,
        restart_pool_size: int | None = None,
        **deprecated: Any,
    ):
        super().__init__()
        settings = {
            "codebook_dim": codebook_dim, "codebook_size": codebook_size, "l2_normalize": l2_normalize,
            "commitment_beta": commitment_beta, "use_ema": use_ema, "ema_decay": ema_decay, "ema_eps": ema_eps,
            "dead_code_threshold": dead_code_threshold, "dead_code_rule": dead_code_rule,
            "kmeans_init": kmeans_init, "kmeans_iters": kmeans_iters, "quantizer_gradient": quantizer_gradient,
        }  # fmt: skip
        settings = {k: v for k, v in settings.items() if v is not None}
        restart_pool_size = _old_keywords(deprecated, settings, restart_pool_size)
        self.config = _quantizer_config(config, settings)
        self.auto_update = auto_update
        config = self.config
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
        if restart_pool_size is None:
            restart_pool_size = max(K, 4096)
        if isinstance(restart_pool_size, bool) or not isinstance(restart_pool_size, int) or restart_pool_size < 1:
            raise ValueError(f"restart_pool_size must be a positive int (latents kept for restarts), got {restart_pool_size!r}")
        self.register_buffer("restart_pool", torch.zeros(restart_pool_size, Dm), persistent=False)
        self.register_buffer("restart_pool_len", torch.zeros((), dtype=torch.int64), persistent=False)
        self._kmeans_samples: list[torch.Tensor] = []
        self._update_total = 0.0  # latents in the latest update_codebook() (the absolute rule's unit)

    _FP32_STATE = ("embed", "ema_count", "ema_sum", "acc_count", "acc_sum", "restart_pool")

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
        return self._lookup_form(self.embed)

    def _lookup_form(self, weight: torch.Tensor) -> torch.Tensor:
        e = weight.float()
        return F.normalize(e, dim=1) if self.config.l2_normalize and not self.config.use_ema else e

    def prepare(self, z: torch.Tensor) -> torch.Tensor:
        """Latents in float32, l2-normalised when the config says so."""
        z = z.float()
        return F.normalize(z, dim=-1) if self.config.l2_normalize else z

    def lookup(self, z: torch.Tensor, precision: LookupPrecision = "exact") -> torch.Tensor:
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
        """Quantize latents `[..., D]` (e.g. `[B, N, D]` from any encoder).

        Training mode accumulates codebook statistics (and with `auto_update` applies them);
        eval mode changes no state. `quantized` equals the chosen codes; its gradient reaches
        `z` straight through, or rotated and rescaled with `gradient="rotation"`.
        """
        if z.ndim < 1 or z.shape[-1] != self.config.codebook_dim:
            raise ValueError(f"expected latents [..., {self.config.codebook_dim}], got {tuple(z.shape)}")
        device_type = z.device.type if z.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            z = self.prepare(z)
            flat = z.reshape(-1, z.shape[-1])  # (N, D)
            if self.training:
                self._observe(flat.detach())
            weight = self.embed
            if self.training and self.auto_update and weight.requires_grad and torch.is_grad_enabled():
                weight = weight.clone()  # this forward's update writes `embed`; the backward needs these values
            codebook = self._lookup_form(weight)  # (K, D) float32
            idx = nearest_code(flat.detach(), codebook.detach(), metric=self.metric)  # (N,)
            e = F.embedding(idx, codebook)  # (N, D)
            if flat.shape[0] == 0:  # an empty batch: no loss (mse_loss of nothing is NaN), still a graph
                codebook_loss = commit_loss = flat.sum() + e.sum() * 0
            else:
                codebook_loss = F.mse_loss(e, flat.detach())
                commit_loss = self.config.commitment_beta * F.mse_loss(flat, e.detach())
            if self.config.quantizer_gradient == "rotation" and flat.requires_grad:  # same values, other gradient
                quantized = rotation_trick(flat, e.detach())
            else:
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

    def dead_level(self) -> torch.Tensor:
        """The usage EMA below which a code is dead: `dead_code_threshold` times the mean code's
        usage (relative rule), or `dead_code_threshold` latents per update (absolute rule).

        The usage EMA starts at zero, so in its first ~1/(1 - ema_decay) updates it undercounts
        every code. The absolute rule reads it in latents per update without that bias: a code's
        share of the EMA times the latents of the latest update (constant-size updates give
        exactly the bias-corrected EMA). Read raw, every code would be dead for ~70 updates.
        """
        threshold = self.config.dead_code_threshold
        if self.config.dead_code_rule == "relative":
            return threshold * self.ema_count.mean()
        total = self.ema_count.sum()
        if self._update_total > 0 and float(total) > 0:
            return threshold * total / self._update_total
        return torch.tensor(threshold, device=self.ema_count.device)

    def dead_mask(self) -> torch.Tensor:
        """Codes whose usage EMA is below `dead_level()`."""
        return self.ema_count < self.dead_level()

    def _observe(self, flat: torch.Tensor) -> None:
        """Remember recent encoder outputs (restart pool) and k-means samples."""
        pool = self.restart_pool.shape[0]
        take = flat[-pool:] if flat.shape[0] > pool else flat
        n = take.shape[0]
        start = int(self.restart_pool_len) % pool
        first = min(n, pool - start)
        self.restart_pool[start : start + first] = take[:first]
        if first < n:
            self.restart_pool[: n - first] = take[first:]
        self.restart_pool_len += n
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
        distributed.all_reduce_sum_(self.acc_count, self.acc_sum)
        if float(self.acc_count.sum()) == 0:
            return
        self._update_total = float(self.acc_count.sum())  # latents this update, on every rank
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
        available = min(int(self.restart_pool_len), self.restart_pool.shape[0])
        if num_dead == 0 or available == 0:
            return
        vectors = self._restart_vectors(num_dead, available)
        distributed.broadcast_(vectors, src=0)  # sampled on rank 0: identical on every rank
        # A restarted code starts at the mean code's usage, and never below the dead level, which
        # would make it dead on arrival and restart it again at the next update.
        start = torch.maximum(self.ema_count.mean(), self.dead_level())
        self.embed[dead] = vectors.to(self.embed.dtype)  # in place, so autograd's version check sees it
        self.ema_count[dead] = start
        if self.config.use_ema:
            self.ema_sum[dead] = vectors * start

    def _restart_vectors(self, count: int, available: int) -> torch.Tensor:
        """`[count, D]` restart vectors from the pool's first `available` rows, drawn without replacement.

        A pool smaller than `count` gives every row once, and noise-perturbed copies for the rest
        (noise `RESTART_NOISE` times the pool's root-mean-square entry), so no two restarts coincide.
        """
        pool = self.restart_pool[:available]
        order = torch.randperm(available, device=pool.device)
        if available >= count:
            return pool[order[:count]].clone()
        extra = pool[torch.randint(available, (count - available,), device=pool.device)]
        scale = RESTART_NOISE * pool.square().mean().sqrt().clamp(min=1e-6)
        extra = extra + scale * torch.randn_like(extra)
        if self.config.l2_normalize:
            extra = F.normalize(extra, dim=1)
        return torch.cat([pool[order], extra])

    def _maybe_kmeans_init(self) -> bool:
        """Run k-means once every rank holds >= K samples; True when it ran (same answer on every rank)."""
        K = self.config.codebook_size
        have = sum(s.shape[0] for s in self._kmeans_samples)
        device = self.embed.device
        if distributed.all_reduce_min(have, device) < K:
            return False
        centers = torch.empty_like(self.embed, dtype=torch.float32)
        if distributed.rank() == 0:
            samples = torch.cat(self._kmeans_samples)
            centers = kmeans(samples, K, self.config.kmeans_iters, spherical=self.config.l2_normalize)
        distributed.broadcast_(centers, src=0)
        self.embed.copy_(centers.to(self.embed.dtype))  # in place under no_grad: autograd's version check sees it
        self.ema_count.fill_(1.0)
        if self.config.use_ema:
            self.ema_sum.copy_(centers)
        self.initialized.fill_(True)
        self._kmeans_samples.clear()
        return True


def rotation_trick(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The rotation trick (Fifty et al. 2024): values `q`, gradient to `z` through `s R`.

    `R` is the rotation taking `z/|z|` to `q/|q|` in their common plane (two Householder
    reflections: `R = I - 2 w w^T + 2 v u^T` with `u = z/|z|`, `v = q/|q|`, `w = (u+v)/|u+v|`), and
    `s = |q|/|z|`; both are treated as constants, so the gradient w.r.t. `z` is `s R^T g`.
    The returned values are exactly `q`: `s R z` equals `q` only up to rounding, so it carries only the gradient.

    Args:
        z: float32 `[N, D]` encoder outputs (differentiated).
        q: float32 `[N, D]` chosen codes (not differentiated).
    """
    z_norm = torch.linalg.vector_norm(z.detach(), dim=1, keepdim=True).clamp(min=1e-12)  # (N, 1)
    q_norm = torch.linalg.vector_norm(q, dim=1, keepdim=True)
    u = z.detach() / z_norm
    v = q / q_norm.clamp(min=1e-12)
    w = F.normalize(u + v, dim=1)
    rotated = z - 2 * w * (w * z).sum(1, keepdim=True) + 2 * v * (u * z).sum(1, keepdim=True)  # (N, D): R z
    rotated = rotated * (q_norm / z_norm)
    return q + (rotated - rotated.detach())  # exactly q forward; rotated's gradient backward


def _quantizer_config(config: object, settings: dict) -> QuantizerConfig:
    """One `QuantizerConfig` from either construction; see `VectorQuantizer` for the errors."""
    if config is not None and settings:
        raise TypeError(f"VectorQuantizer takes a config or keyword settings, not both; got a config and {sorted(settings)}")
    if isinstance(config, QuantizerConfig):
        return config
    if isinstance(config, ViTVQConfig):
        return QuantizerConfig.from_config(config)
    if config is not None:
        raise TypeError(
            f"VectorQuantizer(config) expects a ViTVQConfig or QuantizerConfig, got {type(config).__name__}; "
            "for a standalone quantizer use keywords, e.g. VectorQuantizer(codebook_dim=8, codebook_size=256)"
        )
    missing = [key for key in ("codebook_dim", "codebook_size") if key not in settings]
    if missing:
        raise TypeError(f"VectorQuantizer needs a config, or codebook_dim= and codebook_size=; missing {missing}")
    return QuantizerConfig(**settings)


_RENAMED = {  # vit_vq 0.2's keyword -> the config field's name
    "dim": "codebook_dim", "metric": "l2_normalize", "gradient": "quantizer_gradient", "restart_pool": "restart_pool_size",
}


def _old_keywords(old: dict[str, Any], settings: dict[str, Any], restart_pool_size: int | None) -> int | None:
    """Map vit_vq 0.2's keywords onto the config field names (with a `DeprecationWarning`); returns the pool size.

    Raises:
        TypeError: an unknown keyword, or an old one given beside its new name.
        ValueError: a `metric` other than "l2" or "cosine".
    """
    unknown = sorted(set(old) - set(_RENAMED))
    if unknown:
        raise TypeError(f"VectorQuantizer got unexpected keywords {unknown}; its settings take ViTVQConfig's field names")
    for name, value in old.items():
        new = _RENAMED[name]
        message = f"VectorQuantizer({name}=...) is deprecated; use {new}= (the config field's name)"
        warnings.warn(message, DeprecationWarning, stacklevel=3)
        if new in settings or (new == "restart_pool_size" and restart_pool_size is not None):
            raise TypeError(f"VectorQuantizer got both {name}= and {new}=; give {new}= only")
        if name == "metric":
            if value not in ("l2", "cosine"):
                raise ValueError(f"metric must be 'l2' or 'cosine', got {value!r}")
            value = value == "cosine"
        if new == "restart_pool_size":
            restart_pool_size = value if value is not None else None
        elif value is not None:
            settings[new] = value
    return restart_pool_size


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
