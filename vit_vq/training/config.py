"""`TrainConfig`: every setting of a training run, in one dataclass.

The same object is filled from defaults, then a YAML/JSON file, then command-line flags
(`vit-vq train`), and is written next to the checkpoints as `train_config.yaml`. Each field
carries its help text in `metadata["help"]`, which the command line shows as is.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import PRESETS
from ..distributed import MAX_DEFAULT_WORKERS, default_workers

MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
DataFormat = Literal["auto", "folder", "hf", "cifar10"]
CropScales = Literal["fixed", "log_uniform"]
PerceptualKind = Literal["auto", "lpips", "vgg"]
DataViews = Literal["loader", "device"]
MAX_DEFAULT_WARMUP = 500  # warmup steps when not set: min(this, max_steps // 10)
# Named sets of settings (`--recipe NAME`): applied beneath a config file's values and explicit flags.
RECIPES: dict[str, dict[str, Any]] = {
    # How the bundled default tokenizer was trained (examples/train_default.py): views across scales with
    # a quarter whole photos, pixel MSE only, AdamW without weight decay, cosine to 5% of the peak lr.
    "default": dict(
        crop_scales="log_uniform", whole_prob=0.25, lr=6e-4, weight_decay=0.0, min_lr_ratio=0.05,
        max_grad_norm=1.0, l2_weight=1.0, l1_weight=0.0, perceptual_weight=0.0,
    ),
}
KNOWN_TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a default and a help text (mutable defaults are copied per instance)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Settings of one training or fine-tuning run.

    The model comes from exactly one of `preset` (train from scratch), `init` (fine-tune a
    saved tokenizer: Hub id, folder, or `vit_vq:default` for the bundled one) or `init_vit`
    (a new tokenizer whose encoder starts from a Hugging Face ViT; `preset` then gives the
    rest of the architecture, `seed` if unset).

    Raises:
        ValueError: for an unknown preset/option, a negative weight, a non-positive count, or
            `init` combined with `preset`/`init_vit`/`model_overrides`.
    """

    # -- model ---------------------------------------------------------------------------
    preset: str | None = _f(None, f"model preset to train from scratch: one of {sorted(PRESETS)}")
    init: str | None = _f(
        None, "fine-tune this tokenizer: a Hub id, a folder written by save_pretrained, or vit_vq:default (the bundled one)"
    )
    init_vit: str | None = _f(None, "start the encoder from this Hugging Face ViT (Hub id or folder)")
    model_overrides: dict[str, Any] = _f({}, "ViTVQConfig fields to change from the preset, e.g. codebook_size=4096")
    # -- data ----------------------------------------------------------------------------
    data: str | None = _f(None, "image folder (recursive), a datasets name or saved folder, or 'cifar10'")
    data_format: DataFormat = _f("auto", "how to read --data; auto: 'cifar10', a local folder, else a datasets dataset")
    data_root: str = _f("~/.cache/vit_vq/data", "where torchvision datasets (cifar10) are stored or downloaded to")
    split: str = _f("train", "datasets split to train on")
    image_column: str = _f("image", "datasets column that holds the images")
    resize_ratio: float = _f(1.0, "resize the short side to image_size * this before the random crop (>= 1)")
    random_crop: bool = _f(True, "random crop (else center crop) after resizing")
    hflip: bool = _f(True, "random horizontal flips")
    crop_scales: CropScales = _f("fixed", "fixed: crops at image_size * resize_ratio; log_uniform: random-resized crops "
                                 "from native resolution up to the whole short side, resized to image_size")
    whole_prob: float = _f(0.0, "share of views that are the whole photo, center-cropped and resized to image_size")
    aspect_range: tuple[float, float] = _f(
        (1.0, 1.0), "views' aspect ratios (width / height): each batch's drawn log-uniformly in [low, high], every view "
        "of a batch at one shape; 1 1: square views at image_size, as the model was built for (e.g. 0.5 2)"
    )
    train_tokens: int | None = _f(
        None, "the most tokens of a view's grid: each batch's shape is the largest grid of its aspect ratio within a "
        "token count drawn log-uniformly in [min_train_tokens, train_tokens] (sides multiples of the patch); "
        "default: the model's square grid, (image_size / patch_size)^2"
    )
    min_train_tokens: int | None = _f(None, "the fewest tokens a batch's grid is sized for; default: train_tokens "
                                      "(every view at the budget)")
    data_views: DataViews = _f("loader", "where views are made: loader (data-loader processes crop each image; any amount "
                               "of data) or device (photos decoded once into memory on the training device, each batch "
                               "cut there in a few tensor operations; needs crop_scales=log_uniform)")
    views_max_gb: float = _f(8.0, "data_views=device: the most memory the decoded photos may take there (3 bytes a pixel)")
    num_workers: int | None = _f(
        None, f"data loader worker processes per rank (0: load in the main process); default: the CPUs this process may "
        f"use, at most {MAX_DEFAULT_WORKERS}"
    )
    # -- optimisation --------------------------------------------------------------------
    output: str = _f("runs/vit-vq", "output folder: checkpoints, logs, samples and the exported model")
    max_steps: int = _f(10000, "optimizer steps to train for (in total, counting resumed steps)")
    batch_size: int = _f(32, "images per rank per micro-batch")
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(1e-4, "peak learning rate of the tokenizer (AdamW)")
    codebook_lr: float | None = _f(None, "learning rate of a learnable (use_ema=False) codebook; default: lr")
    weight_decay: float = _f(1e-4, "AdamW weight decay (not applied to biases, norms, embeddings, codebook)")
    adam_betas: tuple[float, float] = _f((0.9, 0.99), "AdamW betas")
    warmup_steps: int | None = _f(
        None, f"linear warmup steps, then cosine decay to min_lr_ratio * lr; default: min({MAX_DEFAULT_WARMUP}, max_steps // 10)"
    )
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of the peak")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: no clipping; the norm is still logged)")
    mixed_precision: MixedPrecision = _f("auto", "autocast dtype; auto: bf16 on GPUs that support it, else no")
    model_ema_decay: float = _f(0.0, "keep an EMA of the weights with this decay (0: off); exported when on")
    seed: int = _f(0, "seed of the model init, data order and augmentations")
    compile: bool = _f(False, "torch.compile the transformer blocks and the perceptual loss")
    # -- losses --------------------------------------------------------------------------
    l2_weight: float = _f(1.0, "weight of the pixel MSE")
    l1_weight: float = _f(0.0, "weight of the pixel L1")
    perceptual_weight: float | None = _f(None, "weight of the VGG16 perceptual loss; default: the model recipe's")
    perceptual_loss: PerceptualKind = _f(
        "auto", "lpips: LPIPS-VGG with its learned channel weights (the lpips package); vgg: VGG16 features, uniform "
        "channel weights; auto: lpips when the package is installed, else vgg"
    )
    perceptual_weights_path: str | None = _f(None, "VGG16 weights file (safetensors or torchvision .pth)")
    download_timeout: float = _f(10.0, "seconds to wait on a stalled weight download (0: never download)")
    codebook_weight: float = _f(1.0, "weight of the codebook loss (only moves a learnable codebook)")
    commit_weight: float = _f(1.0, "weight of the commitment loss (beta is in the model config)")
    adversarial_weight: float = _f(0.0, "weight of the hinge GAN loss (0: no discriminator)")
    disc_start_step: int = _f(2000, "step at which the discriminator starts")
    disc_lr: float | None = _f(None, "discriminator learning rate; default: lr")
    disc_channels: int = _f(64, "channels of the first discriminator layer")
    disc_layers: int = _f(3, "strided layers of the patch discriminator")
    adaptive_weight: bool = _f(True, "scale the GAN loss by the ratio of gradient norms at the decoder's last layer")
    # -- logging and checkpoints ---------------------------------------------------------
    log_every: int = _f(50, "log scalars every N steps")
    image_every: int = _f(500, "save a grid of originals above reconstructions every N steps and at the end (0: only at the end)")
    num_log_images: int = _f(8, "images in the reconstruction grid")
    save_every: int = _f(1000, "write a checkpoint every N steps (and always at the end)")
    keep_checkpoints: int = _f(2, "checkpoints to keep (the newest)")
    resume: str | None = _f(None, "'latest' (the newest checkpoint in --output, if any) or a checkpoint folder")
    trackers: str = _f("tensorboard", f"comma-separated accelerate trackers ({', '.join(KNOWN_TRACKERS)}) or 'none'")
    export_name: str = _f("final", "folder inside --output that receives the exported model")
    push_to_hub: str | None = _f(None, "push the exported model to this Hub repo id")
    progress: bool = _f(True, "show a tqdm progress bar (main process only)")

    def __post_init__(self) -> None:
        if isinstance(self.adam_betas, list):
            self.adam_betas = tuple(self.adam_betas)
        if isinstance(self.aspect_range, list):
            self.aspect_range = tuple(float(a) for a in self.aspect_range)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if "float" in str(f.type) and isinstance(value, str):  # YAML reads `1e-4` as a string
                try:
                    setattr(self, f.name, float(value))
                except ValueError:
                    raise ValueError(f"TrainConfig.{f.name} must be a number, got {value!r}") from None
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known presets: {sorted(PRESETS)}")
        if self.init is not None and (self.preset is not None or self.init_vit is not None or self.model_overrides):
            raise ValueError(
                "init fine-tunes a saved tokenizer whose architecture is fixed; "
                "do not combine it with preset, init_vit or model_overrides"
            )
        for name in ("max_steps", "batch_size", "grad_accum_steps", "log_every", "save_every", "keep_checkpoints",
                     "disc_channels", "disc_layers", "num_log_images"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        for name in ("num_workers", "warmup_steps", "image_every", "disc_start_step", "seed"):
            value = getattr(self, name)
            if value is None and name in ("num_workers", "warmup_steps"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {value!r}")
        for name in ("l2_weight", "l1_weight", "perceptual_weight", "codebook_weight", "commit_weight",
                     "adversarial_weight", "weight_decay", "max_grad_norm", "model_ema_decay", "download_timeout"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {value!r}")
        for name in ("lr", "codebook_lr", "disc_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {value!r}")
        if not 0 <= self.model_ema_decay < 1:
            raise ValueError(f"model_ema_decay must be in [0, 1), got {self.model_ema_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.resize_ratio < 1:
            raise ValueError(f"resize_ratio must be >= 1 (the crop must fit), got {self.resize_ratio}")
        _check_choice("crop_scales", self.crop_scales, ("fixed", "log_uniform"))
        if not 0 <= self.whole_prob <= 1:
            raise ValueError(f"whole_prob must be in [0, 1], got {self.whole_prob}")
        _check_choice("data_views", self.data_views, ("loader", "device"))
        if self.data_views == "device" and self.crop_scales != "log_uniform":
            raise ValueError("data_views='device' makes random-resized crops across scales (crop_scales='log_uniform'); "
                             f"crop_scales={self.crop_scales!r} views are made by the data loader (data_views='loader')")
        if (not isinstance(self.aspect_range, tuple) or len(self.aspect_range) != 2
                or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in self.aspect_range)
                or not 0 < self.aspect_range[0] <= self.aspect_range[1] < float("inf")):
            raise ValueError(f"aspect_range must be two positive numbers (width / height), low <= high, "
                             f"got {self.aspect_range!r}")
        for name in ("train_tokens", "min_train_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"TrainConfig.{name} must be a positive int or null, got {value!r}")
        if self.train_tokens is not None and self.min_train_tokens is not None and self.min_train_tokens > self.train_tokens:
            raise ValueError(f"min_train_tokens={self.min_train_tokens} is above train_tokens={self.train_tokens}")
        if self.data_views == "device" and self.many_shapes:
            raise ValueError("data_views='device' cuts square views at the model's image_size only; views of many shapes "
                             f"(aspect_range={list(self.aspect_range)}, train_tokens={self.train_tokens}, min_train_tokens="
                             f"{self.min_train_tokens}) are made by the data loader (data_views='loader')")
        if not self.views_max_gb > 0:
            raise ValueError(f"views_max_gb must be > 0, got {self.views_max_gb}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        _check_choice("mixed_precision", self.mixed_precision, ("auto", "no", "fp16", "bf16"))
        _check_choice("perceptual_loss", self.perceptual_loss, ("auto", "lpips", "vgg"))
        _check_choice("data_format", self.data_format, ("auto", "folder", "hf", "cifar10"))
        for name in self.tracker_list():
            _check_choice("trackers", name, KNOWN_TRACKERS)
        if not self.export_name or Path(self.export_name).name != self.export_name:
            raise ValueError(f"export_name must be a plain folder name, got {self.export_name!r}")
        if self.warmup_steps is not None and self.warmup_steps >= self.max_steps:
            warnings.warn(
                f"warmup_steps={self.warmup_steps} >= max_steps={self.max_steps}: the learning rate never reaches its "
                f"peak and never decays; leave warmup_steps unset for min({MAX_DEFAULT_WARMUP}, max_steps // 10)",
                UserWarning, stacklevel=3,
            )

    # -- derived -------------------------------------------------------------------------
    def tracker_list(self) -> list[str]:
        """The trackers as a list (`[]` for 'none')."""
        names = [t.strip() for t in self.trackers.split(",") if t.strip()]
        return [] if names in ([], ["none"]) else names

    @property
    def warmup(self) -> int:
        """The warmup steps in effect: `warmup_steps`, or `min(500, max_steps // 10)` when unset."""
        return self.warmup_steps if self.warmup_steps is not None else min(MAX_DEFAULT_WARMUP, self.max_steps // 10)

    @property
    def workers(self) -> int:
        """The data-loader workers in effect: `num_workers`, or the CPUs this process may use (at most 4) when unset."""
        if self.num_workers is not None:
            return self.num_workers
        return default_workers()

    @property
    def many_shapes(self) -> bool:
        """Whether views take shapes other than the model's square (`aspect_range`, `train_tokens`, `min_train_tokens`)."""
        return self.aspect_range != (1.0, 1.0) or self.train_tokens is not None or self.min_train_tokens is not None

    @property
    def adversarial(self) -> bool:
        return self.adversarial_weight > 0

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["adam_betas"] = list(self.adam_betas)
        data["aspect_range"] = list(self.aspect_range)
        return data

    @classmethod
    def from_dict(cls, mapping: dict[str, Any], /, **overrides: Any) -> TrainConfig:
        """Build from a mapping (keys may use dashes), then apply `overrides`.

        A `recipe` key (in either) names a set of `RECIPES` settings, applied beneath every other value.

        Raises:
            ValueError: on unknown keys (the message lists the known ones) or an unknown recipe.
        """
        merged = {str(k).replace("-", "_"): v for k, v in {**mapping, **overrides}.items()}
        recipe = merged.pop("recipe", None)
        if recipe is not None:
            if recipe not in RECIPES:
                raise ValueError(f"unknown recipe {recipe!r}; known recipes: {sorted(RECIPES)}")
            merged = {**RECIPES[recipe], **merged}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known settings are {sorted(known)}")
        return cls(**merged)

    @classmethod
    def from_recipe(cls, name: str, /, **settings: Any) -> TrainConfig:
        """The `RECIPES[name]` settings, with `settings` on top: `TrainConfig.from_recipe("default", preset="tiny", ...)`.

        Raises:
            ValueError: an unknown recipe or setting.
        """
        return cls.from_dict({"recipe": name}, **settings)

    @classmethod
    def from_file(cls, path: str | Path, /, **overrides: Any) -> TrainConfig:
        """Read a YAML (or JSON) mapping of fields, then apply `overrides`.

        Raises:
            FileNotFoundError: no such file. ValueError: not YAML (or nested too deeply), not a mapping,
                or unknown keys.
        """
        import yaml

        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no such config file: {str(path)!r}")
        try:
            mapping = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from err
        except RecursionError:
            raise ValueError(f"{path} is nested too deeply to be a file of training settings") from None
        if not isinstance(mapping, dict):
            raise ValueError(f"{path} must hold a mapping of training settings, got {type(mapping).__name__}")
        return cls.from_dict(mapping, **overrides)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


__all__ = [
    "TrainConfig", "RECIPES", "MixedPrecision", "PerceptualKind", "DataFormat", "DataViews", "KNOWN_TRACKERS",
]
