"""VideoGPT+-style pooling of a video's frame embeddings into a fixed number of LLM tokens.

A video reaches the model as F frames (``data.video``: S x M segment frames, or N uniform). Every frame goes
through the experts and the fusion as an image would (one batched call with the batch's images), giving the
fusion's token grid per frame (its ``layout``: one (h, w) grid per output segment). Then:

- spatial pooling: each grid of each frame is average-pooled by ``spatial_pool`` (windows of p x p tokens,
  a partial window at the right / bottom edge averages the tokens it has): (h, w) -> (ceil(h/p), ceil(w/p));
- temporal pooling: the F frames are cut into ``segments`` consecutive groups (group s holds frames
  ``floor(s F / S)`` .. ``floor((s+1) F / S) - 1``, every group non-empty since F >= S) and each group is
  averaged, one pooled frame per segment.

A video therefore costs ``segments * sum(ceil(h/p) * ceil(w/p))`` tokens, whatever F and the clip's length
(``video_tokens``): the processor counts them from the config alone. Its tokens are laid out segment after
segment, each as the pooled layout, so ``video_layout`` (the pooled grids repeated per segment) is what
``mm.positions`` places: a video is one visual block, like an image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class VideoPooling:
    """The ``model.video`` section: how a video's frame embeddings become tokens (in ``config.json``)."""

    segments: int = 4  # temporal groups: one pooled frame each (VideoGPT+'s segments)
    spatial_pool: int = 2  # average-pool each frame's token grid by this factor per side (1: keep it)

    def __post_init__(self) -> None:
        if self.segments < 1:
            raise ValueError(f"segments: must be >= 1, got {self.segments}")
        if self.spatial_pool < 1:
            raise ValueError(f"spatial_pool: must be >= 1, got {self.spatial_pool}")

    def to_dict(self) -> dict:
        return asdict(self)


def pooled_layout(layout: Sequence[tuple[int, int]], spatial_pool: int) -> list[tuple[int, int]]:
    """The fusion's grids after ``spatial_pool``: (h, w) -> (ceil(h/p), ceil(w/p))."""
    return [(math.ceil(h / spatial_pool), math.ceil(w / spatial_pool)) for h, w in layout]


def video_layout(layout: Sequence[tuple[int, int]], cfg: VideoPooling) -> list[tuple[int, int]]:
    """The grids of one video's tokens in sequence order: the pooled layout once per segment."""
    return pooled_layout(layout, cfg.spatial_pool) * cfg.segments


def video_tokens(layout: Sequence[tuple[int, int]], cfg: VideoPooling) -> int:
    """LLM tokens per video: ``segments`` x the pooled tokens of one frame."""
    return sum(h * w for h, w in video_layout(layout, cfg))


def spatial_pool(tokens: torch.Tensor, layout: Sequence[tuple[int, int]], factor: int) -> torch.Tensor:
    """``[N, sum(h*w), D]`` frame tokens -> ``[N, sum(ceil(h/p)*ceil(w/p)), D]``, each grid pooled on its
    own (a grid's tokens are row-major)."""
    if factor == 1:
        return tokens
    parts, start = [], 0
    for h, w in layout:
        grid = tokens[:, start : start + h * w]
        start += h * w
        grid = grid.transpose(1, 2).reshape(grid.shape[0], -1, h, w)
        pooled = F.avg_pool2d(grid, factor, stride=factor, ceil_mode=True)
        parts.append(pooled.flatten(2).transpose(1, 2))
    return torch.cat(parts, dim=1)


def segment_weights(frames: int, segments: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[S, F]``: row s averages segment s, frames ``floor(s F / S)`` up to ``floor((s+1) F / S)``."""
    if frames < segments:
        raise ValueError(
            f"a video of {frames} frame(s) cannot fill {segments} segments (model.video.segments); "
            "data.video must give at least one frame per segment"
        )
    weights = torch.zeros(segments, frames, dtype=dtype, device=device)
    for s in range(segments):
        lo, hi = s * frames // segments, (s + 1) * frames // segments
        weights[s, lo:hi] = 1.0 / (hi - lo)
    return weights


def pool_video(frames: torch.Tensor, layout: Sequence[tuple[int, int]], cfg: VideoPooling) -> torch.Tensor:
    """Frame embeddings ``[V, F, M, D]`` (M tokens on ``layout``) -> video tokens ``[V, video_tokens, D]``:
    spatial pooling per frame, then the mean of each segment's frames, segments in order."""
    videos, count = frames.shape[:2]
    pooled = spatial_pool(frames.flatten(0, 1), layout, cfg.spatial_pool)
    pooled = pooled.reshape(videos, count, *pooled.shape[1:])
    weights = segment_weights(count, cfg.segments, pooled.dtype, pooled.device)
    return torch.einsum("sf,vfmd->vsmd", weights, pooled).flatten(1, 2)
