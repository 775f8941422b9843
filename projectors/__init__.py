"""Fusion of visual experts into LLM embeddings: one config, one registry of families.

A fusion takes ``{expert name: [B, N_e, C_e]}`` (with each expert's grid known at build time) and returns
visual embeddings ``[B, M, D]``; its ``layout`` (the grids of its output segments) tells ``mm.positions`` how
many positions each visual token occupies. Add a family: a ``Fusion`` subclass in its own module,
registered in ``FUSIONS`` and named in ``config.FUSION_TYPES``.
"""

from __future__ import annotations

from .base import Fusion, TokenGrid
from .channel_concat import ChannelConcatFusion
from .concat import ConcatFusion
from .config import FUSION_TYPES, ExpertProjection, ProjectorConfig
from .mlp import MLPProjector
from .pooling import TokenPool
from .resampler import ResamplerFusion

FUSIONS: dict[str, type[Fusion]] = {
    "concat": ConcatFusion,
    "channel_concat": ChannelConcatFusion,
    "resampler": ResamplerFusion,
}
assert set(FUSIONS) == set(FUSION_TYPES)


def build_fusion(cfg: ProjectorConfig, experts: dict[str, TokenGrid], out_dim: int) -> Fusion:
    """The fusion ``cfg`` describes over ``experts`` (name -> channels and grid), into width ``out_dim``."""
    return FUSIONS[cfg.type](cfg, {n: TokenGrid(*spec) for n, spec in experts.items()}, out_dim)


__all__ = [
    "FUSIONS",
    "ExpertProjection",
    "Fusion",
    "MLPProjector",
    "ProjectorConfig",
    "TokenGrid",
    "TokenPool",
    "build_fusion",
]
