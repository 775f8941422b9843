"""One typed config tree for a run: ``model`` (llm, tokenizer, experts, projector), ``data`` and ``train``.

Every section is a dataclass. A config is read from YAML plus ``a.b.c=value`` overrides (``experts.0.x`` or
``experts[0].x`` address list items); an unknown key or a value of the wrong type is rejected with its full
path, e.g. ``model.projector.pol: unknown key; known: depth, experts, grid, ...``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from data.boxes import BoxFormat
from data.video_frames import VideoSettings
from projectors import ProjectorConfig
from vision.experts import ExpertConfig

from .lora import LoraSettings
from .positions import V2PE_DELTAS
from .video import VideoPooling


class ConfigError(ValueError):
    """A config key or value is wrong; the message starts with the key's full path."""


@dataclass
class LLMConfig:
    """A local HF causal LM directory (``path``), or a small Llama/Qwen2 built from scratch (the sizes)."""

    path: str | None = None
    family: Literal["llama", "qwen2"] | None = None  # from scratch only (default llama)
    hidden_size: int | None = None  # sizes: from scratch only (defaults in mm.llm.tiny_llm_config)
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    intermediate_size: int | None = None
    max_position_embeddings: int | None = None
    rope_theta: float | None = None
    tie_word_embeddings: bool | None = None

    def __post_init__(self) -> None:
        if self.path:
            given = [f.name for f in dataclasses.fields(self) if f.name != "path" and getattr(self, f.name)]
            if given:
                raise ValueError(
                    f"{given[0]}: only for an LLM built from scratch; the LLM at path has its own config"
                )

    def scratch_settings(self) -> dict[str, Any]:
        """The sizes that were set, as keyword arguments of ``tiny_llm_config``."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("path", "family") and getattr(self, f.name) is not None
        }


@dataclass
class TokenizerConfig:
    """A local tokenizer directory; none: the LLM's own, or (tiny LLM) a BPE trained on the training text."""

    path: str | None = None
    vocab_size: int = 1024  # trained BPE only
    digits: Literal["single", "grouped"] = "single"  # trained BPE: one token per digit, or whole numbers


@dataclass
class ModelConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    experts: list[ExpertConfig] = field(default_factory=lambda: [ExpertConfig(name="main", model="resnet18")])
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    visual_delta: float = 1.0  # position increment of a visual token (V2PE's delta; 1.0 = plain)
    # MouSi position occupancy of an image's tokens: each its own position, one per grid row, or one in all
    visual_positions: Literal["original", "share_by_row", "share_all"] = "original"
    # V2PE: in training each image draws its delta from data.v2pe_deltas; rotary angles from float64
    # positions (fractional steps survive far out); at inference every image at visual_delta
    v2pe: bool = False
    init_from: str | None = None  # an mmstack model directory to start from (e.g. align -> sft)
    # a <video>'s frames -> tokens (mm/video.py): spatial avg-pool per frame, mean per temporal segment
    video: VideoPooling = field(default_factory=VideoPooling)

    def __post_init__(self) -> None:
        if not self.experts:
            raise ValueError("experts: a VLM needs at least one visual expert")
        names = [e.name for e in self.experts]
        if len(set(names)) != len(names):
            raise ValueError(f"experts: names must be unique, got {names}")
        unknown = sorted(set(self.projector.experts) - set(names))
        if unknown:
            raise ValueError(f"projector: settings for unknown expert(s) {unknown}; experts: {names}")


@dataclass
class DataConfig:
    train: str = ""  # LLaVA .json / .jsonl
    val: str | None = None
    image_folder: str | None = None  # relative image paths start here (default: the JSON file's folder)
    media_roots: list[str] = field(default_factory=list)  # more folders records may point into
    strict: bool = False  # a record that breaks the schema stops the run (default: skipped and recorded)
    max_length: int = 1024
    system_prompt: str | None = None
    box_format: BoxFormat = field(default_factory=BoxFormat)  # how answers write boxes; saved with the model
    cache_pixels: bool = False
    blind: bool = False  # replace every image by a black one: the no-vision baseline
    # train a multi-turn one-image record as single-turn branches sharing the image prefix (its KV cache)
    branch_turns: bool = False
    num_workers: int = 0
    val_max_records: int = 256
    # batches of similar-length samples (HF's group_by_length: sorted within megabatches of 50 batches):
    # less padding on data whose lengths vary; the order stays seeded and resumable
    group_by_length: bool = False
    # several samples per row (up to max_length tokens) with positions and attention kept per sample
    # (mm/model.py restart_positions, segment_attention_mask): no padding between short samples
    packing: bool = False
    # the deltas V2PE training draws from, one per image (the paper's {1, 1/2, ..., 1/256}); model.v2pe only
    v2pe_deltas: list[float] = field(default_factory=lambda: list(V2PE_DELTAS))
    # how a video file becomes frames (data/video_frames.py): sampling, reader, the middle-frame baseline
    video: VideoSettings = field(default_factory=VideoSettings)


