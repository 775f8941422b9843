"""``concat``: one MLP projector per expert, outputs concatenated along the sequence (LLaVA with one expert,
MouSi's MLP fusion with several). Tokens: the sum of every expert's (pooled) grid."""

from __future__ import annotations

import torch
from torch import nn

from .base import Fusion, TokenGrid
from .config import ProjectorConfig
from .mlp import MLPProjector


class ConcatFusion(Fusion):
    def __init__(self, cfg: ProjectorConfig, experts: dict[str, TokenGrid], out_dim: int):
        super().__init__(cfg, experts)
        self.projectors = nn.ModuleDict()
        for name, spec in self.pooled.items():
            opts = cfg.for_expert(name)
            self.projectors[name] = MLPProjector(
                spec.dim, out_dim, opts["depth"], opts["hidden_dim"], spec.grid, opts["pos_embed"]
            )
        self.layout = [self.pooled[n].grid for n in self.names]

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = self.pool(features)
        parts = [self.projectors[n](pooled[n]) for n in self.names]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
