"""Projectors: map a visual expert's token grid to LLM embeddings. One registry, one config dataclass.

A projector class is built by ``from_config(cfg, in_dim, out_dim, grid)`` and says how many LLM positions it
produces for a number of expert tokens (``output_length``). Add a kind by writing its module and registering
it below.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .mlp import MLPProjector

PROJECTORS: dict[str, type[nn.Module]] = {"mlp": MLPProjector}


@dataclass
class ProjectorConfig:
    """``type`` picks the registered class; the other fields are its options (MLP: see ``mlp.py``)."""

    type: str = "mlp"
    depth: int = 2
    hidden_dim: int | None = None
    pool: int = 1  # merge pool x pool neighbouring tokens into one (pixel-unshuffle)
    pos_embed: bool = False  # append fixed 2-D sin-cos coordinates of each token

    def __post_init__(self) -> None:
        if self.type not in PROJECTORS:
            raise ValueError(f"type: unknown projector {self.type!r}; known: {', '.join(sorted(PROJECTORS))}")
        if self.depth < 1:
            raise ValueError(f"depth: must be >= 1, got {self.depth}")
        if self.pool < 1:
            raise ValueError(f"pool: must be >= 1, got {self.pool}")

    @classmethod
    def from_dict(cls, d: dict) -> ProjectorConfig:
        return cls(**d)


def build_projector(
    cfg: ProjectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int] | None = None
) -> nn.Module:
    return PROJECTORS[cfg.type].from_config(cfg, in_dim, out_dim, grid)


__all__ = ["PROJECTORS", "MLPProjector", "ProjectorConfig", "build_projector"]
