"""``channel_concat`` (EAGLE): every expert's grid resampled to one grid (bilinear), channels concatenated,
one MLP. The token count is the grid's, however many experts there are."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Fusion, TokenGrid
from .config import ProjectorConfig
from .mlp import MLPProjector


def resample_grid(tokens: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """``[B, h*w, C]`` -> ``[B, H*W, C]`` by bilinear interpolation (antialiased when shrinking)."""
    if tuple(grid) == tuple(target):
        return tokens
    b, _, c = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, c, *grid)
    shrink = target[0] < grid[0] or target[1] < grid[1]
    x = F.interpolate(x.float(), size=target, mode="bilinear", align_corners=False, antialias=shrink)
    return x.to(tokens.dtype).flatten(2).transpose(1, 2)


class ChannelConcatFusion(Fusion):
    def __init__(self, cfg: ProjectorConfig, experts: dict[str, TokenGrid], out_dim: int):
        super().__init__(cfg, experts)
        self.grid = self.default_grid(cfg)
        channels = sum(spec.dim for spec in self.pooled.values())
        self.mlp = MLPProjector(channels, out_dim, cfg.depth, cfg.hidden_dim, self.grid, cfg.pos_embed)
        self.layout = [self.grid]

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = self.pool(features)
        parts = [resample_grid(pooled[n], self.pooled[n].grid, self.grid) for n in self.names]
        return self.mlp(torch.cat(parts, dim=-1))
