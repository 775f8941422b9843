"""Bounding boxes: stored in absolute pixels, rendered to text in an explicit reference frame.

A box is ``(x0, y0, x1, y1)`` in pixels of the original image. Models read and write boxes as text whose
numbers are integers in ``0..frame``: the coordinate divided by the image width (x) or height (y), times
``frame``. Keeping the frame explicit lets one dataset serve LLMs trained with different conventions
(Qwen-VL uses 1000, others 100) and makes render -> parse -> render exact.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

Box = tuple[float, float, float, float]
_FIELDS = ("x0", "y0", "x1", "y1")
_NUMBER = r"[-+]?\d+(?:\.\d*)?"


@dataclass(frozen=True)
class BoxFormat:
    """How a box is written as text: integer coordinates in ``0..frame``, laid out by ``template``."""

    frame: int = 1000
    template: str = "[{x0}, {y0}, {x1}, {y1}]"

    def __post_init__(self) -> None:
        if isinstance(self.frame, bool) or not isinstance(self.frame, int) or self.frame < 1:
            raise ValueError(f"BoxFormat.frame must be a positive integer, got {self.frame!r}")
        names = re.findall(r"\{(\w*)\}", self.template)
        if sorted(names) != sorted(_FIELDS):
            raise ValueError(
                f"BoxFormat.template must hold each of {{x0}}, {{y0}}, {{x1}}, {{y1}} exactly once, "
                f"got {self.template!r}"
            )
        if re.search(r"\}\{", self.template):
            raise ValueError(f"BoxFormat.template needs a separator between numbers, got {self.template!r}")

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        """Regex finding boxes of this format in free text; spaces in and around literals are optional."""
        parts = re.split(r"\{(\w+)\}", self.template)
        regex = []
        for i, part in enumerate(parts):
            if i % 2:  # a field name
                regex.append(rf"\s*(?<![\d.])(?P<{part}>{_NUMBER})(?![\d.])\s*")
            elif part.strip():
                regex.append(r"\s*".join(re.escape(tok) for tok in re.findall(r"\w+|[^\w\s]", part)))
            elif part:  # only whitespace between two numbers: it must stay a separator
                regex.append(r"\s+")
        joined = "".join(regex).replace(r"\s*\s+\s*", r"\s+").replace(r"\s*\s*", r"\s*")
        return re.compile(joined)


DEFAULT_BOX_FORMAT = BoxFormat()


def _check_size(image_size_wh: Sequence[float]) -> tuple[float, float]:
    w, h = image_size_wh
    if not (w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h)):
        raise ValueError(
            f"image size must be two positive numbers (width, height), got {tuple(image_size_wh)}"
        )
    return float(w), float(h)


def to_frame(value: float, extent: float, frame: int) -> int:
    """Pixel coordinate -> integer in ``0..frame`` (rounded half up, clamped)."""
    return min(frame, max(0, math.floor(value / extent * frame + 0.5)))


def from_frame(value: float, extent: float, frame: int) -> float:
    """Frame coordinate -> pixel coordinate, clamped to ``0..extent``."""
    return min(extent, max(0.0, value / frame * extent))


def render_box(
    box_xyxy_abs: Sequence[float], image_size_wh: Sequence[float], fmt: BoxFormat = DEFAULT_BOX_FORMAT
) -> str:
    """Render an absolute-pixel box as text in ``fmt``'s frame. Parts outside the image are clamped."""
    w, h = _check_size(image_size_wh)
    if len(box_xyxy_abs) != 4 or not all(math.isfinite(v) for v in box_xyxy_abs):
        raise ValueError(f"a box must be 4 finite numbers (x0, y0, x1, y1), got {tuple(box_xyxy_abs)}")
    x0, y0, x1, y1 = (float(v) for v in box_xyxy_abs)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box must have x0 <= x1 and y0 <= y1, got {tuple(box_xyxy_abs)}")
    extents = (w, h, w, h)
    values = {name: to_frame(v, e, fmt.frame) for name, v, e in zip(_FIELDS, (x0, y0, x1, y1), extents)}
    return fmt.template.format(**values)


def render_boxes(
    boxes: Iterable[Sequence[float]], image_size_wh: Sequence[float], fmt: BoxFormat = DEFAULT_BOX_FORMAT
) -> list[str]:
    return [render_box(b, image_size_wh, fmt) for b in boxes]


def parse_boxes(text: str, image_size_wh: Sequence[float], fmt: BoxFormat = DEFAULT_BOX_FORMAT) -> list[Box]:
    """Every box of format ``fmt`` found in ``text``, in absolute pixels.

    Text that does not match the template (wrong count of numbers, missing brackets) is skipped. Coordinates
    are clamped to the image and each box is ordered so that x0 <= x1 and y0 <= y1.
    """
    w, h = _check_size(image_size_wh)
    boxes = []
    for match in fmt.pattern.finditer(text):
        x0, y0, x1, y1 = (float(match.group(name)) for name in _FIELDS)
        x0, x1 = sorted((from_frame(x0, w, fmt.frame), from_frame(x1, w, fmt.frame)))
        y0, y1 = sorted((from_frame(y0, h, fmt.frame), from_frame(y1, h, fmt.frame)))
        boxes.append((x0, y0, x1, y1))
    return boxes


def parse_box(text: str, image_size_wh: Sequence[float], fmt: BoxFormat = DEFAULT_BOX_FORMAT) -> Box | None:
    """The first box in ``text`` (see ``parse_boxes``), or None if there is none."""
    boxes = parse_boxes(text, image_size_wh, fmt)
    return boxes[0] if boxes else None


def box_area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two xyxy boxes; 0.0 when both are empty."""
    inter = box_area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0
