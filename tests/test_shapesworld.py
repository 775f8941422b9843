import collections
import dataclasses
import itertools
import json
import re

import numpy as np
import pytest

from data.boxes import BoxFormat, box_iou, parse_box, parse_boxes
from data.schema import load_llava_json
from data.shapesworld import (
    COLOURS,
    OBJECT_GAP_FRACTION,
    SHAPES,
    SIZES,
    UNIT_SHAPES,
    WORDS,
    Background,
    Scene,
    SceneObject,
    all_texts,
    example,
    generate,
    sample_scene,
    scene_rng,
    split_sizes,
    unique_description,
    vocabulary,
)

N_SCENES = 400  # for statistics: a few hundred scenes take well under a second


@pytest.fixture(scope="module")
def examples():
    return [example(0, "train", i, dense=False)[:2] for i in range(N_SCENES)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("sw")
    info = generate(out, n=20, seed=3, progress=False)
    return out, info


def expand(box, by):
    return (box[0] - by, box[1] - by, box[2] + by, box[3] + by)


def pixel_mask(box, size):
    """Pixels whose square [i, i+1) touches the box."""
    mask = np.zeros((size, size), dtype=bool)
    x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    x1, y1 = min(size, int(np.ceil(box[2]))), min(size, int(np.ceil(box[3])))
    mask[y0:y1, x0:x1] = True
    return mask


def coverage(pixels, colour, background):
    """For a plain background: the fraction of each pixel covered by a shape of ``colour``."""
    direction = np.array(colour, float) - background
    return (pixels - background) @ direction / (direction @ direction)


def polygon_area(points):
    xs, ys = np.array(points).T
    return 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))


def perimeter(points):
    points = np.array(points)
    return np.linalg.norm(points - np.roll(points, 1, axis=0), axis=1).sum()


def matching(objects, description):
    """Objects (meta dicts) that fit a description such as 'small red object' or 'blue star'."""
    words = description.split()
    noun = words[-1]
    return [
        o
        for o in objects
        if all(w in (o["size"], o["colour"]) for w in words[:-1]) and (noun == "object" or noun == o["shape"])
    ]


def plural_to_shape(word):
    return next(s for s in SHAPES if word in (s + "s", s + "es"))


# ------------------------------------------------------------------------------------------ vocabulary


def test_vocabulary_sizes_and_distinct_colours():
    vocab = vocabulary()
    assert (
        len(vocab["shapes"]) >= 6
        and len(vocab["colours"]) >= 8
        and vocab["sizes"] == ["small", "medium", "large"]
    )
    assert len(vocab["words"]) == len(set(vocab["words"])) == 20
    rgb = np.array(list(COLOURS.values()), float)
    distances = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert distances[~np.eye(len(rgb), dtype=bool)].min() >= 100
    for grey in (25, 55, 205, 240):  # every background grey stays far from every object colour
        assert np.linalg.norm(rgb - grey, axis=-1).min() >= 100
    assert not set(WORDS) & (set(SHAPES) | set(COLOURS) | set(SIZES))


def test_unit_shapes_are_normalised_and_distinct():
    for name, points in UNIT_SHAPES.items():
        xs, ys = np.array(points).T
        assert max(xs.max(), ys.max()) == pytest.approx(1.0), name
        assert xs.min() == pytest.approx(-xs.max()) and ys.min() == pytest.approx(-ys.max()), name
    areas = {name: round(polygon_area(points), 2) for name, points in UNIT_SHAPES.items()}
    assert len(set(areas.values())) == len(areas)  # no two shapes share an area: they differ in form


# ------------------------------------------------------------------------------------------ scenes


def test_scene_is_deterministic_per_seed_split_index():
    a = sample_scene(scene_rng(0, "train", 5))
    assert a == sample_scene(scene_rng(0, "train", 5))
    assert a != sample_scene(scene_rng(1, "train", 5))
    assert a != sample_scene(scene_rng(0, "val", 5))
    np.testing.assert_array_equal(np.asarray(a.render()), np.asarray(a.render()))


def test_image_size_minimum():
    with pytest.raises(ValueError, match="image_size must be >= 96"):
        sample_scene(scene_rng(0, "train", 0), 64)
    assert sample_scene(scene_rng(0, "train", 0), 160).render().size == (160, 160)


