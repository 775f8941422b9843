"""Position ids for interleaved text and visual tokens — the one place that assigns them.

V2PE's rule (OpenGVLab V2PE, ``get_rope_pos_id``), with MouSi's position sharing folded in:
- text tokens advance the position by 1 (the first real token of a row sits at 0, or at ``start``);
- the visual tokens of image i sit at ``last + delta_i * offset_j``, where ``last`` is the position of the
  token before the image and ``offset_j`` the token's offset in the image's occupancy scheme (below);
- after the image, ``last = ceil(last visual position)`` and text continues at +1, so text positions stay
  integers and image i occupies ``ceil(delta_i * max offset)`` positions.
``delta = 1`` with the ``original`` scheme is the plain integer encoding. Positions are built in float64 (fp32
cannot hold 70000 + 1/256); padding sits at 0.

A video is one visual block too (its own placeholder id and offsets, over ``mm.video.video_layout``: the
pooled grid once per temporal segment), with its own delta: images and videos share one delta list, in the
order their blocks appear in the row.

Occupancy schemes (MouSi) for an image whose visual tokens come in segments of (h, w) grids:
- ``original``: offsets 1..N, every visual token its own position.
- ``share_by_row``: token (r, c) of a segment at offset = its row (rows of later segments continue), so a
  segment occupies h positions.
- ``share_all``: every token at offset 1: the whole image at one position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

POSITION_SCHEMES = ("original", "share_by_row", "share_all")
V2PE_DELTAS = tuple(2.0**-k for k in range(9))  # the paper's training set {1, 1/2, ..., 1/256}


def visual_offsets(scheme: str, layout: Sequence[tuple[int, int]]) -> list[int]:
    """Per visual token of one image, its offset (in units of delta) from the position before the image."""
    if scheme not in POSITION_SCHEMES:
        raise ValueError(f"visual_positions: unknown scheme {scheme!r}; known: {', '.join(POSITION_SCHEMES)}")
    total = sum(h * w for h, w in layout)
    if scheme == "original":
        return list(range(1, total + 1))
    if scheme == "share_all":
        return [1] * total
    offsets, row = [], 0
    for h, w in layout:
        for _ in range(h):
            row += 1
            offsets += [row] * w
    return offsets


def positions_occupied(offsets: Sequence[float], delta: float = 1.0) -> int:
    """LLM positions one image takes: text after it resumes this far past the token before it (minus 1)."""
    return math.ceil(delta * max(offsets))


def build_position_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    offsets: Sequence[float] | torch.Tensor,
    deltas: torch.Tensor | float = 1.0,
    start: torch.Tensor | None = None,
    *,
    video_token_id: int | None = None,
    video_offsets: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Float64 position ids ``[B, L]`` by the rule above, for any (left or right) padding.

    ``offsets``: one image's visual-token offsets (``visual_offsets``); images are whole blocks of
    ``len(offsets)`` placeholder tokens; ``video_offsets`` the same for a video's ``video_token_id`` block.
    ``deltas``: one number for every block, or ``[B, K]`` per block (image or video) in placeholder order
    (entries past a row's blocks are ignored). ``start`` (``[B]``) shifts each row.
    """
    dev = input_ids.device
    real = attention_mask.bool()
    kinds = [(image_token_id, offsets)]
    if video_token_id is not None and video_offsets is not None and len(video_offsets):
        kinds.append((video_token_id, video_offsets))
    is_vis = torch.zeros_like(real)
    image = torch.zeros_like(input_ids)  # a visual token's block index; for text, the blocks completed before
    token_off = torch.zeros(input_ids.shape, dtype=torch.float64, device=dev)  # a visual token's offset
    block_max = torch.zeros(input_ids.shape, dtype=torch.float64, device=dev)  # its block's max, at its start
    for token_id, kind_offsets in kinds:
        is_kind = (input_ids == token_id) & real
        off = torch.as_tensor(kind_offsets, dtype=torch.float64, device=dev)
        n = off.numel()
        kind_before = torch.cumsum(is_kind.long(), 1) - is_kind.long()  # this kind's tokens before each token
        image = image + kind_before // n  # blocks of every kind are whole, so the counts add up
        k = kind_before % n
        token_off = torch.where(is_kind, off[k], token_off)
        block_max = torch.where(is_kind & (k == 0), off.max(), block_max)
        is_vis = is_vis | is_kind
    is_text = real & ~is_vis
    if not torch.is_tensor(deltas):
        deltas = torch.full((input_ids.shape[0], 1), float(deltas), dtype=torch.float64, device=dev)
    deltas = deltas.to(device=dev, dtype=torch.float64)
    needed = int(image.max()) + 1 if image.numel() else 1
    if deltas.shape[1] < needed:  # rows with more images than deltas given: the last delta repeats
        deltas = torch.cat([deltas, deltas[:, -1:].expand(-1, needed - deltas.shape[1])], dim=1)
    # each block's largest offset (scattered from its first token), then the positions each block occupies
    block = image.clamp(max=deltas.shape[1] - 1)
    widest = torch.zeros_like(deltas).scatter_reduce(1, block, block_max, "amax")
    spans = torch.ceil(deltas * widest)
    before = torch.cat([torch.zeros_like(spans[:, :1]), torch.cumsum(spans, 1)], dim=1)
    text_before = (torch.cumsum(is_text.long(), 1) - is_text.long()).to(torch.float64)
    base = text_before + before.gather(1, image.clamp(max=before.shape[1] - 1))
    delta = deltas.gather(1, block)
    pos = torch.where(is_vis, base - 1 + delta * token_off, base)
    if start is not None:
        pos = pos + start.to(device=dev, dtype=torch.float64).unsqueeze(1)
    return pos * real


def next_positions(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ``[B]`` of the token that follows a (left- or right-padded) prefix: ``ceil(last) + 1`` of the
    last real token (a text token's position is an integer; after an image, V2PE's ceil)."""
    last = torch.where(
        attention_mask.bool(),
        position_ids.to(torch.float64),
        torch.full_like(position_ids, -1, dtype=torch.float64),
    ).amax(dim=1)
    return torch.ceil(last) + 1.0
