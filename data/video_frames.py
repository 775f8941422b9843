"""What a ``<video>`` hands the model: a fixed number of frames per clip (the ``data.video`` section).

``VideoSettings`` is the sampling a run uses (saved with the processor, so eval and chat decode the same
frames): ``segments`` S x M frames by default (VideoGPT+'s segments; the model pools each segment into one
frame's worth of tokens) or ``uniform`` N. ``load_frames`` decodes a file through ``data.video.read_video``
and ``fit_frames`` makes any decoded clip exactly ``frames_per_video`` frames, so every video of a batch has
the same shape and the same token count whatever its length: a clip shorter than the sampling asks for
repeats its frames in order (frame ``floor(j * n / F)`` fills slot ``j``).

``middle_frame`` is the single-frame baseline: only the clip's middle frame (``floor(T / 2)``, the centre of
one uniform bin) is decoded, and it fills every slot, so the baseline runs the same model, the same tokens
and the same positions, and differs only in what the frames show.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .video import Sampling, Video, read_video

SETTINGS = ("mode", "segments", "per_segment", "frames", "backend", "max_side", "middle_frame")


@dataclass
class VideoSettings:
    """How a video record's file becomes frames (the ``data.video`` config section)."""

    mode: Literal["segments", "uniform"] = "segments"
    segments: int = 4  # segments mode: S equal parts of the clip ...
    per_segment: int = 4  # ... M frames from each (S x M frames in all)
    frames: int = 16  # uniform mode: N frames over the whole clip
    backend: Literal["auto", "decord", "pyav"] = "auto"  # data.video.read_video's reader
    max_side: int | None = 448  # shrink frames while decoding (each expert resizes them again anyway)
    # the single-frame baseline: the middle frame fills every slot (same model, tokens and positions)
    middle_frame: bool = False

    def __post_init__(self) -> None:
        for name in ("segments", "per_segment", "frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.mode not in ("segments", "uniform"):
            raise ValueError(f"mode: expected 'segments' or 'uniform', got {self.mode!r}")
        if self.max_side is not None and self.max_side < 1:
            raise ValueError(f"max_side: must be >= 1 or null, got {self.max_side}")
        self.sampling()  # the reader's own checks (max_frames)

    @property
    def frames_per_video(self) -> int:
        """Frames each video hands the model (the model's temporal pooling divides them into segments)."""
        return self.segments * self.per_segment if self.mode == "segments" else self.frames

    def sampling(self) -> Sampling:
        """The reader's sampling: the configured one, or the one middle frame for the baseline."""
        if self.middle_frame:
            return Sampling("uniform", frames=1)
        if self.mode == "segments":
            return Sampling("segments", segments=self.segments, per_segment=self.per_segment)
        return Sampling("uniform", frames=self.frames)

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in SETTINGS}

    @classmethod
    def from_dict(cls, values: dict | None) -> VideoSettings:
        return cls(**{k: v for k, v in (values or {}).items() if k in SETTINGS})


def fit_frames(frames: np.ndarray, count: int) -> np.ndarray:
    """``frames`` ``[n, H, W, 3]`` (n >= 1) as exactly ``count`` frames in order: slot ``j`` takes frame
    ``floor(j * n / count)`` (with n == count every frame once; with n < count some repeat)."""
    n = len(frames)
    if n < 1:
        raise ValueError("a video needs at least one frame")
    if n == count:
        return frames
    return frames[[j * n // count for j in range(count)]]


def load_frames(path: str | os.PathLike, settings: VideoSettings) -> np.ndarray:
    """The ``frames_per_video`` frames of the file at ``path`` (uint8 ``[F, H, W, 3]``) under ``settings``;
    any unreadable file raises ``data.media.MediaError`` naming it."""
    video = read_video(path, settings.sampling(), backend=settings.backend, max_side=settings.max_side)
    return fit_frames(video.frames, settings.frames_per_video)


def frames_of(video: Video | np.ndarray, settings: VideoSettings) -> np.ndarray:
    """Frames already decoded (a ``Video`` or an array) as the model takes them: the middle one for the
    baseline, then fitted to ``frames_per_video``."""
    frames = video.frames if isinstance(video, Video) else np.asarray(video)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) < 1:
        raise ValueError(f"a video is uint8 frames [N, H, W, 3] with N >= 1, got shape {tuple(frames.shape)}")
    if settings.middle_frame:
        frames = frames[len(frames) // 2 : len(frames) // 2 + 1]
    return fit_frames(frames.astype(np.uint8, copy=False), settings.frames_per_video)
