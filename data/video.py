"""Video files: which frames to take (``Sampling``, ``sample_indices``) and one place that decodes them.

``read_video`` decodes only the sampled frames, with decord (``VideoReader.get_batch``) or PyAV (seek to the
keyframe before a wanted frame when that skips work, otherwise decode forward; unwanted frames are never
converted to RGB or kept), so memory is the sampled frames, not the clip. ``max_side`` shrinks frames while
decoding. decord is unmaintained since 2021 and has no wheels for some platforms; ``backend="auto"`` uses it
when it imports and PyAV otherwise, and both are tested to return the same frames.

Every file is first probed with PyAV (container, video stream, frame count, frame rate, truncation), also for
decord: on bad files decord raises RuntimeError or DECORDError with C++ log text, reads a Matroska file cut
in half as a shorter clip without complaint, and is reported upstream to hang or crash on some damaged
files; the probe gives both backends the same checks and reasons. Every failure (missing, empty, not a
video, audio-only, zero frames, truncated, corrupt) becomes a ``data.media.MediaError`` naming the file,
as for images.

Frame ``i`` has timestamp ``i / fps``: a constant frame rate is assumed (what decord assumes too). On a
variable-frame-rate file the PyAV reader maps presentation times to indices, so the two backends may pick
neighbouring frames there.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from data.media import MediaError

Mode = Literal["uniform", "fps", "segments"]
Backend = Literal["auto", "decord", "pyav"]
_DEFAULT_KEYFRAME_INTERVAL = 64  # frames, when the container has no index to estimate it from
# FFmpeg demuxers of still images: they open a PNG or JPEG as a one-frame "video"
_IMAGE_FORMATS = ("image2", "_pipe")


@dataclass(frozen=True)
class Sampling:
    """Which frames of a clip to decode; ``sample_indices`` gives the rule of each mode.

    - ``uniform``: ``frames`` frames (default 8) spread over the whole clip.
    - ``fps``: ``fps`` frames per second of video, at most ``max_frames`` (beyond: ``max_frames`` uniform).
    - ``segments``: ``segments`` equal segments, ``per_segment`` frames spread over each.
    """

    mode: Mode = "uniform"
    frames: int | None = None
    fps: float | None = None
    segments: int | None = None
    per_segment: int | None = None
    max_frames: int = 256

    def __post_init__(self) -> None:
        if self.mode not in ("uniform", "fps", "segments"):
            raise ValueError(f"Sampling.mode must be 'uniform', 'fps' or 'segments', got {self.mode!r}")
        if self.max_frames < 1:
            raise ValueError(f"Sampling.max_frames must be >= 1, got {self.max_frames}")
        used = {"uniform": ("frames",), "fps": ("fps",), "segments": ("segments", "per_segment")}[self.mode]
        for name in ("frames", "fps", "segments", "per_segment"):
            if name not in used and getattr(self, name) is not None:
                raise ValueError(f"Sampling.{name} is not used by mode={self.mode!r} (it takes {used})")
        if self.mode == "uniform":
            if self.frames is None:
                object.__setattr__(self, "frames", 8)
            if self.frames < 1 or self.frames > self.max_frames:
                raise ValueError(
                    f"Sampling.frames must be in 1..max_frames={self.max_frames}, got {self.frames}"
                )
        elif self.mode == "fps":
            if self.fps is None or not math.isfinite(self.fps) or self.fps <= 0:
                raise ValueError(f"Sampling(mode='fps') needs fps > 0, got {self.fps}")
        else:
            for name in ("segments", "per_segment"):
                if getattr(self, name) is None or getattr(self, name) < 1:
                    raise ValueError(
                        f"Sampling(mode='segments') needs {name} >= 1, got {getattr(self, name)}"
                    )
            if self.segments * self.per_segment > self.max_frames:
                total = self.segments * self.per_segment
                raise ValueError(f"segments*per_segment = {total} > max_frames={self.max_frames}")


def _centres(start: int, stop: int, n: int) -> list[int]:
    """The frame at the centre of each of ``n`` equal bins of ``[start, stop)``; every frame if fewer."""
    length = stop - start
    if length <= n:
        return list(range(start, stop))
    return [start + (2 * i + 1) * length // (2 * n) for i in range(n)]


def sample_indices(num_frames: int, native_fps: float, sampling: Sampling) -> list[int]:
    """Sorted distinct frame indices in ``[0, num_frames)`` chosen by ``sampling``.

    - uniform N: ``[0, T)`` is cut into N equal bins and the frame at each bin's centre is taken,
      ``floor((2i+1) T / 2N)`` (the rule of InternVL's ``get_index`` and LLaVA-NeXT-Video's centred
      sampling): T=48, N=4 -> 6, 18, 30, 42. A clip with T <= N gives all its T frames (none repeated).
    - fps f: frame ``floor(k * native / f)`` for k = 0, 1, ... while it is < T, i.e. one frame every
      ``native / f`` frames, starting at frame 0: T=48 at 24 fps, f=2 -> 0, 12, 24, 36. ``f >= native`` gives
      every frame. More than ``max_frames`` such frames -> ``max_frames`` uniform frames instead, so a long
      clip is still covered from start to end.
    - segments S x M: segment s is frames ``[floor(s T / S), floor((s+1) T / S))`` and takes the centres of
      M equal bins of it, as uniform does; segments are disjoint, so no frame of one falls in another. A
      segment shorter than M gives all its frames, an empty one (T < S) none.
    """
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    if num_frames == 0:
        return []
    if sampling.mode == "uniform":
        return _centres(0, num_frames, sampling.frames)
    if sampling.mode == "segments":
        s = sampling.segments
        out: list[int] = []
        for k in range(s):
            out += _centres(k * num_frames // s, (k + 1) * num_frames // s, sampling.per_segment)
        return out
    if not (native_fps > 0 and math.isfinite(native_fps)):
        raise ValueError(f"native_fps must be > 0 for mode='fps', got {native_fps}")
    if sampling.fps >= native_fps:
        indices = list(range(num_frames))
    else:
        step = native_fps / sampling.fps
        # 1e-9: k * step that is an integer in exact arithmetic must not floor to the frame before it
        count = math.ceil(num_frames / step - 1e-9)
        indices = sorted({min(int(k * step + 1e-9), num_frames - 1) for k in range(count)})
    if len(indices) > sampling.max_frames:
        return _centres(0, num_frames, sampling.max_frames)
    return indices


@dataclass
class VideoInfo:
    """What the PyAV probe learnt about a file's first video stream."""

    num_frames: int
    fps: float
    width: int
    height: int
    keyframe_interval: int  # estimated, in frames: the PyAV reader seeks only across larger gaps


