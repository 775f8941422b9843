"""Visual experts: one interface over vision towers, one registry of kinds.

- ``timm``: any timm model, our CSWin / BiFormer / SG-Former included (``timm_expert``).
- ``open_clip``: an open_clip architecture's visual tower (``open_clip_expert``).
- ``hf``: a HuggingFace vision tower from a local directory (``hf_expert``).

Add a kind: a ``VisualExpert`` subclass with ``build`` and ``tokens``, registered in ``EXPERT_KINDS``.
"""

from __future__ import annotations

from typing import Any

from .base import IMAGENET_MEAN, IMAGENET_STD, ExpertConfig, VisualExpert
from .hf_expert import HFExpert
from .open_clip_expert import OpenCLIPExpert
from .preprocess import Preprocessing
from .timm_expert import TimmExpert

EXPERT_KINDS: dict[str, type[VisualExpert]] = {
    "timm": TimmExpert,
    "open_clip": OpenCLIPExpert,
    "hf": HFExpert,
}


def build_expert(cfg: ExpertConfig | dict[str, Any], load_weights: bool = True) -> VisualExpert:
    """The expert ``cfg`` describes; ``load_weights=False`` rebuilds a saved one from ``cfg.tower_config``."""
    cfg = cfg if isinstance(cfg, ExpertConfig) else ExpertConfig.from_dict(cfg)
    return EXPERT_KINDS[cfg.kind](cfg, load_weights=load_weights)


__all__ = [
    "EXPERT_KINDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ExpertConfig",
    "Preprocessing",
    "VisualExpert",
    "build_expert",
]
