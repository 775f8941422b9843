"""LLaVA-1.5-style MLP projector: expert token grid ``[B, N, C]`` -> LLM embeddings ``[B, M, D]``.

Two options beyond LLaVA, both off by default:
- ``pool``: merge each ``pool x pool`` block of neighbouring tokens into one by stacking their channels
  (pixel-unshuffle, as InternVL's pixel shuffle does): ``pool**2`` fewer LLM positions, no detail thrown away.
- ``pos_embed``: fixed 2-D sin-cos coordinates of each token appended to its channels before the MLP, so
  the LLM knows where on the grid each visual token sits (it only sees a 1-D sequence otherwise) — what
  grounding needs. Concatenated rather than added, so their scale cannot drown in (or drown) the features.
"""

from __future__ import annotations

import torch
from torch import nn

POS_FREQUENCIES = 8


def sincos_2d(h: int, w: int, frequencies: int) -> torch.Tensor:
    """``[h * w, 4 * frequencies]`` sin/cos of row and column coordinates at octave-spaced frequencies."""
    ys, xs = torch.meshgrid(torch.arange(h) / max(1, h), torch.arange(w) / max(1, w), indexing="ij")
    freqs = torch.pi * 2.0 ** torch.arange(frequencies)
    parts = []
    for coord in (ys.reshape(-1, 1), xs.reshape(-1, 1)):
        angles = coord * freqs
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)


class MLPProjector(nn.Module):
    """(pixel-unshuffle) -> Linear -> (GELU -> Linear) x (depth - 1) -> (+ position embedding)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        depth: int = 2,
        hidden_dim: int | None = None,
        grid: tuple[int, int] | None = None,
        pool: int = 1,
        pos_embed: bool = False,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"projector depth must be >= 1, got {depth}")
        if (pool > 1 or pos_embed) and grid is None:
            raise ValueError("projector pool / pos_embed need the expert's token grid shape")
        if grid is not None and (grid[0] % pool or grid[1] % pool):
            raise ValueError(f"token grid {grid} is not divisible by pool={pool}")
        self.grid, self.pool = grid, pool
        in_features = in_dim * pool * pool
        self.pos_features = 0
        if pos_embed:
            coords = sincos_2d(grid[0] // pool, grid[1] // pool, POS_FREQUENCIES)
            self.register_buffer("pos_table", coords)  # saved: HF loading leaves unsaved buffers empty
            self.pos_features = coords.shape[1]
            in_features += self.pos_features
        hidden = hidden_dim or out_dim
        layers: list[nn.Module] = [nn.Linear(in_features, hidden if depth > 1 else out_dim)]
        for i in range(1, depth):
            layers += [nn.GELU(), nn.Linear(hidden, out_dim if i == depth - 1 else hidden)]
        self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    @classmethod
    def from_config(cls, cfg, in_dim: int, out_dim: int, grid: tuple[int, int] | None) -> MLPProjector:
        """From a ``projectors.ProjectorConfig``."""
        return cls(
            in_dim,
            out_dim,
            depth=cfg.depth,
            hidden_dim=cfg.hidden_dim,
            grid=grid,
            pool=cfg.pool,
            pos_embed=cfg.pos_embed,
        )

    def output_length(self, num_input_tokens: int) -> int:
        """Number of LLM positions produced for ``num_input_tokens`` expert tokens."""
        return num_input_tokens // (self.pool * self.pool)

    def _unshuffle(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape
        h, w = self.grid
        p = self.pool
        x = tokens.view(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool > 1:
            tokens = self._unshuffle(tokens)
        if self.pos_features:
            table = self.pos_table.to(device=tokens.device, dtype=tokens.dtype)
            tokens = torch.cat([tokens, table.expand(tokens.shape[0], -1, -1)], dim=-1)
        return self.net(tokens)
