"""What every fusion shares: per-expert token pooling in front, and the layout of its output."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .config import ProjectorConfig
from .pooling import TokenPool


class TokenGrid(NamedTuple):
    """What an expert hands the fusion: ``dim`` channels on an ``(h, w)`` grid."""

    dim: int
    grid: tuple[int, int]


class Fusion(nn.Module):
    """``{expert name: [B, N_e, C_e]}`` -> visual embeddings ``[B, M, D]``.

    ``layout`` lists the (h, w) grids of the output's segments in sequence order (one per expert for
    ``concat``, one for the others); ``mm.positions`` turns it into per-token position increments
    (MouSi's ``original`` / ``share_by_row`` / ``share_all``).
    """

    layout: list[tuple[int, int]]

    def __init__(self, cfg: ProjectorConfig, experts: dict[str, TokenGrid]):
        super().__init__()
        if not experts:
            raise ValueError("a fusion needs at least one expert")
        unknown = sorted(set(cfg.experts) - set(experts))
        if unknown:
            raise ValueError(f"experts: settings for unknown expert(s) {unknown}; experts: {sorted(experts)}")
        self.names = list(experts)
        self.pools = nn.ModuleDict()
        self.pooled: dict[str, TokenGrid] = {}
        for name, spec in experts.items():
            opts = cfg.for_expert(name)
            pool = TokenPool(spec.grid, spec.dim, opts["pool"], opts["pool_mode"])
            self.pools[name] = pool
            self.pooled[name] = TokenGrid(pool.out_dim, pool.out_grid)

    @property
    def num_tokens(self) -> int:
        return sum(h * w for h, w in self.layout)

    def pool(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [n for n in self.names if n not in features]
        if missing:
            raise KeyError(f"fusion: no features for expert(s) {missing}")
        return {name: self.pools[name](features[name]) for name in self.names}

    def default_grid(self, cfg: ProjectorConfig) -> tuple[int, int]:
        """``cfg.grid``, else the grid of the expert with the fewest (pooled) tokens."""
        if cfg.grid is not None:
            return tuple(cfg.grid)
        return min((g.grid for g in self.pooled.values()), key=lambda hw: hw[0] * hw[1])
