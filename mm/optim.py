"""Which parameters train (by stage) and with which learning rate and weight decay (AdamW groups)."""

from __future__ import annotations

from typing import Any

import torch

from .config import RunConfig
from .lora import adapter_rank, has_adapter, is_adapter_weight
from .model import VLM


def apply_stage(model: VLM, stage: str, train_experts: bool) -> dict[str, int]:
    """Freeze/unfreeze by stage; returns trainable parameter counts per part (``stage_summary`` says it in
    words). With a LoRA adapter (mm/lora.py) the LLM's base stays frozen and only the adapter trains."""
    adapter = has_adapter(model)
    model.llm.requires_grad_(stage == "sft" and not adapter)
    if adapter and stage == "sft":
        for name, p in model.llm.named_parameters():
            p.requires_grad_(is_adapter_weight(name))
    for expert in model.experts.values():
        expert.requires_grad_(train_experts and not expert.cfg.frozen)
    model.fusion.requires_grad_(True)
    parts = {"llm": model.llm, "experts": model.experts, "fusion": model.fusion}
    return {k: sum(_numel(p) for p in m.parameters() if p.requires_grad) for k, m in parts.items()}


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions a parameter: its full size is ds_numel


def stage_summary(model: VLM, stage: str) -> str:
    """What trains and what is frozen, one part each (prismatic-style), e.g. ``stage sft: training fusion
    (2.1M), llm LoRA r=8 (0.4M of 124M); frozen: experts.clip (303M), llm base (124M)``."""
    parts = [("fusion", model.fusion)] + [(f"experts.{n}", e) for n, e in model.experts.items()]
    training, frozen = [], []
    for name, module in [*parts, ("llm", model.llm)]:
        params = dict(module.named_parameters())
        total = sum(_numel(p) for p in params.values())
        trainable = sum(_numel(p) for p in params.values() if p.requires_grad)
        if name == "llm" and has_adapter(model):
            base = total - sum(_numel(p) for n, p in params.items() if is_adapter_weight(n))
            if trainable:
                training.append(f"llm LoRA r={adapter_rank(model)} ({_count(trainable)} of {_count(base)})")
            frozen.append(f"llm base ({_count(base)})")
        elif trainable == total:
            training.append(f"{name} ({_count(total)})")
        elif trainable == 0:
            frozen.append(f"{name} ({_count(total)})")
        else:
            training.append(f"{name} ({_count(trainable)} of {_count(total)})")
    trained, kept = ", ".join(training) or "nothing", ", ".join(frozen) or "none"
    return f"stage {stage}: training {trained}; frozen: {kept}"


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
