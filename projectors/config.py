"""The fusion's config: which family, its options, and per-expert overrides."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

FUSION_TYPES = ("concat", "channel_concat", "resampler")


@dataclass
class ExpertProjection:
    """Per-expert overrides of the fusion's token pooling and (``concat``) projector options."""

    pool: int | None = None
    pool_mode: Literal["shuffle", "avg"] | None = None
    depth: int | None = None
    hidden_dim: int | None = None
    pos_embed: bool | None = None


@dataclass
class ProjectorConfig:
    """``type`` picks the fusion family (``mlp`` is the older name of ``concat``).

    - ``concat``: an MLP per expert, outputs concatenated along the sequence (LLaVA; MouSi's MLP fusion).
    - ``channel_concat``: every expert's grid resampled to ``grid``, channels concatenated, one MLP (EAGLE).
    - ``resampler``: ``grid[0] * grid[1]`` queries cross-attend all experts' tokens (MouSi's Q-Former).
    ``pool`` / ``pool_mode`` merge k x k tokens of every expert first (``experts.NAME`` overrides per expert).
    """

    type: Literal["concat", "channel_concat", "resampler", "mlp"] = "concat"
    depth: int = 2  # MLP layers (concat: per expert; channel_concat: the one MLP)
    hidden_dim: int | None = None  # MLP hidden width / resampler width (default: the LLM's)
    pool: int = 1  # merge pool x pool neighbouring tokens of each expert into one
    pool_mode: Literal["shuffle", "avg"] = "shuffle"  # stack the block's channels, or average them
    pos_embed: bool = False  # append fixed 2-D sin-cos coordinates of each token (concat, channel_concat)
    grid: list[int] | None = (
        None  # channel_concat / resampler output grid [h, w] (default: smallest expert's)
    )
    layers: int = 2  # resampler: cross-attention blocks
    heads: int = 4  # resampler: attention heads
    experts: dict[str, ExpertProjection] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type == "mlp":
            self.type = "concat"
        if self.depth < 1:
            raise ValueError(f"depth: must be >= 1, got {self.depth}")
        if self.pool < 1:
            raise ValueError(f"pool: must be >= 1, got {self.pool}")
        if self.grid is not None and (len(self.grid) != 2 or min(self.grid) < 1):
            raise ValueError(f"grid: expected [h, w] of positive integers, got {self.grid}")
        self.experts = {
            name: e if isinstance(e, ExpertProjection) else ExpertProjection(**e)
            for name, e in self.experts.items()
        }

    def for_expert(self, name: str) -> dict[str, Any]:
        """The pooling / projector options that apply to expert ``name``."""
        own = self.experts.get(name, ExpertProjection())
        return {
            f.name: getattr(own, f.name) if getattr(own, f.name) is not None else getattr(self, f.name)
            for f in fields(ExpertProjection)
        }

    @classmethod
    def from_dict(cls, d: dict) -> ProjectorConfig:
        return cls(**d)
