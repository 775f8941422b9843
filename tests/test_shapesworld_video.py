"""ShapesWorld clips (data/shapesworld/video.py): records, balance, files; answers read off decoded pixels."""

import json
import re
from collections import Counter

import numpy as np
import pytest

from data.schema import SchemaError, validate_record
from data.scoring import ScoreContext, aggregate, score_record
from data.shapesworld.generate import split_sizes
from data.shapesworld.scene import COLOURS, SHAPES
from data.shapesworld.video import (
    CHANCE,
    DIRECTIONS,
    VIDEO_INFO_FILE,
    VIDEO_TYPES,
    clip_records,
    encode_mp4,
    events,
    generate_video,
)
from data.video import Sampling, probe_video, read_video
from mm.cli import main

NAMES = list(COLOURS)


def _labels(frames: np.ndarray, background) -> np.ndarray:
    """Per pixel, the index in ``NAMES`` of the palette colour it shows: the nearest among the palette and the
    background grey, and within 40 of it; -1 for background and anything else."""
    palette = np.array([*COLOURS.values(), background], np.float32)
    dist = ((frames[..., None, :].astype(np.float32) - palette) ** 2).sum(-1)
    nearest = dist.argmin(-1)
    near = np.take_along_axis(dist, nearest[..., None], -1)[..., 0] < 40**2
    return np.where(near & (nearest < len(NAMES)), nearest, -1)


def _present(labels: np.ndarray) -> set[str]:
    """The colours one frame shows (5 pixels at least)."""
    counts = np.bincount(labels[labels >= 0], minlength=len(NAMES))
    return {c for c, n in zip(NAMES, counts) if n >= 5}


def _centroid(labels: np.ndarray, colour: str) -> np.ndarray:
    """(row, column) of the colour's pixels in one frame."""
    return np.argwhere(labels == NAMES.index(colour)).mean(0)


def _by_type(records):
    return {r["meta"]["video_type"]: r for r in records}


