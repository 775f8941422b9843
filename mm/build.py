"""Assemble a VLM + processor from a config, and save/load them as one HF model directory."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from data.processor import VLMProcessor
from data.tokenizer import ensure_image_token, ensure_video_token, train_tokenizer

from . import lora
from .config import DataConfig, ModelConfig, to_plain
from .llm import build_llm, load_tokenizer
from .model import VLM, VLMConfig

# weight names of model directories saved before the fusion registry (one MLP per expert under projectors.)
LEGACY_KEYS = {r"^projectors\.": "fusion.projectors."}


class ModelLoadError(ValueError):
    """A model directory is incomplete or corrupt; the message names the file."""


def build_tokenizer(model_cfg: ModelConfig, corpus: Iterable[str] | None = None) -> Any:
    """The configured tokenizer, else the LLM's own, else a BPE trained on ``corpus`` (the tiny default)."""
    if model_cfg.tokenizer.path:
        tok = load_tokenizer(model_cfg.tokenizer.path)
    elif model_cfg.llm.path:
        tok = load_tokenizer(model_cfg.llm.path)
    else:
        if corpus is None:
            raise ValueError("no tokenizer configured and no training text to train one on")
        tok = train_tokenizer(
            corpus, None, vocab_size=model_cfg.tokenizer.vocab_size, digits=model_cfg.tokenizer.digits
        )
    ensure_image_token(tok)
    ensure_video_token(tok)  # before the LLM is sized to the tokenizer
    return tok


def build_vlm(model_cfg: ModelConfig, tokenizer: Any) -> VLM:
    llm = build_llm(model_cfg.llm, tokenizer)
    config = VLMConfig(
        text_config=llm.config,
        experts=to_plain(model_cfg.experts),
        projector=to_plain(model_cfg.projector),
        image_token_id=ensure_image_token(tokenizer),
        visual_delta=model_cfg.visual_delta,
        visual_positions=model_cfg.visual_positions,
        v2pe=model_cfg.v2pe,
        video_token_id=ensure_video_token(tokenizer),
        video=to_plain(model_cfg.video),
    )
    return VLM(config, llm=llm, load_expert_weights=True)


def make_processor(model: VLM, tokenizer: Any, data_cfg: DataConfig | None = None) -> VLMProcessor:
    data_cfg = data_cfg or DataConfig()
    return VLMProcessor(
        tokenizer,
        {name: expert.preprocess for name, expert in model.experts.items()},
        model.tokens_per_image,
        visual_offsets=model.visual_offsets,
        delta=model.config.visual_delta,
        system_prompt=data_cfg.system_prompt,
        max_length=data_cfg.max_length,
        box_format=data_cfg.box_format,
        **video_settings(model),
        video=data_cfg.video,
    )


def video_settings(model: VLM) -> dict[str, Any]:
    """What the processor needs of the model to expand ``<video>``: its token count, offsets, segments."""
    return {
        "tokens_per_video": model.tokens_per_video,
        "video_offsets": model.video_offsets,
        "video_segments": model.video_pooling.segments,
    }


def save_vlm(
    model: VLM,
    processor: VLMProcessor,
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write model + tokenizer + processor settings to ``out_dir`` atomically (temp dir, then rename).

    ``state_dict``: the weights to write instead of the model's own (ZeRO-3 partitions them: the trainer
    gathers them on every rank and hands them here)."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    adapter = None
    if lora.has_adapter(model):  # base weights under their usual names, the adapter in lora/ (mm/lora.py)
        state_dict, adapter = lora.split_state(model, state_dict)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    if adapter is not None:
        lora.save_adapter(model, adapter, tmp)
    processor.save_pretrained(tmp)
    old = out.with_name(out.name + ".old")
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)
    return out


def check_safetensors(path: Path) -> list[str]:
    """Read a safetensors file's header and check that its data is all there (cheap: no tensor is loaded);
    returns the weight names."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as err:  # safetensors reports a bad header or a truncated file with its own error type
        raise ModelLoadError(f"{path}: corrupt or truncated weights file ({err})") from err


def load_vlm(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[VLM, VLMProcessor]:
    """Load an mmstack model directory written by ``save_vlm`` (local path only)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(f"{model_dir}: no *.safetensors weights file")
    names = [name for path in weights for name in check_safetensors(path)]
    # the legacy renaming only for legacy directories: transformers keeps a mapping it was given and, in some
    # loads (ZeRO-3), reverts it when the model is saved again, writing the old names back
    legacy = any(re.match(pattern, name) for pattern in LEGACY_KEYS for name in names)
    model = VLM.from_pretrained(
        model_dir, dtype=dtype or torch.float32, key_mapping=LEGACY_KEYS if legacy else None
    )
    lora.load_adapter(model, model_dir)  # a LoRA run's adapter (lora/), if the directory has one
    model.to(device).eval()
    transforms = {name: expert.preprocess for name, expert in model.experts.items()}
    processor = VLMProcessor.from_pretrained(model_dir, transforms, **video_settings(model))
    if model.config.video_token_id is None:  # saved before videos: <video> is a new, untrained token
        model.config.video_token_id = processor.video_token_id
        if model.get_input_embeddings().weight.shape[0] < len(processor.tokenizer):
            # mean_resizing=False: the row is never used by this model, and HF prints a note on every load
            model.llm.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    return model, processor