@dataclass
class Video:
    """The sampled frames of a file: ``frames[j]`` is frame ``indices[j]`` at ``timestamps[j]`` seconds."""

    frames: np.ndarray  # uint8 [N, H, W, 3], RGB
    indices: list[int]
    timestamps: list[float]
    fps: float  # of the file
    num_frames: int  # of the file
    path: str
    backend: str = field(default="pyav")

    def images(self) -> list[Image.Image]:
        return [Image.fromarray(frame) for frame in self.frames]


def decord_available() -> bool:
    return importlib.util.find_spec("decord") is not None


def _fps_of(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return float(rate)
    return 0.0


def _check_file(path: Path) -> None:
    if not path.exists():
        raise MediaError(path, "file not found")
    if path.is_dir():
        raise MediaError(path, "is a directory, not a video file")
    if path.stat().st_size == 0:
        raise MediaError(path, "empty file (0 bytes)")


def _track_seconds(container, stream) -> float | None:
    """The video track's duration as the container states it (Matroska: a DURATION tag), if it does."""
    tag = stream.metadata.get("DURATION")
    if tag:
        try:
            hours, minutes, seconds = tag.split(":")
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
        except ValueError:
            pass
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and len(container.streams) == 1:
        return container.duration / 1_000_000
    return None


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Open ``path`` with PyAV and check it is a video with frames, without decoding any.

    The frame count comes from the container; where it reports none (Matroska/WebM never do), the video
    packets are counted by demuxing (reading, not decoding). The file was cut short when an MP4-style index
    points past its end, or when fewer packets are there than the stated track duration needs.
    """
    import av

    path = Path(path)
    _check_file(path)
    try:
        with av.open(str(path)) as container:
            if any(part in container.format.name for part in _IMAGE_FORMATS):
                raise MediaError(path, f"a still image ({container.format.name}), not a video")
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams})
                what = "audio-only file" if "audio" in kinds else f"streams: {', '.join(kinds) or 'none'}"
                raise MediaError(path, f"no video stream ({what})")
            stream = container.streams.video[0]
            fps = _fps_of(stream)
            width, height = stream.codec_context.width, stream.codec_context.height
            entries = stream.index_entries
            size = path.stat().st_size
            if entries and max(e.pos + e.size for e in entries) > size:
                raise MediaError(path, f"truncated video file: its index points past the end ({size} bytes)")
            num_frames = stream.frames
            keyframes = sum(1 for e in entries if e.is_keyframe)
            if num_frames <= 0:
                num_frames = keyframes = 0
                for packet in container.demux(stream):
                    if packet.size > 0:
                        num_frames += 1
                        keyframes += packet.is_keyframe
                seconds = _track_seconds(container, stream)
                if num_frames and seconds and fps > 0:
                    stated = round(seconds * fps)
                    if num_frames < stated - max(2, 0.05 * stated):
                        raise MediaError(
                            path, f"truncated video: {num_frames} frames where {seconds:.2f} s needs {stated}"
                        )
    except MediaError:
        raise
    except PermissionError as err:
        raise MediaError(path, f"cannot read file: {err.strerror or err}") from err
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as err:
        raise MediaError(path, f"not a readable video (corrupt, truncated or not a video): {err}") from err
    if num_frames <= 0:
        raise MediaError(path, "video stream has zero frames")
    if fps <= 0:
        raise MediaError(path, "video stream has no frame rate")
    if width <= 0 or height <= 0:
        raise MediaError(path, f"zero-size video ({width}x{height})")
    interval = num_frames // keyframes if keyframes else _DEFAULT_KEYFRAME_INTERVAL
    return VideoInfo(num_frames, fps, width, height, max(interval, 1))


def _fit(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) shrunk, aspect kept, so the longer side is <= max_side; never enlarged."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _read_pyav(path: Path, info: VideoInfo, indices: list[int], size: tuple[int, int], threads: int):
    import av

    try:
        return _decode_pyav(path, info, indices, size, threads)
    except av.error.FFmpegError as err:
        raise MediaError(path, f"corrupt video data (pyav): {err}") from err


def _decode_pyav(path: Path, info: VideoInfo, indices: list[int], size: tuple[int, int], threads: int):
    import av

    width, height = size
    out = np.empty((len(indices), height, width, 3), np.uint8)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        tb, start = float(stream.time_base), stream.start_time or 0

        def index_of(frame, previous: int) -> int:
            if frame.pts is None:
                return previous + 1
            return round((frame.pts - start) * tb * info.fps)

        def seek(target: int):
            """Decoded frames from the keyframe before ``target``: (iterator, first frame, its index)."""
            margin = 0
            while True:
                at = max(target - margin, 0)
                container.seek(start + int(at / info.fps / tb), stream=stream, backward=True)
                frames = container.decode(stream)
                first = next(frames, None)
                if first is None:
                    return frames, None, target
                pos = index_of(first, at - 1)
                # a keyframe found by decode time may show after ``target``: seek further back
                if pos <= target or at == 0:
                    return frames, first, pos
                margin = max(2 * margin, info.keyframe_interval)

        frames, frame, pos = container.decode(stream), None, -1
        for slot, want in enumerate(indices):
            if want - pos > info.keyframe_interval:
                frames, frame, pos = seek(want)
            while frame is None or pos < want:
                frame = next(frames, None)
                if frame is None:
                    raise MediaError(path, f"truncated video: frame {want} of {info.num_frames} is missing")
                pos = index_of(frame, pos)
            out[slot] = frame.to_ndarray(format="rgb24", width=width, height=height)
    return out


def _read_decord(path: Path, info: VideoInfo, indices: list[int], size: tuple[int, int], threads: int):
    import decord

    width, height = size
    resize = (width, height) != (info.width, info.height)
    try:
        reader = decord.VideoReader(
            str(path),
            ctx=decord.cpu(0),
            width=width if resize else -1,
            height=height if resize else -1,
            num_threads=threads,
        )
        if len(reader) <= indices[-1]:
            raise MediaError(
                path, f"decord sees {len(reader)} frames, the container reports {info.num_frames}"
            )
        return reader.get_batch(indices).asnumpy()
    except (decord.DECORDError, RuntimeError) as err:  # decord raises both, with C++ log lines
        reason = str(err).strip().splitlines()[0][:200]
        raise MediaError(path, f"corrupt video data (decord): {reason}") from err


def read_video(
    path: str | os.PathLike,
    sampling: Sampling | None = None,
    *,
    backend: Backend = "auto",
    max_side: int | None = None,
    threads: int = 0,
) -> Video:
    """Decode the frames ``sampling`` picks (default: 8 uniform) from ``path`` as uint8 RGB.

    ``backend``: ``"decord"``, ``"pyav"`` or ``"auto"`` (decord when it imports, else PyAV). ``max_side``:
    frames are resized while decoding so the longer side is at most this (aspect kept). ``threads``: decoder
    threads, 0 = the library's choice. Raises ``MediaError`` naming the file for any unreadable file.
    """
    if backend not in ("auto", "decord", "pyav"):
        raise ValueError(f"backend must be 'auto', 'decord' or 'pyav', got {backend!r}")
    if backend == "auto":
        backend = "decord" if decord_available() else "pyav"
    sampling = sampling or Sampling()
    path = Path(path)
    info = probe_video(path)
    indices = sample_indices(info.num_frames, info.fps, sampling)
    size = _fit(info.width, info.height, max_side)
    reader = _read_decord if backend == "decord" else _read_pyav
    frames = reader(path, info, indices, size, threads)
    return Video(
        frames=frames,
        indices=indices,
        timestamps=[i / info.fps for i in indices],
        fps=info.fps,
        num_frames=info.num_frames,
        path=str(path),
        backend=backend,
    )
