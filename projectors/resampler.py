"""``resampler`` (Q-Former / perceiver style; MouSi's Q-Former fusion): ``h*w`` learned queries cross-attend
the tokens of every expert at once. Each expert's tokens get their own input projection and learned position
embedding, so the queries can tell experts and places apart. Tokens: ``h*w`` whatever the experts give."""

from __future__ import annotations

import torch
from torch import nn

from .base import Fusion, TokenGrid
from .config import ProjectorConfig


class ResamplerBlock(nn.Module):
    """Pre-norm cross-attention (queries -> expert tokens), then a pre-norm MLP; both residual."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(kv)
        q = q + self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]
        return q + self.mlp(self.norm_mlp(q))


class ResamplerFusion(Fusion):
    def __init__(self, cfg: ProjectorConfig, experts: dict[str, TokenGrid], out_dim: int):
        super().__init__(cfg, experts)
        width = cfg.hidden_dim or out_dim
        if width % cfg.heads:
            raise ValueError(f"heads: {cfg.heads} does not divide the resampler width {width}")
        self.grid = self.default_grid(cfg)
        self.inputs = nn.ModuleDict({n: nn.Linear(s.dim, width) for n, s in self.pooled.items()})
        self.input_pos = nn.ParameterDict(
            {
                n: nn.Parameter(torch.randn(s.grid[0] * s.grid[1], width) * 0.02)
                for n, s in self.pooled.items()
            }
        )
        self.queries = nn.Parameter(torch.randn(self.grid[0] * self.grid[1], width) * 0.02)
        self.blocks = nn.ModuleList(ResamplerBlock(width, cfg.heads) for _ in range(cfg.layers))
        self.norm_out = nn.LayerNorm(width)
        self.out = nn.Linear(width, out_dim)
        self.layout = [self.grid]

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = self.pool(features)
        kv = torch.cat([self.inputs[n](pooled[n]) + self.input_pos[n] for n in self.names], dim=1)
        q = self.queries.unsqueeze(0).expand(kv.shape[0], -1, -1).to(kv.dtype)
        for block in self.blocks:
            q = block(q, kv)
        return self.out(self.norm_out(q))
