"""The Gradio demo (demo/app.py): bundled examples, box drawing, the chat handler on a real engine, and the
server's safety: local bind, no file outside the allowed folders, upload size and type limits, the page shown
when the model does not load."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from demo_helpers import (
    GROUND_ANSWER,
    GROUND_QUESTION,
    free_port,
    ground_example,
    listening_addresses,
    make_box_model,
    start_demo,
    stop_demo,
)
from PIL import Image

from data.boxes import parse_boxes
from demo import app as demo_app
from demo.shapes_examples import EXAMPLES_DIR, example_records, load_examples

MAGENTA = demo_app.BOX_COLOURS[0]
# gradio's queue calls pandas with deprecated options after every request (gradio/queueing.py): its warnings,
# not ours; hidden by default in ``mm demo``, shown by pytest
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")


# -- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def box_model(tmp_path_factory):
    return make_box_model(tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture(scope="module")
def engine(box_model):
    from mm.inference import Engine

    engine = Engine.load(box_model, device="cpu")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    """The demo app on ``engine``, launched in this process with the CLI's launch settings."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("uploads")))
        mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        app = demo_app.build_app(engine, model_dir="tiny")
        app.queue(default_concurrency_limit=4)
        port = free_port()
        app.launch(**demo_app.launch_kwargs(port=port), prevent_thread_lock=True, quiet=True)
        yield f"http://127.0.0.1:{port}"
        app.close(verbose=False)


# -- examples and drawing -------------------------------------------------------------------------------
def test_bundled_examples_are_small_shapesworld_scenes_that_regenerate_identically():
    examples = load_examples()
    assert [e["task"] for e in examples] == ["ground", "caption", "qa", "describe"]
    files = sorted(EXAMPLES_DIR.glob("*.png"))
    assert len(files) == 4 and all(f.stat().st_size < 5_000 for f in files)
    for (name, data, record), bundled in zip(example_records(), examples):
        assert bundled["question"] == record["question"] and bundled["answer"] == record["answer"]
        regenerated, on_disk = Image.open(io.BytesIO(data)), Image.open(bundled["image"])
        assert Path(bundled["image"]).name == name
        assert (on_disk.mode, on_disk.size) == (regenerated.mode, regenerated.size) == ("RGB", (96, 96))
        assert on_disk.tobytes() == regenerated.tobytes()
    truth = ground_example()
    assert parse_boxes(truth["answer"], (96, 96)) == parse_boxes(GROUND_ANSWER, (96, 96))


def test_display_image_enlarges_and_draws_each_box_in_its_colour():
    image = Image.new("RGB", (96, 64), (200, 200, 200))
    shown = demo_app.display_image(image, [(10, 10, 40, 30), (50, 20, 90, 60)])
    assert shown.size == (384, 256)  # 4x: the longer side reaches DISPLAY_MIN_SIDE
    pixels = shown.load()
    assert pixels[10 * 4, 20 * 4] == MAGENTA  # left edge of box 1
    assert pixels[90 * 4 - 1, 40 * 4] == demo_app.BOX_COLOURS[1]  # right edge of box 2
    assert pixels[25 * 4, 20 * 4] == (200, 200, 200)  # inside box 1: not filled
    assert demo_app.display_image(image).getcolors() == [(384 * 256, (200, 200, 200))]  # no box, no ink


def test_uploads_other_than_images_and_videos_are_refused_by_name(tmp_path):
    assert demo_app.accepted_file_types() == ["image", ".mp4", ".webm", ".mkv", ".avi", ".mov"]
    assert [demo_app.media_kind(f"a{s}").name for s in (".png", ".JPG", ".mp4", ".MOV", ".mkv")] == [
        "image",
        "image",
        "video",
        "video",
        "video",
    ]
    for name in ("notes.txt", "clip.flv", "clip.mpg"):  # .flv / .mpg are videos, but not ones the box takes
        with pytest.raises(ValueError, match=rf"^{name}: not a supported upload \(image, video only\)$"):
            demo_app.load_media([str(tmp_path / name)])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"^broken\.png: ") as err:
        demo_app.load_media([str(broken)])
    assert str(tmp_path) not in str(err.value)  # the server's folders stay private


