"""Position ids for interleaved text and visual tokens — the one place that assigns them.

Text tokens advance the position by 1; visual tokens advance it by ``visual_delta`` (1.0 now; V2PE uses a
smaller, possibly fractional increment so long visual contexts fit the LLM's position range). Ids are float
so both cases share one code path; rotary embeddings in HF LLMs accept float positions. Padding tokens do
not advance the position, so left-padded batches get the same positions as unpadded sequences, and
generation continues from the last prefill position (not from the token count).
"""

from __future__ import annotations

import torch


def token_increments(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int, visual_delta: float = 1.0
) -> torch.Tensor:
    """Per-token position increment: 1 for text, ``visual_delta`` for visual tokens, 0 for padding."""
    inc = torch.ones(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    if visual_delta != 1.0:
        inc = torch.where(input_ids == image_token_id, torch.full_like(inc, visual_delta), inc)
    return inc * attention_mask.to(inc.dtype)


def build_position_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    visual_delta: float = 1.0,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float position ids ``[B, L]``: the first real token of each row sits at ``start`` (default 0).

    Each token's position is the sum of the increments of the real tokens before it. Padding positions are
    set to 0 (they are masked out anyway). ``start`` (shape ``[B]``) continues a sequence, e.g. after a cache.
    """
    inc = token_increments(input_ids, attention_mask, image_token_id, visual_delta)
    pos = torch.cumsum(inc, dim=1) - inc
    if start is not None:
        pos = pos + start.to(pos.dtype).unsqueeze(1)
    return pos * attention_mask.to(pos.dtype)


def next_positions(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ``[B]`` of the token that follows a (possibly left-padded) prefix: last position + 1."""
    last = position_ids[:, -1]
    # Right-padded rows would end on padding; take the max over real tokens instead.
    real_max = torch.where(attention_mask.bool(), position_ids, torch.full_like(position_ids, -1.0)).amax(
        dim=1
    )
    return torch.maximum(last, real_max) + 1.0
