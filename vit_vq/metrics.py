"""Reconstruction and codebook metrics: PSNR, SSIM, blockiness, codebook usage/perplexity, Frechet distance.

Every image metric takes float images `[B, 3, H, W]` in [0, 1] (`data_range=1`) and
returns one value per image, so a caller can average over a data set however it likes
(`MeanAccumulator` averages per-image values). Accumulators keep their state on the
device of the first update and sync to the host only when read.

The network-based metrics (LPIPS, rFID) need pretrained weights. `PublishedFID`,
`InceptionFeatures` and `lpips_network` load them only from local files and raise
`MetricUnavailable` with the reason otherwise; they never download. `PublishedFID` (torchmetrics
on torch-fidelity's TF-Inception, the network of published FIDs; `pip install 'vit_vq[metrics]'`)
gives rFIDs comparable with papers; `InceptionFeatures` (torchvision's Inception-v3) only with
other runs of this library.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

INCEPTION_WEIGHTS = "inception_v3_google-0cc3c7bd.pth"  # torchvision's ImageNet Inception-v3
# torch-fidelity's port of the TF Inception used by pytorch-fid and published FIDs, as torch.hub caches it
FID_INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
FID_INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{FID_INCEPTION_WEIGHTS}"
LPIPS_BACKBONES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


class MetricUnavailable(RuntimeError):
    """A metric whose network weights are not available locally (the message says what is missing)."""


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two image batches of the same shape [B, C, H, W], got {tuple(x.shape)} and {tuple(y.shape)}")


# -- per-image metrics ---------------------------------------------------------------
def psnr(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0, max_db: float = 100.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB: `10 log10(range^2 / mse)`.

    Args:
        x: float `[B, C, H, W]` in `[0, data_range]`.
        y: the reference, same shape as `x`.
        max_db: cap for identical images (mse = 0), so averages stay finite.

    Returns:
        float32 `[B]`.

    Raises:
        ValueError: shapes differ or are not 4-d.
    """
    _check_pair(x, y)
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).double()  # (B,)
    floor = data_range**2 * 10 ** (-max_db / 10)
    return (10 * torch.log10(data_range**2 / mse.clamp(min=floor))).float()


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1-d Gaussian taps `[size]` (float64)."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(r**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    data_range: float = 1.0,
    window: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image, averaged over channels.

    Gaussian-weighted local statistics (separable `window` x `window`, `sigma`), population
    covariances, and the mean over the "valid" region (the border of width `window // 2`
    is excluded) — the same as `skimage.metrics.structural_similarity(..., gaussian_weights=True,
    use_sample_covariance=False, data_range=1)`.

    Args:
        x: float `[B, C, H, W]` with `H, W >= window`.
        y: the reference, same shape as `x`.

    Returns:
        float32 `[B]`, in [-1, 1].

    Raises:
        ValueError: shapes differ, or images are smaller than the window.
    """
    _check_pair(x, y)
    B, C, H, W = x.shape
    if H < window or W < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} px, got {H}x{W}")
    g = gaussian_window(window, sigma).to(x.device, torch.float32)
    kh = g.view(1, 1, window, 1).expand(C, 1, window, 1)  # depthwise, vertical pass
    kw = g.view(1, 1, 1, window).expand(C, 1, 1, window)  # depthwise, horizontal pass

    def blur(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H-win+1, W-win+1)
        return F.conv2d(F.conv2d(t, kh, groups=C), kw, groups=C)

    x, y = x.float(), y.float()
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(2).mean(2).mean(1)  # (B,)


def blockiness(x: torch.Tensor, *, block: int = 8) -> torch.Tensor:
    """How much a `block`-px grid shows, per image: the mean absolute step between neighbouring
    pixels across block boundaries divided by the mean step inside blocks, for horizontal
    and vertical neighbours, then averaged over the two directions.

    Natural photos score about 1; a decoder that paints each token's block on its own scores
    above 1 (seams). Boundaries are at multiples of `block` from the top-left corner.

    Args:
        x: float `[B, C, H, W]` with `H, W > block`.

    Returns:
        float32 `[B]` (a flat image, with no steps inside blocks, divides by a 1e-12 floor).

    Raises:
        ValueError: not 4-d, or an image no larger than one block.
    """
    if x.ndim != 4 or x.shape[-1] <= block or x.shape[-2] <= block:
        raise ValueError(f"expected images [B, C, H, W] larger than {block} px, got {tuple(x.shape)}")
    x = x.double()
    ratios = []
    for dim in (-1, -2):
        step = (x.narrow(dim, 1, x.shape[dim] - 1) - x.narrow(dim, 0, x.shape[dim] - 1)).abs()  # (B, C, ., .)
        across = (torch.arange(1, x.shape[dim], device=x.device) % block) == 0  # step j joins pixels j and j+1
        across = across.view(-1, 1) if dim == -2 else across
        across = across.expand(step.shape[-2:])
        edge = step[..., across].flatten(1).mean(1)  # (B,)
        inside = step[..., ~across].flatten(1).mean(1)  # (B,)
        ratios.append(edge / inside.clamp(min=1e-12))
    return ((ratios[0] + ratios[1]) / 2).float()


# -- accumulators --------------------------------------------------------------------
class MeanAccumulator:
    """Running mean of per-item values (float64 on the host)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, values: torch.Tensor) -> None:
        """Add per-item values `[B]`."""
        self.total += float(values.detach().double().sum())
        self.count += values.numel()

    @property
    def mean(self) -> float:
        """The mean so far (NaN before any update)."""
        return self.total / self.count if self.count else math.nan


