"""Videos in the model: <video> expansion, frames through the experts with the images, VideoGPT+ pooling,
positions, the middle-frame baseline, schema errors and bad files skipped (issue 14, model side)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import solid_image

from data.dataset import Collator, ConversationDataset
from data.media import MediaPaths
from data.schema import SchemaError, validate_record
from data.shapesworld.video import encode_mp4
from data.video_frames import VideoSettings, fit_frames, load_frames
from mm.build import load_vlm, save_vlm
from mm.inference import Assistant, Engine, Request
from mm.model import VLM, VLMConfig
from mm.positions import build_position_ids, visual_offsets
from mm.video import VideoPooling, pool_video, video_layout, video_tokens

W = H = 32


def _frame(i: int) -> np.ndarray:
    """Frame ``i``: its index in binary as 4 black/white stripes on top (readable after the codec)."""
    pixels = np.full((H, W, 3), 90, np.uint8)
    for bit in range(4):
        pixels[: H // 2, bit * 8 : bit * 8 + 8] = 255 * ((i >> bit) & 1)
    return pixels


def _frame_id(pixels: np.ndarray) -> int:
    top = pixels[: pixels.shape[0] // 2].mean(axis=(0, 2))
    stripe = pixels.shape[1] / 4
    return sum(1 << bit for bit in range(4) if top[int((bit + 0.5) * stripe)] > 170)


def _write(path, frames: int):
    """A tiny mp4 whose frame i shows i."""
    path.write_bytes(encode_mp4(np.stack([_frame(i) for i in range(frames)]), fps=8))
    return path


def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _clip(seed: int = 0, frames: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (frames, 40, 48, 3), dtype=np.uint8)


# -- pooling, token counts ---------------------------------------------------------------------------
def test_pooling_on_a_hand_computed_example():
    # one video of 5 frames, one 2x3 grid and one 1x1 grid (two experts' segments), 1 channel:
    # frame f holds 10 f + [[0, 1, 2], [3, 4, 5]] and 10 f + 6
    grid = torch.arange(7.0)
    frames = torch.stack([grid + 10 * f for f in range(5)]).reshape(1, 5, 7, 1)
    out = pool_video(frames, [(2, 3), (1, 1)], VideoPooling(segments=2, spatial_pool=2))
    # spatial 2x2 windows: [0,1,3,4] -> 2, [2,5] (the partial edge window) -> 3.5, the 1x1 grid -> 6;
    # segment 0 = frames 0-1 (mean 10 f = 5), segment 1 = frames 2-4 (mean 30)
    assert out.shape == (1, 6, 1)
    assert out.flatten().tolist() == [7.0, 8.5, 11.0, 32.0, 33.5, 36.0]
    assert video_tokens([(2, 3), (1, 1)], VideoPooling(segments=2, spatial_pool=2)) == 6
    with pytest.raises(ValueError, match="a video of 1 frame.*cannot fill 2 segments"):
        pool_video(frames[:, :1], [(2, 3), (1, 1)], VideoPooling(segments=2, spatial_pool=2))


def test_token_count_per_video_equals_the_models_output(tiny_vlm):
    model, processor = tiny_vlm
    h, w = model.fusion.layout[0]
    assert processor.tokens_per_video == model.tokens_per_video == 4 * -(-h // 2) * -(-w // 2)
    conv = _turns("<image>\n<video>\nWhat moved?", "red")
    features = processor(conv, [solid_image()], videos=[_clip()])
    ids = torch.tensor(features["input_ids"])
    assert int((ids == processor.video_token_id).sum()) == model.tokens_per_video
    assert features["video_values"]["main"].shape == (1, 16, 3, 64, 64)  # 7 frames fitted to 4 x 4
    batch = processor.collate([features])
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["pixel_values"])
        frames = model.encode_images(batch["pixel_values"]["video:main"][0])  # the 16 frames as images
        image = model.encode_images(batch["pixel_values"]["main"])
    pooled = pool_video(frames[None], model.fusion.layout, model.video_pooling)[0]
    assert pooled.shape == (model.tokens_per_video, embeds.shape[-1])
    at_video = embeds[0][batch["input_ids"][0] == processor.video_token_id]
    at_image = embeds[0][batch["input_ids"][0] == processor.image_token_id]
    torch.testing.assert_close(at_video, pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(at_image, image[0], rtol=1e-5, atol=1e-5)
    counts = processor.token_counts(batch["input_ids"], batch["attention_mask"])
    assert counts == {"image": model.tokens_per_image, "video": model.tokens_per_video}


def test_tokens_per_video_follows_the_config_without_running_the_model(tiny_model):
    config = VLMConfig(**{**tiny_model.config.to_dict(), "video": {"segments": 2, "spatial_pool": 3}})
    model = VLM(config).eval()
    (h, w) = model.fusion.layout[0]  # 4x4 -> 2x2 at pool 3 (partial windows at the edges)
    assert model.tokens_per_video == 2 * 2 * 2 == video_tokens([(h, w)], VideoPooling(2, 3))
    frames = torch.zeros(1, 6, 3, 64, 64, dtype=torch.uint8)
    with torch.no_grad():
        visual = model.encode_images(frames[0])
    assert pool_video(visual[None], model.fusion.layout, model.video_pooling).shape[1] == 8


# -- training and generation with an image and a video ---------------------------------------------------
def test_an_image_and_a_video_train_a_step_and_generate(tiny_vlm):
    model, processor = tiny_vlm
    mixed = processor(
        _turns("<image>\nThen <video>\nWhich way did it move?", "left"), [solid_image()], videos=[_clip()]
    )
    only_image = processor(_turns("<image>\nWhat colour?", "red"), [solid_image()])
    batch = processor.collate([mixed, only_image])
    assert batch["image_deltas"].shape == (2, 2)  # row 0: an image block and a video block
    model.train()
    model.experts.eval()
    try:
        out = model(**batch)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        grads = [p.grad for p in model.fusion.parameters() if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    # the video reaches the loss: the same row with white instead of black frames
    losses = []
    for value in (0, 255):
        clip = np.full((5, 40, 48, 3), value, np.uint8)
        row = processor(_turns("<image>\nThen <video>\nWhich way?", "left"), [solid_image()], videos=[clip])
        with torch.no_grad():
            losses.append(float(model(**processor.collate([row])).loss))
    assert abs(losses[0] - losses[1]) > 1e-4
    engine = Engine(model, processor)
    question = _turns("<image>\n<video>\nWhich way?", "x")[:1]
    answer = engine.generate([Request(question, [solid_image()], videos=[_clip()])])[0]
    assert answer.new_tokens > 0
    assert (answer.image_tokens, answer.video_tokens) == (model.tokens_per_image, model.tokens_per_video)
    assert answer.visual_tokens == model.tokens_per_image + model.tokens_per_video


def test_video_settings_survive_save_and_load_and_chat_takes_a_video_file(tiny_vlm, tmp_path):
    model, processor = tiny_vlm
    saved = processor.video
    processor.video = VideoSettings(mode="uniform", frames=8, middle_frame=True)
    try:
        save_vlm(model, processor, tmp_path / "model")
    finally:
        processor.video = saved
    _, loaded = load_vlm(tmp_path / "model")
    assert loaded.video == VideoSettings(mode="uniform", frames=8, middle_frame=True)
    assert (loaded.tokens_per_video, loaded.video_offsets) == (
        processor.tokens_per_video,
        processor.video_offsets,
    )
    assistant = Assistant(tmp_path / "model", device="cpu")
    clip = _write(tmp_path / "clip.mp4", 9)
    answer = assistant.ask("What moved?", videos=[clip], max_new_tokens=2)
    assert isinstance(answer, str)
    assert assistant.conversation.turns[0]["value"] == "<video>\nWhat moved?"
    assert assistant.conversation.videos[0].shape == (8, H, W, 3)  # decoded once, as the model takes it


# -- frames ---------------------------------------------------------------------------------------------
def test_middle_frame_baseline_takes_the_middle_frame(tmp_path):
    clip = _write(tmp_path / "clip.mp4", 15)
    frames = load_frames(clip, VideoSettings())  # 4 segments x 4 frames of 15
    # segments [0,3) [3,7) [7,11) [11,15) give all 15 frames; slot j of 16 takes frame floor(15 j / 16)
    assert [_frame_id(f) for f in frames] == [0, 0, *range(1, 15)]
    middle = load_frames(clip, VideoSettings(middle_frame=True))
    assert middle.shape == (16, H, W, 3)
    assert [_frame_id(f) for f in middle] == [7] * 16  # floor(15 / 2), in every slot
    assert [int(x) for x in fit_frames(np.arange(3)[:, None, None, None], 8).flatten()] == [
        0,
        0,
        0,
        1,
        1,
        1,
        2,
        2,
    ]


# -- records ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "record, message",
    [
        (
            {"id": "a", "video": ["x.mp4", "y.mp4"], "conversations": _turns("<video>\nWhat?", "no")},
            "record 3 (id 'a'): conversations: 1 '<video>' placeholder(s) but 2 video(s); they must match",
        ),
        (
            {"id": "b", "conversations": _turns("<video>\nWhat?", "no")},
            "conversations: 1 '<video>' placeholder(s) but 0 video(s); they must match",
        ),
        (
            {"id": "c", "video": 5, "conversations": _turns("<video>\nWhat?", "no")},
            "record 3 (id 'c'): video: expected a string or a list of strings, got int",
        ),
        (
            {"id": "d", "video": ["x.mp4", ""], "conversations": _turns("<video><video>?", "no")},
            "video[1]: expected a non-empty string, got ''",
        ),
    ],
)
def test_schema_errors_name_the_video_field(record, message):
    with pytest.raises(SchemaError) as err:
        validate_record(record, index=3, source="clips.json")
    assert message in str(err.value)
    assert str(err.value).startswith("clips.json: record 3")


def test_a_record_with_an_image_and_videos_is_valid():
    validate_record(
        {
            "id": "v",
            "image": "a.png",
            "video": ["x.mp4", "y.mp4"],
            "conversations": _turns("<video> then <image> then <video>: same?", "yes"),
        }
    )


def test_a_corrupt_video_is_skipped_with_a_reason_naming_the_file(tiny_processor, tmp_path):
    _write(tmp_path / "good.mp4", 9)
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    records = [
        {"id": "good", "video": "good.mp4", "conversations": _turns("<video>\nWhat?", "a")},
        {"id": "bad", "video": "bad.mp4", "conversations": _turns("<video>\nWhat?", "b")},
        {"id": "out", "video": "../elsewhere.mp4", "conversations": _turns("<video>\nWhat?", "c")},
    ]
    dataset = ConversationDataset(records, tiny_processor, MediaPaths(tmp_path), progress=False)
    batch = Collator(tiny_processor)([dataset[i] for i in range(3)])
    assert batch["ids"] == ["good"]
    assert batch["pixel_values"]["video:main"].shape == (1, 16, 3, 64, 64)
    bad, refused = batch["skipped"]
    assert (bad.index, bad.id, bad.path) == (1, "bad", str(tmp_path / "bad.mp4"))
    assert "not a readable video" in bad.reason
    assert (refused.id, refused.path) == ("out", "../elsewhere.mp4") and "refused" in refused.reason
    json.dumps(bad.__dict__)  # a skip is written to skipped.jsonl


# -- positions -------------------------------------------------------------------------------------------
def test_v2pe_positions_of_a_video_block_follow_the_rule():
    text, image, video = 5, 7, 8
    ids = torch.tensor([[text, image, image, image, image, text, video, video, video, video, text]])
    offsets = visual_offsets("original", [(2, 2)])  # 1, 2, 3, 4
    vid_offsets = visual_offsets("share_by_row", video_layout([(2, 4)], VideoPooling(2, 2)))  # 1, 1, 2, 2
    assert vid_offsets == [1, 1, 2, 2]
    got = build_position_ids(
        ids,
        torch.ones_like(ids),
        image,
        offsets,
        torch.tensor([[0.5, 0.25]], dtype=torch.float64),
        video_token_id=video,
        video_offsets=vid_offsets,
    )
    # image at 0 + 0.5 k, text resumes at ceil(2) + 1; the video at 3 + 0.25 * offset, text at ceil(3.5) + 1
    assert got[0].tolist() == [0, 0.5, 1, 1.5, 2, 3, 3.25, 3.25, 3.5, 3.5, 5]
    swapped = torch.tensor([[text, video, video, video, video, image, image, image, image, text]])
    got = build_position_ids(
        swapped,
        torch.ones_like(swapped),
        image,
        offsets,
        torch.tensor([[0.25, 0.5]], dtype=torch.float64),  # deltas follow the blocks' order
        video_token_id=video,
        video_offsets=vid_offsets,
    )
    assert got[0].tolist() == [0, 0.25, 0.25, 0.5, 0.5, 1.5, 2, 2.5, 3, 4]


def test_model_positions_place_a_video_as_one_block(tiny_vlm):
    model, processor = tiny_vlm
    features = processor(_turns("<video>\n<image>\nSame?", "no"), [solid_image()], videos=[_clip()])
    batch = processor.collate([features])
    batch["image_deltas"] = torch.tensor([[0.5, 1.0]], dtype=torch.float64)
    ids = batch["input_ids"][0]
    pos = model.position_ids_for(
        batch["input_ids"], batch["attention_mask"], image_deltas=batch["image_deltas"]
    )[0]
    at_video = pos[ids == processor.video_token_id]
    first = int(torch.nonzero(ids == processor.video_token_id)[0])
    start = float(pos[first - 1])
    expected = [start + 0.5 * o for o in model.video_offsets]  # original: 1..T
    assert at_video.tolist() == expected and model.video_offsets == list(range(1, model.tokens_per_video + 1))
    after = int(torch.nonzero(ids == processor.image_token_id)[0])
    assert float(pos[after - 1]) == np.ceil(expected[-1]) + 1  # the text between: after V2PE's ceil


def test_evaluation_scores_video_records_and_skips_a_bad_file(tiny_vlm, tmp_path):
    from mm.evaluate import evaluate

    model, processor = tiny_vlm
    _write(tmp_path / "good.mp4", 9)
    (tmp_path / "bad.mp4").write_bytes(b"not a video at all")
    meta = {"task": "video", "video_type": "motion", "answer": "left"}
    records = [
        {
            "id": "g",
            "video": "good.mp4",
            "conversations": _turns("<video>\nWhich way?", "left"),
            "meta": meta,
        },
        {"id": "b", "video": "bad.mp4", "conversations": _turns("<video>\nWhich way?", "left"), "meta": meta},
    ]
    metrics, rows = evaluate(Engine(model, processor), records, MediaPaths(tmp_path), progress=False)
    assert (metrics["scored"], metrics["skipped"]) == (1, 1)
    assert set(metrics["video_by_type"]) == {"motion"} and "video_exact_match" in metrics
    assert (metrics["image_tokens"], metrics["video_tokens"]) == (0, model.tokens_per_video)
    assert rows[0]["video"] == "good.mp4" and rows[0]["video_type"] == "motion"
    assert rows[1]["path"] == str(tmp_path / "bad.mp4") and "not a readable video" in rows[1]["skipped"]
