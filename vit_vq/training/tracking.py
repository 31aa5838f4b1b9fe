"""What a run reports: scalar averages, reconstruction grids and the summary line logged every N steps.

Scalars go to accelerate's trackers (TensorBoard by default). Reconstruction grids are saved
as PNG files under `<output>/samples/` and, for TensorBoard, logged as images.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


class MetricMeter:
    """Sums named scalar tensors on the device, without host syncs, until `read` averages them.

    Each name is averaged over the `add` calls that carried it. `read` with a `reduce` function
    is collective under multi-process training: every rank must call it with the same names.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1

    def read(self, reduce: Any = None) -> dict[str, float]:
        """Averages per name (and over ranks, through `reduce(tensor) -> tensor`); then reset."""
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        device = self.sums[keys[0]].device
        stacked = torch.stack([self.sums[k].to(device) / self.counts[k] for k in keys])  # (n_keys,)
        if reduce is not None:
            stacked = reduce(stacked)
        self.sums, self.counts = {}, {}
        return dict(zip(keys, stacked.tolist(), strict=True))


def tracker_config(config: dict[str, Any]) -> dict[str, Any]:
    """A flat dict of scalars and strings (what TensorBoard's hparams accepts)."""
    flat: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv if isinstance(vv, (int, float, str, bool)) else str(vv) for kk, vv in v.items()})
        elif isinstance(v, (int, float, str, bool)):
            flat[k] = v
        else:
            flat[k] = str(v)
    return flat


def reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Originals in the top row, reconstructions below: float `[3, H', W']` in [0, 1]."""
    from torchvision.utils import make_grid

    pair = torch.cat([originals.float().cpu(), reconstructions.float().clamp(0, 1).cpu()])  # (2n, 3, S, S)
    return make_grid(pair, nrow=originals.shape[0], padding=2, pad_value=1.0)


def save_grid(grid: torch.Tensor, path: Path) -> None:
    """Write a `[3, H, W]` float grid as PNG (atomically: temp file, then rename)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)


def log_grid(accelerator: Any, grid: torch.Tensor, step: int) -> None:
    """Send the grid to the trackers that take images (TensorBoard)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("reconstructions", grid, global_step=step)
        elif hasattr(tracker, "log_images"):
            try:
                tracker.log_images({"reconstructions": [grid.permute(1, 2, 0).numpy()]}, step=step)
            except (TypeError, ValueError) as err:
                logger.debug("tracker %s did not take the reconstruction grid: %s", tracker.name, err)


def step_summary(step: int, max_steps: int, images: int, seconds: float, metrics: dict[str, float]) -> str:
    """One line: `step 1200/2000 | loss 0.0412 | l2 0.0101 | psnr 21.3 | lr 0.0001 | usage 0.910 | ... | 812.3 img/s`.

    `metrics` are the averages since the last line, `images` and `seconds` what that interval took
    (`psnr` is `10 log10(1 / l2)`, from the mean squared error over the interval).
    """
    parts = [f"step {step}/{max_steps}"]
    for key in ("loss", "l2", "l1", "perceptual", "commit", "g_adv", "d_loss"):
        if key in metrics:
            parts.append(f"{key} {metrics[key]:.4g}")
    if metrics.get("l2", 0) > 0:
        parts.append(f"psnr {10 * math.log10(1 / metrics['l2']):.2f}")
    for key, fmt in (("lr", "{:.3g}"), ("usage", "{:.3f}"), ("perplexity", "{:.1f}"), ("dead_codes", "{:.0f}"),
                     ("skipped", "{:.0f}")):
        if key in metrics:
            parts.append(f"{key} " + fmt.format(metrics[key]))
    parts.append(f"{images / max(seconds, 1e-9):.1f} img/s")
    return " | ".join(parts)


__all__ = ["MetricMeter", "tracker_config", "reconstruction_grid", "save_grid", "log_grid", "step_summary"]
