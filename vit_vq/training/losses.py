"""Training losses: pixel L2/L1 and a perceptual loss on VGG16 features, LPIPS when the `lpips` package is there.

Two perceptual losses share one VGG16 trunk and its weights (below):

* `LPIPSLoss` (`kind="lpips"`, used when the `lpips` package is installed: `pip install 'vit_vq[lpips]'`)
  is the `lpips` package's own LPIPS-VGG module (Zhang et al. 2018) with the learned per-channel
  linear weights that ship in its wheel; its values are LPIPS-VGG distances as published.
* `PerceptualLoss` (`kind="vgg"`, the fallback without the package) is LPIPS-style with uniform
  channel weights: images in [0, 1] are normalised with ImageNet's mean/std (the range
  torchvision's VGG16 was trained on), features are taken after relu1_2, relu2_2, relu3_3,
  relu4_3 and relu5_3, unit-normalised over channels, and the squared distance is summed over
  channels, averaged over positions and batch, and summed over layers. Its values are on a
  different scale from LPIPS numbers (every channel weighs the same).

Pretrained VGG16 weights come from a local file (`weights_path`: safetensors, or a torchvision
`.pth` read with `torch.load(weights_only=True)`) or from torchvision's
`VGG16_Weights.IMAGENET1K_V1` through the torch hub cache. A download is attempted only when the
file is not cached, after a reachability probe bounded by `download_timeout` seconds, so a
firewalled machine fails fast with `PerceptualWeightsUnavailable` instead of hanging.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import urllib.parse
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import PerceptualKind
from .download import probe, socket_timeout

logger = logging.getLogger(__name__)

LPIPS_LAYERS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16().features
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PerceptualWeightsUnavailable(RuntimeError):
    """Pretrained VGG16 weights were asked for (perceptual_weight > 0) but cannot be had."""


def pixel_losses(recon: torch.Tensor, target: torch.Tensor, l2_weight: float, l1_weight: float) -> dict[str, torch.Tensor]:
    """`{"l2": mse, "l1": mae}` in float32 for images `[B, 3, H, W]`; a part whose weight is 0 is not computed."""
    out: dict[str, torch.Tensor] = {}
    if l2_weight > 0:
        out["l2"] = F.mse_loss(recon.float(), target.float())
    if l1_weight > 0:
        out["l1"] = F.l1_loss(recon.float(), target.float())
    return out


class VGGTaps(nn.Module):
    """Images float `[B, 3, H, W]` in [0, 1] -> raw VGG16 features `[B, C_l, H_l, W_l]` at the five LPIPS layers."""

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.features = features[: LPIPS_LAYERS[-1] + 1]
        for m in self.features:
            if isinstance(m, nn.ReLU):
                m.inplace = False  # the tapped activations must survive the next layer
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.mean) / self.std  # the range torchvision's VGG16 was trained on
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_LAYERS:
                out.append(x)
        return out


def _sq_norm(f: torch.Tensor) -> torch.Tensor:
    """`sum_c f^2` accumulated in float32: `[B, C, H, W]` -> `[B, H, W]`."""
    return torch.linalg.vector_norm(f, dim=1, dtype=torch.float32).square()


class PerceptualLoss(nn.Module):
    """LPIPS-style distance on frozen VGG16 features; inputs are images in [0, 1].

    Args:
        features: `torchvision.models.vgg16().features` (only layers up to relu5_3 are kept).

    `forward(recon, target)` takes float `[B, 3, H, W]` in [0, 1] (recon may stray outside
    while training) and returns a float32 scalar. No gradient reaches `target` or the VGG weights.
    On CUDA, move it with `.to(device, memory_format=torch.channels_last)` for faster convolutions.

    Per layer and position, with `a`, `b` the feature vectors and `n = |.|^2 + eps`, the
    distance of the unit vectors `|a/sqrt(n_a) - b/sqrt(n_b)|^2` is computed as
    `|a|^2/n_a + |b|^2/n_b - 2 a.b / sqrt(n_a n_b)`: channel reductions only, so no normalised
    float32 copy of the (large, early-layer) feature maps is made or kept for the backward pass.
    """

    eps = 1e-10
    kind = "vgg"
    description = "VGG16 features with uniform channel weights (LPIPS-style, not LPIPS values)"

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.net = VGGTaps(features).eval().requires_grad_(False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # always eval: the network is a fixed measuring instrument

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if recon.shape != target.shape or recon.ndim != 4 or recon.shape[1] != 3:
            raise ValueError(f"expected two image batches [B, 3, H, W], got {tuple(recon.shape)} and {tuple(target.shape)}")
        with torch.no_grad():
            ref = self.net(target)
            ref_n = [_sq_norm(b) + self.eps for b in ref]  # (B, H_l, W_l)
        loss = recon.new_zeros((), dtype=torch.float32)
        for a, b, nb in zip(self.net(recon), ref, ref_n, strict=True):
            na = _sq_norm(a) + self.eps  # (B, H_l, W_l)
            dot = (a * b).sum(1, dtype=torch.float32)  # (B, H_l, W_l)
            dist = (na - self.eps) / na + (nb - self.eps) / nb - 2 * dot * torch.rsqrt(na * nb)
            loss = loss + dist.mean()
        return loss


class LPIPSLoss(nn.Module):
    """LPIPS-VGG from the `lpips` package, over a given VGG16 trunk; inputs are images in [0, 1].

    Args:
        features: `torchvision.models.vgg16().features` with the weights to use (only layers up
            to relu5_3 are used); they replace the package's own backbone, which would be downloaded.

    The package's module supplies everything else: its input scaling, the unit normalisation of
    features, the learned per-channel linear weights of LPIPS v0.1 (`lpips/weights/v0.1/vgg.pth`,
    inside its wheel) and the spatial average. `forward(recon, target)` takes float `[B, 3, H, W]` in
    [0, 1] and returns the batch mean as a float32 scalar; nothing in it is trained.

    Raises:
        ModuleNotFoundError: the `lpips` package is not installed.
    """

    kind = "lpips"

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        import lpips

        with warnings.catch_warnings():  # lpips builds torchvision's vgg16 with the deprecated `pretrained=False`
            warnings.simplefilter("ignore", UserWarning)
            module = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        net = module.net
        for part in (net.slice1, net.slice2, net.slice3, net.slice4, net.slice5):  # children named by features index
            for name in list(part._modules):
                part._modules[name] = features[int(name)]
        self.lpips = module.eval().requires_grad_(False)
        self.description = f"LPIPS-VGG (lpips {importlib.metadata.version('lpips')}, its learned linear weights)"

    def train(self, mode: bool = True) -> LPIPSLoss:
        return super().train(False)  # always eval: the network is a fixed measuring instrument

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if recon.shape != target.shape or recon.ndim != 4 or recon.shape[1] != 3:
            raise ValueError(f"expected two image batches [B, 3, H, W], got {tuple(recon.shape)} and {tuple(target.shape)}")
        return self.lpips(recon, target.detach(), normalize=True).float().mean()  # normalize: [0, 1] -> [-1, 1]


def perceptual_kind(kind: PerceptualKind = "auto") -> Literal["lpips", "vgg"]:
    """`"lpips"` or `"vgg"`: `auto` picks LPIPS when the `lpips` package is installed.

    Raises:
        ValueError: an unknown kind. ModuleNotFoundError: `lpips` asked for but not installed.
    """
    if kind not in ("auto", "lpips", "vgg"):
        raise ValueError(f"perceptual loss kind must be 'auto', 'lpips' or 'vgg', got {kind!r}")
    installed = importlib.util.find_spec("lpips") is not None
    if kind == "lpips" and not installed:
        raise ModuleNotFoundError("the LPIPS perceptual loss needs the `lpips` package (pip install lpips)", name="lpips")
    if kind == "auto":
        return "lpips" if installed else "vgg"
    return kind


def build_perceptual_loss(
    weights_path: str | Path | None = None,
    *,
    download_timeout: float = 10.0,
    allow_random_init: bool = False,
    weight: float | None = None,
    kind: PerceptualKind = "auto",
) -> PerceptualLoss | LPIPSLoss:
    """A perceptual loss on pretrained VGG16 weights: `LPIPSLoss` or `PerceptualLoss`, as `kind` says.

    Args:
        weights_path: a VGG16 state dict (`.safetensors`, or a torchvision `.pth`); keys may
            carry the `features.` prefix; classifier weights are ignored.
        download_timeout: seconds allowed for the reachability probe and for each stalled
            read of a download; 0 never downloads (the torch hub cache is still used).
        allow_random_init: use a randomly initialised VGG16 when no weights can be had
            (tests and benchmarks only: the loss then measures nothing meaningful).
        weight: the configured perceptual weight, quoted in the error message.
        kind: `lpips` (the `lpips` package's LPIPS), `vgg` (uniform channel weights), or `auto`
            (`lpips` when the package is installed).

    Raises:
        PerceptualWeightsUnavailable: no usable weights; the message says how to provide them.
        FileNotFoundError: `weights_path` does not exist. ValueError: it is not a VGG16 state dict.
        ModuleNotFoundError: `kind="lpips"` without the `lpips` package.
    """
    loss_class = LPIPSLoss if perceptual_kind(kind) == "lpips" else PerceptualLoss
    features = vgg16_features()
    if weights_path is not None:
        state = load_vgg16_file(weights_path)
    else:
        try:
            state = torchvision_vgg16_state(download_timeout)
        except PerceptualWeightsUnavailable as err:
            if not allow_random_init:
                raise PerceptualWeightsUnavailable(_unavailable_message(str(err), weight)) from None
            logger.warning("VGG16 weights unavailable (%s); using a random VGG16 as allowed", err)
            return loss_class(features)
    _load_features(features, state, str(weights_path or "torchvision VGG16_Weights.IMAGENET1K_V1"))
    return loss_class(features)


def vgg16_features() -> nn.Sequential:
    """torchvision's VGG16 convolutional trunk (`vgg16().features`), randomly initialised.

    Built without the 100M-parameter classifier, which the perceptual loss does not use.
    """
    from torchvision.models.vgg import cfgs, make_layers

    return make_layers(cfgs["D"], batch_norm=False)


def load_vgg16_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a VGG16 state dict from `.safetensors` or a `torch.save`d file, never unpickling objects."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no VGG16 weights file at {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure means "not a plain state dict"
        raise ValueError(f"{path} is not a VGG16 state dict readable with torch.load(weights_only=True): {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a VGG16 state dict")
    return state


def _load_features(features: nn.Sequential, state: dict[str, torch.Tensor], source: str) -> None:
    wanted = {k: v for k, v in features.state_dict().items() if int(k.split(".")[0]) <= LPIPS_LAYERS[-1]}
    given = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
    missing = sorted(set(wanted) - set(given))
    bad = [k for k in wanted if k in given and given[k].shape != wanted[k].shape]
    if missing or bad:
        raise ValueError(f"{source} is not a VGG16 state dict: missing {missing[:6]}, wrong shapes {bad[:6]}")
    features.load_state_dict({k: given[k] for k in wanted}, strict=False)


def torchvision_vgg16_state(download_timeout: float) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet VGG16 weights from the torch hub cache, downloading them if allowed.

    Raises:
        PerceptualWeightsUnavailable: not cached and the download is disabled, unreachable or failed.
    """
    url = vgg16_url()
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(url).path).name
    if cached.is_file():
        return load_vgg16_file(cached)
    if download_timeout <= 0:
        raise PerceptualWeightsUnavailable(f"{cached} is not there and downloads are off (download_timeout=0)")
    try:
        probe(url, download_timeout)
        logger.info("downloading VGG16 weights from %s to %s", url, cached)
        with socket_timeout(download_timeout):
            torch.hub.load_state_dict_from_url(url, progress=False, map_location="cpu", weights_only=True)
    except (OSError, TimeoutError) as err:
        raise PerceptualWeightsUnavailable(f"downloading {url} failed: {type(err).__name__}: {err}") from err
    return load_vgg16_file(cached)


