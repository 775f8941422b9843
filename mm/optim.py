"""Which parameters train (by stage) and with which learning rate and weight decay (AdamW groups)."""

from __future__ import annotations

from typing import Any

import torch

from .config import RunConfig
from .model import VLM


def apply_stage(model: VLM, stage: str, train_experts: bool) -> dict[str, int]:
    """Freeze/unfreeze by stage; returns trainable parameter counts per part (logged, prismatic-style)."""
    model.llm.requires_grad_(stage == "sft")
    for expert in model.experts.values():
        expert.requires_grad_(train_experts and not expert.cfg.frozen)
    model.fusion.requires_grad_(True)
    parts = {"llm": model.llm, "experts": model.experts, "fusion": model.fusion}
    return {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in parts.items()}


def param_groups(model: VLM, cfg: RunConfig) -> list[dict[str, Any]]:
    """AdamW groups: per-part learning rates (an expert's own ``lr`` first); no weight decay on biases,
    norms and embeddings."""
    t = cfg.train
    lrs = {"llm": t.lr, "fusion": t.projector_lr or t.lr}
    for name, expert in model.experts.items():
        lrs[f"experts.{name}"] = expert.cfg.lr or t.expert_lr or t.lr
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head, rest = name.split(".", 1)
        part = f"experts.{rest.split('.', 1)[0]}" if head == "experts" else head
        decay = p.ndim >= 2 and "embed" not in name
        groups.setdefault((part, decay), []).append(p)
    return [
        {"params": ps, "lr": lrs[part], "weight_decay": t.weight_decay if decay else 0.0, "name": f"{part}"}
        for (part, decay), ps in groups.items()
    ]
