"""ShapesWorld: procedurally drawn scenes of coloured shapes (and a word or number) with tasks whose answers
are known exactly, so a tiny VLM can be trained and scored on a CPU.

A ``Scene`` is pure data; ``Scene.render(t)`` draws it. Each object's state is a function of time
(``SceneObject.at(t)``), so the same scenes drive the video tasks. Scene ``index`` of ``split`` is drawn from
an RNG seeded by ``(seed, split, index)`` only, so it does not change with the size of the dataset.
"""

from __future__ import annotations

import io
import itertools
import math
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from data.boxes import DEFAULT_BOX_FORMAT, Box, BoxFormat, render_box
from data.schema import IMAGE_TOKEN, save_llava_json, write_bytes_atomic, write_json_atomic

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart")
# Saturated colours far from each other (>= 100 apart in RGB) and from any neutral grey background.
COLOURS = {
    "red": (220, 20, 30),
    "orange": (255, 130, 0),
    "yellow": (250, 230, 30),
    "green": (30, 160, 40),
    "cyan": (0, 200, 210),
    "blue": (30, 60, 220),
    "purple": (130, 40, 190),
    "pink": (235, 90, 170),
}
# Half the larger side of an object's box, as a fraction of the image side.
SIZES = {"small": 0.06, "medium": 0.09, "large": 0.13}
WORDS = (
    "cat", "dog", "sun", "moon", "tree", "fish", "bird", "book", "cake", "frog",
    "lamp", "ship", "rain", "milk", "door", "kite", "ball", "bell", "corn", "hat",
)  # fmt: skip
TASKS = ("caption", "qa", "ground", "describe")
QA_TYPES = ("colour", "shape", "count", "position", "text")
SPLITS = ("train", "val", "test")
MIN_IMAGE_SIZE = 96
MAX_OBJECTS = 4
SUPERSAMPLE = 4  # draw at 4x and average down: anti-aliased edges, shapes readable at 12 px
FONT_FRACTION = 0.17  # font size / image side: 16 px at 96, legible after downsampling
OBJECT_GAP_FRACTION = 0.04  # minimum gap between any two boxes (objects and text)
CLEAR_GAP_FRACTION = 0.05  # position questions only when the boxes are this far apart on the asked axis
ATTRIBUTES = ("size", "colour", "shape")
REPEAT_P = 0.5  # chance that a new object copies the shape (and, independently, the colour) of an earlier one
# Weights of the counts 0..4 a shape/colour count question may have, about 1 / how often a scene offers each;
# they keep 0, 1 and 2 near 30% each, with 3 and 4 the rest (tests/test_shapesworld.py checks the balance).
COUNT_ANSWER_WEIGHTS = (1.0, 1.0, 4.0, 12.0, 50.0)

CAPTION_QUESTIONS = (
    "Describe the image.",
    "What is in this image?",
    "Describe everything you see.",
    "List the objects in the image.",
)
COLOUR_QUESTIONS = ("What colour is the {d}?", "Which colour does the {d} have?")
SHAPE_QUESTIONS = ("What shape is the {d}?", "Which shape does the {d} have?")
TOTAL_COUNT_QUESTIONS = ("How many objects are there?", "How many shapes are in the image?")
SHAPE_COUNT_QUESTIONS = ("How many {p} are there?", "How many {p} can you see?")
COLOUR_COUNT_QUESTIONS = ("How many {c} objects are there?", "How many {c} shapes can you see?")
HORIZONTAL_QUESTIONS = (
    "Is the {a} to the left or to the right of the {b}?",
    "Is the {a} to the right or to the left of the {b}?",
)
VERTICAL_QUESTIONS = ("Is the {a} above or below the {b}?", "Is the {a} below or above the {b}?")
TEXT_QUESTIONS = ("What is written in the image?", "What word or number is written in the image?")
GROUND_QUESTIONS = ("Where is the {d}?", "Give the bounding box of the {d}.", "Locate the {d}.")
DESCRIBE_QUESTIONS = ("What is at {box}?", "What object is at {box}?", "Describe the object at {box}.")


# --------------------------------------------------------------------------------------------- geometry


