"""Decoding for the VLM: prefill with visual embeddings, then token-by-token with a KV cache.

Our own loop (rather than ``GenerationMixin.generate``) because positions are ours: after the prefill,
each new token sits at the last prefill position + 1, which differs from the token count once visual
tokens advance positions by a V2PE delta. The loop is also where KV-cache compression (LOOK-M) hooks in,
right after the prefill. Works with left-padded batches and an HF ``TextIteratorStreamer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from .positions import next_positions


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


def _sample(logits: torch.Tensor, s: GenerationSettings, gen: torch.Generator | None) -> torch.Tensor:
    if not s.do_sample or s.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > s.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.inference_mode()
def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: dict[str, torch.Tensor] | torch.Tensor | None = None,
    *,
    image_deltas: torch.Tensor | None = None,
    settings: GenerationSettings | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int = 0,
    streamer: Any = None,
) -> torch.Tensor:
    """Generate continuations of left-padded prompts. Returns new tokens ``[B, T]`` (pad after EOS)."""
    s = settings or GenerationSettings()
    eos = torch.tensor(
        [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id),
        dtype=torch.long,
        device=input_ids.device,
    )
    gen = None
    if s.seed is not None:
        gen = torch.Generator(device=input_ids.device).manual_seed(s.seed)
    positions = model.position_ids_for(input_ids, attention_mask, image_deltas=image_deltas)
    embeds = model.embed(input_ids, pixel_values)
    cache = DynamicCache(config=model.llm.config)
    out = model.run_llm(
        cache=cache,
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
    )
    next_pos = next_positions(positions, attention_mask)
    mask = attention_mask
    batch = input_ids.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    new_tokens: list[torch.Tensor] = []
    if streamer is not None:
        streamer.put(input_ids.cpu())
    for _ in range(s.max_new_tokens):
        tok = _sample(out.logits[:, -1, :].float(), s, gen)
        tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
        new_tokens.append(tok)
        if streamer is not None:
            streamer.put(tok.cpu())
        finished |= torch.isin(tok, eos)
        if bool(finished.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model.run_llm(
            cache=cache,
            input_ids=tok[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None],
            use_cache=True,
        )
        next_pos = next_pos + 1.0
    if streamer is not None:
        streamer.end()
    if not new_tokens:
        return input_ids.new_zeros(batch, 0)
    return torch.stack(new_tokens, dim=1)
