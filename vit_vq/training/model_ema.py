"""`ModelEMA`: an exponential moving average of a model's weights, kept in float32.

Parameters are averaged (`ema += (1 - decay) * (param - ema)`); buffers, such as an EMA
codebook that already is an average, are copied. The state is a flat `{name: tensor}` dict
with the model's `state_dict()` names, so it is saved as safetensors and loads into a fresh
model with `load_state_dict(strict=True)`.
"""

from __future__ import annotations

import torch
from torch import nn


class ModelEMA:
    """EMA of `model`'s persistent state (parameters averaged, buffers copied).

    Args:
        model: the unwrapped model; its current weights start the average.
        decay: in [0, 1); 0.999 averages over roughly the last 1000 updates.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        params = dict(model.named_parameters())
        state = model.state_dict()
        self.param_names = [k for k in state if k in params and state[k].is_floating_point()]
        self.shadow = {k: v.detach().clone().float() if k in self.param_names else v.detach().clone() for k, v in state.items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards `model`'s current weights (call once per optimizer step)."""
        state = model.state_dict()
        ema = [self.shadow[k] for k in self.param_names]
        new = [state[k].detach().float() for k in self.param_names]
        torch._foreach_lerp_(ema, new, 1.0 - self.decay)
        for k, v in state.items():
            if k not in self.param_names:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged state, with the model's `state_dict()` names."""
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a saved average.

        Raises:
            ValueError: the names or shapes differ from this model's.
        """
        if set(state) != set(self.shadow):
            diff = sorted(set(state) ^ set(self.shadow))
            raise ValueError(f"the saved model EMA does not match the model: differing keys {diff[:8]}")
        for k, v in state.items():
            if v.shape != self.shadow[k].shape:
                raise ValueError(f"the saved model EMA has {k} of shape {tuple(v.shape)}, expected {tuple(self.shadow[k].shape)}")
            self.shadow[k].copy_(v)


__all__ = ["ModelEMA"]
