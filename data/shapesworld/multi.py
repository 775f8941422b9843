"""Long multi-image ShapesWorld: conversations holding K images, questions that need one image or all of them.

Each split has a pool of rendered scenes (``images/<split>/multi_NNNNNN.png``); a record shows K of them as
``Image 1: <image>`` ... ``Image K: <image>`` and asks one of:
- ``lookup``: "In image 7, what colour is the star?" (one image, found by its number);
- ``find_text``: "Which image shows the word 'bird'?" (exactly one of the K shows it);
- ``count_images``: "How many images contain a red circle?" (every image matters);
- ``needle``: "Which image contains a purple heart?" (one needle among K - 1 distractors without one);
- ``retrieve``: "One image shows a heart. What colour is it?" (MM-NIAH-style retrieval: the answer is a colour
  whatever K is, so accuracy far past the trained window measures the positions, not unseen numbers; every
  record plants one image with a single object of a shape the other K - 1 images lack).
Answers are a word or a number, scored by exact match (``meta.task`` = ``multi``, broken down by
``meta.multi_type``). Record ``index`` of split ``s`` with K images is drawn from an RNG seeded by
``(seed, s, K, index)`` only: deterministic, and independent of the other settings' sizes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from data.schema import IMAGE_TOKEN, save_llava_json, write_bytes_atomic, write_json_atomic

from .generate import png_bytes
from .scene import COLOURS, SHAPES, Scene, sample_scene
from .tasks import COLOUR_QUESTIONS, SHAPE_QUESTIONS, _attribute_question

MULTI_TYPES = ("lookup", "find_text", "count_images", "needle", "retrieve")
# the types whose answers do not depend on K (a colour): trained with K <= 8 and asked with K = 64, an
# index answer ("37") or a count past 8 was never seen, a colour was
K_INVARIANT_TYPES = ("retrieve",)
MULTI_INFO_FILE = "shapesworld_multi.json"


def pool_scene(seed: int, split: str, index: int, image_size: int) -> Scene:
    """Scene ``index`` of a split's multi-image pool (text more often: find_text needs words)."""
    return sample_scene(
        random.Random(f"shapesworld-multi/{seed}/{split}/pool/{index}"), image_size, p_text=0.5
    )


def _has(scene: Scene, colour: str, shape: str) -> bool:
    return any(o.colour == colour and o.shape == shape for o in scene.objects)


def _lookup(scenes: Sequence[Scene], rng: random.Random) -> tuple[str, str] | None:
    i = rng.randrange(len(scenes))
    asked = rng.choice(("colour", "shape"))
    task = _attribute_question(
        scenes[i], rng, asked, COLOUR_QUESTIONS if asked == "colour" else SHAPE_QUESTIONS
    )
    if task is None:
        return None
    question = task["question"][0].lower() + task["question"][1:]
    return f"In image {i + 1}, {question}", task["answer"]


def _find_text(scenes: Sequence[Scene], rng: random.Random) -> tuple[str, str] | None:
    words = [s.text for s in scenes]
    unique = [i for i, w in enumerate(words) if w and not w.isdigit() and words.count(w) == 1]
    if not unique:
        return None
    i = rng.choice(unique)
    return f"Which image shows the word '{words[i]}'?", str(i + 1)


def _count_images(scenes: Sequence[Scene], rng: random.Random) -> tuple[str, str]:
    present = sorted({(o.colour, o.shape) for s in scenes for o in s.objects})
    colour, shape = (
        rng.choice(present)
        if present and rng.random() < 0.8
        else (rng.choice(list(COLOURS)), rng.choice(SHAPES))
    )
    count = sum(_has(s, colour, shape) for s in scenes)
    return f"How many images contain a {colour} {shape}?", str(count)


def _needle(scenes: Sequence[Scene], rng: random.Random) -> tuple[str, str] | None:
    kinds = {}
    for i, s in enumerate(scenes):
        for o in s.objects:
            kinds.setdefault((o.colour, o.shape), set()).add(i)
    needles = [(kind, next(iter(where))) for kind, where in kinds.items() if len(where) == 1]
    if not needles:
        return None
    (colour, shape), i = rng.choice(sorted(needles))
    return f"Which image contains a {colour} {shape}?", str(i + 1)


def _retrieve(scenes: Sequence[Scene], rng: random.Random) -> tuple[str, str] | None:
    where: dict[str, list] = {}
    for s in scenes:
        for o in s.objects:
            where.setdefault(o.shape, []).append(o)
    unique = sorted(shape for shape, objects in where.items() if len(objects) == 1)
    if not unique:
        return None
    shape = rng.choice(unique)
    return f"One image shows a {shape}. What colour is it?", where[shape][0].colour


ASK = {
    "lookup": _lookup,
    "find_text": _find_text,
    "count_images": _count_images,
    "needle": _needle,
    "retrieve": _retrieve,
}


def pool_by_shape(pool: Sequence[Scene]) -> dict[str, tuple[list[int], list[int]]]:
    """Per shape: the pool scenes holding exactly one object of it, and those holding none."""
    out = {}
    for shape in SHAPES:
        counts = [sum(o.shape == shape for o in s.objects) for s in pool]
        out[shape] = (
            [i for i, c in enumerate(counts) if c == 1],
            [i for i, c in enumerate(counts) if c == 0],
        )
    return out