def _normalised(points: Sequence[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Centre a polygon on its box and scale it so the larger half-side of the box is 1."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    half = max(max(xs) - min(xs), max(ys) - min(ys)) / 2
    return tuple(((x - cx) / half, (y - cy) / half) for x, y in points)


def _regular(n: int, start_deg: float, radius: float = 1.0) -> list[tuple[float, float]]:
    angles = (math.radians(start_deg + 360 * k / n) for k in range(n))
    return [(radius * math.cos(a), radius * math.sin(a)) for a in angles]


def _star() -> list[tuple[float, float]]:
    outer, inner = _regular(5, -90), _regular(5, -54, radius=0.45)
    return [p for pair in zip(outer, inner) for p in pair]


def _heart() -> list[tuple[float, float]]:
    ts = (2 * math.pi * k / 96 for k in range(96))
    return [
        (
            16 * math.sin(t) ** 3,
            -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)),
        )
        for t in ts
    ]


_ARM = 0.32  # half-thickness of the cross's arms
UNIT_SHAPES: dict[str, tuple[tuple[float, float], ...]] = {
    "circle": _normalised(_regular(96, 0)),
    "square": _normalised([(-1, -1), (1, -1), (1, 1), (-1, 1)]),
    "triangle": _normalised(_regular(3, -90)),
    "star": _normalised(_star()),
    "hexagon": _normalised(_regular(6, 0)),
    "diamond": _normalised([(0, -1), (0.68, 0), (0, 1), (-0.68, 0)]),
    "cross": _normalised(
        [
            (-_ARM, -1),
            (_ARM, -1),
            (_ARM, -_ARM),
            (1, -_ARM),
            (1, _ARM),
            (_ARM, _ARM),
            (_ARM, 1),
            (-_ARM, 1),
            (-_ARM, _ARM),
            (-1, _ARM),
            (-1, -_ARM),
            (-_ARM, -_ARM),
        ]
    ),
    "heart": _normalised(_heart()),
}
# Half-width and half-height of each unit shape's box (the larger one is 1).
UNIT_EXTENTS = {
    name: (max(abs(x) for x, _ in pts), max(abs(y) for _, y in pts)) for name, pts in UNIT_SHAPES.items()
}


def _boxes_apart(a: Box, b: Box, gap: float) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


# --------------------------------------------------------------------------------------------- scene