class CodebookUsage:
    """Histogram of code indices over a whole data set.

    `usage` is the fraction of the `codebook_size` codes used at least once; `perplexity`
    is `exp(H(p))` of the code frequencies, between 1 (one code) and `codebook_size`
    (uniform use).
    """

    def __init__(self, codebook_size: int) -> None:
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        self.codebook_size = codebook_size
        self.counts: torch.Tensor | None = None

    def update(self, indices: torch.Tensor) -> None:
        """Count int codes of any shape, in `[0, codebook_size)`.

        Raises:
            ValueError: codes out of range.
        """
        flat = indices.detach().reshape(-1).long()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.codebook_size):
            raise ValueError(f"codes must be in [0, {self.codebook_size}), got [{int(flat.min())}, {int(flat.max())}]")
        counts = torch.bincount(flat, minlength=self.codebook_size)
        self.counts = counts if self.counts is None else self.counts + counts.to(self.counts.device)

    @property
    def total(self) -> int:
        return 0 if self.counts is None else int(self.counts.sum())

    @property
    def usage(self) -> float:
        """Fraction of codes seen at least once (0 before any update)."""
        return 0.0 if self.counts is None else float((self.counts > 0).double().mean())

    @property
    def perplexity(self) -> float:
        """`exp` of the entropy (nats) of the code frequencies (NaN before any update)."""
        if not self.total:
            return math.nan
        p = self.counts.double() / self.total
        p = p[p > 0]
        return float(torch.exp(-(p * p.log()).sum()))


class FeatureStatistics:
    """Running mean and covariance of feature vectors `[B, F]` (float64), for Frechet distances."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def update(self, feats: torch.Tensor) -> None:
        f = feats.detach().double().cpu()
        if self.sum is None:
            self.sum, self.outer = f.sum(0), f.T @ f
        else:
            self.sum += f.sum(0)
            self.outer += f.T @ f
        self.n += f.shape[0]

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mean [F], covariance [F, F])`, the covariance with the unbiased `n - 1` divisor.

        Raises:
            ValueError: fewer than two vectors.
        """
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.n}")
        mu = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu, cov


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """`|mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2))` between two Gaussians, in float64.

    The trace of the matrix square root is computed from the eigenvalues of the symmetric
    `cov1^(1/2) cov2 cov1^(1/2)`, which is stable for the rank-deficient covariances
    of small sets.
    """
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    s1 = _sqrt_psd(cov1)
    tr_sqrt = torch.linalg.eigvalsh(s1 @ cov2 @ s1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * tr_sqrt)


