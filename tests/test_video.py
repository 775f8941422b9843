from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from data import video
from data.media import MediaError
from data.video import Sampling, probe_video, read_video, sample_indices

BACKENDS = [
    "pyav",
    pytest.param("decord", marks=pytest.mark.skipif(not video.decord_available(), reason="no decord")),
]
CODEC = "libx264" if "libx264" in av.codecs_available else "mpeg4"
FPS, FRAMES, W, H = 24, 48, 64, 48


def _frame(i: int) -> np.ndarray:
    """Frame ``i``: its index in binary as 8 black/white 8-pixel stripes on top, a colour of its own below."""
    pixels = np.zeros((H, W, 3), np.uint8)
    for bit in range(8):
        pixels[: H // 2, bit * 8 : bit * 8 + 8] = 255 * ((i >> bit) & 1)
    pixels[H // 2 :] = ((i * 5) % 256, (255 - i * 5) % 256, (i * 37) % 256)
    return pixels


def _frame_id(pixels: np.ndarray) -> int:
    """The index ``_frame`` drew into ``pixels`` (at any width)."""
    top = pixels[: pixels.shape[0] // 2].mean(axis=(0, 2))
    stripe = pixels.shape[1] / 8
    return sum(1 << bit for bit in range(8) if top[int((bit + 0.5) * stripe)] > 127)


def _write(path, frames=FRAMES, gop=None, container_options=None, codec=CODEC):
    with av.open(str(path), "w", options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        out.start_encoding()
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_frame(i), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _write_audio(path, codec):
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=16000)
        fmt, dtype = ("s16", np.int16) if codec.startswith("pcm") else ("fltp", np.float32)
        for k in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype), format=fmt, layout="mono")
            frame.sample_rate, frame.pts = 16000, k * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _cut(src, dst):
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return {
        "mp4": _write(d / "gop12.mp4", gop=12),  # B-frames and a keyframe every 12: PyAV seeks
        "mp4_long_gop": _write(d / "long_gop.mp4"),  # encoder default: one keyframe, PyAV decodes forward
        "mkv": _write(d / "clip.mkv", gop=12),  # no frame count in the container: counted by demuxing
        "long": _write(d / "long.mp4", frames=240, gop=24),  # 10 s: sparse samples, PyAV seeks between them
    }


# --- sample_indices: hand-computed ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_frames, n, expected",
    [
        (48, 4, [6, 18, 30, 42]),  # centres of bins of 12
        (10, 3, [1, 5, 8]),  # floor(10/6), floor(30/6), floor(50/6)
        (8, 8, list(range(8))),
        (3, 8, [0, 1, 2]),  # fewer frames than requested: each once
        (1, 4, [0]),
        (0, 4, []),
    ],
)
def test_uniform_indices(num_frames, n, expected):
    assert sample_indices(num_frames, 24.0, Sampling("uniform", frames=n)) == expected


@pytest.mark.parametrize(
    "num_frames, native, target, expected",
    [
        (48, 24, 2, [0, 12, 24, 36]),  # one frame every 12
        (50, 24, 5, [0, 4, 9, 14, 19, 24, 28, 33, 38, 43, 48]),  # every 4.8 frames, floored
        (90, float(Fraction(30000, 1001)), 1, [0, 29, 59, 89]),  # NTSC: every 29.97 frames
        (5, 24, 30, [0, 1, 2, 3, 4]),  # target above native: every frame, none twice
        (5, 24, 24, [0, 1, 2, 3, 4]),
    ],
)
def test_fps_indices(num_frames, native, target, expected):
    assert sample_indices(num_frames, native, Sampling("fps", fps=target)) == expected


def test_fps_beyond_max_frames_falls_back_to_uniform_over_the_whole_clip():
    assert sample_indices(48, 24, Sampling("fps", fps=24, max_frames=4)) == [6, 18, 30, 42]
    assert sample_indices(48, 24, Sampling("fps", fps=2, max_frames=4)) == [0, 12, 24, 36]  # exactly 4: kept


@pytest.mark.parametrize(
    "num_frames, segments, per_segment, expected",
    [
        (48, 4, 2, [3, 9, 15, 21, 27, 33, 39, 45]),  # segments of 12, centres of bins of 6
        (10, 3, 2, [0, 2, 3, 5, 7, 9]),  # segments [0,3) [3,6) [6,10)
        (5, 2, 4, [0, 1, 2, 3, 4]),  # segments of 2 and 3 < 4: all their frames
        (2, 3, 1, [0, 1]),  # segments [0,0) [0,1) [1,2): the empty one gives nothing
    ],
)
def test_segment_indices(num_frames, segments, per_segment, expected):
    sampling = Sampling("segments", segments=segments, per_segment=per_segment)
    assert sample_indices(num_frames, 24, sampling) == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "random"}, "mode must be"),
        ({"frames": 0}, "frames must be in"),
        ({"frames": 300}, "max_frames=256"),
        ({"mode": "fps"}, "needs fps > 0"),
        ({"mode": "fps", "fps": -1.0}, "needs fps > 0"),
        ({"mode": "fps", "fps": 1.0, "frames": 8}, "frames is not used"),
        ({"fps": 2.0}, "fps is not used"),
        ({"mode": "segments", "segments": 4}, "per_segment >= 1"),
        ({"mode": "segments", "segments": 20, "per_segment": 20}, "400 > max_frames"),
        ({"max_frames": 0}, "max_frames must be"),
    ],
)
def test_sampling_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