@dataclass(frozen=True)
class SceneObject:
    """One shape: ``(cx, cy)`` its box centre at t=0, ``r`` its larger half-side, ``(vx, vy)`` px per unit."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    r: float
    vx: float = 0.0
    vy: float = 0.0

    def at(self, t: float) -> SceneObject:
        """The object at time ``t`` (straight-line motion; static when the velocity is zero)."""
        return replace(self, cx=self.cx + self.vx * t, cy=self.cy + self.vy * t)

    def box(self, t: float = 0.0) -> Box:
        """Tight box of the drawn polygon, absolute pixels ``(x0, y0, x1, y1)``."""
        ex, ey = UNIT_EXTENTS[self.shape]
        cx, cy = self.cx + self.vx * t, self.cy + self.vy * t
        return (cx - self.r * ex, cy - self.r * ey, cx + self.r * ex, cy + self.r * ey)

    def describe(self, attributes: Iterable[str] = ATTRIBUTES) -> str:
        """E.g. ``small red circle``; without ``shape`` the noun is ``object`` (``large blue object``)."""
        attributes = set(attributes)
        words = [getattr(self, a) for a in ("size", "colour") if a in attributes]
        return " ".join([*words, self.shape if "shape" in attributes else "object"])


@dataclass(frozen=True)
class Background:
    """A neutral grey (far from every object colour) with an optional light texture."""

    colour: tuple[int, int, int] = (225, 225, 225)
    texture: str = "plain"  # plain | noise | gradient
    seed: int = 0

    def texture_field(self, size: int) -> np.ndarray:
        """Grey-level offsets ``[size, size]`` added to the background (zeros for ``plain``)."""
        rng = np.random.default_rng(self.seed)
        if self.texture == "noise":
            return 4.0 * rng.standard_normal((size, size), dtype=np.float32)
        if self.texture == "gradient":
            angle = rng.uniform(0, 2 * math.pi)
            ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
            return 12.0 * (math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]) / math.sqrt(2)
        if self.texture == "plain":
            return np.zeros((size, size), dtype=np.float32)
        raise ValueError(f"unknown background texture {self.texture!r}; expected plain, noise or gradient")


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def text_ink_size(text: str, font_size: int) -> tuple[float, float]:
    """Width and height in pixels of the ink of ``text`` at ``font_size``."""
    left, top, right, bottom = _font(font_size * SUPERSAMPLE).getbbox(text)
    return (right - left) / SUPERSAMPLE, (bottom - top) / SUPERSAMPLE


@dataclass(frozen=True)
class Scene:
    image_size: int
    objects: tuple[SceneObject, ...]
    text: str | None = None
    text_box: Box | None = None  # where the text's ink lies (absolute pixels)
    font_size: int = 16
    background: Background = field(default_factory=Background)

    def boxes(self, t: float = 0.0) -> list[Box]:
        return [obj.box(t) for obj in self.objects]

    def at(self, t: float) -> Scene:
        return replace(self, objects=tuple(obj.at(t) for obj in self.objects))

    def text_colour(self) -> tuple[int, int, int]:
        """Near-black on light backgrounds, near-white on dark ones: readable, and never an object colour."""
        return (20, 20, 20) if sum(self.background.colour) > 3 * 128 else (240, 240, 240)

    def render(self, t: float = 0.0) -> Image.Image:
        """Draw the scene at time ``t`` as an RGB image (supersampled, then box-averaged down)."""
        size, ss = self.image_size, SUPERSAMPLE
        textured = self.background.texture != "plain"
        canvas = Image.new("RGB", (size * ss, size * ss), self.background.colour)
        layers = [(ImageDraw.Draw(canvas), None)]
        if textured:  # also record where the foreground is, to keep the texture off it
            coverage = Image.new("L", canvas.size, 0)
            layers.append((ImageDraw.Draw(coverage), 255))
        for obj in self.objects:
            o = obj.at(t)
            # PIL fills polygons inclusive of their edges, about half a canvas pixel too wide on every side:
            # drawing the shape that much smaller puts the drawn edge on the true outline.
            r = o.r - 0.5 / ss
            points = [((o.cx + r * x) * ss, (o.cy + r * y) * ss) for x, y in UNIT_SHAPES[o.shape]]
            for draw, fill in layers:
                draw.polygon(points, fill=fill or COLOURS[o.colour])
        if self.text:
            font = _font(self.font_size * ss)
            left, top, _, _ = font.getbbox(self.text)
            origin = (self.text_box[0] * ss - left, self.text_box[1] * ss - top)
            for draw, fill in layers:
                draw.text(origin, self.text, font=font, fill=fill or self.text_colour())
        image = canvas.reduce(ss)
        if not textured:
            return image
        background_share = 1.0 - np.asarray(coverage.reduce(ss), dtype=np.float32) / 255.0
        pixels = np.asarray(image, dtype=np.float32)
        pixels += (self.background.texture_field(size) * background_share)[..., None]
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


def _sample_background(rng: random.Random) -> Background:
    grey = rng.randint(205, 240) if rng.random() < 0.7 else rng.randint(25, 55)
    texture = rng.choice(("plain", "noise", "gradient"))
    return Background((grey, grey, grey), texture, rng.getrandbits(32))


def _sample_attributes(rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    """``n`` distinct (shape, colour, size) triples; shapes and colours repeat often enough to make counting
    questions with answers above 1 common."""
    chosen: list[tuple[str, str, str]] = []
    while len(chosen) < n:
        shape = rng.choice(chosen)[0] if chosen and rng.random() < REPEAT_P else rng.choice(SHAPES)
        colour = rng.choice(chosen)[1] if chosen and rng.random() < REPEAT_P else rng.choice(tuple(COLOURS))
        triple = (shape, colour, rng.choice(tuple(SIZES)))
        if triple not in chosen:
            chosen.append(triple)
    return chosen


def _place(
    rng: random.Random, extents: Sequence[tuple[float, float]], size: int, taken: list[Box]
) -> list[Box] | None:
    """Random non-overlapping boxes (with a gap) of the given half extents, or None if they did not fit."""
    gap = max(2.0, OBJECT_GAP_FRACTION * size)
    placed: list[Box] = []
    for hx, hy in extents:
        for _ in range(50):
            cx, cy = rng.uniform(hx + 1, size - 1 - hx), rng.uniform(hy + 1, size - 1 - hy)
            box = (cx - hx, cy - hy, cx + hx, cy + hy)
            if all(_boxes_apart(box, other, gap) for other in taken + placed):
                placed.append(box)
                break
        else:
            return None
    return placed


def sample_scene(
    rng: random.Random, image_size: int = 96, *, p_text: float = 0.3, max_objects: int = MAX_OBJECTS
) -> Scene:
    """A random scene: 1..max_objects distinct objects, non-overlapping, and with probability ``p_text`` a
    word or a number (0-99) whose box overlaps no object either. Objects are ordered left to right."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE} (text and small shapes must stay legible)")
    background = _sample_background(rng)
    attributes = _sample_attributes(rng, rng.randint(1, max_objects))
    text = None
    if rng.random() < p_text:
        text = rng.choice(WORDS) if rng.random() < 0.5 else str(rng.randint(0, 99))
    font_size = round(FONT_FRACTION * image_size)
    radii = [SIZES[size] * image_size for _, _, size in attributes]
    extents = [
        (r * UNIT_EXTENTS[shape][0], r * UNIT_EXTENTS[shape][1])
        for (shape, _, _), r in zip(attributes, radii)
    ]
    # Largest first packs best; the text (when present) goes down before the objects.
    order = sorted(range(len(attributes)), key=lambda k: -radii[k])
    text_extent = [tuple(v / 2 for v in text_ink_size(text, font_size))] if text else []
    for _ in range(1000):
        text_box = _place(rng, text_extent, image_size, [])
        placed = _place(rng, [extents[k] for k in order], image_size, text_box or [])
        if text_box is not None and placed is not None:
            break
    else:  # pragma: no cover - 4 large shapes and a word fill under half of a 96 px image
        raise RuntimeError("could not lay out a ShapesWorld scene")
    objects = [None] * len(attributes)
    for k, box in zip(order, placed):
        shape, colour, size = attributes[k]
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        objects[k] = SceneObject(shape, colour, size, cx, cy, radii[k])
    objects.sort(key=lambda o: (o.cx, o.cy))
    return Scene(
        image_size=image_size,
        objects=tuple(objects),
        text=text,
        text_box=text_box[0] if text else None,
        font_size=font_size,
        background=background,
    )


