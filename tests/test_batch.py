"""``mm caption`` / ``mm ground`` (mm/batch.py) on a real tiny model and real ShapesWorld files: every input
kind, resumable JSONL results, error rows for bad images, ``--draw``, ``--eval`` against a hand computation,
two real processes sharding one input, and the ``scripts/`` wrappers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import CORPUS, MM, overfit, tiny_model_section
from PIL import Image

from data.boxes import box_iou
from data.media import load_image
from data.shapesworld import generate
from mm.batch import COLOURS, read_inputs, read_rows
from mm.cli import main

ROOT = Path(__file__).resolve().parents[1]
# What the tiny model is overfitted to answer, whatever the image: one test image's objects and one box.
CAPTION = "a purple diamond and a blue cross"


def train_model(out: Path, records: list[dict], sw: Path, box: str) -> Path:
    """A tiny VLM overfitted to answer every caption question with CAPTION and every grounding question with
    ``box``, so its answers (and so the expected metrics) are known; saved as users have models."""
    from mm.build import build_tokenizer, build_vlm, make_processor, save_vlm

    questions = [r["conversations"][0]["value"] for r in records]
    torch.manual_seed(0)
    section = tiny_model_section()
    texts = [q.replace("<image>\n", "") for q in questions] + [CAPTION, box]
    tokenizer = build_tokenizer(section, CORPUS + texts * 20)
    model = build_vlm(section, tokenizer)
    processor = make_processor(model, tokenizer)
    features = []
    for rec, question in zip(records, questions):
        answer = CAPTION if rec["meta"]["task"] == "caption" else box
        conv = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        features.append(processor(conv, [load_image(sw / rec["image"])]))
    batch = processor.collate(features)
    model.experts.requires_grad_(False)  # the answers do not depend on the image: train the LLM only (fast)
    assert overfit(model, batch, steps=60, lr=5e-3) < 0.1
    return save_vlm(model.eval(), processor, out)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """ShapesWorld (4 test images) and a model trained on the test split's caption and grounding questions."""
    root = tmp_path_factory.mktemp("batch")
    sw = root / "sw"
    generate(sw, n=40, seed=0, progress=False)
    test = json.loads((sw / "test.json").read_text())
    wanted = [r for r in test if r["meta"]["task"] in ("caption", "ground")]
    box = next(r for r in test if r["meta"]["task"] == "ground")["meta"]["answer"]
    model = train_model(root / "model", wanted, sw, box)
    return SimpleNamespace(root=root, sw=sw, model=model, test=test, box=box)


def run(*args: str) -> int:
    return main([*args[:1], *args[1:], "--quiet"])


def ids(path: Path) -> list[str]:
    return [r["id"] for r in read_rows(path)]


