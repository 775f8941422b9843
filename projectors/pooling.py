"""Token pooling in front of any fusion: fewer visual tokens per expert, on its 2-D grid.

- ``shuffle`` (pixel-unshuffle, InternVL's pixel shuffle, MouSi's "multi-patch-one-token"): each k x k block
  becomes one token with the block's channels stacked (``k*k*C``), so nothing is averaged away.
- ``avg``: each k x k block averaged (LLaVA-style 2x2 pooling); channels unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POOL_MODES = ("shuffle", "avg")


class TokenPool(nn.Module):
    """``[B, h*w, C]`` on grid (h, w) -> ``[B, (h/k)*(w/k), C']``; no parameters."""

    def __init__(self, grid: tuple[int, int], dim: int, k: int = 1, mode: str = "shuffle"):
        super().__init__()
        if mode not in POOL_MODES:
            raise ValueError(f"pool_mode: unknown {mode!r}; known: {', '.join(POOL_MODES)}")
        if k < 1:
            raise ValueError(f"pool: must be >= 1, got {k}")
        if grid[0] % k or grid[1] % k:
            raise ValueError(f"pool: token grid {grid[0]}x{grid[1]} is not divisible by pool={k}")
        self.grid, self.k, self.mode = grid, k, mode
        self.out_grid = (grid[0] // k, grid[1] // k)
        self.out_dim = dim * k * k if mode == "shuffle" and k > 1 else dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.k == 1:
            return tokens
        b, _, c = tokens.shape
        (h, w), k = self.grid, self.k
        if self.mode == "avg":
            x = tokens.transpose(1, 2).reshape(b, c, h, w)
            return F.avg_pool2d(x, k).flatten(2).transpose(1, 2)
        x = tokens.view(b, h // k, k, w // k, k, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (h // k) * (w // k), k * k * c)
