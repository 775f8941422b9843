"""Helpers shared by our staged backbones (CSWin, BiFormer, SG-Former), following timm's conventions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models._features import feature_take_indices
from torch import Tensor, nn


def prune_stages(model: nn.Module, indices: int | list[int], prune_norm: bool, prune_head: bool) -> list[int]:
    """Drop the stages after the last wanted index, and the final norm / head when asked or no longer valid.

    ``model`` has ``stages``, ``norm``, ``feature_info`` and ``reset_classifier``; when the last stage goes,
    the head's input width changes, so the head is reset and ``num_features`` follows the new last stage.
    Returns the kept absolute stage indices.
    """
    take_indices, max_index = feature_take_indices(len(model.stages), indices)
    prune_end = max_index < len(model.stages) - 1
    model.stages = model.stages[: max_index + 1]
    if prune_norm or prune_end:
        model.norm = nn.Identity()
    if prune_end:
        model.num_features = model.head_hidden_size = model.feature_info[max_index]["num_chs"]
    if prune_head or prune_end:
        model.reset_classifier(0, "")
    return take_indices


# Where training checkpoints keep the weights, most preferred first: released CSWin / SG-Former files are timm
# CheckpointSaver dicts (EMA weights first), BiFormer's are {"model": ...}.
CHECKPOINT_CONTAINER_KEYS = ("state_dict_ema", "model_ema", "model", "state_dict")


def unwrap_checkpoint(checkpoint: dict) -> dict:
    """The weights out of a (possibly nested) training checkpoint, without a DDP ``module.`` prefix."""
    while isinstance(checkpoint, dict) and not any(isinstance(v, Tensor) for v in checkpoint.values()):
        key = next((k for k in CHECKPOINT_CONTAINER_KEYS if isinstance(checkpoint.get(k), dict)), None)
        if key is None:
            break
        checkpoint = checkpoint[key]
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def layer_norm_keep_dtype(
    x: Tensor, norm: nn.LayerNorm, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """LayerNorm that keeps bf16/fp16 activations in their dtype under autocast.

    Autocast would return fp32 here and the next Linear would cast it back: two full-size passes per norm.
    The kernel accumulates statistics in fp32 either way.
    """
    device = x.device.type
    if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            weight = None if weight is None else weight.to(x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
            return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)
    return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)