def image_folder(tmp_path: Path, world) -> Path:
    """a.png, sub/b.png, sub/c.png, plus a hidden folder's image and a text file, which are not inputs."""
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    (folder / ".cache").mkdir()
    for k, name in enumerate(["a.png", "sub/b.png", "sub/c.png", ".cache/d.png"]):
        shutil.copy(world.sw / "images" / "test" / f"test_{k:06d}.png", folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


# -- inputs -------------------------------------------------------------------------------------------
def test_each_input_kind_is_read_with_its_ids(world, tmp_path):
    folder = image_folder(tmp_path, world)
    items = read_inputs([folder], "caption")
    assert [i.id for i in items] == ["a.png", "sub/b.png", "sub/c.png"]
    assert [i.path for i in items] == [folder / "a.png", folder / "sub/b.png", folder / "sub/c.png"]
    assert {i.prompt for i in items} == {"Describe the image."} and all(i.truth is None for i in items)

    pattern = str(folder / "sub" / "*.png")
    assert [i.id for i in read_inputs([pattern], "caption")] == [
        str(folder / "sub/b.png"),
        str(folder / "sub/c.png"),
    ]

    listing = folder / "list.txt"
    listing.write_text(f"# my images\nsub/c.png\n\n  a.png\n{folder / 'sub/b.png'}\n")
    items = read_inputs([listing], "caption")
    assert [i.id for i in items] == ["sub/c.png", "a.png", str(folder / "sub/b.png")]
    assert [i.path for i in items] == [folder / "sub/c.png", folder / "a.png", folder / "sub/b.png"]

    jsonl = folder / "list.jsonl"
    rows = [
        {"id": "first", "image": "a.png", "object": "blue cross"},
        {"image": "sub/b.png", "object": "disc"},
    ]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = read_inputs([jsonl], "ground")
    assert [(i.id, i.path, i.label, i.prompt) for i in items] == [
        ("first", folder / "a.png", "blue cross", "Where is the blue cross?"),
        ("sub/b.png", folder / "sub/b.png", "disc", "Where is the disc?"),
    ]
    with pytest.raises(ValueError, match="no object to find"):
        read_inputs([folder], "ground")  # grounding a folder needs --object
    assert [i.label for i in read_inputs([folder], "ground", obj="star")] == ["star"] * 3

    llava = world.sw / "test.json"
    captions = [r for r in world.test if r["meta"]["task"] == "caption"]
    items = read_inputs([llava], "caption")
    assert [i.id for i in items] == [f"test_{k:06d}-caption" for k in range(4)] == [r["id"] for r in captions]
    assert [i.prompt for i in items] == [r["conversations"][0]["value"].split("\n", 1)[1] for r in captions]
    assert [i.path for i in items] == [world.sw / r["image"] for r in captions]
    assert [i.truth["meta"]["objects"] for i in items] == [r["meta"]["objects"] for r in captions]
    grounds = [r for r in world.test if r["meta"]["task"] == "ground"]
    items = read_inputs([llava], "ground")
    assert [(i.id, i.label) for i in items] == [(r["id"], r["meta"]["target"]) for r in grounds]
    assert [i.truth["meta"]["box"] for i in items] == [r["meta"]["box"] for r in grounds]

    with pytest.raises(ValueError, match="appears twice"):
        read_inputs([folder, folder], "caption")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        read_inputs([str(folder / "*.jpg")], "caption")


# -- results, resume ----------------------------------------------------------------------------------
def test_results_have_one_row_per_input_and_a_rerun_skips_them(world, tmp_path, capsys):
    folder = image_folder(tmp_path, world)
    out = tmp_path / "out" / "captions.jsonl"
    assert (
        run("caption", str(folder), "--model", str(world.model), "--out", str(out), "--batch-size", "2") == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a.png", "sub/b.png", "sub/c.png"]
    assert [r["image"] for r in rows] == [
        str(folder / "a.png"),
        str(folder / "sub/b.png"),
        str(folder / "sub/c.png"),
    ]
    assert {r["text"] for r in rows} == {CAPTION} and {tuple(r["size"]) for r in rows} == {(96, 96)}
    assert all(r["prompt"] == "Describe the image." and r["new_tokens"] > 0 for r in rows)
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out.resolve())

    before = out.read_bytes()
    assert run("caption", str(folder), "--model", str(world.model), "--out", str(out)) == 0
    assert out.read_bytes() == before
    assert "3 input(s), 3 already in captions.jsonl, 0 to do" in capsys.readouterr().err


def test_a_run_cut_short_is_completed_on_rerun(world, tmp_path, capsys):
    llava = world.sw / "test.json"
    out = tmp_path / "captions.jsonl"
    args = ("caption", str(llava), "--model", str(world.model), "--out", str(out), "--batch-size", "3")
    assert run(*args, "--limit", "2") == 0
    assert ids(out) == ["test_000000-caption", "test_000001-caption"]
    # a kill in the middle of writing the next row: its line is cut
    whole = json.dumps({"id": "test_000002-caption", "image": "x", "text": CAPTION}) + "\n"
    with open(out, "ab") as f:
        f.write(whole.encode()[:25])
    assert run(*args) == 0
    lines = out.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [f"test_{k:06d}-caption" for k in range(4)]
    assert all(json.loads(line)["text"] == CAPTION for line in lines)
    assert "dropped a cut last line (25 bytes)" in capsys.readouterr().err
    assert run(*args) == 0  # nothing left: no duplicate
    assert ids(out) == [f"test_{k:06d}-caption" for k in range(4)]


def test_bad_images_give_one_error_row_each_and_the_run_goes_on(world, tmp_path, capsys):
    good = world.sw / "images" / "test" / "test_000000.png"
    shutil.copy(good, tmp_path / "good.png")
    data = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # a truncated download
    listing = tmp_path / "list.txt"
    listing.write_text("cut.png\ngone.png\ngood.png\n")
    out = tmp_path / "r.jsonl"
    args = ("caption", str(listing), "--model", str(world.model), "--out", str(out))
    assert run(*args) == 0  # some inputs answered: exit 0, the errors are rows
    rows = read_rows(out)
    assert [r["id"] for r in rows] == ["cut.png", "gone.png", "good.png"]
    assert str(tmp_path / "cut.png") in rows[0]["error"] and "truncated" in rows[0]["error"]
    assert str(tmp_path / "gone.png") in rows[1]["error"] and "file not found" in rows[1]["error"]
    assert "error" not in rows[2] and rows[2]["text"] == CAPTION
    assert "2 input(s) could not be used" in capsys.readouterr().err

    assert run(*args) == 0 and len(read_rows(out)) == 3  # error rows count as done...
    (tmp_path / "gone.png").write_bytes(data)
    assert run(*args, "--retry-errors") == 0  # ... unless asked to retry them
    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == ["cut.png", "gone.png", "good.png"]
    assert [r["text"] for r in rows if r["id"] == "gone.png"] == [CAPTION]

    only_bad = tmp_path / "bad.txt"
    only_bad.write_text("cut.png\n")
    assert run("caption", str(only_bad), "--model", str(world.model), "--out", str(tmp_path / "b.jsonl")) == 1
    assert len(read_rows(tmp_path / "b.jsonl")) == 1
    assert run("caption", str(tmp_path / "nothing"), "--model", str(world.model), "--out", str(out)) == 2


# -- videos -------------------------------------------------------------------------------------------
def write_clip(path: Path, frames: int = 8) -> Path:
    """A tiny real mp4: a white square moving right over grey."""
    from data.shapesworld.video import encode_mp4

    clip = np.full((frames, 32, 32, 3), 60, dtype=np.uint8)
    for t in range(frames):
        clip[t, 12:20, 2 + 3 * t : 10 + 3 * t] = 255
    path.write_bytes(encode_mp4(clip, fps=8))
    return path


def media_folder(tmp_path: Path, world) -> Path:
    """a.png, b.png and clip.mp4."""
    folder = tmp_path / "media"
    folder.mkdir()
    for k, name in enumerate(["a.png", "b.png"]):
        shutil.copy(world.sw / "images" / "test" / f"test_{k:06d}.png", folder / name)
    write_clip(folder / "clip.mp4")
    return folder


def test_videos_are_captioned_beside_images_in_one_padded_batch(world, tmp_path, capsys):
    from mm.batch import VIDEO_CAPTION_PROMPT, BatchOptions, run_batch
    from mm.inference import Engine

    folder = media_folder(tmp_path, world)
    items = read_inputs([folder], "caption")
    assert [(i.id, i.media, i.prompt) for i in items] == [
        ("a.png", "image", "Describe the image."),
        ("b.png", "image", "Describe the image."),
        ("clip.mp4", "video", VIDEO_CAPTION_PROMPT),
    ]
    engine = Engine.load(world.model, max_batch=3)
    out = tmp_path / "c.jsonl"
    summary = run_batch(items, BatchOptions("caption", world.model, out, batch_size=3), engine=engine)
    assert engine.batch_sizes == Counter({3: 1})  # the images and the video went in one padded batch
    assert summary.errors == 0 and summary.processed == 3
    image_a, image_b, video = read_rows(out)
    for row, name in ((image_a, "a.png"), (image_b, "b.png")):
        assert row["image"] == str(folder / name) and "media" not in row and "video_tokens" not in row
        assert row["text"] == CAPTION and row["size"] == [96, 96]
    proc = engine.processor
    assert video["id"] == "clip.mp4" and video["image"] == str(folder / "clip.mp4")
    assert video["media"] == "video" and video["prompt"] == VIDEO_CAPTION_PROMPT and "size" not in video
    assert video["text"] and video["new_tokens"] > 0
    assert video["frames"] == proc.video.frames_per_video == 16
    assert video["video_tokens"] == proc.tokens_per_video > 0
    # the caption is the model's answer to that video alone (padding beside the images changes nothing)
    alone = run_batch(
        [items[2]], BatchOptions("caption", world.model, tmp_path / "alone.jsonl"), engine=engine
    ).rows
    assert alone[0]["text"] == video["text"]

    before = out.read_bytes()  # resumable as before: a rerun skips all three
    assert run("caption", str(folder), "--model", str(world.model), "--out", str(out)) == 0
    assert out.read_bytes() == before
    assert "3 input(s), 3 already in c.jsonl, 0 to do" in capsys.readouterr().err


def test_a_corrupt_video_is_one_error_row_and_the_others_are_captioned(world, tmp_path, capsys):
    folder = media_folder(tmp_path, world)
    data = (folder / "clip.mp4").read_bytes()
    (folder / "broken.mp4").write_bytes(data[: len(data) // 3])  # a cut download
    out = tmp_path / "c.jsonl"
    args = ("caption", str(folder), "--model", str(world.model), "--out", str(out), "--batch-size", "4")
    assert run(*args) == 0
    rows = read_rows(out)
    assert [r["id"] for r in rows] == ["a.png", "b.png", "broken.mp4", "clip.mp4"]
    bad = rows[2]
    assert set(bad) == {"id", "image", "media", "error"} and bad["media"] == "video"
    assert str(folder / "broken.mp4") in bad["error"]
    assert [r["text"] for r in rows[:2]] == [CAPTION, CAPTION] and rows[3]["text"]
    assert "1 input(s) could not be used" in capsys.readouterr().err


def test_ground_refuses_a_video_with_an_error_row(world, tmp_path):
    folder = media_folder(tmp_path, world)
    listing = folder / "list.jsonl"
    rows = [{"image": "clip.mp4", "object": "white square"}, {"image": "a.png", "object": "blue cross"}]
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "g.jsonl"
    assert run("ground", str(listing), "--model", str(world.model), "--out", str(out)) == 0
    video, image = read_rows(out)
    clip = folder / "clip.mp4"
    assert video == {
        "id": "clip.mp4",
        "image": str(clip),
        "media": "video",
        "error": f"grounding takes images; {clip} is a video",
    }
    assert image["text"] == world.box and len(image["boxes"]) == 1
    # a folder given with --object: the video is an error row too, the images are grounded
    out = tmp_path / "g2.jsonl"
    args = ("ground", str(folder), "--object", "cross", "--model", str(world.model), "--out", str(out))
    assert run(*args) == 0
    assert [("error" in r, r.get("media")) for r in read_rows(out)] == [
        (False, None),
        (False, None),
        (True, "video"),
    ]


# -- draw, eval ---------------------------------------------------------------------------------------
def test_ground_draws_each_box_and_label(world, tmp_path):
    out, draw = tmp_path / "g.jsonl", tmp_path / "drawn"
    llava = world.sw / "test.json"
    assert run("ground", str(llava), "--model", str(world.model), "--out", str(out), "--draw", str(draw)) == 0
    rows = read_rows(out)
    assert len(rows) == 4
    for row in rows:
        assert row["text"] == world.box and len(row["boxes"]) == 1
        drawn = Image.open(draw / f"{row['id']}.png")
        drawn.load()
        original = Image.open(row["image"]).convert("RGB")
        assert drawn.size == original.size == (96, 96)
        x0, y0, x1, y1 = row["boxes"][0]
        middle = round((y0 + y1) / 2)
        left = [drawn.getpixel((x, middle)) for x in range(int(x0) - 1, int(x0) + 2)]
        assert tuple(COLOURS[0]) in left  # the box's left edge, in the first colour
        assert drawn.getpixel((90, 90)) == original.getpixel((90, 90))  # far from the box: untouched


def hand_recall(records: list[dict], caption: str) -> float:
    """Object recall by hand: each object named in the caption counts, each mention once."""
    hits = total = 0
    for rec in records:
        names = Counter(o["name"] for o in rec["meta"]["objects"])
        hits += sum(min(n, caption.count(name)) for name, n in names.items())
        total += sum(names.values())
    return hits / total


def test_eval_matches_a_hand_computation(world, tmp_path, capsys):
    llava = world.sw / "test.json"
    out = tmp_path / "c.jsonl"
    assert run("caption", str(llava), "--model", str(world.model), "--out", str(out), "--eval") == 0
    metrics = json.loads((tmp_path / "c.metrics.json").read_text())
    captions = [r for r in world.test if r["meta"]["task"] == "caption"]
    expected = hand_recall(captions, CAPTION)
    assert 0 < expected < 1
    assert metrics["caption_object_recall"] == pytest.approx(expected)
    assert metrics["scored"] == 4 and metrics["skipped"] == 0 and metrics["counts"] == {"caption": 4}

    out = tmp_path / "g.jsonl"
    assert run("ground", str(llava), "--model", str(world.model), "--out", str(out), "--eval") == 0
    metrics = json.loads((tmp_path / "g.metrics.json").read_text())
    rows = {r["id"]: r for r in read_rows(out)}
    ious = []
    for rec in (r for r in world.test if r["meta"]["task"] == "ground"):
        x0, y0, x1, y1 = (int(v) * 96 / 1000 for v in re.findall(r"\d+", rows[rec["id"]]["text"]))
        ious.append(box_iou((x0, y0, x1, y1), rec["meta"]["box"]))
    assert ious[0] > 0.9  # the box the model learnt is test image 0's
    assert metrics["grounding_acc@0.5"] == pytest.approx(sum(i >= 0.5 for i in ious) / 4)
    assert metrics["grounding_miou"] == pytest.approx(sum(ious) / 4)
    assert "grounding_miou" in capsys.readouterr().out


# -- accelerate-style sharding, scripts/ --------------------------------------------------------------
def test_two_processes_shard_the_input_and_merge_in_order(world, tmp_path):
    """Rank 0 through ``mm caption``, rank 1 through ``python scripts/caption.py``, concurrently, as
    ``accelerate launch`` starts them (RANK / WORLD_SIZE)."""
    if not MM.is_file():
        pytest.skip(f"console script {MM} is not installed (pip install -e .)")
    folder = image_folder(tmp_path, world)
    out = tmp_path / "out" / "merged.jsonl"
    args = [str(world.sw / "test.json"), str(folder), "--model", str(world.model)]
    args += ["--out", str(out), "--batch-size", "4", "--quiet"]
    commands = [[str(MM), "caption", *args], [sys.executable, str(ROOT / "scripts" / "caption.py"), *args]]
    procs = []
    for rank, command in enumerate(commands):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
        env.update(LOCAL_RANK=str(rank), TOKENIZERS_PARALLELISM="false")
        procs.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = [(*p.communicate(timeout=120), p.returncode) for p in procs]
    for _, err, rc in results:
        assert rc == 0, err
    assert results[0][0].strip().splitlines()[-1] == str(out.resolve())  # rank 0 prints the merged file
    assert "merged the 2 rank files" in results[0][1]
    expected = [f"test_{k:06d}-caption" for k in range(4)] + ["a.png", "sub/b.png", "sub/c.png"]
    assert ids(out) == expected  # every id once, in input order
    assert {r["text"] for r in read_rows(out)} == {CAPTION}
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged.jsonl"]  # rank files and markers gone


def test_scripts_ground_is_mm_ground(world, tmp_path):
    out = tmp_path / "g.jsonl"
    image = world.sw / "images" / "test" / "test_000000.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(ROOT / "scripts" / "ground.py"), str(image), "--object", "yellow object"]
    done = subprocess.run(
        [*command, "--model", str(world.model), "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(out.resolve())
    [row] = read_rows(out)
    assert row["id"] == str(image) and row["object"] == "yellow object" and row["text"] == world.box
    assert row["prompt"] == "Where is the yellow object?" and len(row["boxes"]) == 1