def test_objects_and_text_never_overlap(examples):
    n_objects = collections.Counter()
    with_text = 0
    for scene, _ in examples:
        gap = OBJECT_GAP_FRACTION * scene.image_size
        boxes = scene.boxes() + ([scene.text_box] if scene.text else [])
        for box in boxes:
            assert 0 <= box[0] < box[2] <= scene.image_size and 0 <= box[1] < box[3] <= scene.image_size
        for a, b in itertools.combinations(boxes, 2):
            assert box_iou(expand(a, gap / 2 - 1e-9), expand(b, gap / 2 - 1e-9)) == 0.0
        assert [o.cx for o in scene.objects] == sorted(o.cx for o in scene.objects)
        triples = [(o.shape, o.colour, o.size) for o in scene.objects]
        assert len(set(triples)) == len(triples)
        n_objects[len(scene.objects)] += 1
        with_text += bool(scene.text)
    assert set(n_objects) == {1, 2, 3, 4} and min(n_objects.values()) > 0.15 * len(examples)
    assert 0.2 < with_text / len(examples) < 0.4  # p_text = 0.3


def test_boxes_match_drawn_pixels_on_a_plain_background(examples):
    for scene, _ in examples[:60]:
        grey = scene.background.colour
        plain = dataclasses.replace(scene, background=Background(grey, "plain"))
        pixels = np.asarray(plain.render(), float)
        size = scene.image_size
        foreground = np.zeros((size, size), bool)
        for obj in scene.objects:
            box = obj.box()
            near = pixel_mask(expand(box, 1), size)
            cover = coverage(pixels, COLOURS[obj.colour], np.array(grey, float)) * near
            ys, xs = np.nonzero(cover > 0.05)
            # tight: the painted pixels span the box to within a pixel on every side
            assert abs(xs.min() - box[0]) <= 1 and abs(xs.max() + 1 - box[2]) <= 1
            assert abs(ys.min() - box[1]) <= 1 and abs(ys.max() + 1 - box[3]) <= 1
            # the painted area is the polygon's: on average its drawn edge lies within 0.15 px of the outline
            points = UNIT_SHAPES[obj.shape]
            assert abs(cover.sum() - polygon_area(points) * obj.r**2) <= 0.15 * perimeter(points) * obj.r
            foreground |= near
        if scene.text:
            text_pixels = np.abs(pixels - grey).max(-1) > 30
            assert text_pixels.sum() > 20
            foreground |= pixel_mask(expand(scene.text_box, 1), size)
            assert not (text_pixels & ~foreground).any()
        assert (pixels[~foreground] == grey).all()  # nothing drawn outside the boxes


def test_textured_backgrounds_stay_neutral_outside_boxes(examples):
    textures = collections.Counter()
    for scene, _ in examples[:60]:
        textures[scene.background.texture] += 1
        pixels = np.asarray(scene.render(), int)
        outside = np.ones(pixels.shape[:2], bool)
        for box in scene.boxes() + ([scene.text_box] if scene.text else []):
            outside &= ~pixel_mask(expand(box, 1), scene.image_size)
        spread = pixels.max(-1) - pixels.min(-1)
        assert spread[outside].max() <= 1  # grey everywhere: no object colour leaks out of a box
        for obj in scene.objects:  # inside, the object's own colour is the nearest palette colour
            rgb = np.array(COLOURS[obj.colour])
            solid = spread >= 0.8 * (rgb.max() - rgb.min())  # skip anti-aliased edge pixels
            inside = pixels[pixel_mask(obj.box(), scene.image_size) & solid]
            names = np.array(list(COLOURS))
            rgb = np.array(list(COLOURS.values()))
            nearest = names[np.linalg.norm(inside[:, None] - rgb[None], axis=-1).argmin(1)]
            assert len(inside) > 10 and (nearest == obj.colour).mean() > 0.95
    assert set(textures) == {"plain", "noise", "gradient"}


