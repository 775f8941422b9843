"""Position ids for interleaved text and visual tokens — the one place that assigns them.

V2PE's rule (OpenGVLab V2PE, ``get_rope_pos_id``), with MouSi's position sharing folded in:
- text tokens advance the position by 1 (the first real token of a row sits at 0, or at ``start``);
- the visual tokens of image i sit at ``last + delta_i * offset_j``, where ``last`` is the position of the
  token before the image and ``offset_j`` the token's offset in the image's occupancy scheme (below);
- after the image, ``last = ceil(last visual position)`` and text continues at +1, so text positions stay
  integers and image i occupies ``ceil(delta_i * max offset)`` positions.
``delta = 1`` with the ``original`` scheme is the plain integer encoding. Positions are built in float64 (fp32
cannot hold 70000 + 1/256); padding sits at 0.

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
) -> torch.Tensor:
    """Float64 position ids ``[B, L]`` by the rule above, for any (left or right) padding.

    ``offsets``: one image's visual-token offsets (``visual_offsets``); images are whole blocks of
    ``len(offsets)`` placeholder tokens. ``deltas``: one number for every image, or ``[B, K]`` per image in
    placeholder order (entries past a row's images are ignored). ``start`` (``[B]``) shifts each row.
    """
    dev = input_ids.device
    real = attention_mask.bool()
    is_vis = (input_ids == image_token_id) & real
    is_text = real & ~is_vis
    off = torch.as_tensor(offsets, dtype=torch.float64, device=dev)
    n = off.numel()
    vis_before = torch.cumsum(is_vis.long(), 1) - is_vis.long()  # visual tokens before each token
    image = vis_before // n  # a visual token's image index; for text, the images completed before it
    k = vis_before % n
    if not torch.is_tensor(deltas):
        deltas = torch.full((input_ids.shape[0], 1), float(deltas), dtype=torch.float64, device=dev)
    deltas = deltas.to(device=dev, dtype=torch.float64)
    needed = int(image.max()) + 1 if image.numel() else 1
    if deltas.shape[1] < needed:  # rows with more images than deltas given: the last delta repeats
        deltas = torch.cat([deltas, deltas[:, -1:].expand(-1, needed - deltas.shape[1])], dim=1)
    spans = torch.ceil(deltas * off.max())  # positions each image occupies
    before = torch.cat([torch.zeros_like(spans[:, :1]), torch.cumsum(spans, 1)], dim=1)
    text_before = (torch.cumsum(is_text.long(), 1) - is_text.long()).to(torch.float64)
    base = text_before + before.gather(1, image.clamp(max=before.shape[1] - 1))
    delta = deltas.gather(1, image.clamp(max=deltas.shape[1] - 1))
    pos = torch.where(is_vis, base - 1 + delta * off[k], base)
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
