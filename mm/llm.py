"""The language model: a tiny Llama/Qwen2 built from a config, or any HF causal LM from a local directory."""

from __future__ import annotations

import inspect
from functools import cache
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from data.tokenizer import ensure_image_token

from .config import LLMConfig

# Families we can build from scratch by name (the tiny default and tests); anything else loads from a path.
_FAMILIES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config"}


def tiny_llm_config(
    family: str,
    tokenizer: Any,
    *,
    hidden_size: int = 256,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 4096,
    rope_theta: float = 10000.0,
    tie_word_embeddings: bool = True,
):
    """A small decoder config sized to ``tokenizer`` (vocab, pad/eos ids)."""
    if family not in _FAMILIES:
        raise ValueError(f"unknown LLM family {family!r}; build from scratch supports {sorted(_FAMILIES)}")
    import transformers

    cls = getattr(transformers, _FAMILIES[family])
    eos = tokenizer.eos_token_id
    return cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads or num_attention_heads,
        intermediate_size=intermediate_size or 3 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
    )


def load_tokenizer(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist (nothing is downloaded)")
    return AutoTokenizer.from_pretrained(path)


def build_llm(cfg: LLMConfig, tokenizer: Any, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The pretrained HF causal LM at ``cfg.path``, or a small one built from ``cfg``'s sizes.

    The tokenizer must already hold ``<image>``; the embedding matrix grows to fit it if needed.
    """
    ensure_image_token(tokenizer)
    if cfg.path:
        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"LLM directory {path} has no config.json (nothing is downloaded)")
        AutoConfig.from_pretrained(path)  # a clear error for unknown architectures before loading weights
        llm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    else:
        config = tiny_llm_config(cfg.family or "llama", tokenizer, **cfg.scratch_settings())
        llm = AutoModelForCausalLM.from_config(config)
        if dtype is not None:
            llm = llm.to(dtype)
    if llm.get_input_embeddings().weight.shape[0] < len(tokenizer):
        llm.resize_token_embeddings(len(tokenizer))
    if llm.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        llm.config.pad_token_id = tokenizer.pad_token_id
    # Generation stops at the tokenizer's end-of-turn token (the chat eos).
    if tokenizer.eos_token_id is not None:
        llm.generation_config.eos_token_id = tokenizer.eos_token_id
    return llm


@cache
def _cache_argument(forward: Any) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_argument(llm: PreTrainedModel) -> str:
    """The keyword under which this LLM's ``forward`` takes a KV cache in the installed transformers.

    transformers 5.x renames ``past_key_values`` to ``cache`` (the old name warns on every call and goes in
    5.40); passing the name the signature declares keeps both old and new releases quiet and working.
    """
    return _cache_argument(type(llm).forward)