# --------------------------------------------------------------------------------------------- tasks


def _rounded(box: Box) -> list[float]:
    return [round(v, 2) for v in box]


def objects_meta(scene: Scene) -> list[dict]:
    """The scene's objects as JSON metadata (left-to-right order, boxes in absolute pixels)."""
    return [
        {"shape": o.shape, "colour": o.colour, "size": o.size, "box": _rounded(o.box())}
        for o in scene.objects
    ]


def unique_description(
    target: int, objects: Sequence[SceneObject], rng: random.Random, allowed: Sequence[str] = ATTRIBUTES
) -> str | None:
    """Shortest description of ``objects[target]`` from ``allowed`` attributes that fits no other object
    (ties broken at random), or None when those attributes cannot single it out."""
    obj = objects[target]
    for length in range(1, len(allowed) + 1):
        fitting = [
            combo
            for combo in itertools.combinations(allowed, length)
            if not any(
                k != target and all(getattr(other, a) == getattr(obj, a) for a in combo)
                for k, other in enumerate(objects)
            )
        ]
        if fitting:
            return obj.describe(rng.choice(fitting))
    return None


def caption_text(scene: Scene) -> str:
    """Every object left to right with size, colour and shape, then the text if any."""
    names = [f"a {o.describe()}" for o in scene.objects]
    listing = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    caption = f"{len(names)} object{'s' if len(names) > 1 else ''}: {listing}."
    if scene.text:
        kind = "number" if scene.text.isdigit() else "word"
        caption += f' The {kind} "{scene.text}" is written.'
    return caption