def test_objects_move_with_time():
    obj = SceneObject("square", "red", "large", cx=30.0, cy=48.0, r=10.0, vx=20.0, vy=-5.0)
    assert obj.at(1.5) == dataclasses.replace(obj, cx=60.0, cy=40.5)
    assert obj.box(1.5) == (50.0, 30.5, 70.0, 50.5)
    scene = Scene(96, (obj,), background=Background((230, 230, 230)))
    assert scene.boxes(1.0) == [(40.0, 33.0, 60.0, 53.0)]
    before, after = np.asarray(scene.render(0.0)), np.asarray(scene.render(1.0))
    assert tuple(before[48, 30]) == COLOURS["red"] and tuple(before[48, 55]) == (230, 230, 230)
    assert tuple(after[43, 55]) == COLOURS["red"] and tuple(after[43, 25]) == (230, 230, 230)


# ------------------------------------------------------------------------------------------ tasks


def test_caption_lists_every_object_left_to_right(examples):
    for scene, tasks in examples:
        caption = next(t for t in tasks if t["task"] == "caption")
        n = len(scene.objects)
        listed = re.findall(r"a (small|medium|large) (\w+) (\w+)", caption["answer"])
        assert caption["answer"].startswith(f"{n} object{'s' if n > 1 else ''}: ")
        assert listed == [(o.size, o.colour, o.shape) for o in scene.objects]
        if scene.text:
            kind = "number" if scene.text.isdigit() else "word"
            assert caption["answer"].endswith(f'The {kind} "{scene.text}" is written.')
        else:
            assert "written" not in caption["answer"]
        assert [o["box"] for o in caption["objects"]] == [[round(v, 2) for v in b] for b in scene.boxes()]


def test_every_answer_is_consistent_with_the_scene(examples):
    seen = collections.Counter()
    for scene, tasks in examples:
        objects = [
            {"shape": o.shape, "colour": o.colour, "size": o.size, "box": o.box()} for o in scene.objects
        ]
        size = (scene.image_size, scene.image_size)
        for task in tasks:
            kind = task.get("qa_type", task["task"])
            seen[kind] += 1
            question, answer = task["question"], task["answer"]
            if kind in ("colour", "shape"):
                (target,) = matching(objects, task["target"])  # the description singles out one object
                assert task["target"] in question and answer == target[kind]
                assert kind not in task["target"].split()[:-1] and (
                    kind != "shape" or "object" in task["target"]
                )
            elif kind == "count":
                if task["count_of"] == "total":
                    expected = len(objects)
                elif task["count_of"] == "colour":
                    colour = re.search(r"How many (\w+) (objects|shapes)", question).group(1)
                    expected = sum(o["colour"] == colour for o in objects)
                else:
                    shape = plural_to_shape(re.search(r"How many (\w+)", question).group(1))
                    expected = sum(o["shape"] == shape for o in objects)
                assert answer == str(expected)
            elif kind == "position":
                (a,), (b,) = matching(objects, task["target"]), matching(objects, task["reference"])
                gap = 0.05 * scene.image_size
                checks = {
                    "left": a["box"][2] + gap <= b["box"][0],
                    "right": b["box"][2] + gap <= a["box"][0],
                    "above": a["box"][3] + gap <= b["box"][1],
                    "below": b["box"][3] + gap <= a["box"][1],
                }
                assert checks[answer]
                assert ("left or" in question or "right or" in question) == (answer in ("left", "right"))
            elif kind == "text":
                assert answer == scene.text
            elif kind == "ground":
                (target,) = matching(objects, task["target"])
                assert box_iou(parse_box(answer, size), target["box"]) > 0.9
                assert task["box"] == [round(v, 2) for v in target["box"]]
            elif kind == "describe":
                (box,) = parse_boxes(question, size)
                best = max(objects, key=lambda o: box_iou(o["box"], box))
                assert box_iou(best["box"], box) > 0.9
                assert answer == f"a {best['size']} {best['colour']} {best['shape']}"
            else:
                assert kind == "caption"
    n = len(examples)
    assert seen["caption"] == seen["count"] == seen["ground"] == seen["describe"] == n
    assert seen["colour"] > 0.9 * n and seen["shape"] > 0.9 * n and seen["position"] > 0.6 * n
    assert seen["text"] == sum(bool(scene.text) for scene, _ in examples)


