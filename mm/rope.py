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
    """The LLM's rotary-embedding modules (name, module): none for learned absolute positions (GPT-2, OPT).
    A wrapped module is listed once, as its ``PreciseRotary``."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in llm.named_modules():
        inside_wrapper = any(name.startswith(w + ".") for w, mod in found if isinstance(mod, PreciseRotary))
        if inside_wrapper:
            continue
        if isinstance(m, PreciseRotary) or (
            type(m).__name__.endswith("RotaryEmbedding") and hasattr(m, "inv_freq")
        ):
            found.append((name, m))
    return found


def _frequencies(inner: nn.Module) -> tuple[torch.Tensor, float]:
    """The module's inverse frequencies recomputed from its config (float64, CPU), and its attention scaling.

    Recomputed rather than copied: a model cast to bf16 (``.to(bfloat16)``, DeepSpeed) casts the ``inv_freq``
    buffer too, and a bf16 inverse frequency is exactly the precision loss this module exists to avoid.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = getattr(inner, "rope_type", "default")
    try:
        init = (
            inner.compute_default_rope_parameters
            if rope_type == "default"
            else ROPE_INIT_FUNCTIONS[rope_type]
        )
        inv_freq, scaling = init(inner.config)
    except (AttributeError, KeyError, TypeError):  # a family without HF's init helpers: its own fp32 copy
        inv_freq, scaling = inner.original_inv_freq, getattr(inner, "attention_scaling", 1.0)
    return inv_freq.detach().to("cpu", torch.float64), float(scaling)


class PreciseRotary(nn.Module):
    """Wraps one HF rotary module: float64 positions -> float64 angles -> cos / sin in the input's dtype."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self._table: dict[torch.device, torch.Tensor] = {}  # float64 inverse frequencies per device
        self._scaling: float | None = None

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.inner.inv_freq

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._table:
            freqs, self._scaling = _frequencies(self.inner)
            self._table[device] = freqs.to(device)
        return self._table[device]

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.dtype != torch.float64:
            return self.inner(x, position_ids)
        inv_freq = self._inv_freq(x.device)
        angles = torch.remainder(position_ids[..., None] * inv_freq, 2 * math.pi)
        emb = torch.cat((angles, angles), dim=-1)
        return (emb.cos() * self._scaling).to(x.dtype), (emb.sin() * self._scaling).to(x.dtype)


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