def _task(task: str, question: str, answer: str, **meta) -> dict:
    return {"task": task, "question": question, "answer": answer, **meta}


def caption_task(scene: Scene, rng: random.Random) -> dict:
    return _task("caption", rng.choice(CAPTION_QUESTIONS), caption_text(scene), objects=objects_meta(scene))


def _attribute_question(
    scene: Scene, rng: random.Random, asked: str, templates: Sequence[str]
) -> dict | None:
    """Ask for ``asked`` (colour or shape) of an object described without that attribute."""
    allowed = tuple(a for a in ATTRIBUTES if a != asked)
    candidates = []
    for k, obj in enumerate(scene.objects):
        description = unique_description(k, scene.objects, rng, allowed)
        if description:
            candidates.append((obj, description))
    if not candidates:
        return None
    obj, description = rng.choice(candidates)
    question = rng.choice(templates).format(d=description)
    return _task("qa", question, getattr(obj, asked), qa_type=asked, target=description)


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("ss") else "s")


def count_question(scene: Scene, rng: random.Random) -> dict:
    """How many objects / shapes of a kind / objects of a colour, the kind chosen uniformly.

    Every scene allows "0" (an absent shape) and most allow "1", while 2+ of one shape or colour is rare, so
    the asked shape or colour is chosen by weighting each count the scene offers by COUNT_ANSWER_WEIGHTS.
    """
    objects = scene.objects
    kind = rng.choice(("total", "shape", "colour"))
    if kind == "total":
        return _task(
            "qa", rng.choice(TOTAL_COUNT_QUESTIONS), str(len(objects)), qa_type="count", count_of="total"
        )
    values = SHAPES if kind == "shape" else tuple(COLOURS)
    by_answer: dict[int, list[str]] = {}
    for value in values:
        by_answer.setdefault(sum(getattr(o, kind) == value for o in objects), []).append(value)
    answers = sorted(by_answer)
    answer = rng.choices(answers, weights=[COUNT_ANSWER_WEIGHTS[a] for a in answers])[0]
    value = rng.choice(by_answer[answer])
    if kind == "shape":
        question = rng.choice(SHAPE_COUNT_QUESTIONS).format(p=_plural(value))
    else:
        question = rng.choice(COLOUR_COUNT_QUESTIONS).format(c=value)
    return _task("qa", question, str(answer), qa_type="count", count_of=kind, count_value=value)


def position_question(scene: Scene, rng: random.Random) -> dict | None:
    """Left/right or above/below of two objects whose boxes are clearly apart on that axis. Which of the two
    is the subject is a coin flip, so both answers are equally likely."""
    clear = CLEAR_GAP_FRACTION * scene.image_size
    boxes = scene.boxes()
    pairs = []  # (first, second, axis): first is left of / above second
    for i, a in enumerate(boxes):
        for j, b in enumerate(boxes):
            if a[2] + clear <= b[0]:
                pairs.append((i, j, "horizontal"))
            if a[3] + clear <= b[1]:
                pairs.append((i, j, "vertical"))
    if not pairs:
        return None
    first, second, axis = rng.choice(pairs)
    subject, reference, answer_index = (first, second, 0) if rng.random() < 0.5 else (second, first, 1)
    a = unique_description(subject, scene.objects, rng)
    b = unique_description(reference, scene.objects, rng)
    templates, answers = (
        (HORIZONTAL_QUESTIONS, ("left", "right"))
        if axis == "horizontal"
        else (VERTICAL_QUESTIONS, ("above", "below"))
    )
    question = rng.choice(templates).format(a=a, b=b)
    return _task("qa", question, answers[answer_index], qa_type="position", target=a, reference=b)


def text_question(scene: Scene, rng: random.Random) -> dict | None:
    if not scene.text:
        return None
    return _task("qa", rng.choice(TEXT_QUESTIONS), scene.text, qa_type="text")


def qa_tasks(scene: Scene, rng: random.Random) -> list[dict]:
    """One question of each QA type the scene allows, in ``QA_TYPES`` order."""
    tasks = [
        _attribute_question(scene, rng, "colour", COLOUR_QUESTIONS),
        _attribute_question(scene, rng, "shape", SHAPE_QUESTIONS),
        count_question(scene, rng),
        position_question(scene, rng),
        text_question(scene, rng),
    ]
    return [task for task in tasks if task is not None]


