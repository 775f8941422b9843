"""Position ids for interleaved text and visual tokens — the one place that assigns them.

Every token has an *increment*: how far the position advances after it. Text tokens advance it by 1;
visual tokens by what their image's occupancy scheme gives (MouSi, below), times ``visual_delta`` (1.0 now;
V2PE uses a smaller, possibly fractional step so long visual contexts fit the LLM's position range); padding
by 0. A token's position is the sum of the increments before it, so left-padded rows get the same positions
as unpadded ones, and generation continues from the last prefill position (not from the token count). Ids
are float so all cases share one code path; HF rotary embeddings accept float positions.

Occupancy schemes (MouSi) for an image whose visual tokens come in segments of (h, w) grids:
- ``original``: every visual token its own position (h*w per segment).
- ``share_by_row``: token (r, c) of a segment sits at p0 + r: the segment occupies h positions.
- ``share_all``: the whole image at one position.
Text after the image resumes right after the occupied positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

POSITION_SCHEMES = ("original", "share_by_row", "share_all")


def visual_increments(scheme: str, layout: Sequence[tuple[int, int]], delta: float = 1.0) -> list[float]:
    """Per visual token of one image, how far the position advances after it (``sum`` = positions used)."""
    if scheme not in POSITION_SCHEMES:
        raise ValueError(f"visual_positions: unknown scheme {scheme!r}; known: {', '.join(POSITION_SCHEMES)}")
    total = sum(h * w for h, w in layout)
    if scheme == "original":
        steps = [1.0] * total
    elif scheme == "share_all":
        steps = [0.0] * (total - 1) + [1.0]
    else:
        steps = [s for h, w in layout for _ in range(h) for s in [0.0] * (w - 1) + [1.0]]
    return [s * delta for s in steps]


def token_increments(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    visual: Sequence[float] | torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Per-token increments ``[B, L]``: 1 for text, ``visual[k]`` for the k-th token of an image, 0 for
    padding. ``visual`` is one image's increments (``visual_increments``) or one number for every token."""
    inc = torch.ones(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    is_visual = input_ids == image_token_id
    if isinstance(visual, (int, float)):
        if visual != 1.0:
            inc = torch.where(is_visual, torch.full_like(inc, float(visual)), inc)
    else:
        table = torch.as_tensor(visual, dtype=torch.float32, device=input_ids.device)
        # images are whole blocks of len(table) placeholder tokens, so the k-th visual token of a row
        # is token k % len(table) of its image
        k = (torch.cumsum(is_visual.long(), dim=1) - 1).clamp_min(0) % table.numel()
        inc = torch.where(is_visual, table[k], inc)
    return inc * attention_mask.to(inc.dtype)


def positions_from_increments(
    increments: torch.Tensor, attention_mask: torch.Tensor, start: torch.Tensor | None = None
) -> torch.Tensor:
    """Float positions ``[B, L]``: each token at the sum of the increments before it (+ ``start[b]``);
    padding at 0 (masked out anyway). Summed in float64: exact for any length a model can hold."""
    inc = increments.to(torch.float64) * attention_mask.to(torch.float64)
    pos = torch.cumsum(inc, dim=1) - inc
    if start is not None:
        pos = pos + start.to(pos.dtype).unsqueeze(1)
    return (pos * attention_mask.to(pos.dtype)).to(torch.float32)


def build_position_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    visual_delta: Sequence[float] | torch.Tensor | float = 1.0,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float position ids ``[B, L]``: the first real token of each row sits at ``start`` (default 0)."""
    inc = token_increments(input_ids, attention_mask, image_token_id, visual_delta)
    return positions_from_increments(inc, attention_mask, start)


def next_positions(
    position_ids: torch.Tensor, attention_mask: torch.Tensor, increments: torch.Tensor | None = None
) -> torch.Tensor:
    """Position ``[B]`` of the token that follows a (left- or right-padded) prefix: the last real token's
    position plus its increment (``increments``; default 1, a prompt ending in text)."""
    step = torch.ones_like(position_ids) if increments is None else increments.to(position_ids.dtype)
    ends = torch.where(attention_mask.bool(), position_ids + step, torch.full_like(position_ids, -1.0))
    return ends.amax(dim=1)
