"""`ViTVQConfig`: the one configuration object of a tokenizer.

Every submodule takes the config whole. It is validated once, in `__post_init__`,
serialised to `config.json` with a `format_version`, and presets are plain data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

FORMAT_VERSION = 1

PixelConvention = Literal["minus_one_one", "zero_one", "imagenet"]
# (mean, std) per channel of each convention: the encoder sees (pixels in [0, 1] - mean) / std.
PIXEL_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "minus_one_one": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "zero_one": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# Upper bounds, far above any published tokenizer: a hand-edited config.json cannot ask for
# gigabytes before the weights are checked against it (see docs/security.md).
MAX_SIZES: dict[str, int] = {
    "image_size": 4096,
    "patch_size": 256,
    "encoder_width": 16384,
    "decoder_width": 16384,
    "encoder_depth": 256,
    "decoder_depth": 256,
    "encoder_heads": 256,
    "decoder_heads": 256,
    "codebook_size": 2**22,
    "codebook_dim": 8192,
    "kmeans_iters": 1000,
}
MAX_GRID_SIZE = 256  # tokens per side
MAX_CODEBOOK_ELEMENTS = 2**28  # codebook_size * codebook_dim: 1 GiB per float32 codebook buffer
MAX_MLP_RATIO = 64.0
# Ranges (inclusive) of the float fields: outside them a tokenizer outputs NaN or all-equal codes
# (layer_norm_eps -1, 0 or 1e300), or training diverges; bounds below 1e-12 would round to 0 in float32
# arithmetic at some step. dead_code_threshold is further capped at 1.0 under the "relative" rule.
FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "layer_norm_eps": (1e-12, 0.1),
    "ema_eps": (1e-12, 1.0),
    "commitment_beta": (0.0, 100.0),
    "perceptual_weight": (0.0, 100.0),
    "dead_code_threshold": (0.0, 1e9),
    "lfq_entropy_weight": (0.0, 100.0),
    "lfq_diversity_weight": (0.0, 100.0),
    "lfq_temperature": (1e-6, 100.0),
}
DecoderHead = Literal["pixel_shuffle", "conv_upsample"]
QuantizerGradient = Literal["ste", "rotation"]
DeadCodeRule = Literal["relative", "absolute"]
QuantizerKind = Literal["vq", "fsq", "lfq"]
PositionEmbedding = Literal["learned", "rope2d"]
DEFAULT_TOKEN_BUDGET = 16  # max_tokens left at None: this many times num_tokens per image


@dataclass
class ViTVQConfig:
    """Architecture and quantizer settings of a `ViTVQTokenizer`.

    Images enter the public API as floats in [0, 1] (or uint8); `pixel_convention`
    says how the encoder sees them internally (`minus_one_one` matches the
    mean=std=0.5 normalisation of Hugging Face's ViT checkpoints).

    Raises:
        ValueError: for impossible combinations, e.g. an image size that is not a
            multiple of the patch size, or a width not divisible by the head count.
    """

    # geometry
    image_size: int = 256
    patch_size: int = 8
    in_channels: int = 3
    # encoder ViT
    encoder_width: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    encoder_cls_token: bool = False
    # decoder ViT
    decoder_width: int = 768
    decoder_depth: int = 12
    decoder_heads: int = 12
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    # "pixel_shuffle": per-token linear -> patch pixels (+ 3x3 conv), the head of every checkpoint
    # made before this field existed; "conv_upsample": adds a convolutional upsampling branch (see decoder.py)
    decoder_head: DecoderHead = "pixel_shuffle"
    # "learned": absolute embeddings on the native grid, resampled bicubically to other grids (every checkpoint
    # made before this field existed); "rope2d": axial 2D rotary embeddings on q and k in every attention layer
    position_embedding: PositionEmbedding = "learned"
    # tokens per image encode/decode accept (grids of any shape up to it): the bound on activation memory per
    # image (docs/security.md); None is DEFAULT_TOKEN_BUDGET * num_tokens
    max_tokens: int | None = None
    # codebook
    codebook_size: int = 8192
    codebook_dim: int = 32
    l2_normalize: bool = True
    commitment_beta: float = 0.25
    use_ema: bool = True
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    dead_code_threshold: float = 0.03
    kmeans_init: bool = False
    kmeans_iters: int = 10
    # gradient from the quantized latents to the encoder: "ste" (straight-through, every checkpoint
    # made before this field existed) or "rotation" (Fifty et al. 2024); training only, see quantizer.py
    quantizer_gradient: QuantizerGradient = "ste"
    # a code is dead when its usage EMA is below dead_code_threshold times the mean usage ("relative",
    # every checkpoint made before this field existed) or below dead_code_threshold itself ("absolute")
    dead_code_rule: DeadCodeRule = "relative"
    # "vq": the codebook above (every checkpoint made before this field existed); "fsq": finite scalar
    # quantization, codebook_size = prod(fsq_levels) and codebook_dim = len(fsq_levels); "lfq": lookup-free,
    # codebook_size = 2 ** codebook_dim. fsq and lfq have no stored codebook and ignore the VQ-only fields above
    # (l2_normalize, use_ema, ema_*, dead_code_*, kmeans_*, quantizer_gradient); see fsq.py and lfq.py
    quantizer: QuantizerKind = "vq"
    fsq_levels: list[int] | None = None
    # lfq's entropy penalty, training only: lfq_entropy_weight * (per-latent entropy - lfq_diversity_weight *
    # batch entropy) of softmax(-|z - c|^2 / lfq_temperature) over the codes c. A temperature of 1 keeps the
    # assignment soft where the latents live (|z| ~ 1); 0.01 (vector-quantize-pytorch's inv_temperature=100)
    # leaves gradient only near z = 0: the tiny preset over-fit 8 photos to 21.1 dB in 400 steps, against 28.9
    lfq_entropy_weight: float = 0.1
    lfq_diversity_weight: float = 1.0
    lfq_temperature: float = 1.0
    # pixels
    pixel_convention: PixelConvention = "minus_one_one"
    # training-time defaults that belong to the model's recipe
    perceptual_weight: float = 0.0

    def __post_init__(self) -> None:
        positive = {
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "encoder_width": self.encoder_width,
            "encoder_depth": self.encoder_depth,
            "encoder_heads": self.encoder_heads,
            "decoder_width": self.decoder_width,
            "decoder_depth": self.decoder_depth,
            "decoder_heads": self.decoder_heads,
            "codebook_size": self.codebook_size,
            "codebook_dim": self.codebook_dim,
            "kmeans_iters": self.kmeans_iters,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ViTVQConfig.{name} must be a positive int, got {value!r}")
            if name in MAX_SIZES and value > MAX_SIZES[name]:
                raise ValueError(f"ViTVQConfig.{name} must be <= {MAX_SIZES[name]} (vit_vq.config.MAX_SIZES), got {value}")
        if self.image_size // self.patch_size > MAX_GRID_SIZE:
            raise ValueError(
                f"image_size // patch_size must be <= {MAX_GRID_SIZE} tokens per side (vit_vq.config.MAX_GRID_SIZE), "
                f"got {self.image_size} // {self.patch_size} = {self.image_size // self.patch_size}"
            )
        if self.codebook_size * self.codebook_dim > MAX_CODEBOOK_ELEMENTS:
            raise ValueError(
                f"codebook_size * codebook_dim must be <= {MAX_CODEBOOK_ELEMENTS} (vit_vq.config.MAX_CODEBOOK_ELEMENTS), "
                f"got {self.codebook_size} * {self.codebook_dim}"
            )
        flags = {
            "encoder_cls_token": self.encoder_cls_token, "l2_normalize": self.l2_normalize,
            "use_ema": self.use_ema, "kmeans_init": self.kmeans_init,
        }
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise ValueError(f"ViTVQConfig.{name} must be true or false, got {value!r}")
        if self.in_channels != 3:
            raise ValueError(f"in_channels must be 3 (RGB; grey images are expanded by preprocess), got {self.in_channels}")
        floats = {
            "commitment_beta": self.commitment_beta, "ema_decay": self.ema_decay, "ema_eps": self.ema_eps,
            "dead_code_threshold": self.dead_code_threshold, "mlp_ratio": self.mlp_ratio,
            "layer_norm_eps": self.layer_norm_eps, "perceptual_weight": self.perceptual_weight,
            "lfq_entropy_weight": self.lfq_entropy_weight, "lfq_diversity_weight": self.lfq_diversity_weight,
            "lfq_temperature": self.lfq_temperature,
        }
        for name, value in floats.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"ViTVQConfig.{name} must be a finite number, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        for part in ("encoder", "decoder"):
            width, heads = getattr(self, f"{part}_width"), getattr(self, f"{part}_heads")
            if width % heads:
                raise ValueError(f"{part}_width ({width}) must be divisible by {part}_heads ({heads})")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        for name, (low, high) in FLOAT_RANGES.items():
            if not low <= getattr(self, name) <= high:
                raise ValueError(
                    f"{name} must be in [{low:g}, {high:g}] (vit_vq.config.FLOAT_RANGES), got {getattr(self, name)!r}"
                )
        if self.dead_code_rule == "relative" and self.dead_code_threshold > 1.0:
            raise ValueError(
                f"dead_code_threshold must be <= 1 under dead_code_rule 'relative' (a fraction of the mean code's "
                f"usage), got {self.dead_code_threshold}"
            )
        if not 0 < self.mlp_ratio <= MAX_MLP_RATIO:
            raise ValueError(f"mlp_ratio must be in (0, {MAX_MLP_RATIO}] (vit_vq.config.MAX_MLP_RATIO), got {self.mlp_ratio}")
        for part in ("encoder", "decoder"):
            if round(getattr(self, f"{part}_width") * self.mlp_ratio) < 1:
                raise ValueError(
                    f"mlp_ratio {self.mlp_ratio} gives {part} MLPs no hidden units ({part}_width "
                    f"{getattr(self, f'{part}_width')} * mlp_ratio rounds to 0)"
                )
        heads = get_args(DecoderHead)
        if self.decoder_head not in heads:
            raise ValueError(f"decoder_head must be one of {heads}, got {self.decoder_head!r}")
        if self.decoder_head == "conv_upsample" and self.patch_size & (self.patch_size - 1):
            raise ValueError(
                f"decoder_head 'conv_upsample' doubles the token grid log2(patch_size) times, so patch_size "
                f"must be a power of two, got {self.patch_size}"
            )
        options = (("quantizer_gradient", QuantizerGradient), ("dead_code_rule", DeadCodeRule),
                   ("pixel_convention", PixelConvention), ("position_embedding", PositionEmbedding))  # fmt: skip
        for name, kind in options:
            if getattr(self, name) not in get_args(kind):
                raise ValueError(f"{name} must be one of {get_args(kind)}, got {getattr(self, name)!r}")
        if self.position_embedding == "rope2d":
            for part in ("encoder", "decoder"):
                head_dim = getattr(self, f"{part}_width") // getattr(self, f"{part}_heads")
                if head_dim % 4:
                    raise ValueError(
                        f"position_embedding 'rope2d' rotates pairs of channels along rows and along columns, so the "
                        f"{part} head width ({part}_width / {part}_heads = {head_dim}) must be a multiple of 4"
                    )
        if self.max_tokens is not None:
            if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool):
                raise ValueError(f"ViTVQConfig.max_tokens must be a positive int or null, got {self.max_tokens!r}")
            if not self.num_tokens <= self.max_tokens <= MAX_GRID_SIZE**2:
                raise ValueError(
                    f"max_tokens must be in [num_tokens = {self.num_tokens}, {MAX_GRID_SIZE**2}] "
                    f"(vit_vq.config.MAX_GRID_SIZE ** 2), got {self.max_tokens}"
                )
        self._check_quantizer()

    def _check_quantizer(self) -> None:
        """`quantizer`, `fsq_levels` and the codebook size and dimension they imply (see the field comments)."""
        kinds = get_args(QuantizerKind)
        if self.quantizer not in kinds:
            raise ValueError(f"quantizer must be one of {kinds}, got {self.quantizer!r}")
        if self.quantizer != "fsq" and self.fsq_levels is not None:
            raise ValueError(f"fsq_levels is for quantizer 'fsq'; got it with quantizer {self.quantizer!r} (leave it null)")
        if self.quantizer == "fsq":
            levels = self.fsq_levels
            if not isinstance(levels, (list, tuple)) or not 1 <= len(levels) <= MAX_SIZES["codebook_dim"]:
                raise ValueError(
                    f"quantizer 'fsq' needs fsq_levels, a list of 1 to {MAX_SIZES['codebook_dim']} ints (values per "
                    f"channel, e.g. [8, 5, 5, 5] for 1000 codes), got {levels!r}"
                )
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 2 for v in levels):
                raise ValueError(f"fsq_levels must be ints >= 2 (values per channel), got {list(levels)!r}")
            self.fsq_levels = list(levels)
            size = math.prod(levels)
            if (size, len(levels)) != (self.codebook_size, self.codebook_dim):
                raise ValueError(
                    f"quantizer 'fsq' with fsq_levels {list(levels)} has codebook_size = prod(fsq_levels) = {size} and "
                    f"codebook_dim = len(fsq_levels) = {len(levels)}, got codebook_size {self.codebook_size} and "
                    f"codebook_dim {self.codebook_dim} (ViTVQConfig.from_preset sets both from fsq_levels)"
                )
        if self.quantizer == "lfq":
            size = self.codebook_size
            if size < 2 or size & (size - 1) or self.codebook_dim != size.bit_length() - 1:
                raise ValueError(
                    f"quantizer 'lfq' has one bit per channel: codebook_size must be 2 ** codebook_dim, got "
                    f"codebook_size {size} and codebook_dim {self.codebook_dim} (ViTVQConfig.from_preset sets "
                    "codebook_dim from a power-of-two codebook_size)"
                )

    # -- derived ---------------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        """Tokens per side: `image_size // patch_size`."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens per image at the native size: `grid_size ** 2`."""
        return self.grid_size**2

    @property
    def token_budget(self) -> int:
        """Most tokens per image `encode`/`decode` accept: `max_tokens`, else `DEFAULT_TOKEN_BUDGET * num_tokens`
        (at most `MAX_GRID_SIZE ** 2`)."""
        if self.max_tokens is not None:
            return self.max_tokens
        return min(DEFAULT_TOKEN_BUDGET * self.num_tokens, MAX_GRID_SIZE**2)

    # -- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields, plus `format_version` and the library version."""
        from . import __version__

        return {**dataclasses.asdict(self), "format_version": FORMAT_VERSION, "vit_vq_version": __version__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTVQConfig:
        """Build a config from `to_dict()` output.

        Raises:
            ValueError: on unknown keys or a `format_version` newer than this library reads.
        """
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        data.pop("vit_vq_version", None)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"config format_version must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"config format_version {version} is newer than this vit_vq reads ({FORMAT_VERSION}); "
                "upgrade vit_vq"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            more = f" ({len(unknown)} in all)" if len(unknown) > 5 else ""
            raise ValueError(f"unknown ViTVQConfig keys {unknown[:5]}{more}; known keys are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def config_hash(self) -> str:
        """A short, stable hash of the architecture fields (not the library version).

        `decoder_head` enters only when it is not `"pixel_shuffle"` (`position_embedding` only when not
        `"learned"`), so configs written before the field existed keep their hash (codes files record it
        and decoding checks it). `max_tokens` never enters: it bounds requests, not what codes mean.
        """
        fields = dataclasses.asdict(self)
        if fields["decoder_head"] == "pixel_shuffle":
            del fields["decoder_head"]
        del fields["quantizer_gradient"]  # training only: the same weights give the same codes either way
        if fields["quantizer"] == "vq":  # every config made before the quantizer family keeps its hash
            del fields["quantizer"]
        if fields["fsq_levels"] is None:
            del fields["fsq_levels"]
        for name in ("lfq_entropy_weight", "lfq_diversity_weight", "lfq_temperature"):
            del fields[name]  # training only, like quantizer_gradient
        if fields["dead_code_rule"] == "relative":
            del fields["dead_code_rule"]
        if fields["position_embedding"] == "learned":
            del fields["position_embedding"]
        del fields["max_tokens"]  # a bound on requests: the same weights give the same codes under any budget
        payload = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ViTVQConfig:
        """One of `PRESETS` (`tiny`, `small`, `base`, `seed`), with optional field overrides.

        A preset's `codebook_size` and `codebook_dim` are its VQ codebook's: with `quantizer="fsq"` they
        follow from `fsq_levels`, and with `quantizer="lfq"` `codebook_dim` follows from `codebook_size`,
        unless the overrides name them (`from_preset("tiny", quantizer="lfq", codebook_size=4096)`: 12 bits).

        Raises:
            ValueError: for an unknown preset name; the message lists the known ones.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
        fields = {**PRESETS[name], **overrides}
        levels = fields.get("fsq_levels")
        if fields.get("quantizer") == "fsq" and isinstance(levels, (list, tuple)) and all(type(v) is int for v in levels):
            if "codebook_size" not in overrides:
                fields["codebook_size"] = math.prod(levels)
            if "codebook_dim" not in overrides:
                fields["codebook_dim"] = len(levels)
        size = fields.get("codebook_size")
        if fields.get("quantizer") == "lfq" and "codebook_dim" not in overrides and type(size) is int and size > 1:
            fields["codebook_dim"] = size.bit_length() - 1  # a size that is not a power of two is refused by validation
        return cls(**fields)


PRESETS: dict[str, dict[str, Any]] = {
    # Trains on a CPU in minutes; used by tests and examples.
    "tiny": dict(
        image_size=32, patch_size=4,
        encoder_width=64, encoder_depth=2, encoder_heads=4,
        decoder_width=64, decoder_depth=2, decoder_heads=4,
        codebook_size=256, codebook_dim=8, l2_normalize=True,
        perceptual_weight=0.0, quantizer_gradient="rotation",
    ),
    # ViT-VQGAN recipe (Yu et al. 2022): 256 px, patch 8, 32x32 tokens, 8192 codes of dim 32, l2.
    "small": dict(
        image_size=256, patch_size=8,
        encoder_width=512, encoder_depth=8, encoder_heads=8,
        decoder_width=512, decoder_depth=8, decoder_heads=8,
        codebook_size=8192, codebook_dim=32, l2_normalize=True,
        perceptual_weight=0.1, decoder_head="conv_upsample", quantizer_gradient="rotation",
    ),
    "base": dict(
        image_size=256, patch_size=8,
        encoder_width=768, encoder_depth=12, encoder_heads=12,
        decoder_width=768, decoder_depth=12, decoder_heads=12,
        codebook_size=8192, codebook_dim=32, l2_normalize=True,
        perceptual_weight=0.1, decoder_head="conv_upsample", quantizer_gradient="rotation",
    ),
    # The reference design: ViT-B/16 at 224 px, 14x14 tokens, 1024 codes of dim 512.
    "seed": dict(
        image_size=224, patch_size=16,
        encoder_width=768, encoder_depth=12, encoder_heads=12, encoder_cls_token=True,
        decoder_width=768, decoder_depth=12, decoder_heads=12,
        codebook_size=1024, codebook_dim=512, l2_normalize=False, layer_norm_eps=1e-12,
        perceptual_weight=1.0,
    ),
}

__all__ = [
    "ViTVQConfig", "PRESETS", "FORMAT_VERSION", "PixelConvention", "DecoderHead", "QuantizerGradient", "DeadCodeRule",
    "QuantizerKind",
    "PositionEmbedding", "DEFAULT_TOKEN_BUDGET",
    "MAX_SIZES", "MAX_GRID_SIZE", "MAX_CODEBOOK_ELEMENTS", "MAX_MLP_RATIO", "FLOAT_RANGES",
]
