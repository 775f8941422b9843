"""Helpers shared by our staged backbones (CSWin, BiFormer, SG-Former), following timm's conventions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
    if weight is not None and weight.dtype != x.dtype:  # e.g. weights cast for a 16-bit stream, fp32 input
        weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
    return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)


# layer name -> (weight, bias) as a block computes with them
Weights = dict[str, tuple[Tensor | None, Tensor | None]]


class _CastTogether(torch.autograd.Function):
    """Cast fp32 tensors to ``dtype`` with one ``cat`` + one cast, and their gradients back the same way.

    A custom Function: one autograd node instead of the views, ``cat``, casts and splits of the plain ops.
    """

    @staticmethod
    def forward(ctx: Any, dtype: torch.dtype, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.shapes = [t.shape for t in tensors]
        flat = torch.cat([_flat(t) for t in tensors]).to(dtype)
        return _unflat(flat, ctx.shapes)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        return (None, *_unflat(torch.cat([_flat(g) for g in grads]).float(), ctx.shapes))


def _flat(t: Tensor) -> Tensor:
    return t if t.dim() == 1 else t.reshape(-1)


def _unflat(flat: Tensor, shapes: list[torch.Size]) -> tuple[Tensor, ...]:
    pieces = flat.split([s.numel() for s in shapes])
    return tuple(p if len(s) == 1 else p.view(s) for p, s in zip(pieces, shapes))


def cast_weights_together(groups: Sequence[dict[str, nn.Module | None]], x: Tensor) -> list[Weights]:
    """Per group, ``name -> (weight, bias)`` of its layers; under autocast all cast to its dtype together.

    Autocast casts every fp32 parameter on its own: one kernel forward and one for its gradient backward,
    about 20-30 per block, and eager training at small sizes is bound by such per-op host cost. One
    ``_CastTogether`` does the same for a whole stage in a few ops; values and gradients are identical. The
    layers then run functionally on the result. Without autocast the parameters themselves are returned.
    """
    pairs = [{name: (m.weight, m.bias) for name, m in group.items() if m is not None} for group in groups]
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return pairs
    tensors = [t for group in pairs for pair in group.values() for t in pair if t is not None]
    if len(tensors) < 3 or any(t.dtype != torch.float32 for t in tensors):
        return pairs  # nothing to gain, or not what autocast would cast
    cast = iter(_CastTogether.apply(torch.get_autocast_dtype(device), *tensors))
    return [
        {name: tuple(None if t is None else next(cast) for t in pair) for name, pair in g.items()}
        for g in pairs
    ]


def weights_or_own(weights: Weights | None, layers: dict[str, nn.Module | None], x: Tensor) -> Weights:
    """``weights`` handed down by a stage, else ``layers``' own (cast together under autocast): what a block
    or layer called on its own computes with."""
    return cast_weights_together([layers], x)[0] if weights is None else weights
