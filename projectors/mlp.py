"""LLaVA-1.5-style MLP projector: expert token grid ``[B, N, C]`` -> LLM embeddings ``[B, N, D]``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MLPProjectorConfig:
    in_dim: int
    out_dim: int
    depth: int = 2  # LLaVA-1.5 "mlp2x_gelu"
    hidden_dim: int | None = None  # defaults to out_dim, as in LLaVA


class MLPProjector(nn.Module):
    """Linear -> (GELU -> Linear) x (depth - 1). One visual token in, one LLM position out."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, hidden_dim: int | None = None):
        super().__init__()
        if depth < 1:
            raise ValueError(f"projector depth must be >= 1, got {depth}")
        hidden = hidden_dim or out_dim
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden if depth > 1 else out_dim)]
        for i in range(1, depth):
            layers += [nn.GELU(), nn.Linear(hidden, out_dim if i == depth - 1 else hidden)]
        self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def output_length(self, num_input_tokens: int) -> int:
        """Number of LLM positions produced for ``num_input_tokens`` expert tokens."""
        return num_input_tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)


def build_projector(kind: str, in_dim: int, out_dim: int, **kwargs) -> nn.Module:
    """Projector registry entry point (MLP now; resampler / multi-expert fusion plug in here)."""
    if kind == "mlp":
        return MLPProjector(in_dim, out_dim, **kwargs)
    raise ValueError(f"unknown projector type {kind!r}; known: ['mlp']")
