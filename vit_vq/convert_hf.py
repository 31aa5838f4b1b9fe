"""Initialise the encoder from a pretrained Hugging Face ViT checkpoint.

The checkpoint is loaded through transformers' public API (`ViTModel.from_pretrained`);
its weights are renamed into this package's layout, so our checkpoints never contain
transformers' parameter names. Position embeddings are interpolated to the target grid.
Both the transformers 4.x (`encoder.layer.N.attention.attention.query`) and 5.x
(`layers.N.attention.q_proj`) layouts are understood.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .config import ViTVQConfig
from .layers import resample_pos_embed

# our name inside block i -> candidate HF names (5.x first, then 4.x)
_BLOCK_KEYS: dict[str, tuple[str, ...]] = {
    "norm1": ("layers.{i}.layernorm_before", "encoder.layer.{i}.layernorm_before"),
    "attn.q": ("layers.{i}.attention.q_proj", "encoder.layer.{i}.attention.attention.query"),
    "attn.k": ("layers.{i}.attention.k_proj", "encoder.layer.{i}.attention.attention.key"),
    "attn.v": ("layers.{i}.attention.v_proj", "encoder.layer.{i}.attention.attention.value"),
    "attn.proj": ("layers.{i}.attention.o_proj", "encoder.layer.{i}.attention.output.dense"),
    "norm2": ("layers.{i}.layernorm_after", "encoder.layer.{i}.layernorm_after"),
    "mlp.fc1": ("layers.{i}.mlp.fc1", "encoder.layer.{i}.intermediate.dense"),
    "mlp.fc2": ("layers.{i}.mlp.fc2", "encoder.layer.{i}.output.dense"),
}


def load_hf_vit(name_or_path: str, **kwargs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """`(hf_config, state_dict)` of a Hugging Face ViT (Hub id or local folder)."""
    from transformers import ViTModel

    model = ViTModel.from_pretrained(name_or_path, add_pooling_layer=False, **kwargs)
    return model.config, {k: v.detach().float() for k, v in model.state_dict().items()}


def config_from_hf(hf_config: Any, base: ViTVQConfig) -> ViTVQConfig:
    """`base` with the encoder fields taken from a HF `ViTConfig`.

    Raises:
        ValueError: when the patch sizes differ, `base` asks for 2D RoPE (a HF ViT's positions are
            learned), or the checkpoint uses an activation or layout this ViT does not implement.
    """
    if base.position_embedding != "learned":
        raise ValueError(
            f"a Hugging Face ViT carries learned absolute position embeddings, but the config asks for "
            f"position_embedding={base.position_embedding!r}; use position_embedding='learned'"
        )
    if hf_config.patch_size != base.patch_size:
        raise ValueError(
            f"the pretrained ViT uses patch_size={hf_config.patch_size} but the config asks for "
            f"patch_size={base.patch_size}; patch embeddings cannot be resized, so set patch_size={hf_config.patch_size}"
        )
    if getattr(hf_config, "hidden_act", "gelu") != "gelu":
        raise ValueError(f"only GELU ViTs can be converted, got hidden_act={hf_config.hidden_act!r}")
    if not getattr(hf_config, "qkv_bias", True):
        raise ValueError("only ViTs with qkv_bias=True can be converted")
    return dataclasses.replace(
        base,
        encoder_width=hf_config.hidden_size,
        encoder_depth=hf_config.num_hidden_layers,
        encoder_heads=hf_config.num_attention_heads,
        mlp_ratio=hf_config.intermediate_size / hf_config.hidden_size,
        layer_norm_eps=hf_config.layer_norm_eps,
        in_channels=hf_config.num_channels,
        encoder_cls_token=True,
    )


def _take(state: dict[str, torch.Tensor], candidates: tuple[str, ...], suffix: str) -> torch.Tensor:
    for c in candidates:
        if f"{c}.{suffix}" in state:
            return state[f"{c}.{suffix}"]
    raise ValueError(
        f"unrecognised Hugging Face ViT layout: none of {[f'{c}.{suffix}' for c in candidates]} in the checkpoint"
    )


def convert_state_dict(state: dict[str, torch.Tensor], config: ViTVQConfig) -> dict[str, torch.Tensor]:
    """HF ViT weights -> `Encoder` weights (everything but `to_code`)."""
    pos = state["embeddings.position_embeddings"]  # (1, 1 + g*g, W)
    out = {
        "patch_embed.weight": state["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.bias": state["embeddings.patch_embeddings.projection.bias"],
        "cls_token": state["embeddings.cls_token"],
        "cls_pos_embed": pos[:, :1],
        "pos_embed": resample_pos_embed(pos[:, 1:], (config.grid_size, config.grid_size)),
        "transformer.norm.weight": state["layernorm.weight"],
        "transformer.norm.bias": state["layernorm.bias"],
    }
    for i in range(config.encoder_depth):
        for ours, theirs in _BLOCK_KEYS.items():
            cands = tuple(t.format(i=i) for t in theirs)
            for suffix in ("weight", "bias"):
                out[f"transformer.blocks.{i}.{ours}.{suffix}"] = _take(state, cands, suffix)
    return out


def init_encoder_from_hf(encoder: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy converted HF weights into `encoder`; `to_code` keeps its fresh init."""
    converted = convert_state_dict(state, encoder.config)
    result = encoder.load_state_dict(converted, strict=False)
    leftover = [k for k in result.missing_keys if not k.startswith("to_code.")]
    if leftover or result.unexpected_keys:
        raise ValueError(f"HF ViT conversion left keys unset {leftover} or unused {result.unexpected_keys}")