def test_uniform_default_is_8_frames():
    assert Sampling().frames == 8


# --- decoding ---------------------------------------------------------------------------------------------

SAMPLINGS = [
    Sampling("uniform", frames=5),
    Sampling("fps", fps=3),
    Sampling("segments", segments=3, per_segment=2),
    Sampling("uniform", frames=64),  # more than the clip: every frame
]


@pytest.mark.parametrize("clip", ["mp4", "mp4_long_gop", "mkv", "long"])
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=lambda s: s.mode)
def test_backends_return_the_requested_frames(clips, clip, sampling):
    path = clips[clip]
    num_frames = 240 if clip == "long" else FRAMES
    expected = sample_indices(num_frames, FPS, sampling)
    results = [read_video(path, sampling, backend="pyav")]
    if video.decord_available():
        results.append(read_video(path, sampling, backend="decord"))
    for result in results:
        assert result.indices == expected and result.num_frames == num_frames and result.fps == FPS
        assert result.timestamps == pytest.approx([i / FPS for i in expected])
        assert result.frames.dtype == np.uint8 and result.frames.shape == (len(expected), H, W, 3)
        assert [_frame_id(f) for f in result.frames] == expected, result.backend
        colours = np.array([_frame(i)[H - 1, 0] for i in expected], np.float64)
        assert np.abs(result.frames[:, H - 1, 0].astype(np.float64) - colours).max() < 12  # limited-range YUV
    if len(results) == 2:
        diff = np.abs(results[0].frames.astype(np.int16) - results[1].frames.astype(np.int16))
        assert diff.mean() < 1.0 and diff.max() <= 8  # same decoder underneath: rounding in YUV->RGB only


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_side_resizes_while_decoding(clips, backend):
    result = read_video(clips["mp4"], Sampling("uniform", frames=4), backend=backend, max_side=32)
    assert result.frames.shape == (4, 24, 32, 3)
    assert [_frame_id(f) for f in result.frames] == result.indices == [6, 18, 30, 42]
    full = read_video(clips["mp4"], Sampling("uniform", frames=4), backend=backend, max_side=1000)
    assert full.frames.shape == (4, H, W, 3)  # never enlarged
    small = np.asarray([np.asarray(Image.fromarray(f).resize((32, 24), Image.BILINEAR)) for f in full.frames])
    assert np.abs(result.frames.astype(np.int16) - small).mean() < 12


def test_images_and_auto_backend(clips, monkeypatch):
    result = read_video(clips["mp4"])
    assert result.backend == ("decord" if video.decord_available() else "pyav")
    assert len(result.images()) == 8 and result.images()[0].size == (W, H)
    monkeypatch.setattr(video, "decord_available", lambda: False)
    assert read_video(clips["mp4"], backend="auto").backend == "pyav"
    with pytest.raises(ValueError, match="backend must be"):
        read_video(clips["mp4"], backend="opencv")


def test_probe(clips):
    info = probe_video(clips["mkv"])
    assert (info.num_frames, info.fps, info.width, info.height) == (FRAMES, FPS, W, H)
    assert 1 <= info.keyframe_interval <= 12  # x264 adds keyframes at scene cuts: here, every frame is one


# --- bad files --------------------------------------------------------------------------------------------


def _bad_files(d):
    text = d / "notes.mp4"
    text.write_text("not a video " * 50)
    png = d / "picture.mp4"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(png, format="PNG")
    empty = d / "empty.mp4"
    empty.write_bytes(b"")
    zero = d / "zero_frames.avi"
    with av.open(str(zero), "w") as out:
        stream = out.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        out.start_encoding()
    return {
        "missing": (d / "missing.mp4", "file not found"),
        "directory": (d, "is a directory"),
        "empty": (empty, "empty file"),
        "text": (text, "not a readable video"),
        "png": (png, "still image"),
        "aac": (_write_audio(d / "speech.m4a", "aac"), "no video stream (audio-only"),
        "pcm": (_write_audio(d / "speech.mkv", "pcm_s16le"), "no video stream (audio-only"),
        "zero_frames": (zero, "zero frames"),
        # the moov index is written at the end: cut off with the second half
        "cut_mp4": (_cut(_write(d / "whole.mp4"), d / "cut.mp4"), "truncated"),
        "cut_faststart": (
            _cut(_write(d / "fs.mp4", container_options={"movflags": "+faststart"}), d / "cut_fs.mp4"),
            "truncated video file: its index points past the end",
        ),
        "cut_mkv": (_cut(_write(d / "whole.mkv"), d / "cut.mkv"), "truncated video: "),
    }


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return _bad_files(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kind",
    "missing directory empty text png aac pcm zero_frames cut_mp4 cut_faststart cut_mkv".split(),
)
def test_bad_files_raise_media_error_naming_the_file(bad_files, kind, backend):
    path, reason = bad_files[kind]
    with pytest.raises(MediaError) as info:
        read_video(path, Sampling("uniform", frames=4), backend=backend)
    assert str(path) in str(info.value) and info.value.path == str(path)
    assert reason in info.value.reason
