"""LLaVA-1.5-style MLP projector: tokens ``[B, N, C]`` -> LLM embeddings ``[B, N, D]``.

One option beyond LLaVA, off by default: ``pos_embed`` appends fixed 2-D sin-cos coordinates of each token
to its channels before the MLP, so the LLM knows where on the grid each visual token sits (it only sees a
1-D sequence otherwise) — what grounding needs. Concatenated rather than added, so their scale cannot drown
in (or drown) the features.
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
    """(+ 2-D position channels) -> Linear -> (GELU -> Linear) x (depth - 1)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        depth: int = 2,
        hidden_dim: int | None = None,
        grid: tuple[int, int] | None = None,
        pos_embed: bool = False,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth: must be >= 1, got {depth}")
        if pos_embed and grid is None:
            raise ValueError("pos_embed: needs the token grid shape")
        in_features = in_dim
        self.pos_features = 0
        if pos_embed:
            coords = sincos_2d(grid[0], grid[1], POS_FREQUENCIES)
            self.register_buffer("pos_table", coords)  # saved: HF loading leaves unsaved buffers empty
            self.pos_features = coords.shape[1]
            in_features += self.pos_features
        hidden = hidden_dim or out_dim
        layers: list[nn.Module] = [nn.Linear(in_features, hidden if depth > 1 else out_dim)]
        for i in range(1, depth):
            layers += [nn.GELU(), nn.Linear(hidden, out_dim if i == depth - 1 else hidden)]
        self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pos_features:
            table = self.pos_table.to(device=tokens.device, dtype=tokens.dtype)
            tokens = torch.cat([tokens, table.expand(tokens.shape[0], -1, -1)], dim=-1)
        return self.net(tokens)
