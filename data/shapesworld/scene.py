"""ShapesWorld scenes: coloured shapes (and a word or number) placed without overlap, drawn anti-aliased.

A ``Scene`` is pure data; ``Scene.render(t)`` draws it. Each object's state is a function of time
(``SceneObject.at(t)``), so the same scenes drive the video tasks. Scene ``index`` of ``split`` is drawn from
an RNG seeded by ``(seed, split, index)`` only, so it does not change with the size of the dataset.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data.boxes import Box

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
MIN_IMAGE_SIZE = 96
MAX_OBJECTS = 4
SUPERSAMPLE = 4  # draw at 4x and average down: anti-aliased edges, shapes readable at 12 px
FONT_FRACTION = 0.17  # font size / image side: 16 px at 96, legible after downsampling
OBJECT_GAP_FRACTION = 0.04  # minimum gap between any two boxes (objects and text)
ATTRIBUTES = ("size", "colour", "shape")
REPEAT_P = 0.5  # chance that a new object copies the shape (and, independently, the colour) of an earlier one

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