def _box_format_meta(box_format: BoxFormat) -> dict:
    return {"frame": box_format.frame, "template": box_format.template}


def ground_task(
    scene: Scene, rng: random.Random, box_format: BoxFormat = DEFAULT_BOX_FORMAT, target: int | None = None
) -> dict:
    """Referring expression (shortest unique description) -> box text."""
    if target is None:
        target = rng.randrange(len(scene.objects))
    description = unique_description(target, scene.objects, rng)
    box = scene.objects[target].box()
    answer = render_box(box, (scene.image_size, scene.image_size), box_format)
    question = rng.choice(GROUND_QUESTIONS).format(d=description)
    return _task(
        "ground",
        question,
        answer,
        box=_rounded(box),
        target=description,
        box_format=_box_format_meta(box_format),
    )


def describe_task(
    scene: Scene, rng: random.Random, box_format: BoxFormat = DEFAULT_BOX_FORMAT, target: int | None = None
) -> dict:
    """Box text -> full description of the object in it."""
    obj = rng.choice(scene.objects) if target is None else scene.objects[target]
    box_text = render_box(obj.box(), (scene.image_size, scene.image_size), box_format)
    question = rng.choice(DESCRIBE_QUESTIONS).format(box=box_text)
    return _task(
        "describe",
        question,
        f"a {obj.describe()}",
        box=_rounded(obj.box()),
        box_format=_box_format_meta(box_format),
    )


def make_tasks(
    scene: Scene, rng: random.Random, box_format: BoxFormat = DEFAULT_BOX_FORMAT, dense: bool = False
) -> list[dict]:
    """Every task for one image: caption, the applicable QA types, grounding and box description.

    ``dense`` (used for training) asks grounding and box description once per object instead of once per
    image: boxes are the hardest thing to learn, and every extra turn reuses the same encoded image.
    """
    tasks = [caption_task(scene, rng), *qa_tasks(scene, rng)]
    if not dense:
        return tasks + [ground_task(scene, rng, box_format), describe_task(scene, rng, box_format)]
    for target in range(len(scene.objects)):
        tasks.append(ground_task(scene, rng, box_format, target=target))
        tasks.append(describe_task(scene, rng, box_format, target=target))
    return tasks


# --------------------------------------------------------------------------------------------- records


def _scene_meta(scene: Scene) -> dict:
    return {"objects": objects_meta(scene), "text": scene.text, "image_size": scene.image_size}


def _turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


def train_record(
    image_id: str, image_path: str, scene: Scene, tasks: Sequence[dict], rng: random.Random
) -> dict:
    """One multi-turn conversation holding all of the image's tasks in random order."""
    order = list(tasks)
    rng.shuffle(order)
    conversations = []
    for k, task in enumerate(order):
        question = f"{IMAGE_TOKEN}\n{task['question']}" if k == 0 else task["question"]
        conversations += [_turn("human", question), _turn("gpt", task["answer"])]
    meta = {**_scene_meta(scene), "tasks": [task.get("qa_type", task["task"]) for task in order]}
    return {"id": image_id, "image": image_path, "conversations": conversations, "meta": meta}


def eval_records(image_id: str, image_path: str, scene: Scene, tasks: Sequence[dict]) -> list[dict]:
    """One single-turn record per task, its ``meta`` holding what the scorer needs."""
    records = []
    for task in tasks:
        suffix = f"qa-{task['qa_type']}" if "qa_type" in task else task["task"]
        meta = {key: value for key, value in task.items() if key != "question"} | _scene_meta(scene)
        conversations = [_turn("human", f"{IMAGE_TOKEN}\n{task['question']}"), _turn("gpt", task["answer"])]
        records.append(
            {"id": f"{image_id}-{suffix}", "image": image_path, "conversations": conversations, "meta": meta}
        )
    return records


def scene_rng(seed: int, split: str, index: int) -> random.Random:
    """The RNG of one image: depends on (seed, split, index) only, never on the dataset size."""
    return random.Random(f"shapesworld/{seed}/{split}/{index}")


