"""Sampled frames per second of ``data.video.read_video``: decord against PyAV (and torchcodec if it loads).

Clips are written by the bench into a temp dir (H.264 via libx264, encoder defaults: keyframes at most 250
frames apart, B-frames; smooth synthetic motion, so no extra scene-cut keyframes) at 30 fps and 320x240, of
two lengths; each is read with two samplings (16 uniform frames; 2 frames per second). ``read_video`` rows
include its PyAV probe (open, stream checks, index), which the ``probe`` column gives alone; torchcodec rows
are its ``VideoDecoder(...).get_frames_at`` alone. Each cell is the best of ``--repeats`` timed calls after
one warm-up. ``diff`` is the mean absolute pixel difference from the PyAV frames (same indices). Prints a
table with ratios against PyAV; writes JSON.

    python bench/video_decode.py --json bench/results/video_decode_cpu_2026-12-07.json

torchcodec needs FFmpeg's shared libraries, which its wheel does not bring: where no system FFmpeg is
installed it is timed only if ``import torchcodec`` and a decode work (the ``torchcodec`` key of the JSON
says what happened). The saved run loaded torchcodec 0.17 (``pip install --target /tmp/tc torchcodec``, not a
project dependency) against the FFmpeg 8 libraries bundled in the PyAV wheel (``.venv/.../av.libs``,
symlinked under their plain sonames into /tmp/tcff): ``PYTHONPATH=/tmp/tc LD_LIBRARY_PATH=/tmp/tcff``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from data.video import Sampling, decord_available, probe_video, read_video, sample_indices  # noqa: E402

FPS, WIDTH, HEIGHT = 30, 320, 240


def write_clip(path: Path, seconds: float) -> Path:
    """A moving gradient with a moving square: cheap to encode, not trivially compressible."""
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for i in range(round(seconds * FPS)):
            frame = np.empty((HEIGHT, WIDTH, 3), np.uint8)
            frame[..., 0] = (xs + 3 * i) % 256
            frame[..., 1] = (ys + 2 * i) % 256
            frame[..., 2] = (xs + ys + i) % 256
            x, y = (7 * i) % (WIDTH - 40), (5 * i) % (HEIGHT - 40)
            frame[y : y + 40, x : x + 40] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def torchcodec_reader():
    """(reader, note): a function like the others, or None and why torchcodec is left out."""
    try:
        import torchcodec
        from torchcodec.decoders import VideoDecoder
    except Exception as err:  # ImportError, or OSError/RuntimeError when its FFmpeg libraries are missing
        return None, f"not loaded: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"

    def read(path: Path, sampling: Sampling) -> np.ndarray:
        decoder = VideoDecoder(str(path), num_ffmpeg_threads=0)
        meta = decoder.metadata
        indices = sample_indices(meta.num_frames, meta.average_fps, sampling)
        return decoder.get_frames_at(indices).data.permute(0, 2, 3, 1).numpy()

    return read, f"torchcodec {torchcodec.__version__}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def best_time(fn, repeats: int) -> tuple[float, float, object]:
    result = fn()  # warm-up (file cache, library init)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, nargs="+", default=[10.0, 60.0], help="clip lengths")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    samplings = {"uniform 16": Sampling("uniform", frames=16), "fps 2": Sampling("fps", fps=2.0)}
    readers = {"pyav": lambda p, s: read_video(p, s, backend="pyav").frames}
    if decord_available():
        readers["decord"] = lambda p, s: read_video(p, s, backend="decord").frames
    tc_read, tc_note = torchcodec_reader()
    if tc_read is not None:
        readers["torchcodec"] = tc_read
    print(f"torchcodec: {tc_note}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seconds in args.seconds:
            path = write_clip(Path(tmp) / f"clip_{seconds:g}s.mp4", seconds)
            info = probe_video(path)
            probe_s, _, _ = best_time(lambda p=path: probe_video(p), args.repeats)
            for name, sampling in samplings.items():
                reference = None
                for backend, read in readers.items():
                    best, median, frames = best_time(lambda r=read, p=path, s=sampling: r(p, s), args.repeats)
                    if backend == "pyav":
                        reference, pyav_s = frames, best
                    diff = float(np.abs(frames.astype(np.int16) - reference.astype(np.int16)).mean())
                    rows.append(
                        {
                            "clip_s": seconds,
                            "clip_frames": info.num_frames,
                            "file_kib": round(path.stat().st_size / 1024, 1),
                            "keyframe_interval": info.keyframe_interval,
                            "sampling": name,
                            "backend": backend,
                            "frames": len(frames),
                            "best_s": best,
                            "median_s": median,
                            "frames_per_s": len(frames) / best,
                            "speedup_vs_pyav": pyav_s / best,
                            "mean_abs_diff_vs_pyav": diff,
                            "probe_s": probe_s,
                        }
                    )

    header = (
        f"{'clip':>5} {'sampling':>10} {'backend':>10} {'frames':>6} {'ms':>8} {'frames/s':>9} "
        f"{'vs pyav':>7} {'diff':>5} {'probe ms':>8}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['clip_s']:>4g}s {r['sampling']:>10} {r['backend']:>10} {r['frames']:>6} "
            f"{1000 * r['best_s']:>8.1f} {r['frames_per_s']:>9.1f} {r['speedup_vs_pyav']:>6.2f}x "
            f"{r['mean_abs_diff_vs_pyav']:>5.2f} {1000 * r['probe_s']:>8.2f}"
        )
    if args.json:
        env = {
            "date": datetime.date.today().isoformat(),
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "av": av.__version__,
            "decord": version("decord") if decord_available() else None,
            "torchcodec": tc_note,
            "library_paths": {k: os.environ.get(k) for k in ("PYTHONPATH", "LD_LIBRARY_PATH")},
            "repeats": args.repeats,
        }
        result = {"command": "python " + " ".join(sys.argv), "env": env, "fps": FPS, "size": [WIDTH, HEIGHT]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**result, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