def _choose_scenes(
    rng: random.Random, k: int, pool: Sequence[Scene], by_shape: dict[str, tuple[list[int], list[int]]]
) -> list[int]:
    """K pool scenes, one of them (at a uniform place) the only one with its single object of a shape;
    a plain sample where the pool is too small for that."""
    shape = rng.choice(SHAPES)
    single, without = by_shape[shape]
    if not single or len(without) < k - 1:
        return rng.sample(range(len(pool)), k)
    chosen = rng.sample(without, k - 1)
    chosen.insert(rng.randrange(k), rng.choice(single))
    return chosen


def multi_record(
    seed: int,
    split: str,
    k: int,
    index: int,
    pool: Sequence[Scene],
    paths: Sequence[str],
    turns: int = 1,
    by_shape: dict[str, tuple[list[int], list[int]]] | None = None,
    types: Sequence[str] = MULTI_TYPES,
) -> dict:
    """Record ``index`` with ``k`` images of the pool and ``turns`` questions (``types`` in rotation);
    ``by_shape`` is ``pool_by_shape(pool)``, computed here when not given."""
    rng = random.Random(f"shapesworld-multi/{seed}/{split}/k{k}/{index}")
    chosen = _choose_scenes(rng, k, pool, by_shape if by_shape is not None else pool_by_shape(pool))
    scenes = [pool[c] for c in chosen]
    header = "\n".join(f"Image {n + 1}: {IMAGE_TOKEN}" for n in range(k))
    conversations: list[dict] = []
    start = rng.randrange(len(types))
    asked_types: list[str] = []
    for attempt in range(4 * len(types)):
        if len(asked_types) == turns:
            break
        kind = types[(start + attempt) % len(types)]
        asked = ASK[kind](scenes, rng)
        if asked is None:
            continue
        question, answer = asked
        text = f"{header}\n{question}" if not conversations else question
        conversations += [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]
        asked_types.append(kind)
    if not asked_types:
        raise ValueError(
            f"shapesworld-multi: no {'/'.join(types)} question fits record {index} of {split} (K = {k}); "
            f"a pool of {len(pool)} scenes is too small to plant one: raise the pool"
        )
    meta = {
        "task": "multi",
        "multi_type": asked_types[0],
        "k": k,
        "types": asked_types,
        "answer": conversations[1]["value"],
    }
    return {
        "id": f"{split}-k{k}-{index:06d}",
        "image": [paths[c] for c in chosen],
        "conversations": conversations,
        "meta": meta,
    }


def generate_multi(
    out_dir: str | Path,
    *,
    k: dict[str, Sequence[int]],
    records: dict[str, int],
    pool: int | dict[str, int] = 512,
    seed: int = 0,
    image_size: int = 96,
    train_turns: int = 3,
    types: Sequence[str] = MULTI_TYPES,
    progress: bool = True,
) -> dict:
    """Write the pools, ``multi_<split>.json`` for the train split (K drawn per record from ``k['train']``)
    and ``multi_<split>_k<K>.json`` per K for the others, asking ``types`` (a subset of ``MULTI_TYPES``);
    ``pool`` (scenes rendered per split) is one number or one per split. Returns (and writes)
    ``shapesworld_multi.json``."""
    out_dir = Path(out_dir)
    pools = pool if isinstance(pool, dict) else {split: pool for split in k}
    unknown = sorted(set(types) - set(MULTI_TYPES))
    if unknown or not types:
        raise ValueError(f"types: choose from {list(MULTI_TYPES)}, got {list(types)}")
    for split, ks in k.items():
        if min(ks) < 1 or max(ks) > pools[split]:
            raise ValueError(f"k[{split!r}]: every K must be in 1..pool ({pools[split]}), got {list(ks)}")
    files: dict[str, dict[str, int]] = {}
    total = sum(pools[s] for s in k) + sum(records[s] * (1 if s == "train" else len(k[s])) for s in k)
    with tqdm(total=total, disable=not progress, desc="ShapesWorld multi", unit="item") as bar:
        for split, ks in k.items():
            scenes, paths = [], []
            for i in range(pools[split]):
                scene = pool_scene(seed, split, i, image_size)
                path = f"images/{split}/multi_{i:06d}.png"
                write_bytes_atomic(out_dir / path, png_bytes(scene.render()))
                scenes.append(scene)
                paths.append(path)
                bar.update()
            by_shape = pool_by_shape(scenes)
            if split == "train":
                rng = random.Random(f"shapesworld-multi/{seed}/train/ks")
                rows = [
                    multi_record(seed, split, rng.choice(list(ks)), i, scenes, paths, train_turns, by_shape)
                    for i in range(records[split])
                ]
                bar.update(len(rows))
                save_llava_json(out_dir / "multi_train.json", rows)
                files["multi_train.json"] = len(rows)
                continue
            for kk in ks:
                rows = [
                    multi_record(seed, split, kk, i, scenes, paths, by_shape=by_shape, types=types)
                    for i in range(records[split])
                ]
                bar.update(len(rows))
                name = f"multi_{split}_k{kk}.json"
                save_llava_json(out_dir / name, rows)
                files[name] = len(rows)
    info = {
        "dataset": "shapesworld_multi",
        "seed": seed,
        "image_size": image_size,
        "pool": pools,
        "k": {s: list(v) for s, v in k.items()},
        "records": records,
        "types": list(types),
        "files": files,
    }
    write_json_atomic(out_dir / MULTI_INFO_FILE, info)
    return info