def vgg16_url() -> str:
    """Where torchvision downloads its ImageNet VGG16 weights from."""
    from torchvision.models import VGG16_Weights

    return VGG16_Weights.IMAGENET1K_V1.url


def _unavailable_message(reason: str, weight: float | None) -> str:
    name = Path(urllib.parse.urlparse(vgg16_url()).path).name
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    what = f"perceptual_weight={weight:g}" if weight is not None else "the perceptual loss"
    return (
        f"{what} needs pretrained VGG16 weights, which could not be loaded: {reason}. Either\n"
        f"  - put torchvision's {name} into {cache} (on a machine with internet, run\n"
        "    python -c \"import torchvision; torchvision.models.vgg16(weights='IMAGENET1K_V1')\"\n"
        "    and copy it from that machine's torch hub checkpoints folder), or\n"
        "  - set TrainConfig.perceptual_weights_path=FILE (a VGG16 state dict, .safetensors or torchvision .pth), or\n"
        "  - train without the perceptual loss: TrainConfig.perceptual_weight=0"
    )


__all__ = [
    "PerceptualLoss",
    "LPIPSLoss",
    "PerceptualKind",
    "perceptual_kind",
    "VGGTaps",
    "PerceptualWeightsUnavailable",
    "build_perceptual_loss",
    "load_vgg16_file",
    "vgg16_features",
    "pixel_losses",
    "torchvision_vgg16_state",
    "LPIPS_LAYERS",
]
