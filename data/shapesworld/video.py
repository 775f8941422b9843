"""ShapesWorld clips: short mp4 videos of shapes that move, appear, leave the frame or change colour, with
questions whose answers are known exactly (LLaVA-NeXT-Video / VideoGPT+ style records, ``<video>`` in the
text, ``video`` the clip's path).

Every clip holds, with distinct shapes and distinct colours (also across colour changes), so "the circle" or
"the red object" names one object:
- one **mover** crossing 30-45% of the frame in a straight line, left / right / up / down;
- two **appearers** popping in before the middle frame, ``max(2, frames // 8)`` frames apart or more (so 8
  uniformly sampled frames tell them apart);
- 0-2 **leavers** moving out through an edge, and 0-2 **recolourers** (static, one colour change each).
No two objects' swept boxes touch, so nothing is ever hidden. One record per question type:
- ``motion``: "Which way did the red square move?" -> left / right / up / down (chance 1/4);
- ``order``: "What appeared first, the circle or the star?" -> a shape (chance 1/2; the first one to appear is
  named first or second with equal odds);
- ``count``: "How many objects left the frame?" or "... changed colour?" -> 0 / 1 / 2 (chance 1/3);
- ``state``: the colour of the mover at the start, of the mover or an appearer at the end, or the shape of one
  of them by its colour -> a colour or a shape (chance 1/8). These objects never change colour and are
  visible at the middle frame, so one frame answers them;
- ``caption``: one sentence per event ("The red square moves left. The blue star appears. Then ...").
Motion and order need more than one frame: the mover's position at the middle frame is drawn from the same
range whatever its direction, and both appearers are visible there. All answers are scored by exact match
(``meta.task`` = ``video``, broken down by ``meta.video_type``); captions also by event recall.

Answers are balanced exactly, not only in expectation: each run of 4 / 6 / 2 consecutive clips of a split
takes every direction / (count kind, count) / order of naming once, so chance is exact. Clip ``index`` of
``split`` comes from an RNG seeded by ``(seed, split, index)`` (and its run's, for those three) only: never
the dataset size. Clips are written atomically; a rerun into the same folder with the same settings skips
the clips already there.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from data.boxes import Box
from data.schema import VIDEO_TOKEN, save_llava_json, write_bytes_atomic, write_json_atomic

from .generate import SPLITS, split_sizes
from .scene import (
    COLOURS,
    MIN_IMAGE_SIZE,
    OBJECT_GAP_FRACTION,
    SHAPES,
    SIZES,
    UNIT_EXTENTS,
    Background,
    Scene,
    SceneObject,
    _boxes_apart,
    _sample_background,
)

VIDEO_TYPES = ("motion", "order", "count", "state", "caption")
DIRECTIONS = ("left", "right", "up", "down")
# what a count question asks and its answer: uniform over these six
COUNT_PLANS = tuple((kind, k) for kind in ("leave", "recolour") for k in range(3))
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VIDEO_INFO_FILE = "shapesworld_video.json"
MIN_FRAMES = 8  # two appearances at least 2 frames apart before the middle frame
CLIP_SIZES = ("small", "medium")  # no large shapes: room for paths
MOVE_FRACTION = (0.30, 0.45)  # the mover's path, as a fraction of the image side
LEAVE_FRACTION = 0.5  # a leaver starts at most this far (image fraction) from the edge it leaves through
# chance of a right answer by guessing uniformly among the answers the question allows
CHANCE = {"motion": 1 / 4, "order": 1 / 2, "count": 1 / 3, "state": 1 / len(COLOURS), "caption": 0.0}
CRF = 18  # libx264 quality: the saturated palette survives 4:2:0 chroma with room to spare

MOTION_QUESTIONS = ("Which way did the {d} move?", "In which direction did the {d} move?")
ORDER_QUESTIONS = ("What appeared first, the {a} or the {b}?", "Which appeared first: the {a} or the {b}?")
COUNT_QUESTIONS = {
    "leave": ("How many objects left the frame?", "How many objects moved out of the frame?"),
    "recolour": ("How many objects changed colour?", "How many objects changed their colour?"),
}
STATE_QUESTIONS = {
    "start_colour": ("What colour was the {s} at the start?", "What colour was the {s} in the first frame?"),
    "end_colour": ("What colour was the {s} at the end?", "What colour was the {s} in the last frame?"),
    "shape": ("What shape was the {c} object?", "Which shape was {c}?"),
}
CAPTION_QUESTIONS = ("Describe what happens in the video.", "What happens in this video?")


@dataclass(frozen=True)
class Track:
    """One object over a clip: ``obj`` is its state at frame 0 (velocity in pixels per frame); it is drawn
    from frame ``start`` until before frame ``end`` and wears ``new_colour`` from frame ``change`` on."""

    obj: SceneObject
    event: str  # move | appear | leave | recolour
    start: int = 0
    end: int | None = None
    direction: str | None = None
    new_colour: str | None = None
    change: int | None = None

    def at(self, frame: int) -> SceneObject | None:
        """The object as drawn in ``frame``, or None when it is not in the frame."""
        if frame < self.start or (self.end is not None and frame >= self.end):
            return None
        obj = self.obj.at(frame)
        return (
            replace(obj, colour=self.new_colour) if self.change is not None and frame >= self.change else obj
        )

    @property
    def name(self) -> str:
        return f"{self.obj.colour} {self.obj.shape}"


@dataclass(frozen=True)
class Clip:
    frames: int
    image_size: int
    background: Background
    tracks: tuple[Track, ...]
    count_kind: str  # what its count question asks: leave | recolour

    @property
    def middle(self) -> int:
        """The frame a one-frame baseline sees (uniform sampling of 1 frame: ``frames // 2``)."""
        return self.frames // 2

    def of(self, event: str) -> list[Track]:
        return [t for t in self.tracks if t.event == event]

    def scene(self, frame: int) -> Scene:
        objects = tuple(o for o in (t.at(frame) for t in self.tracks) if o is not None)
        return Scene(self.image_size, objects, background=self.background)

    def render(self) -> np.ndarray:
        """All frames, uint8 ``[frames, size, size, 3]`` RGB."""
        return np.stack([np.asarray(self.scene(f).render()) for f in range(self.frames)])


def clip_rng(seed: int, split: str, index: int) -> random.Random:
    """The RNG of one clip and its questions: (seed, split, index) only, never the dataset size."""
    return random.Random(f"shapesworld-video/{seed}/{split}/{index}")


def _check_settings(frames: int, image_size: int, fps: float | None = None) -> None:
    if not isinstance(frames, int) or frames < MIN_FRAMES:
        raise ValueError(f"frames must be an integer >= {MIN_FRAMES}, got {frames!r}")
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE or image_size % 2:
        raise ValueError(
            f"image_size must be an even integer >= {MIN_IMAGE_SIZE} (4:2:0 video needs even sides), "
            f"got {image_size!r}"
        )
    if fps is not None and not (isinstance(fps, (int, float)) and 0 < fps <= 240):
        raise ValueError(f"fps must be a number in (0, 240], got {fps!r}")


def _extent(shape: str, r: float) -> tuple[float, float]:
    return r * UNIT_EXTENTS[shape][0], r * UNIT_EXTENTS[shape][1]


def _union(a: Box, b: Box) -> Box:
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def _mover(
    rng: random.Random, shape: str, colour: str, size: str, n: int, frames: int, direction: str
) -> tuple[Track, Box]:
    """A straight path inside the frame; its position at the middle frame is uniform over one range for every
    direction, so that frame does not give the direction away."""
    r = SIZES[size] * n
    hx, hy = _extent(shape, r)
    sx, sy = _STEP[direction]
    speed = rng.uniform(*MOVE_FRACTION) * n / (frames - 1)
    reach = speed * max(frames // 2, frames - 1 - frames // 2)  # the farther end from the middle frame
    h_along, h_across = (hx, hy) if sx else (hy, hx)
    mid_along = rng.uniform(h_along + 1 + reach, n - 1 - h_along - reach)
    mid_across = rng.uniform(h_across + 1, n - 1 - h_across)
    mx, my = (mid_along, mid_across) if sx else (mid_across, mid_along)
    m = frames // 2
    obj = SceneObject(
        shape, colour, size, mx - sx * speed * m, my - sy * speed * m, r, sx * speed, sy * speed
    )
    return Track(obj, "move", direction=direction), _union(obj.box(0), obj.box(frames - 1))


def _leaver(rng: random.Random, shape: str, colour: str, size: str, n: int, end: int) -> tuple[Track, Box]:
    """Starts inside near an edge and is wholly out of the frame at frame ``end`` (moving from frame 0)."""
    r = SIZES[size] * n
    hx, hy = _extent(shape, r)
    direction = rng.choice(DIRECTIONS)
    sx, sy = _STEP[direction]
    h_along, h_across = (hx, hy) if sx else (hy, hx)
    gap = rng.uniform(2, LEAVE_FRACTION * n - 2 * h_along)  # from the box's leading side to the edge
    along = n - 1 - h_along - gap if sx + sy > 0 else 1 + h_along + gap
    across = rng.uniform(h_across + 1, n - 1 - h_across)
    cx, cy = (along, across) if sx else (across, along)
    travel = gap + 1 + 2 * h_along + 1  # leading side to the edge, then the whole box past it
    speed = travel / end
    obj = SceneObject(shape, colour, size, cx, cy, r, sx * speed, sy * speed)
    box = obj.box(0)
    edge = {"left": (0, box[1], box[2], box[3]), "right": (box[0], box[1], n, box[3])}
    edge |= {"up": (box[0], 0, box[2], box[3]), "down": (box[0], box[1], box[2], n)}
    return Track(obj, "leave", end=end, direction=direction), edge[direction]


def _static(rng: random.Random, shape: str, colour: str, size: str, n: int) -> tuple[SceneObject, Box]:
    r = SIZES[size] * n
    hx, hy = _extent(shape, r)
    obj = SceneObject(
        shape, colour, size, rng.uniform(hx + 1, n - 1 - hx), rng.uniform(hy + 1, n - 1 - hy), r
    )
    return obj, obj.box(0)


def _two_frames(rng: random.Random, low: int, high: int, gap: int) -> tuple[int, int]:
    """Two frames in ``[low, high]`` at least ``gap`` apart, earlier first."""
    first = rng.randint(low, high - gap)
    return first, rng.randint(first + gap, high)


def sample_clip(
    rng: random.Random,
    frames: int = 16,
    image_size: int = 96,
    *,
    direction: str | None = None,
    count: tuple[str, int] | None = None,
) -> Clip:
    """A random clip (see the module docstring); the RNG is left ready to draw its questions. ``direction``
    (the mover's) and ``count`` (what the count question asks and its answer) are drawn when not given."""
    _check_settings(frames, image_size)
    n, m = image_size, frames // 2
    # frames between two events whose order is asked or captioned: 8 uniform frames of the clip separate them
    gap = max(2, frames // 8)
    direction = direction or rng.choice(DIRECTIONS)
    count_kind, asked = count or rng.choice(COUNT_PLANS)
    counts = {count_kind: asked, ("recolour" if count_kind == "leave" else "leave"): rng.randint(0, 1)}
    total = 3 + counts["leave"] + counts["recolour"]
    shapes = rng.sample(SHAPES, total)
    colours = rng.sample(tuple(COLOURS), total + counts["recolour"])
    sizes = [rng.choice(CLIP_SIZES) for _ in range(total)]
    background = _sample_background(rng)
    appear = _two_frames(rng, 1, m - 1, gap)
    leave_ends = sorted(rng.sample(range(frames // 4 + 1, frames), counts["leave"]))
    while any(b - a < gap for a, b in zip(leave_ends, leave_ends[1:])):
        leave_ends = sorted(rng.sample(range(frames // 4 + 1, frames), counts["leave"]))
    changes = [
        frames // 4 + k * (frames // 2) // max(1, counts["recolour"]) for k in range(counts["recolour"])
    ]
    changes = [c + rng.randint(0, max(0, (frames // 2) // max(1, counts["recolour"]) - gap)) for c in changes]
    gap_px = max(2.0, OBJECT_GAP_FRACTION * n)
    for attempt in range(2000):
        if attempt and attempt % 250 == 0:  # large objects that do not fit together: other sizes
            sizes = [rng.choice(CLIP_SIZES) for _ in range(total)]
        placed: list[tuple[Track, Box]] = [_mover(rng, shapes[0], colours[0], sizes[0], n, frames, direction)]
        k = 1
        for end in leave_ends:
            placed.append(_leaver(rng, shapes[k], colours[k], sizes[k], n, end))
            k += 1
        for when in appear:
            obj, box = _static(rng, shapes[k], colours[k], sizes[k], n)
            placed.append((Track(obj, "appear", start=when), box))
            k += 1
        for j, when in enumerate(changes):
            obj, box = _static(rng, shapes[k], colours[k], sizes[k], n)
            placed.append((Track(obj, "recolour", new_colour=colours[total + j], change=when), box))
            k += 1
        boxes = [box for _, box in placed]
        if all(_boxes_apart(a, b, gap_px) for i, a in enumerate(boxes) for b in boxes[i + 1 :]):
            return Clip(frames, image_size, background, tuple(t for t, _ in placed), count_kind)
    raise RuntimeError(f"could not lay out a {n}px ShapesWorld clip with {total} objects")  # pragma: no cover


# ------------------------------------------------------------------------------------------ questions


def events(clip: Clip) -> list[str]:
    """The caption's event phrases, in caption order (what event recall looks for)."""
    out = [f"{t.name} moves {t.direction}" for t in clip.of("move")]
    out += [f"{t.name} appears" for t in sorted(clip.of("appear"), key=lambda t: t.start)]
    out += [f"{t.name} leaves the frame" for t in sorted(clip.of("leave"), key=lambda t: t.end)]
    out += [f"{t.name} turns {t.new_colour}" for t in sorted(clip.of("recolour"), key=lambda t: t.change)]
    return out


def caption(clip: Clip) -> str:
    """One sentence per event: movers, then appearances, leavings and colour changes, each in time order;
    the second of a kind starts with "Then"."""
    sentences, previous = [], None
    for phrase in events(clip):
        kind = phrase.split()[2]
        sentences.append(("Then the " if kind == previous else "The ") + phrase + ".")
        previous = kind
    return " ".join(sentences)


def _ask(clip: Clip, rng: random.Random, kind: str, first_named: bool | None = None) -> tuple[str, str, dict]:
    """(question, answer, extra meta) of one type for ``clip``; ``first_named``: whether an order question
    names the object that appeared first first (drawn when not given)."""
    if kind == "motion":
        (mover,) = clip.of("move")
        extra = {"object": {"shape": mover.obj.shape, "colour": mover.obj.colour}}
        return rng.choice(MOTION_QUESTIONS).format(d=mover.name), mover.direction, extra
    if kind == "order":
        first, second = sorted(clip.of("appear"), key=lambda t: t.start)
        first_named = rng.random() < 0.5 if first_named is None else first_named
        a, b = (first, second) if first_named else (second, first)
        extra = {
            "objects": [{"shape": t.obj.shape, "colour": t.obj.colour, "frame": t.start} for t in (a, b)]
        }
        return rng.choice(ORDER_QUESTIONS).format(a=a.obj.shape, b=b.obj.shape), first.obj.shape, extra
    if kind == "count":
        count = len(clip.of(clip.count_kind))
        return rng.choice(COUNT_QUESTIONS[clip.count_kind]), str(count), {"count_of": clip.count_kind}
    if kind == "state":
        variant = rng.choice(tuple(STATE_QUESTIONS))
        candidates = clip.of("move") + ([] if variant == "start_colour" else clip.of("appear"))
        target = rng.choice(candidates).obj
        question = rng.choice(STATE_QUESTIONS[variant]).format(s=target.shape, c=target.colour)
        answer = target.shape if variant == "shape" else target.colour
        return (
            question,
            answer,
            {"state": variant, "object": {"shape": target.shape, "colour": target.colour}},
        )
    if kind == "caption":
        return rng.choice(CAPTION_QUESTIONS), caption(clip), {"events": events(clip)}
    raise ValueError(f"unknown video question type {kind!r}; expected one of {VIDEO_TYPES}")


def _balanced(seed: int, split: str, index: int, name: str, values: tuple):
    """Clip ``index``'s value of ``values``: each run of ``len(values)`` clips takes every value once, in an
    order drawn per run, so the answers are balanced over a split exactly, not only in expectation."""
    run, slot = divmod(index, len(values))
    return random.Random(f"shapesworld-video/{seed}/{split}/{name}/{run}").sample(values, len(values))[slot]


def clip_path(split: str, index: int) -> str:
    """The clip's path relative to the dataset folder."""
    return f"clips/{split}/vid_{index:06d}.mp4"


def clip_records(
    seed: int, split: str, index: int, *, frames: int = 16, image_size: int = 96
) -> tuple[Clip, list[dict]]:
    """Clip ``index`` of ``split`` and its records (one per type of ``VIDEO_TYPES``), without writing
    anything: the records of a whole dataset can be made (and checked) without rendering a frame."""
    rng = clip_rng(seed, split, index)
    direction = _balanced(seed, split, index, "direction", DIRECTIONS)
    count = _balanced(seed, split, index, "count", COUNT_PLANS)
    clip = sample_clip(rng, frames, image_size, direction=direction, count=count)
    first_named = _balanced(seed, split, index, "order", (True, False))
    records = []
    for q, kind in enumerate(VIDEO_TYPES):
        question, answer, extra = _ask(clip, rng, kind, first_named)
        records.append(
            {
                "id": f"vid_{split}_{index:06d}_{q}",
                "video": clip_path(split, index),
                "conversations": [
                    {"from": "human", "value": f"{VIDEO_TOKEN}\n{question}"},
                    {"from": "gpt", "value": answer},
                ],
                "meta": {"task": "video", "video_type": kind, "answer": answer, **extra},
            }
        )
    return clip, records


# ------------------------------------------------------------------------------------------ files


def video_codec() -> str:
    """H.264 where this FFmpeg build has it, MPEG-4 part 2 otherwise."""
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def encode_mp4(frames: np.ndarray, fps: float, codec: str | None = None) -> bytes:
    """uint8 RGB frames ``[T, H, W, 3]`` as an mp4 file's bytes (yuv420p, high quality)."""
    import av

    codec = codec or video_codec()
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_count = (
            1  # x264's output depends on its thread count: same bytes anywhere
        )
        if codec == "libx264":
            stream.options = {"crf": str(CRF)}
        else:
            stream.bit_rate = 4_000_000  # MPEG-4's default (200 kb/s) smears colours at this size
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def _settings(seed: int, frames: int, fps: float, image_size: int) -> dict:
    return {"seed": seed, "frames": frames, "fps": fps, "image_size": image_size}


def _clip_counts(n_clips: int | dict[str, int]) -> dict[str, int]:
    if isinstance(n_clips, dict):
        unknown = sorted(set(n_clips) - set(SPLITS))
        if unknown or any(not isinstance(v, int) or v < 0 for v in n_clips.values()):
            raise ValueError(f"n_clips: non-negative integers per split of {SPLITS}, got {n_clips!r}")
        return {s: n_clips.get(s, 0) for s in SPLITS}
    if not isinstance(n_clips, int) or n_clips < 0:
        raise ValueError(f"n_clips must be a non-negative integer or a dict per split, got {n_clips!r}")
    return split_sizes(n_clips, (0.8, 0.1, 0.1))


def generate_video(
    out_dir: str | Path,
    n_clips: int | dict[str, int],
    seed: int = 0,
    frames: int = 16,
    fps: float = 8,
    image_size: int = 96,
    progress: bool = True,
) -> dict:
    """Write clips under ``clips/<split>/``, ``train.json`` / ``val.json`` / ``test.json`` (one record per
    question, ``len(VIDEO_TYPES)`` per clip) and ``shapesworld_video.json`` (settings, counts, answer counts
    and chance per type; also returned). ``n_clips``: a total split 80/10/10, or clips per split.

    Clips already in ``out_dir`` are kept (a killed run resumes); a folder made with other settings is
    refused.
    """
    _check_settings(frames, image_size, fps)
    sizes = _clip_counts(n_clips)
    out_dir = Path(out_dir)
    settings = _settings(seed, frames, fps, image_size)
    info_path = out_dir / VIDEO_INFO_FILE
    if info_path.is_file():
        before = {k: json.loads(info_path.read_text()).get(k) for k in settings}
        if before != settings:
            raise ValueError(
                f"{out_dir} holds ShapesWorld clips made with {before}, not {settings}: use another folder"
            )
    codec = video_codec()
    write_json_atomic(info_path, {"dataset": "shapesworld_video", **settings, "complete": False})
    counts, answers = {}, {kind: Counter() for kind in VIDEO_TYPES if kind != "caption"}
    skipped = 0
    with tqdm(total=sum(sizes.values()), disable=not progress, desc="ShapesWorld video", unit="clip") as bar:
        for split in SPLITS:
            records = []
            for index in range(sizes[split]):
                clip, rows = clip_records(seed, split, index, frames=frames, image_size=image_size)
                path = out_dir / clip_path(split, index)
                if path.is_file():
                    skipped += 1
                    bar.set_postfix(kept=skipped, refresh=False)
                else:
                    write_bytes_atomic(path, encode_mp4(clip.render(), fps, codec))
                records += rows
                for row in rows:
                    if row["meta"]["video_type"] in answers:
                        answers[row["meta"]["video_type"]][row["meta"]["answer"]] += 1
                bar.update()
            save_llava_json(out_dir / f"{split}.json", records)
            counts[split] = {"clips": sizes[split], "records": len(records)}
    info = {
        "dataset": "shapesworld_video",
        **settings,
        "codec": codec,
        "middle_frame": frames // 2,
        "types": list(VIDEO_TYPES),
        "counts": counts,
        "chance": CHANCE,
        "answers": {kind: dict(sorted(c.items())) for kind, c in answers.items()},
        "clips_kept": skipped,
        "complete": True,
    }
    write_json_atomic(info_path, info)
    return info