def test_record_format_determinism_and_balance():
    clip, records = clip_records(0, "train", 12)
    assert [r["id"] for r in records] == [f"vid_train_000012_{q}" for q in range(5)]
    motion = records[0]
    assert set(motion) == {"id", "video", "conversations", "meta"}
    assert motion["video"] == "clips/train/vid_000012.mp4"
    human, gpt = motion["conversations"]
    assert human["from"] == "human" and gpt["from"] == "gpt"
    assert re.fullmatch(r"<video>\n(Which way|In which direction) did the \w+ \w+ move\?", human["value"])
    assert motion["meta"]["task"] == "video" and motion["meta"]["video_type"] == "motion"
    assert motion["meta"]["answer"] == gpt["value"] in DIRECTIONS
    for record in records:
        validate_record(record)
    with pytest.raises(SchemaError, match="1 '<video>' placeholder"):
        validate_record({k: v for k, v in motion.items() if k != "video"})
    assert clip_records(0, "train", 12)[1] == records
    assert clip_records(1, "train", 12)[1] != records
    assert clip_records(0, "val", 12)[1] != records

    answers = {kind: Counter() for kind in VIDEO_TYPES}
    named_first, middle_x, count_kinds = 0, {"left": [], "right": []}, Counter()
    n = 480  # 120 runs of 4 directions, 80 runs of 6 count plans, 240 of 2 orders
    for index in range(n):
        clip, rows = clip_records(0, "train", index)
        by_type = _by_type(rows)
        assert [r["meta"]["video_type"] for r in rows] == list(VIDEO_TYPES)
        for kind, row in by_type.items():
            answers[kind][row["meta"]["answer"]] += 1
        order = by_type["order"]["meta"]
        frames = [o["frame"] for o in order["objects"]]
        # both appear before the middle frame: one frame shows both, so it cannot tell the order
        assert max(frames) < clip.middle and frames[0] != frames[1]
        named_first += order["answer"] == order["objects"][0]["shape"]
        count_kinds[by_type["count"]["meta"]["count_of"]] += 1
        (mover,) = clip.of("move")
        if mover.direction in middle_x:
            middle_x[mover.direction].append(mover.at(clip.middle).cx)
        caption = by_type["caption"]["meta"]
        assert caption["answer"].count(".") == len(caption["events"]) == len(events(clip))
    # balanced exactly: chance is 1/4, 1/3 and 1/2
    assert answers["motion"] == dict.fromkeys(DIRECTIONS, n // 4)
    assert answers["count"] == dict.fromkeys("012", n // 3) and count_kinds == {
        "leave": n // 2,
        "recolour": n // 2,
    }
    assert named_first == n // 2
    assert set(answers["order"]) <= set(SHAPES)
    assert set(answers["state"]) <= set(SHAPES) | set(COLOURS) and set(COLOURS) <= set(answers["state"])
    assert max(answers["state"].values()) / n < 0.2
    assert CHANCE["motion"] == 1 / len(DIRECTIONS) and CHANCE["count"] == 1 / 3 and CHANCE["order"] == 0.5
    # where the mover is at the middle frame does not tell left from right
    left, right = np.array(middle_x["left"]), np.array(middle_x["right"])
    assert abs(left.mean() - right.mean()) < 4 and abs(left.min() - right.min()) < 4
    assert abs(left.max() - right.max()) < 4


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_answers_match_decoded_pixels(tmp_path, codec):
    path = tmp_path / "clip.mp4"
    for index in range(8):
        clip, records = clip_records(3, "val", index)
        rendered = clip.render()
        path.write_bytes(encode_mp4(rendered, 8, codec))
        frames = read_video(path, Sampling(frames=16)).frames
        assert frames.shape == (16, 96, 96, 3)
        labels = _labels(frames, clip.background.colour)
        # the palette survives the codec: in every frame, the colours found are those of the objects drawn
        for f in range(16):
            drawn = [t.at(f) for t in clip.tracks if t.at(f) is not None]
            whole = {o.colour for o in drawn if min(o.box()) >= 0 and max(o.box()) <= 96}
            assert whole <= _present(labels[f]) <= {o.colour for o in drawn}
        meta = {kind: r["meta"] for kind, r in _by_type(records).items()}

        colour = meta["motion"]["object"]["colour"]
        dy, dx = _centroid(labels[-1], colour) - _centroid(labels[0], colour)
        direction = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert direction == meta["motion"]["answer"]
        assert max(abs(dx), abs(dy)) > 0.25 * 96 and min(abs(dx), abs(dy)) < 1

        first_seen = {}
        for obj in meta["order"]["objects"]:
            seen = [f for f in range(16) if obj["colour"] in _present(labels[f])]
            assert seen == list(range(obj["frame"], 16))
            first_seen[obj["shape"]] = seen[0]
        assert min(first_seen, key=first_seen.get) == meta["order"]["answer"]

        # leavers take a colour away, recolourers swap one, and the two appearers add theirs
        start, end = _present(labels[0]), _present(labels[-1])
        recoloured = len(end - start) - 2
        left = len(start - end) - recoloured
        asked = left if meta["count"]["count_of"] == "leave" else recoloured
        assert meta["count"]["answer"] == str(asked)

        state = meta["state"]
        colour, middle = state["object"]["colour"], clip.middle
        clean = _labels(rendered[middle], clip.background.colour)
        assert colour in _present(labels[middle])
        assert np.abs(_centroid(labels[middle], colour) - _centroid(clean, colour)).max() < 1
        (track,) = [t for t in clip.tracks if t.obj.colour == colour]
        assert track.change is None and track.at(0 if state["state"] == "start_colour" else 15) is not None
        assert state["answer"] == (track.obj.shape if state["state"] == "shape" else colour)


def test_generate_is_deterministic_resumable_and_checked(tmp_path, capsys):
    sizes = split_sizes(5, (0.8, 0.1, 0.1))
    info = generate_video(tmp_path / "a", sizes, seed=4, progress=False)
    assert main(["data", "shapesworld-video", str(tmp_path / "b"), "--n", "5", "--seed", "4", "--quiet"]) == 0
    assert '"chance"' in capsys.readouterr().out
    assert info["counts"] == {s: {"clips": sizes[s], "records": 5 * sizes[s]} for s in sizes}
    assert info["chance"] == CHANCE and info["complete"] and info["clips_kept"] == 0
    assert sum(info["answers"]["motion"].values()) == 5
    for split in sizes:
        a, b = ((tmp_path / d / f"{split}.json").read_text() for d in "ab")
        assert a == b
    records = json.loads((tmp_path / "a" / "train.json").read_text())
    assert len(records) == 5 * sizes["train"] and records[0]["id"] == "vid_train_000000_0"
    clips = sorted((tmp_path / "a" / "clips").rglob("*.mp4"))
    assert [c.relative_to(tmp_path / "a").as_posix() for c in clips] == sorted(
        f"clips/{s}/vid_{i:06d}.mp4" for s in sizes for i in range(sizes[s])
    )
    for clip in clips:
        twin = tmp_path / "b" / clip.relative_to(tmp_path / "a")
        first, again = (read_video(p, Sampling(frames=16)) for p in (clip, twin))
        assert first.frames.shape == (16, 96, 96, 3) and first.fps == 8
        assert first.frames[0].tobytes() == again.frames[0].tobytes()
        assert clip.read_bytes() == twin.read_bytes()

    stamps = {c: c.stat().st_mtime_ns for c in clips}
    clips[0].unlink()
    again = generate_video(tmp_path / "a", sizes, seed=4, progress=False)
    assert again["clips_kept"] == 4 and again["counts"] == info["counts"]
    assert all(c.stat().st_mtime_ns == stamps[c] for c in clips[1:])
    assert clips[0].read_bytes() == (tmp_path / "b" / clips[0].relative_to(tmp_path / "a")).read_bytes()
    with pytest.raises(ValueError, match="made with .*'frames': 16.* not .*'frames': 12"):
        generate_video(tmp_path / "a", sizes, seed=4, frames=12, progress=False)
    assert json.loads((tmp_path / "a" / VIDEO_INFO_FILE).read_text())["frames"] == 16


def test_frames_and_size_are_settings(tmp_path):
    clip, records = clip_records(0, "test", 0, frames=8, image_size=128)
    path = tmp_path / "c.mp4"
    path.write_bytes(encode_mp4(clip.render(), 4))
    info = probe_video(path)
    assert (info.num_frames, info.width, info.height, info.fps) == (8, 128, 128, 4)
    assert read_video(path, Sampling(frames=8)).frames.shape == (8, 128, 128, 3)
    frames = [o["frame"] for o in _by_type(records)["order"]["meta"]["objects"]]
    assert max(frames) < 4
    with pytest.raises(ValueError, match="frames must be an integer >= 8, got 4"):
        clip_records(0, "test", 0, frames=4)
    with pytest.raises(ValueError, match="image_size must be an even integer >= 96 .* got 97"):
        generate_video(tmp_path / "x", 1, image_size=97, progress=False)
    with pytest.raises(ValueError, match="fps must be a number in"):
        generate_video(tmp_path / "x", 1, fps=0, progress=False)
    with pytest.raises(ValueError, match="n_clips must be a non-negative integer"):
        generate_video(tmp_path / "x", -1, progress=False)
    with pytest.raises(ValueError, match="n_clips: non-negative integers per split"):
        generate_video(tmp_path / "x", {"dev": 2}, progress=False)
    assert not (tmp_path / "x").exists()


def test_scoring_breaks_down_by_type_and_recalls_caption_events():
    _, records = clip_records(0, "test", 1)
    ctx = ScoreContext()
    right = [score_record(r, r["meta"]["answer"], ctx) for r in records]
    metrics = aggregate(right)
    assert metrics["video_exact_match"] == 1.0 and metrics["video_caption_event_recall"] == 1.0
    assert metrics["video_by_type"] == dict.fromkeys(sorted(VIDEO_TYPES), 1.0)
    caption = _by_type(records)["caption"]
    found = caption["meta"]["events"]
    partial = "The " + found[0] + ". Nothing else."
    rows = [score_record(r, "up" if r is not caption else partial, ctx) for r in records]
    metrics = aggregate(rows)
    assert metrics["video_caption_event_recall"] == pytest.approx(1 / len(found))
    assert metrics["video_by_type"]["caption"] == 0.0
    motion = _by_type(records)["motion"]["meta"]["answer"]
    assert metrics["video_by_type"]["motion"] == float(motion == "up")
    assert metrics["counts"] == {"video": 5}
