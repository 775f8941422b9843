"""ShapesWorld tasks: captions, questions (colour, shape, count, position, text), grounding and box
description for one scene, and the LLaVA records that hold them (``meta`` carries what a scorer needs)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from data.boxes import DEFAULT_BOX_FORMAT, Box, BoxFormat, render_box
from data.schema import IMAGE_TOKEN

from .scene import ATTRIBUTES, COLOURS, SHAPES, Scene, SceneObject

TASKS = ("caption", "qa", "ground", "describe")
QA_TYPES = ("colour", "shape", "count", "position", "text")
CLEAR_GAP_FRACTION = 0.05  # position questions only when the boxes are this far apart on the asked axis
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


def _rounded(box: Box) -> list[float]:
    return [round(v, 2) for v in box]


def objects_meta(scene: Scene) -> list[dict]:
    """The scene's objects as JSON metadata (left-to-right order, boxes in absolute pixels). ``name`` is the
    phrase a caption must hold to mention the object (the generic caption scorer's object list)."""
    return [
        {
            "name": f"{o.colour} {o.shape}",
            "shape": o.shape,
            "colour": o.colour,
            "size": o.size,
            "box": _rounded(o.box()),
        }
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


def box_format_meta(box_format: BoxFormat) -> dict:
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
        box_format=box_format_meta(box_format),
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
        box_format=box_format_meta(box_format),
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
