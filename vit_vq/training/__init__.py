"""Training and fine-tuning of `ViTVQTokenizer`s on accelerate (install the `train` extra).

    from vit_vq.training import TrainConfig, Trainer
    Trainer(TrainConfig(preset="tiny", data="photos/", output="runs/tiny", max_steps=2000)).train()

Modules: `config` (TrainConfig), `trainer` (the loop), `losses` (pixel and VGG16 perceptual),
`discriminator` (patch GAN, hinge, adaptive weight), `data` (sources, seeded augmentations,
loader), `checkpoint` (atomic save/resume), `model_ema`, `tracking` (scalars, grids, summaries),
`download` (bounded network access), `views` (training views cut on the training device).
"""

from .config import TrainConfig
from .losses import PerceptualLoss, PerceptualWeightsUnavailable, build_perceptual_loss
from .trainer import NonFiniteLossError, Trainer, TrainResult
from .views import DeviceViews, ViewsTooLarge

__all__ = [
    "TrainConfig",
    "Trainer",
    "TrainResult",
    "NonFiniteLossError",
    "PerceptualLoss",
    "PerceptualWeightsUnavailable",
    "build_perceptual_loss",
    "DeviceViews",
    "ViewsTooLarge",
]