@dataclass
class TrainConfig:
    stage: Literal["align", "sft"] = "sft"  # align: projector only; sft: + LLM (+ experts if train_experts)
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
    max_minutes: float | None = None  # optional wall-clock budget: the schedule follows max(step, time)
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    loss_weighting: Literal["token", "answer"] = "token"  # answer: each answer weighs the same (mm.loss)
    # the LM head only on labelled positions, chunked, gradients on the fly: no [tokens, vocab] logits
    # (mm.loss.fused_loss_terms; same loss and gradients). Off: HF's full logits, then the loss
    fused_loss: bool = True
    eval_every: int = 200
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: bf16 where the hardware has it
    gradient_checkpointing: bool = False
    # torch.compile each LLM decoder layer (one graph shared by all layers): 1.32x tokens/s for a
    # Qwen2-1.5B-shaped VLM step on an H100 (BENCHMARKS.md); the first steps pay the compile time
    compile: bool = False
    # attention kernel while training: None keeps the model's (sdpa); "eager" is ~1.2-1.3x faster per step on
    # the CPU for the tiny quickstart LLM's short rows (BENCHMARKS.md)
    attn_implementation: str | None = None
    threads: int | None = None
    keep_checkpoints: int = 2
    # a DeepSpeed JSON (configs/deepspeed/zero2.json ...); its "auto" fields are filled from this section.
    # `accelerate launch --config_file configs/accelerate/zero2.yaml` names one itself.
    deepspeed: str | None = None
    # LoRA on the LLM (mm/lora.py): its base weights frozen, low-rank adapters trained in sft
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.data.video.frames_per_video < self.model.video.segments:
            raise ValueError(
                f"data.video gives {self.data.video.frames_per_video} frame(s) per video, fewer than "
                f"model.video.segments={self.model.video.segments}: each segment pools at least one frame"
            )
        if self.data.branch_turns and self.data.packing:
            raise ValueError(
                "data.packing: a packed row holds whole samples, a branched sample is a prefix and its "
                "branches; turn off one of data.branch_turns and data.packing"
            )
        if self.data.branch_turns and self.train.gradient_checkpointing:
            raise ValueError(
                "data.branch_turns: branches reuse the image prefix's KV cache, which gradient checkpointing "
                "does not keep; turn off one of data.branch_turns and train.gradient_checkpointing"
            )

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


# -- typed construction ---------------------------------------------------------------------------------
def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists: what YAML and JSON can hold."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def _type_name(value: Any) -> str:
    return type(value).__name__


def _convert(value: Any, kind: Any, path: str) -> Any:
    """``value`` as type ``kind`` (dataclass, list, tuple, Literal, scalars, optional), or ConfigError."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(value, option, path)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else ConfigError(f"{path}: unexpected value {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and all(isinstance(a, str) for a in args):
            value = "yes" if value else "no"  # YAML 1.1 reads `no` / `off` as false: keep the word
        if value not in args:
            raise ConfigError(f"{path}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_type_name(value)} {value!r}")
        return build(kind, value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {_type_name(value)} {value!r}")
        return [_convert(v, args[0] if args else Any, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (
            args and args[-1] is not Ellipsis and len(value) != len(args)
        ):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        item_types = [args[0]] * len(value) if args and args[-1] is Ellipsis else list(args)
        return tuple(_convert(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, item_types)))
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_type_name(value)} {value!r}")
        if len(args) == 2:
            return {str(k): _convert(v, args[1], f"{path}.{k}") for k, v in value.items()}
        return dict(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if kind is str:
        if isinstance(value, bool):  # YAML 1.1 reads `no` / `off` as false: keep the word the user wrote
            return "yes" if value else "no"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{path}: expected a string, got {_type_name(value)} {value!r}")
        return str(value)
    raise ConfigError(f"{path}: unsupported field type {kind!r}")  # pragma: no cover - a programming error


def build(cls: type, values: dict[str, Any], path: str) -> Any:
    """An instance of dataclass ``cls`` from a mapping, every key checked against its declared type."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in fields:
            raise ConfigError(f"{path}.{key}: unknown key; known: {', '.join(sorted(fields))}")
    kwargs = {key: _convert(value, hints[key], f"{path}.{key}") for key, value in values.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:  # a section's own check: "field: reason" or a whole message
        field_name, _, reason = str(err).partition(": ")
        if field_name in fields and reason:
            raise ConfigError(f"{path}.{field_name}: {reason}") from err
        raise ConfigError(f"{path}: {err}") from err


SECTIONS = ("model", "data", "train")


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    unknown = sorted(set(d) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section; known: {', '.join(SECTIONS)}")
    sections = {}
    for name, cls in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig)):
        values = d.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{name}: expected a mapping, got {_type_name(values)} {values!r}")
        sections[name] = build(cls, values, name)
    try:
        return RunConfig(**sections)
    except ValueError as err:
        raise ConfigError(str(err)) from err


_INDEX = re.compile(r"\[(\d+)\]")


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (numbers, bools, lists, mappings, null).

    ``model.experts.0.image_size=128`` (or ``model.experts[0].image_size=128``) changes one list item.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        parts = _INDEX.sub(r".\1", key.strip()).split(".")
        node: Any = d
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: {where}: no item {part} in a list of {len(node)}")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {item!r}: {where} is a value, not a section")
        value = yaml.safe_load(raw)
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override {item!r}: no item {last} in a list of {len(node)}")
            node[int(last)] = value
        else:
            node[last] = value
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
            raise ConfigError(f"{path}: invalid YAML: {err}") from err
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {_type_name(d)}")
    return config_from_dict(apply_overrides(d, list(overrides or [])))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from data.schema import write_bytes_atomic

    write_bytes_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
