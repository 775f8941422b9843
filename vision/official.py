"""Build our backbones from the official repositories' constructor arguments and state dicts.

Each backbone family registers a builder (official kwargs -> our model) and the
``checkpoint_filter_fn`` that remaps official keys; ``from_official`` ties the two together so
golden tensors recorded with the official code can be reproduced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_BUILDERS: dict[str, tuple[Callable[[dict[str, Any]], nn.Module], Callable[[dict, nn.Module], dict]]] = {}


def register_official(
    arch: str,
    build: Callable[[dict[str, Any]], nn.Module],
    checkpoint_filter_fn: Callable[[dict, nn.Module], dict],
) -> None:
    """Register how to build family ``arch`` from official kwargs and remap its state dict."""
    _BUILDERS[arch] = (build, checkpoint_filter_fn)


def official_archs() -> list[str]:
    return sorted(_BUILDERS)


def from_official(
    arch: str, official_kwargs: dict[str, Any], state_dict: dict[str, torch.Tensor]
) -> nn.Module:
    """Our model for ``arch`` built from the official constructor kwargs, loaded strictly, in eval mode."""
    if arch not in _BUILDERS:
        raise KeyError(f"unknown backbone family {arch!r}; known: {official_archs()}")
    build, filter_fn = _BUILDERS[arch]
    model = build(dict(official_kwargs))
    model.load_state_dict(filter_fn(state_dict, model), strict=True)
    return model.eval()