def test_shortest_unique_descriptions():
    objects = (
        SceneObject("circle", "red", "small", 20, 20, 5),
        SceneObject("circle", "blue", "small", 50, 20, 5),
        SceneObject("star", "red", "large", 80, 20, 10),
    )
    scene = Scene(96, objects)
    star, first = collections.Counter(), collections.Counter()
    for i in range(200):
        rng = scene_rng(i, "x", 0)
        star[unique_description(2, scene.objects, rng)] += 1
        first[unique_description(0, scene.objects, rng)] += 1  # no single word singles it out
        assert unique_description(1, scene.objects, rng) == "blue object"
        assert unique_description(0, scene.objects, rng, ("size", "shape")) is None
    # ties between equally short descriptions are broken at random
    assert set(star) == {"star", "large object"} and set(first) == {"red circle", "small red object"}


def blind_accuracy(pairs):
    """Accuracy of the best guesser that sees only the question with attribute words masked, fitted on
    the first half of the pairs and scored on the second."""
    words = sorted([*SHAPES, *(s + "s" for s in SHAPES), "crosses", *COLOURS, *SIZES], key=len, reverse=True)
    mask = re.compile(r"\b(" + "|".join(words) + r")\b")
    pairs = [(mask.sub("X", q), a) for q, a in pairs]
    half = len(pairs) // 2
    fitted = collections.defaultdict(collections.Counter)
    for q, a in pairs[:half]:
        fitted[q][a] += 1
    overall = collections.Counter(a for _, a in pairs[:half]).most_common(1)[0][0]
    hits = [(fitted[q].most_common(1)[0][0] if q in fitted else overall) == a for q, a in pairs[half:]]
    return sum(hits) / len(hits)


def test_qa_answers_are_balanced_against_a_blind_model(examples):
    by_type = collections.defaultdict(list)
    for _, tasks in examples:
        for task in tasks:
            if task["task"] == "qa":
                by_type[task["qa_type"]].append((task["question"], task["answer"]))
    answers = {kind: collections.Counter(a for _, a in pairs) for kind, pairs in by_type.items()}
    left, right, above, below = (answers["position"][k] for k in ("left", "right", "above", "below"))
    assert 0.35 < left / (left + right) < 0.65 and 0.35 < above / (above + below) < 0.65
    assert set(answers["colour"]) == set(COLOURS) and max(answers["colour"].values()) < 0.2 * len(
        by_type["colour"]
    )
    assert set(answers["shape"]) == set(SHAPES) and max(answers["shape"].values()) < 0.2 * len(
        by_type["shape"]
    )
    assert set(answers["count"]) == {"0", "1", "2", "3", "4"}
    assert max(answers["count"].values()) < 0.35 * len(by_type["count"])
    assert blind_accuracy(by_type["count"]) < 0.4
    assert blind_accuracy(by_type["colour"]) < 0.25 and blind_accuracy(by_type["shape"]) < 0.25
    assert len(answers["text"]) > 0.5 * len(by_type["text"])  # words and numbers hardly repeat


# ------------------------------------------------------------------------------------------ files


def test_generate_writes_schema_valid_splits(dataset):
    out, info = dataset
    assert info["counts"]["train"]["images"] == 16 and info["counts"]["val"]["images"] == 2
    assert json.loads((out / "shapesworld.json").read_text()) == info
    assert info["box_format"] == {"frame": 1000, "template": "[{x0}, {y0}, {x1}, {y1}]"}
    train = load_llava_json(out / "train.json", check_files=True)
    assert [r["id"] for r in train] == [f"train_{i:06d}" for i in range(16)]
    for rec in train:
        assert rec["image"] == f"images/train/{rec['id']}.png"
        human = rec["conversations"][0::2]
        assert human[0]["value"].startswith("<image>\n")
        assert len(rec["conversations"]) == 2 * len(rec["meta"]["tasks"])
        assert {"caption", "count", "ground", "describe"} <= set(rec["meta"]["tasks"])
    assert len({tuple(r["meta"]["tasks"]) for r in train}) > 1  # task order is shuffled per image
    for split in ("val", "test"):
        records = load_llava_json(out / f"{split}.json", check_files=True)
        assert len(records) == info["counts"][split]["records"]
        assert len({r["id"] for r in records}) == len(records)
        for rec in records:
            meta = rec["meta"]
            assert len(rec["conversations"]) == 2 and rec["conversations"][1]["value"] == meta["answer"]
            assert {"task", "answer", "objects", "image_size"} <= set(meta)
            assert ("qa_type" in meta) == (meta["task"] == "qa")
            assert ("box" in meta) == (meta["task"] in ("ground", "describe"))
    assert len(list((out / "images" / "val").glob("*.png"))) == 2
    assert not list(out.rglob("*.tmp"))


