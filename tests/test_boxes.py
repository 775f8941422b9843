import math
import random

import pytest

from data.boxes import (
    BoxFormat,
    box_iou,
    from_frame,
    parse_box,
    parse_boxes,
    render_box,
    render_boxes,
    to_frame,
)


def test_render_default_frame_is_1000_of_width_and_height():
    assert render_box((64, 48, 320, 240), (640, 480)) == "[100, 100, 500, 500]"
    assert render_box((0, 0, 640, 480), (640, 480)) == "[0, 0, 1000, 1000]"


def test_render_custom_frame_and_template():
    fmt = BoxFormat(frame=100, template="<box>({x0},{y0}),({x1},{y1})</box>")
    assert render_box((10, 20, 50, 80), (100, 200), fmt) == "<box>(10,10),(50,40)</box>"


def test_render_clamps_outside_image_and_rounds_half_up():
    assert render_box((-5, -1, 700, 500), (640, 480)) == "[0, 0, 1000, 1000]"
    # 0.5 frame units rounds up (not to even): 0.32 px of 640 px = 0.5 / 1000
    assert render_box((0.32, 0, 1.6, 1), (640, 480)) == "[1, 0, 3, 2]"


def test_render_rejects_bad_boxes():
    with pytest.raises(ValueError, match="x0 <= x1"):
        render_box((50, 0, 10, 10), (100, 100))
    with pytest.raises(ValueError, match="4 finite numbers"):
        render_box((0, 0, math.nan, 10), (100, 100))
    with pytest.raises(ValueError, match="4 finite numbers"):
        render_box((0, 0, 10), (100, 100))
    with pytest.raises(ValueError, match="image size"):
        render_box((0, 0, 1, 1), (0, 100))


def test_box_format_validates_template_and_frame():
    with pytest.raises(ValueError, match="exactly once"):
        BoxFormat(template="[{x0}, {y0}, {x1}]")
    with pytest.raises(ValueError, match="exactly once"):
        BoxFormat(template="[{x0}, {y0}, {x1}, {y1}, {x0}]")
    with pytest.raises(ValueError, match="separator"):
        BoxFormat(template="{x0}{y0} {x1} {y1}")
    with pytest.raises(ValueError, match="positive integer"):
        BoxFormat(frame=0)


@pytest.mark.parametrize(
    "fmt",
    [
        BoxFormat(),
        BoxFormat(frame=100),
        BoxFormat(frame=1, template="{x0} {y0} {x1} {y1}"),
        BoxFormat(frame=999, template="<box>({x0},{y0}),({x1},{y1})</box>"),
    ],
)
def test_round_trip_is_exact_and_within_one_frame_unit(fmt):
    rng = random.Random(0)
    for _ in range(500):
        w, h = rng.randint(1, 4000), rng.randint(1, 4000)
        xs = sorted(rng.uniform(0, w) for _ in range(2))
        ys = sorted(rng.uniform(0, h) for _ in range(2))
        box = (xs[0], ys[0], xs[1], ys[1])
        text = render_box(box, (w, h), fmt)
        parsed = parse_box(text, (w, h), fmt)
        assert render_box(parsed, (w, h), fmt) == text
        unit_x, unit_y = w / fmt.frame, h / fmt.frame
        for value, back, unit in zip(box, parsed, (unit_x, unit_y, unit_x, unit_y)):
            assert abs(value - back) <= unit / 2 + 1e-9


def test_parse_finds_every_box_in_free_text_and_skips_malformed_ones():
    text = "cat at [100,200 , 300, 400], dog [ 5, 6, 7 ] or [1, 2, 3, 4, 5] and\n[500, 500, 600, 700]."
    assert parse_boxes(text, (1000, 500)) == [(100.0, 100.0, 300.0, 200.0), (500.0, 250.0, 600.0, 350.0)]
    assert parse_box("no box here [a, b, c, d]", (10, 10)) is None
    assert parse_boxes("", (10, 10)) == []


def test_parse_accepts_decimals_and_ignores_numbers_glued_to_other_digits():
    fmt = BoxFormat(frame=100, template="{x0} {y0} {x1} {y1}")
    assert parse_boxes("box 10.5 20 30 40", (200, 100), fmt) == [(21.0, 20.0, 60.0, 40.0)]
    assert parse_boxes("v1.2.3 20 30 40", (100, 100), fmt) == []


def test_parse_clamps_to_image_and_orders_corners():
    assert parse_box("[-50, 1200, 500, 300]", (200, 100)) == (0.0, 30.0, 100.0, 100.0)
    assert parse_box("[900, 800, 100, 200]", (1000, 1000)) == (100.0, 200.0, 900.0, 800.0)


def test_render_and_parse_many():
    boxes = [(0, 0, 10, 10), (5, 5, 20, 15)]
    texts = render_boxes(boxes, (20, 20), BoxFormat(frame=20))
    assert texts == ["[0, 0, 10, 10]", "[5, 5, 20, 15]"]
    assert parse_boxes(" ".join(texts), (20, 20), BoxFormat(frame=20)) == [
        tuple(map(float, b)) for b in boxes
    ]


def test_frame_helpers():
    assert to_frame(50, 200, 1000) == 250
    assert to_frame(-3, 200, 1000) == 0 and to_frame(250, 200, 1000) == 1000
    assert from_frame(250, 200, 1000) == 50.0
    assert from_frame(1500, 200, 1000) == 200.0


def test_box_iou_values():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (2, 2, 4, 4)) == pytest.approx(4 / 100)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges share no area
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((3, 3, 3, 3), (3, 3, 3, 3)) == 0.0  # empty boxes: no union
