"""Rotary embeddings that keep V2PE's fractional positions, for any HF RoPE LLM (per model, nothing global).

HF's rotary modules compute ``position_ids.float() * inv_freq``: in fp32, 100000 + 1/256 is 100000.0, so
V2PE's small steps vanish far out (the "BFloat16 breaks RoPE" problem, one precision level up). The
``PreciseRotary`` wrapper computes the angles from float64 positions in float64 and reduces them before the
cos / sin, then casts to the activations' dtype; positions given in fp32 (plain models) take the wrapped
module's own path, bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# rope types whose inverse frequencies are fixed at init (the wrapper reuses them as they are)
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def rotary_modules(llm: nn.Module) -> list[tuple[str, nn.Module]]:
    """The LLM's rotary-embedding modules (name, module): none for learned absolute positions (GPT-2, OPT)."""
    return [
        (name, m)
        for name, m in llm.named_modules()
        if (type(m).__name__.endswith("RotaryEmbedding") or isinstance(m, PreciseRotary))
        and hasattr(m, "inv_freq")
    ]


class PreciseRotary(nn.Module):
    """Wraps one HF rotary module: float64 positions -> float64 angles -> cos / sin in the input's dtype."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.inner.inv_freq

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.dtype != torch.float64:
            return self.inner(x, position_ids)
        inv_freq = self.inner.inv_freq.to(device=x.device, dtype=torch.float64)
        angles = torch.remainder(position_ids[..., None] * inv_freq, 2 * math.pi)
        emb = torch.cat((angles, angles), dim=-1)
        scale = getattr(self.inner, "attention_scaling", 1.0)
        return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)


def install_precise_rotary(llm: nn.Module) -> int:
    """Wrap every rotary module of ``llm`` (idempotent); returns how many. Raises for a RoPE whose
    frequencies change with the sequence (dynamic NTK, LongRoPE): fixed inverse frequencies would lie."""
    count = 0
    for name, module in rotary_modules(llm):
        if isinstance(module, PreciseRotary):
            count += 1
            continue
        rope_type = getattr(module, "rope_type", "default")
        if rope_type not in STATIC_ROPE:
            raise ValueError(
                f"model.llm: V2PE needs fixed rotary frequencies; {name} uses rope type {rope_type!r} "
                f"(supported: {', '.join(STATIC_ROPE)})"
            )
        parent_name, _, attr = name.rpartition(".")
        parent = llm.get_submodule(parent_name) if parent_name else llm
        setattr(parent, attr, PreciseRotary(module))
        count += 1
    return count
