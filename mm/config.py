"""One config tree for a run (model, data, train): YAML files plus ``section.key=value`` overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelSection:
    llm: dict[str, Any] = field(default_factory=lambda: {"family": "llama"})  # or {"path": local dir}
    tokenizer: str | None = None  # local dir; None: the LLM's own, or train a BPE on the training data
    tokenizer_vocab_size: int = 1024
    tokenizer_digits: str = "single"  # trained BPE only: "single" digit tokens or "grouped" whole numbers
    experts: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "main", "model": "resnet18"}])
    projector: dict[str, Any] = field(default_factory=lambda: {"type": "mlp", "depth": 2})
    visual_delta: float = 1.0
    loss_weighting: str = "token"  # "answer": each answer weighs the same, however many tokens it has
    init_from: str | None = None  # an mmstack model directory to start from (e.g. align -> sft)


@dataclass
class DataSection:
    train: str = ""
    val: str | None = None
    max_length: int = 1024
    system_prompt: str | None = None
    cache_pixels: bool = False
    blind: bool = False  # replace every image by a black one: the no-vision baseline
    branch_turns: bool = False  # train multi-turn one-image records as single-turn branches on one prefix
    # how branches are batched: "split" (prefix rows + short branch rows sharing the prefix's KV cache) or
    # "packed" (one row per record with a 4-D segment mask); same loss and gradients, split is much cheaper
    branch_layout: str = "split"
    num_workers: int = 0
    val_max_records: int = 256

    def __post_init__(self) -> None:
        if self.branch_layout not in ("split", "packed"):
            raise ValueError(f"data.branch_layout must be 'split' or 'packed', got {self.branch_layout!r}")


@dataclass
class TrainSection:
    stage: str = "sft"  # align: projector only; sft: projector + LLM (+ experts if train_experts)
    train_experts: bool = False
    output_dir: str = "runs/default"
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-4
    projector_lr: float | None = None
    expert_lr: float | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 50
    max_steps: int = 1000
    max_minutes: float | None = (
        None  # optional wall-clock budget: the schedule follows max(step, time) progress
    )
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    eval_every: int = 200
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    mixed_precision: str = "auto"  # auto: bf16 on GPU and on CPUs with native bf16, else no
    gradient_checkpointing: bool = False
    # attention kernel while training: None keeps the model's (sdpa); "eager" (matmul + softmax) is ~1.2-1.3x
    # faster per step than the CPU flash kernel for the tiny quickstart LLM's short rows (BENCHMARKS.md)
    attn_implementation: str | None = None
    threads: int | None = None
    keep_checkpoints: int = 2
    # Dense pretraining of trainable experts on object annotations (meta.objects) before the VLM stage;
    # 0 steps: off. See mm/expert_pretrain.py.
    expert_pretrain_steps: int = 0
    expert_pretrain_minutes: float | None = None
    expert_pretrain_lr: float = 2e-3
    expert_pretrain_batch_size: int = 64


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SCALARS = {"float": float, "int": int}


def _coerce(value: Any, annotation: str, where: str) -> Any:
    """YAML reads ``1e-3`` as a string; convert numbers written that way to the field's declared type."""
    kind = annotation.split("|")[0].strip()
    if kind == "str" and isinstance(value, bool):  # YAML 1.1 reads `no`/`off` (mixed_precision=no) as False
        return "yes" if value else "no"
    if kind in _SCALARS and isinstance(value, str):
        try:
            return _SCALARS[kind](value)
        except ValueError as err:
            raise ValueError(f"{where}: expected {kind}, got {value!r}") from err
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    values = {k: _coerce(v, str(fields[k].type), f"{where}.{k}") for k, v in values.items()}
    obj = cls(**values)
    if hasattr(obj, "betas"):
        obj.betas = tuple(obj.betas)
    return obj


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    unknown = sorted(set(d) - {"model", "data", "train"})
    if unknown:
        raise ValueError(f"config: unknown section(s) {unknown}; known: ['data', 'model', 'train']")
    return RunConfig(
        model=_build(ModelSection, d.get("model") or {}, "model"),
        data=_build(DataSection, d.get("data") or {}, "data"),
        train=_build(TrainSection, d.get("train") or {}, "train"),
    )


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (numbers, bools, lists, null)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = d
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return d


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    d: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: invalid YAML: {err}") from err
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(d).__name__}")
    return config_from_dict(apply_overrides(d, list(overrides or [])))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