def split_sizes(n: int, splits: Sequence[float]) -> dict[str, int]:
    """Images per split: fractions of ``n`` rounded by largest remainder, so they always add up to ``n``."""
    if len(splits) != len(SPLITS) or any(f < 0 for f in splits) or abs(sum(splits) - 1.0) > 1e-6:
        raise ValueError(
            f"splits must be 3 non-negative fractions (train, val, test) adding up to 1, got {splits}"
        )
    exact = [n * f for f in splits]
    sizes = [math.floor(v) for v in exact]
    by_remainder = sorted(range(len(exact)), key=lambda k: (-(exact[k] - sizes[k]), k))
    for k in by_remainder[: n - sum(sizes)]:
        sizes[k] += 1
    return dict(zip(SPLITS, sizes))


def png_bytes(image: Image.Image) -> bytes:
    """Lossless PNG; zlib level 1 is twice as fast as the default for ~10% larger files."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def vocabulary() -> dict[str, list[str]]:
    return {"shapes": list(SHAPES), "colours": list(COLOURS), "sizes": list(SIZES), "words": list(WORDS)}


def all_texts(records: Iterable[dict]) -> Iterator[str]:
    """Every conversation string of the records as written (placeholders included), to train a tokenizer."""
    for record in records:
        for turn in record["conversations"]:
            yield turn["value"]


def example(
    seed: int,
    split: str,
    index: int,
    *,
    image_size: int = 96,
    p_text: float = 0.3,
    box_format: BoxFormat = DEFAULT_BOX_FORMAT,
    dense: bool | None = None,
) -> tuple[Scene, list[dict], random.Random]:
    """Scene and tasks of image ``index`` of ``split``; the RNG is returned to continue (e.g. shuffling).

    ``dense`` (default: only for the train split) asks grounding/description for every object."""
    rng = scene_rng(seed, split, index)
    scene = sample_scene(rng, image_size, p_text=p_text)
    dense = split == "train" if dense is None else dense
    return scene, make_tasks(scene, rng, box_format, dense=dense), rng


def generate(
    out_dir: str | Path,
    n: int = 1000,
    seed: int = 0,
    image_size: int = 96,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    box_format: BoxFormat = DEFAULT_BOX_FORMAT,
    p_text: float = 0.3,
    progress: bool = True,
) -> dict:
    """Write ShapesWorld to ``out_dir``: PNGs under ``images/<split>/``, ``train.json`` (one multi-turn record
    per image), ``val.json`` and ``test.json`` (one record per image and task, scorable by ``meta``) and
    ``shapesworld.json`` (settings and counts, also returned)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out_dir = Path(out_dir)
    sizes = split_sizes(n, splits)
    counts = {}
    with tqdm(total=n, disable=not progress, desc="ShapesWorld", unit="img") as bar:
        for split in SPLITS:
            records = []
            tasks_seen: Counter[str] = Counter()
            for index in range(sizes[split]):
                scene, tasks, rng = example(
                    seed, split, index, image_size=image_size, p_text=p_text, box_format=box_format
                )
                image_id = f"{split}_{index:06d}"
                image_path = f"images/{split}/{image_id}.png"
                write_bytes_atomic(out_dir / image_path, png_bytes(scene.render()))
                if split == "train":
                    records.append(train_record(image_id, image_path, scene, tasks, rng))
                else:
                    records += eval_records(image_id, image_path, scene, tasks)
                tasks_seen.update(task.get("qa_type", task["task"]) for task in tasks)
                bar.update()
            save_llava_json(out_dir / f"{split}.json", records)
            counts[split] = {
                "images": sizes[split],
                "records": len(records),
                "tasks": dict(sorted(tasks_seen.items())),
            }
    info = {
        "dataset": "shapesworld",
        "n": n,
        "seed": seed,
        "image_size": image_size,
        "splits": dict(zip(SPLITS, splits)),
        "p_text": p_text,
        "box_format": _box_format_meta(box_format),
        "counts": counts,
        "vocabulary": vocabulary(),
    }
    write_json_atomic(out_dir / "shapesworld.json", info)
    return info
