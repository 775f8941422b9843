"""Decoding for the VLM: prefill with visual embeddings, then token-by-token with a KV cache.

Our own loop (rather than ``GenerationMixin.generate``) because positions are ours: after the prefill,
each new token sits at the last prefill position + 1, which differs from the token count once visual
tokens advance positions by a V2PE delta. The loop is also where KV-cache compression (LOOK-M) hooks in,
right after the prefill. Works with left-padded batches and an HF ``TextIteratorStreamer``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from .kv_cache import KVCompression, ScoreHooks, cache_bytes_per_entry, compress_cache
from .positions import next_positions


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    kv: KVCompression | None = None  # compress this row's KV cache after the prefill (mm.kv_cache)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.do_sample and self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def samples(self) -> bool:
        return self.do_sample and self.temperature > 0


class RowSampler:
    """Per-row decoding settings of one batch: rows of concurrent requests differ in temperature, top-p,
    top-k, seed and length, and a seeded row draws from its own generator, so its tokens do not depend on
    what it was batched with."""

    def __init__(self, settings: Sequence[GenerationSettings], device: torch.device):
        self.settings = list(settings)
        self.max_new = torch.tensor([s.max_new_tokens for s in settings], device=device)
        self.sampled = [i for i, s in enumerate(settings) if s.samples]
        self.generators = [
            torch.Generator(device=device).manual_seed(s.seed) if s.seed is not None else None
            for s in settings
        ]

    @property
    def steps(self) -> int:
        return max((s.max_new_tokens for s in self.settings), default=0)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        tokens = logits.argmax(dim=-1)
        if not self.sampled:
            return tokens
        rows = torch.tensor(self.sampled, device=logits.device)
        picked = [self.settings[i] for i in self.sampled]
        x = logits[rows] / torch.tensor([s.temperature for s in picked], device=logits.device)[:, None]
        top_k = torch.tensor([s.top_k for s in picked], device=logits.device)
        if bool((top_k > 0).any()):
            k_max = int(top_k.max().clamp(max=x.shape[-1]))
            kth = torch.topk(x, k_max, dim=-1).values.gather(1, (top_k.clamp(1, k_max) - 1)[:, None])
            x = x.masked_fill((top_k[:, None] > 0) & (x < kth), float("-inf"))
        top_p = torch.tensor([s.top_p for s in picked], device=logits.device)
        if bool((top_p < 1).any()):
            sorted_x, order = torch.sort(x, descending=True, dim=-1)
            p = sorted_x.softmax(-1)
            drop = p.cumsum(-1) - p > top_p[:, None]  # keep the smallest set reaching top_p
            x = torch.full_like(x, float("-inf")).scatter(
                -1, order, sorted_x.masked_fill(drop, float("-inf"))
            )
        probs = x.softmax(-1)
        for j, i in enumerate(self.sampled):
            tokens[i] = torch.multinomial(probs[j], 1, generator=self.generators[i])[0]
        return tokens


def _per_row(row_scores: list[dict[int, torch.Tensor] | None]) -> dict[int, torch.Tensor] | None:
    """One score tensor per layer whose row b comes from row b's own kind of scores."""
    present = [r for r in row_scores if r is not None]
    if not present:
        return None
    out = {}
    for layer in present[0]:
        rows = [(r if r is not None else present[0])[layer][b] for b, r in enumerate(row_scores)]
        out[layer] = torch.stack(rows)
    return out


@torch.inference_mode()
def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: dict[str, torch.Tensor] | torch.Tensor | None = None,
    *,
    image_deltas: torch.Tensor | None = None,
    settings: GenerationSettings | Sequence[GenerationSettings] | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int = 0,
    streamer: Any = None,
    on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    stats: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Generate continuations of left-padded prompts. Returns new tokens ``[B, T]`` (pad after a row ends).

    ``settings``: one for every row, or one per row. ``streamer``: an HF streamer (``put`` / ``end``).
    ``on_step(tokens, finished)``: called after every step with the new token of each row (on the CPU) and
    which rows have ended (EOS or their own ``max_new_tokens``); a row that has ended gets padding.
    A row whose settings carry ``kv`` has its KV cache compressed once, right after the prefill; decoding
    then continues at the logical positions. ``stats`` (a dict) receives ``kv_entries_before`` /
    ``kv_entries_after`` (per row, entries per layer and KV head) and ``kv_bytes_per_entry``."""
    batch = input_ids.shape[0]
    if settings is None or isinstance(settings, GenerationSettings):
        settings = [settings or GenerationSettings()] * batch
    if len(settings) != batch:
        raise ValueError(f"{len(settings)} generation settings for a batch of {batch}")
    sampler = RowSampler(settings, input_ids.device)
    eos = torch.tensor(
        [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id),
        dtype=torch.long,
        device=input_ids.device,
    )
    positions = model.position_ids_for(input_ids, attention_mask, image_deltas=image_deltas)
    embeds = model.embed(input_ids, pixel_values)
    cache = DynamicCache(config=model.llm.config)
    specs = [None if s.kv is None or s.kv.is_full else s.kv for s in settings]
    # prompt tokens run after the compression (left padding: every row's last ones are real tokens)
    held = min(max((s.hold_out for s in specs if s is not None), default=0), input_ids.shape[1] - 1)
    prompt = input_ids.shape[1] - held
    scored = [s for s in specs if s is not None and s.scores]
    # one scoring per kind for the whole batch: the widest window, and every query if any row asks for all
    max_queries = (
        None if any(s.queries is None for s in scored) else max((s.queries for s in scored), default=None)
    )
    hooks = {
        kind: ScoreHooks(
            model.llm, cache, attention_mask[:, :prompt], kind, max(s.window for s in scored), max_queries
        )
        for kind in {s.scores for s in scored}
    }
    try:
        out = model.run_llm(
            cache=cache,
            inputs_embeds=embeds[:, :prompt],
            attention_mask=attention_mask[:, :prompt],
            position_ids=positions[:, :prompt],
            use_cache=True,
            logits_to_keep=1,
        )
    finally:
        for h in hooks.values():
            h.remove()
    next_pos = next_positions(positions, attention_mask)  # logical: compression does not move them
    mask = attention_mask[:, :prompt]
    before = after = mask.sum(1).tolist()
    if any(specs):
        row_scores = [hooks[s.scores].scores if s is not None and s.scores else None for s in specs]
        done = compress_cache(
            cache,
            mask,
            model.visual_mask(input_ids)[:, :prompt],
            specs,
            _per_row(row_scores),
        )
        mask, before, after = done.mask, done.before, done.after
    if held:
        mask = torch.cat([mask, attention_mask[:, prompt:]], dim=1)
        out = model.run_llm(
            cache=cache,
            inputs_embeds=embeds[:, prompt:],
            attention_mask=mask,
            position_ids=positions[:, prompt:],
            use_cache=True,
            logits_to_keep=1,
        )
    if stats is not None:
        stats.update(
            kv_entries_before=before, kv_entries_after=after, kv_bytes_per_entry=cache_bytes_per_entry(cache)
        )
    finished = sampler.max_new <= 0
    new_tokens: list[torch.Tensor] = []
    if streamer is not None:
        streamer.put(input_ids.cpu())
    for step in range(sampler.steps):
        tok = sampler(out.logits[:, -1, :].float())
        tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
        new_tokens.append(tok)
        if streamer is not None:
            streamer.put(tok.cpu())
        finished = finished | torch.isin(tok, eos) | (sampler.max_new <= step + 1)
        if on_step is not None:
            on_step(tok.cpu(), finished.cpu())
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