def test_generate_is_deterministic_and_independent_of_n(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    generate(again, n=20, seed=3, progress=False)
    for path in sorted(out.rglob("*")):
        if path.is_file():
            assert (again / path.relative_to(out)).read_bytes() == path.read_bytes(), path
    bigger = tmp_path / "bigger"
    generate(bigger, n=40, seed=3, progress=False)
    for split, count in (("train", 16), ("val", 2), ("test", 2)):
        for i in range(count):
            name = f"images/{split}/{split}_{i:06d}.png"
            assert (bigger / name).read_bytes() == (out / name).read_bytes()
    small_val = load_llava_json(out / "val.json")
    big_val = load_llava_json(bigger / "val.json")
    assert big_val[: len(small_val)] == small_val
    other = tmp_path / "other"
    generate(other, n=20, seed=4, progress=False)
    assert (other / "train.json").read_bytes() != (out / "train.json").read_bytes()
    assert (other / "images/train/train_000000.png").read_bytes() != (
        out / "images/train/train_000000.png"
    ).read_bytes()


def test_generate_uses_the_requested_box_format(tmp_path):
    fmt = BoxFormat(frame=100, template="<{x0},{y0},{x1},{y1}>")
    generate(tmp_path, n=10, seed=0, splits=(0.0, 1.0, 0.0), box_format=fmt, progress=False)
    assert load_llava_json(tmp_path / "train.json") == [] and load_llava_json(tmp_path / "test.json") == []
    ground = [r for r in load_llava_json(tmp_path / "val.json") if r["meta"]["task"] == "ground"]
    assert len(ground) == 10
    for rec in ground:
        assert re.fullmatch(r"<\d{1,3},\d{1,3},\d{1,3},\d{1,3}>", rec["meta"]["answer"])
        assert rec["meta"]["box_format"] == {"frame": 100, "template": fmt.template}
        assert box_iou(parse_box(rec["meta"]["answer"], (96, 96), fmt), rec["meta"]["box"]) > 0.85


def test_split_sizes():
    assert split_sizes(10, (0.8, 0.1, 0.1)) == {"train": 8, "val": 1, "test": 1}
    assert split_sizes(7, (0.5, 0.25, 0.25)) == {"train": 3, "val": 2, "test": 2}  # largest remainders
    assert split_sizes(1, (0.0, 0.0, 1.0)) == {"train": 0, "val": 0, "test": 1}
    assert sum(split_sizes(999, (0.7, 0.2, 0.1)).values()) == 999
    with pytest.raises(ValueError, match="adding up to 1"):
        split_sizes(10, (0.8, 0.1))
    with pytest.raises(ValueError, match="adding up to 1"):
        split_sizes(10, (0.8, 0.3, -0.1))


def test_all_texts_yields_every_turn(dataset):
    out, _ = dataset
    records = load_llava_json(out / "train.json")
    texts = list(all_texts(records))
    assert len(texts) == sum(len(r["conversations"]) for r in records)
    assert texts[0] == records[0]["conversations"][0]["value"] and texts[0].startswith("<image>\n")


def test_dense_training_tasks_ground_and_describe_every_object():
    """Train records ask grounding and box description once per object (eval splits: once per image)."""
    for index in range(30):
        scene, tasks, _ = example(0, "train", index)
        grounded = sorted(tuple(t["box"]) for t in tasks if t["task"] == "ground")
        described = sorted(tuple(t["box"]) for t in tasks if t["task"] == "describe")
        expected = sorted(tuple(round(v, 2) for v in o.box()) for o in scene.objects)
        assert grounded == described == expected
        _, eval_tasks, _ = example(0, "test", index)
        assert sum(t["task"] == "ground" for t in eval_tasks) == 1
        assert sum(t["task"] == "describe" for t in eval_tasks) == 1