# -- network-based metrics (local weights only) ----------------------------------------
def hub_checkpoint(name: str) -> Path:
    """Where torchvision caches a weights file (`$TORCH_HOME/hub/checkpoints/<name>`)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / name


class InceptionFeatures(nn.Module):
    """torchvision Inception-v3 pool features `[B, 2048]` for images `[B, 3, H, W]` in [0, 1].

    Images are resized to 299x299 (bilinear) and mapped to [-1, 1], the input range the
    ImageNet weights were trained with. rFID from these features is comparable between
    runs of this library, not to numbers computed with the TF-Inception weights of `pytorch-fid`.
    """

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        path = Path(weights).expanduser() if weights else hub_checkpoint(INCEPTION_WEIGHTS)
        if not path.is_file():
            raise MetricUnavailable(f"no Inception-v3 weights at {path}; pass --inception-weights FILE")
        try:
            from torchvision.models import inception_v3
        except ImportError as err:
            raise MetricUnavailable("torchvision is not installed (pip install 'vit_vq[train]')") from err
        net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except (RuntimeError, OSError, ValueError) as err:
            raise MetricUnavailable(f"{path} does not hold torchvision Inception-v3 weights: {str(err)[:200]}") from err
        net.fc = nn.Identity()
        self.net = net.eval()

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x * 2 - 1)  # (B, 2048)


class PublishedFID:
    """rFID as papers compute it: torchmetrics' `FrechetInceptionDistance` (2048 pool3 features of
    torch-fidelity's TF-Inception, the network of `pytorch-fid`), from a local weights file.

    Args:
        weights: the TF-Inception state dict (`weights-inception-2015-12-05-6726825d.pth`); default:
            that file in the torch hub cache (`$TORCH_HOME/hub/checkpoints`), where torch-fidelity puts it.
        features: the feature tap: 2048 (pool3, what FID means) or one of torchmetrics' smaller
            ones (64, 192, 768), whose numbers are not comparable with published FIDs.

    `update(real, fake)` takes float image batches `[B, 3, H, W]` in [0, 1]; they are rounded to
    8 bits (the network takes uint8 and resizes to 299 px itself, with the original's TF1-style
    bilinear resize rather than torchmetrics' default antialiased one). `compute()` gives the distance.

    Raises:
        MetricUnavailable: torchmetrics or torch-fidelity not installed, or no weights file, or a
            file that is not a plain state dict of tensors.
    """

    description = "torchmetrics FID on torch-fidelity's TF-Inception (comparable with published FIDs)"

    def __init__(self, weights: str | Path | None = None, *, features: Literal[64, 192, 768, 2048] = 2048) -> None:
        if features not in (64, 192, 768, 2048):
            raise ValueError(f"features must be one of (64, 192, 768, 2048), got {features!r}")
        try:
            import torch_fidelity  # noqa: F401  (torchmetrics' FID network)
            from torchmetrics.image.fid import FrechetInceptionDistance
        except ImportError as err:
            raise MetricUnavailable(f"{err.name} is not installed (pip install 'vit_vq[metrics]')") from err
        path = Path(weights).expanduser() if weights else hub_checkpoint(FID_INCEPTION_WEIGHTS)
        if not path.is_file():
            raise MetricUnavailable(f"no TF-Inception FID weights at {path} (download {FID_INCEPTION_URL} there)")
        try:  # torch-fidelity reads the file with full unpickling: check it holds only tensors first
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # any unpickling failure means "not a plain state dict"
            raise MetricUnavailable(f"{path} is not a state dict readable with torch.load(weights_only=True): {err}") from err
        if not isinstance(state, dict):
            raise MetricUnavailable(f"{path} holds a {type(state).__name__}, expected the TF-Inception state dict")
        try:
            # antialias=False: the TF1-style bilinear resize of the original (torch-fidelity, pytorch-fid);
            # torchmetrics' default antialiased resize gives other features, hence other FIDs
            self.metric = FrechetInceptionDistance(feature=features, feature_extractor_weights_path=str(path), antialias=False)
        except (RuntimeError, KeyError) as err:
            raise MetricUnavailable(f"{path} does not hold torch-fidelity's TF-Inception weights: {str(err)[:200]}") from err

    def to(self, device: torch.device | str) -> PublishedFID:
        self.metric = self.metric.to(device)
        return self

    @property
    def n(self) -> int:
        """Images added so far (on each side)."""
        return int(self.metric.real_features_num_samples)

    @torch.inference_mode()
    def update(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        _check_pair(real, fake)
        for images, is_real in ((real, True), (fake, False)):
            self.metric.update((images.float().clamp(0, 1) * 255).round().to(torch.uint8), real=is_real)

    def compute(self) -> float:
        """The Frechet distance between the two sets' features.

        Raises:
            ValueError: fewer than two images.
        """
        if self.n < 2:
            raise ValueError(f"need at least 2 images for a Frechet distance, got {self.n}")
        return float(self.metric.compute())


def lpips_network(net: str = "alex") -> nn.Module:
    """The `lpips` package's LPIPS metric with `net` (`alex` or `vgg`), loaded from local files only.

    The returned module maps two image batches in [-1, 1] to distances `[B, 1, 1, 1]`.

    Raises:
        MetricUnavailable: `lpips` is not installed, or the backbone's torchvision weights are not cached.
    """
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"net must be one of {sorted(LPIPS_BACKBONES)}, got {net!r}")
    try:
        import lpips
    except ImportError as err:
        raise MetricUnavailable("the `lpips` package is not installed (pip install lpips)") from err
    backbone = hub_checkpoint(LPIPS_BACKBONES[net])
    if not backbone.is_file():
        raise MetricUnavailable(f"LPIPS needs torchvision's {net} weights at {backbone}")
    return lpips.LPIPS(net=net, verbose=False).eval()


__all__ = [
    "psnr",
    "ssim",
    "blockiness",
    "gaussian_window",
    "MeanAccumulator",
    "CodebookUsage",
    "FeatureStatistics",
    "frechet_distance",
    "InceptionFeatures",
    "PublishedFID",
    "lpips_network",
    "MetricUnavailable",
    "hub_checkpoint",
]