# -- the chat handler on a real engine ------------------------------------------------------------------
def test_chat_streams_the_answer_draws_its_box_and_keeps_the_conversation(engine):
    import gradio as gr

    chat = demo_app.chat_fn(engine)
    example = ground_example()
    message = {"text": GROUND_QUESTION, "files": [example["image"]]}
    steps, texts = [], []
    for step in chat(message, [], None, 64, 0, 1, 0):  # the chat is sent after each step: read it then
        steps.append(step)
        texts.append(step[0][-1]["content"])
    assert texts[0] == "" and texts[-1] == GROUND_ANSWER
    partial = texts[1:-1]
    assert len(partial) >= 5 and all(GROUND_ANSWER.startswith(t) for t in partial)  # streamed, in order
    history, textbox, shown, stats, conversation = steps[-1]
    assert history[0]["content"] == {"path": example["image"]}
    assert history[1] == {"role": "user", "content": GROUND_QUESTION}
    assert textbox.interactive is True and steps[0][1].interactive is False  # locked while answering
    assert re.search(r"\*\*[\d.]+ tokens/s\*\* \(\d+ tokens in", stats)
    assert f"{engine.processor.tokens_per_image} visual tokens" in stats and "KV cache" in stats
    assert "1 box drawn" in stats
    # the box is drawn where the answer puts it, on the image enlarged 4x
    x0, y0, x1, y1 = (round(v * 4) for v in parse_boxes(GROUND_ANSWER, (96, 96))[0])
    assert shown.size == (384, 384) and shown.getpixel((x0, (y0 + y1) // 2)) == MAGENTA
    assert conversation.turns[-1] == {"from": "gpt", "value": GROUND_ANSWER}
    # a follow-up without an image keeps talking about the same image
    follow = list(
        chat({"text": "Where is the yellow object?", "files": []}, history, conversation, 8, 0, 1, 0)
    )
    assert len(follow[-1][4].turns) == 4 and len(follow[-1][4].images) == 1
    assert follow[-1][2] is not None  # the image stays beside the chat
    # an empty chat (cleared, or an API call without history) starts a new conversation
    fresh = list(chat(message, [], follow[-1][4], 64, 0, 1, 0))
    assert fresh[-1][0][-1]["content"] == GROUND_ANSWER and len(fresh[-1][4].turns) == 2
    with pytest.raises(gr.Error, match="empty prompt"):
        next(chat({"text": "  ", "files": [example["image"]]}, [], None, 8, 0, 1, 0))


VIDEO_SIDE = 32


def write_clip(path: Path, frames: int = 8) -> str:
    """A tiny mp4 whose frame i is grey level 20 + 25 i."""
    from data.shapesworld.video import encode_mp4

    levels = 20 + 25 * np.arange(frames, dtype=np.uint8)
    pixels = np.broadcast_to(levels[:, None, None, None], (frames, VIDEO_SIDE, VIDEO_SIDE, 3))
    path.write_bytes(encode_mp4(np.ascontiguousarray(pixels), fps=8))
    return str(path)


def test_chat_takes_videos_alone_and_beside_images_and_reports_their_tokens(engine, tmp_path):
    import gradio as gr

    proc = engine.processor
    chat = demo_app.chat_fn(engine)
    clip = write_clip(tmp_path / "clip.mp4")
    *_, (history, textbox, shown, stats, conversation) = chat(
        {"text": "What happens?", "files": [clip]}, [], None, 4, 0, 1, 0
    )
    assert history[0] == {"role": "user", "content": {"path": clip}}  # the chat shows the video
    assert history[1] == {"role": "user", "content": "What happens?"} and history[2]["role"] == "assistant"
    assert conversation.turns[0] == {"from": "human", "value": "<video>\nWhat happens?"}
    # the engine got the frames the model's data.video settings sample, decoded once by the demo
    (frames,) = conversation.videos
    assert frames.dtype == np.uint8 and frames.shape[0] == proc.video.frames_per_video
    assert frames.shape[1:] == (VIDEO_SIDE, VIDEO_SIDE, 3)
    means = frames.mean(axis=(1, 2, 3))
    assert means[0] < 40 and means[-1] > 170 and np.all(np.diff(means) >= -2)  # in time order, dark to light
    ids = proc(conversation.turns[:1], [], videos=[clip], for_generation=True)["input_ids"]
    ids = list(np.asarray(ids).reshape(-1))
    video_tokens = ids.count(proc.video_token_id)
    assert video_tokens > 0 and ids.count(proc.image_token_id) == 0
    assert f" {video_tokens} visual tokens of {len(ids)} in the prompt (video: {video_tokens}) · " in stats
    assert shown is None and textbox.interactive is True  # no image to draw boxes on
    # an image and a video in one message: both placeholders, both counted, the image beside the chat
    image = ground_example()["image"]
    *_, (history, _, shown, stats, conversation) = chat(
        {"text": "Compare them.", "files": [image, clip]}, [], None, 4, 0, 1, 0
    )
    assert [h["content"] for h in history[:2]] == [{"path": image}, {"path": clip}]
    assert conversation.turns[0]["value"] == "<image>\n<video>\nCompare them."
    assert len(conversation.images) == 1 and len(conversation.videos) == 1 and shown.size == (384, 384)
    both = proc.tokens_per_image + video_tokens
    assert f" {both} visual tokens of " in stats and f"(video: {video_tokens})" in stats
    # a corrupt mp4: a clear error naming the file (not the server's folder), nothing kept; the chat goes on
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    with pytest.raises(gr.Error) as err:
        next(chat({"text": "And this?", "files": [str(broken)]}, history, conversation, 4, 0, 1, 0))
    assert err.value.message.startswith(
        "broken.mp4: not a readable video (corrupt, truncated or not a video)"
    )
    assert err.value.title == "Cannot ask that" and str(tmp_path) not in err.value.message
    assert len(conversation.turns) == 2 and len(conversation.videos) == 1
    *_, (after, _, _, stats, conversation) = chat(
        {"text": "And now?", "files": [clip]}, history, conversation, 4, 0, 1, 0
    )
    assert len(after) == len(history) + 3 and len(conversation.turns) == 4 and len(conversation.videos) == 2
    assert f"(video: {2 * video_tokens})" in stats
    # a type the box does not take is refused by the handler as well, by name
    with pytest.raises(gr.Error) as err:
        next(chat({"text": "This?", "files": [str(tmp_path / "clip.flv")]}, [], None, 4, 0, 1, 0))
    assert err.value.message == "clip.flv: not a supported upload (image, video only)"


# -- the server: what it refuses ------------------------------------------------------------------------
def test_defaults_bind_locally_without_share_link_and_limit_uploads():
    from mm.cli import build_parser

    kwargs = demo_app.launch_kwargs()
    assert kwargs["server_name"] == "127.0.0.1" and kwargs["share"] is False
    assert kwargs["max_file_size"] == "10mb"
    assert kwargs["allowed_paths"] == [str(EXAMPLES_DIR)]
    args = build_parser().parse_args(["demo"])
    assert (args.host, args.port, args.model, args.max_file_size) == ("127.0.0.1", 7860, None, "10mb")


def test_files_outside_the_allowed_folders_are_refused(server):
    inside = ground_example()["image"]
    got = httpx.get(f"{server}/gradio_api/file={inside}")
    assert got.status_code == 200 and got.content == Path(inside).read_bytes()  # the examples are served
    for path in ("/etc/passwd", str(Path(demo_app.__file__)), f"{EXAMPLES_DIR}/../app.py"):
        got = httpx.get(f"{server}/gradio_api/file={path}")
        assert got.status_code == 403, path
        assert "File not allowed" in got.text and "root:" not in got.text
    got = httpx.get(f"{server}/gradio_api/file=https://example.com/a.png")
    assert got.status_code == 403 and got.text == demo_app.REMOTE_REFUSED  # no fetching for clients either


def test_oversized_upload_is_refused(server):
    big = b"\x89PNG\r\n\x1a\n" + bytes(10 * 1024 * 1024)  # just over the 10 MB default
    got = httpx.post(f"{server}/gradio_api/upload", files={"files": ("big.png", big, "image/png")})
    assert got.status_code == 413 and "maximum allowed size" in got.text
    small = Path(ground_example()["image"]).read_bytes()
    got = httpx.post(f"{server}/gradio_api/upload", files={"files": ("ok.png", small, "image/png")})
    assert got.status_code == 200 and Path(got.json()[0]).read_bytes() == small


def test_chat_api_refuses_other_file_types_and_streams_answers(server, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server, verbose=False, download_files=False)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(AppError, match="Invalid file type"):
        client.predict(
            {"text": "Read this", "files": [handle_file(notes)]}, [], 16, 0, 1, 0, api_name="/chat"
        )
    message = {"text": GROUND_QUESTION, "files": [handle_file(ground_example()["image"])]}
    job = client.submit(message, [], 64, 0, 1, 0, api_name="/chat")
    history = job.result(timeout=60)[0]
    assert history[-1]["content"][0]["text"] == GROUND_ANSWER
    assert len(job.outputs()) > 5  # one update per streamed piece
    # the same session asking again without history gets the same greedy answer (a new conversation)
    again = client.predict(message, [], 64, 0, 1, 0, api_name="/chat")[0]
    assert again[-1]["content"][0]["text"] == GROUND_ANSWER and len(again) == 3


def test_chat_api_takes_video_files_of_the_listed_types_only(server, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server, verbose=False, download_files=False)
    clip = write_clip(tmp_path / "clip.mp4")
    history, *_, stats = client.predict(
        {"text": "What happens?", "files": [handle_file(clip)]}, [], 4, 0, 1, 0, api_name="/chat"
    )[:4]
    assert history[0]["content"][0]["file"]["path"].endswith("clip.mp4")  # uploaded and shown in the chat
    assert re.search(r"in the prompt \(video: [1-9]\d*\) · ", stats)
    flv = tmp_path / "clip.flv"
    flv.write_bytes(Path(clip).read_bytes())
    with pytest.raises(AppError, match="Invalid file type"):
        client.predict({"text": "And this?", "files": [handle_file(flv)]}, [], 4, 0, 1, 0, api_name="/chat")


def test_missing_model_serves_a_clear_error_page_on_localhost(tmp_path):
    """``mm demo`` with no --model in a folder without a quickstart: the page says what is missing and what
    to run; the server listens on 127.0.0.1 only and removes its upload folder when stopped."""
    port = free_port()
    proc, url, lines = start_demo("--port", str(port), cwd=tmp_path)
    try:
        assert url == f"http://127.0.0.1:{port}"
        assert listening_addresses(port) == {"127.0.0.1"}
        assert any("cannot load the model in quickstart/run/model" in line for line in lines)
        config = httpx.get(f"{url}/config").json()
        texts = [c["props"].get("value") for c in config["components"] if c.get("type") == "markdown"]
        page = next(t for t in texts if t and "could not load its model" in t)
        assert "Model directory: `quickstart/run/model`" in page
        assert "not a model directory" in page and "mm quickstart" in page and "Traceback" not in page
        assert httpx.get(url).status_code == 200
        uploads = Path(next(m.group(1) for x in lines if (m := re.search(r"kept in (\S+)", x))))
        assert uploads.is_dir()
    finally:
        code = stop_demo(proc)
    assert code == 0 and not uploads.exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
