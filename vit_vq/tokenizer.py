"""`ViTVQTokenizer`: images <-> integer code grids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .config import PIXEL_STATS, ViTVQConfig
from .decoder import Decoder
from .encoder import Encoder
from .fsq import FiniteScalarQuantizer
from .lfq import LookupFreeQuantizer
from .ops import LookupPrecision
from .preprocess import ResizeMode
from .preprocess import preprocess as _preprocess
from .quantizer import QuantizerOutput, VectorQuantizer
from .registry import DEFAULT_MODEL
from .validation import check_grid, check_images, check_indices


@dataclass
class TokenizerOutput:
    """Result of `ViTVQTokenizer.forward`.

    reconstruction: float `[B, 3, H, W]`, in [0, 1] in eval mode (unclamped while training).
    indices: int64 `[B, h, w]`.
    loss: `recon_loss + codebook_loss + commit_loss`.
    metrics: `perplexity`, `usage`, `dead_codes` (scalar tensors).
    """

    reconstruction: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    recon_loss: torch.Tensor
    codebook_loss: torch.Tensor
    commit_loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class EncodeOutput:
    """`encode(..., return_latents=True)`: codes `[B, h, w]` and pre-quantization latents `[B, h, w, D]`
    (for a list of images: one `EncodeOutput` per image, `[h, w]` and `[h, w, D]`)."""

    indices: torch.Tensor
    latents: torch.Tensor


def build_quantizer(config: ViTVQConfig) -> VectorQuantizer | FiniteScalarQuantizer | LookupFreeQuantizer:
    """The quantizer `config.quantizer` names: `"vq"`, `"fsq"` or `"lfq"`, built from the config."""
    kinds = {"vq": VectorQuantizer, "fsq": FiniteScalarQuantizer, "lfq": LookupFreeQuantizer}
    return kinds[config.quantizer](config)


class ViTVQTokenizer(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="vit_vq",
    license="apache-2.0",
    tags=["vit_vq", "image-tokenizer", "vector-quantization"],
):
    """A ViT-VQ image tokenizer: ViT encoder -> quantizer (`config.quantizer`: VQ, FSQ or LFQ) -> ViT decoder.

    Images are float `[B, 3, H, W]` in [0, 1], or uint8, with `H` and `W` multiples of the patch
    size `p` (the native size is `S x S`, `S = config.image_size`); codes are int64 `[B, H/p, W/p]`,
    at most `config.token_budget` per image. A list of images of different shapes codes to a list
    of grids (see `encode`).

    Example:
        >>> tok = ViTVQTokenizer(ViTVQConfig.from_preset("tiny"))
        >>> codes = tok.encode(torch.rand(2, 3, 32, 32))   # int64 [2, 8, 8]
        >>> images = tok.decode(codes)                       # float [2, 3, 32, 32]
        >>> tok.encode(torch.rand(1, 3, 32, 64)).shape       # [1, 8, 16]: any multiple of the patch
    """

    def __init__(self, config: ViTVQConfig | None = None) -> None:
        super().__init__()
        config = config if config is not None else ViTVQConfig()
        if not isinstance(config, ViTVQConfig):
            raise TypeError(f"expected a ViTVQConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = build_quantizer(config)
        self.decoder = Decoder(config)
        mean, std = PIXEL_STATS[config.pixel_convention]
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    # -- pixels ----------------------------------------------------------------------
    def preprocess(
        self,
        images: Any,
        resize: ResizeMode | None = None,
        *,
        short_side: int | None = None,
        max_tokens: int | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """PIL images, numpy arrays, tensors or lists of them -> float images in [0, 1] for `encode`.

        Args:
            resize: `"crop"` (the default): resize the short side to `S = config.image_size` (or
                `short_side`) and center-crop to `[B, 3, S, S]`. `"native"`: keep the aspect ratio, short
                side to `S` (or `short_side`), each side rounded to the nearest multiple of `patch_size`.
                `"budget"` (the default when `max_tokens` is given): keep the aspect ratio at the largest
                size of at most `max_tokens` tokens (default `config.token_budget`).
            short_side: the short side for `"crop"` and `"native"`, rounded to a multiple of `patch_size`.
            max_tokens: the token budget of `"budget"`.

        Returns:
            `[B, 3, H, W]` when every image comes out the same shape (always for `"crop"`), else a list
            of `[3, H, W]` tensors (which `encode` takes as they are).

        Raises:
            ValueError: `short_side` with `"budget"`, `max_tokens` with another mode, or see
                `vit_vq.preprocess.preprocess`.
        """
        if resize is None:
            resize = "budget" if max_tokens is not None else "crop"
        if resize == "budget":
            if short_side is not None:
                raise ValueError("short_side goes with resize='crop' or 'native'; resize='budget' sizes by max_tokens")
            max_tokens = self.config.token_budget if max_tokens is None else max_tokens
        if short_side is not None and (isinstance(short_side, bool) or not isinstance(short_side, int) or short_side < 1):
            raise ValueError(f"short_side must be a positive int, got {short_side!r}")
        out = _preprocess(
            images, short_side or self.config.image_size, resize=resize, patch_size=self.config.patch_size, max_tokens=max_tokens,
        )
        device = self.pixel_mean.device
        return out.to(device) if isinstance(out, torch.Tensor) else [t.to(device) for t in out]

    def _to_model_space(self, images: torch.Tensor, validate: bool) -> torch.Tensor:
        if validate:
            check_images(images, self.config.patch_size, self.config.in_channels, self.config.token_budget)
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images
        dtype = self.encoder.patch_embed.weight.dtype
        return ((x.to(self.pixel_mean.device, torch.float32) - self.pixel_mean) / self.pixel_std).to(dtype)

    def _to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.pixel_std + self.pixel_mean

    def _grid(self, flat: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return flat.reshape(flat.shape[0], *grid, *flat.shape[2:])  # (B, h*w, ...) -> (B, h, w, ...)

    def _image_grid(self, images: torch.Tensor) -> tuple[int, int]:
        p = self.config.patch_size
        return images.shape[-2] // p, images.shape[-1] // p

    # -- latent-level API --------------------------------------------------------------
    def quantize(self, latents: torch.Tensor) -> QuantizerOutput:
        """Quantize encoder latents `[B, h, w, D]` or `[B, h*w, D]` (no state change in eval)."""
        if latents.ndim not in (3, 4) or latents.shape[-1] != self.config.codebook_dim:
            raise ValueError(
                f"expected latents [B, h, w, {self.config.codebook_dim}] or [B, h*w, {self.config.codebook_dim}], "
                f"got {tuple(latents.shape)}"
            )
        return self.quantizer(latents)

    def embed_codes(self, indices: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
        """Integer codes `[B, h, w]` (or `[B, h*w]` on the native grid) -> code vectors float32 `[B, h, w, D]`."""
        c = self.config
        if validate:
            indices = check_indices(indices, c.grid_size, c.codebook_size, c.token_budget)
        elif indices.ndim == 2:
            indices = self._grid(indices.long(), (c.grid_size, c.grid_size))
        return self.quantizer.embed_codes(indices.long())

    def decode_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors `[B, h, w, D]` (or `[B, h*w, D]` on the native grid) -> float images `[B, 3, h*p, w*p]` (unclamped)."""
        c = self.config
        if codes.ndim == 4 and codes.shape[-1] == c.codebook_dim:
            check_grid(codes.shape[1], codes.shape[2], c.token_budget)
            grid = (codes.shape[1], codes.shape[2])
            codes = codes.flatten(1, 2)  # (B, h*w, D)
        elif codes.ndim == 3 and codes.shape[1:] == (c.num_tokens, c.codebook_dim):
            grid = (c.grid_size, c.grid_size)
        else:
            raise ValueError(
                f"expected code vectors [B, h, w, {c.codebook_dim}], or [B, {c.num_tokens}, {c.codebook_dim}] on the "
                f"native {c.grid_size}x{c.grid_size} grid, got {tuple(codes.shape)}"
            )
        dtype = self.decoder.from_code.weight.dtype
        return self._to_pixels(self.decoder(codes.to(dtype), grid))

    # -- public API ------------------------------------------------------------------
    @torch.no_grad()
    def encode(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        *,
        return_latents: bool = False,
        validate: bool = True,
        lookup_precision: LookupPrecision = "exact",
    ) -> torch.Tensor | EncodeOutput | list[torch.Tensor] | list[EncodeOutput]:
        """Images -> codes, at the images' own size.

        Args:
            images: float `[B, 3, H, W]` in [0, 1], or uint8, with `H` and `W` multiples of
                `patch_size` and at most `config.token_budget` tokens `(H/p) * (W/p)` per image. Or a
                list of `[3, H, W]` images of any such shapes: they are coded in groups of one shape.
            return_latents: also return the encoder latents `[B, h, w, D]` (before quantization).
            validate: check shape, dtype and values (one reduction, one host sync per shape group).
            lookup_precision: `"exact"` (float64-optimal codes) or `"fast"` (tf32 on GPU; >= 99%
                identical codes, faster).

        Returns:
            int64 `[B, H/p, W/p]`, or an `EncodeOutput` when `return_latents`; for a list, a list (in
            input order) of int64 `[H/p, W/p]` grids, or of `EncodeOutput`s.

        Raises:
            TypeError: an unsupported dtype, or a list item that is not a tensor.
            ValueError: wrong rank, channels or size; more tokens than `config.token_budget` (one line
                naming both); NaN/Inf; values outside [0, 1].
        """
        if isinstance(images, (list, tuple)):
            groups = _shape_groups(images, "image", 3)
            out: list[Any] = [None] * len(images)
            for positions in groups.values():
                result = self.encode(
                    torch.stack([images[i] for i in positions]), return_latents=return_latents, validate=validate,
                    lookup_precision=lookup_precision,
                )
                for j, i in enumerate(positions):
                    out[i] = EncodeOutput(result.indices[j], result.latents[j]) if return_latents else result[j]
            return out
        x = self._to_model_space(images, validate)
        grid = self._image_grid(x)
        latents = self.encoder(x)  # (B, h*w, D)
        z = self.quantizer.prepare(latents)
        indices = self._grid(self.quantizer.lookup(z, lookup_precision), grid)  # (B, h, w)
        if return_latents:
            return EncodeOutput(indices=indices, latents=self._grid(latents.float(), grid))
        return indices

    @torch.no_grad()
    def decode(
        self, indices: torch.Tensor | Sequence[torch.Tensor], *, validate: bool = True
    ) -> torch.Tensor | list[torch.Tensor]:
        """Codes int `[B, h, w]` (or `[B, h*w]` on the native grid) in `[0, codebook_size)` -> float
        `[B, 3, h*p, w*p]` in [0, 1]; a list of `[h, w]` grids of any shapes -> a list of `[3, h*p, w*p]`
        images in input order (decoded in groups of one shape).

        Raises:
            TypeError: non-integer codes, or a list item that is not a tensor.
            ValueError: a grid that is not 2-D (3-D batched), more tokens than `config.token_budget`, or
                codes out of range (checked before any gather).
        """
        if isinstance(indices, (list, tuple)):
            out: list[Any] = [None] * len(indices)
            for positions in _shape_groups(indices, "code grid", 2).values():
                images = self.decode(torch.stack([indices[i] for i in positions]), validate=validate)
                for j, i in enumerate(positions):
                    out[i] = images[j]
            return out
        return self.decode_latents(self.embed_codes(indices, validate=validate)).clamp(0, 1)

    def forward(self, images: torch.Tensor, *, validate: bool = True) -> TokenizerOutput:
        """Encode, quantize (straight-through) and decode; returns losses and codebook metrics."""
        x = self._to_model_space(images, validate)
        grid = self._image_grid(x)
        target = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        q = self.quantizer(self.encoder(x))
        recon = self.decode_latents(self._grid(q.quantized, grid))  # (B, 3, H, W)
        if not self.training:
            recon = recon.clamp(0, 1)
        recon_loss = F.mse_loss(recon, target.to(recon.device))
        return TokenizerOutput(
            reconstruction=recon,
            indices=self._grid(q.indices, grid),
            loss=recon_loss + q.codebook_loss + q.commit_loss,
            recon_loss=recon_loss,
            codebook_loss=q.codebook_loss,
            commit_loss=q.commit_loss,
            metrics=q.metrics,
        )

    def compile(
        self, *, mode: str | None = None, scope: Literal["model", "blocks"] = "model", dynamic: bool | None = None
    ) -> ViTVQTokenizer:
        """`torch.compile` the encoder and decoder in place; state-dict keys are unchanged.

        Args:
            mode: a `torch.compile` mode (`None`, `"reduce-overhead"`, `"max-autotune"`, ...).
            scope: `"model"` compiles encoder and decoder whole (fastest kernels); `"blocks"`
                compiles each transformer block, which compiles much faster because identical
                blocks share one graph.
            dynamic: passed to `torch.compile`; `False` compiles one static graph per shape.

        The quantizer stays eager: its lookup is already a fused kernel on GPU.

        Raises:
            ValueError: an unknown `scope`.
        """
        if scope == "model":
            parts = [self.encoder, self.decoder]
        elif scope == "blocks":
            parts = [*self.encoder.transformer.blocks, *self.decoder.transformer.blocks]
        else:
            raise ValueError(f"scope must be 'model' or 'blocks', got {scope!r}")
        for part in parts:
            nn.Module.compile(part, mode=mode, dynamic=dynamic)
        return self

    # -- persistence -----------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        config: Any = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Atomically write `config.json`, `model.safetensors` and a model card into `save_directory`.

        Saves into one folder are serialised by a lock file beside it (`.<name>.lock`); files of
        other names in the folder are kept, and so is a README.md that vit_vq did not write
        (replaced only when `model_card_kwargs` is given); a symlinked folder is written through
        the link. A save interrupted by a crash is undone on the next save or load (see
        `vit_vq.saving`).
        `config` is accepted for `PyTorchModelHubMixin.push_to_hub` compatibility and ignored:
        the saved config is always `self.config`.

        Raises:
            ValueError: `save_directory` is the current working folder or holds it, or is a file.
            TimeoutError: another process held the folder's lock for `vit_vq.saving.LOCK_TIMEOUT_S`.
        """
        from .saving import save_pretrained

        save_pretrained(self, save_directory, repo_id=repo_id, model_card_kwargs=model_card_kwargs)
        if push_to_hub:
            return self.push_to_hub(repo_id or Path(save_directory).name, **push_to_hub_kwargs)
        return None

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        force_download: bool = False,
        map_location: str | torch.device = "cpu",
        torch_dtype: torch.dtype | None = None,
        strict: bool = True,
        **kwargs: Any,
    ) -> ViTVQTokenizer:
        """Load a tokenizer strictly and without unpickling; returns it in eval mode.

        Args:
            pretrained_model_name_or_path: `vit_vq:default` (the bundled tokenizer, no network), a
                local folder, or a Hub repo id (`org/name`). A path-shaped name (`./x`, `x/`, `~/x`,
                `a/b/c`) is always local; see `vit_vq.hub.resolve_model_name`.
            map_location: device for the weights.
            torch_dtype: compute dtype of the encoder and decoder (e.g. `torch.bfloat16`); the
                codebook stays float32. `dtype=` (transformers 5's name) is accepted too.
            strict: must be True: a partial load would silently give a different tokenizer.

        `device_map=` is refused (a tokenizer is not sharded across devices); use `map_location`.
        The safetensors header is checked against `config.json` before anything is allocated
        (see `vit_vq.loading`).

        Raises:
            FileNotFoundError: no such folder, a folder without the files, or a Hub repo/file not found.
            PermissionError: a file that cannot be read.
            ValueError: an unknown `vit_vq:` name, `strict=False`, a bad `config.json`, weights that
                are corrupted, of a dtype their parameter cannot take, non-finite (as stored, in
                float32, or in `torch_dtype`) or do not match the config, or a non-float `torch_dtype`.
        """
        from .loading import load_pretrained

        if "dtype" in kwargs:  # transformers 5's name for torch_dtype
            if torch_dtype is not None:
                raise TypeError("give torch_dtype or dtype (its transformers 5 name), not both")
            torch_dtype = kwargs.pop("dtype")
        if "device_map" in kwargs:
            raise TypeError(
                "device_map is not supported: a vit_vq tokenizer is small enough for one device and is not sharded; "
                "pass map_location='cuda:0' (or .to(device) after loading)"
            )
        if kwargs:
            raise TypeError(f"unexpected arguments for ViTVQTokenizer.from_pretrained: {sorted(kwargs)}")
        if strict is not True:
            raise ValueError(
                "strict=False is not supported: a partial load would silently give a different tokenizer "
                "(other codes for the same image); fix the checkpoint or its config.json instead"
            )
        return load_pretrained(
            cls, pretrained_model_name_or_path, map_location=map_location, torch_dtype=torch_dtype, revision=revision,
            cache_dir=cache_dir, local_files_only=local_files_only, token=token, force_download=force_download,
        )

    @classmethod
    def default(cls, map_location: str | torch.device = "cpu") -> ViTVQTokenizer:
        """The trained tokenizer that ships inside the package: `from_pretrained("vit_vq:default")`.

        See `vit_vq.default_model` for its model card and the bundled sample photos.

        Raises:
            FileNotFoundError: the package was installed without its assets.
        """
        return cls.from_pretrained(DEFAULT_MODEL, map_location=map_location)

    @classmethod
    def from_vit(cls, vit_name_or_path: str, config: ViTVQConfig | None = None, **hf_kwargs: Any) -> ViTVQTokenizer:
        """A tokenizer whose encoder starts from a pretrained Hugging Face ViT (Hub id or folder).

        The encoder width, depth, heads, MLP ratio and LayerNorm epsilon follow the checkpoint;
        position embeddings are interpolated to `config.image_size // config.patch_size`.

        Raises:
            ValueError: when the checkpoint's patch size differs from `config.patch_size`.
        """
        from .convert_hf import config_from_hf, init_encoder_from_hf, load_hf_vit

        hf_config, state = load_hf_vit(vit_name_or_path, **hf_kwargs)
        model = cls(config_from_hf(hf_config, config or ViTVQConfig.from_preset("seed")))
        init_encoder_from_hf(model.encoder, state)
        return model


def _shape_groups(items: Sequence[Any], what: str, rank: int) -> dict[tuple, list[int]]:
    """Positions of `items` grouped by (shape, dtype, device), in first-seen order.

    Raises:
        TypeError: an item that is not a tensor. ValueError: an item of another rank.
    """
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor {what} at position {i} of the list, got {type(item).__name__}")
        if item.ndim != rank:
            dims = "[3, H, W]" if rank == 3 else "[h, w]"
            raise ValueError(f"expected each {what} in a list to be {dims}, got {tuple(item.shape)} at position {i}")
        groups.setdefault((tuple(item.shape), item.dtype, item.device), []).append(i)
    return groups
