"""The Gradio chat demo: ``mm demo --model DIR`` (or ``python -m demo.app``).

One process, one ``mm.inference.Engine`` shared by every browser session: the engine batches the questions
that arrive together, so there is no controller / worker split (LLaVA's) to keep alive. Each session keeps its
own ``Conversation`` in a ``gr.State``. Answers stream token by token; boxes in an answer are parsed in the
model's own box format and drawn on the image beside the chat.

Safe by default: it listens on 127.0.0.1, never opens a share link, accepts only image and video uploads
(mp4, webm, mkv, avi, mov) up to a size limit, keeps uploads in a private temporary folder that is deleted on
exit, and serves no file outside that folder and the bundled examples (nor proxies remote URLs). A model
directory that is missing or does not load gives a page that says so, not a stack trace.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from data.media import load_image

from .shapes_examples import EXAMPLES_DIR, load_examples

log = logging.getLogger("mm.demo")

# Where ``mm quickstart`` (default ``--out quickstart``) exports its model: ``run_quickstart`` trains in
# ``OUT/run`` and the trainer exports to ``output_dir/model``.
QUICKSTART_MODEL = Path("quickstart") / "run" / "model"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_CONCURRENCY = 8
DEFAULT_MAX_FILE_SIZE = "10mb"
MAX_PIXELS = 40_000_000  # refuse decompression bombs well before the model's resize
DISPLAY_MIN_SIDE = 384  # small images (ShapesWorld is 96 px) are enlarged so the drawn boxes are visible
BOX_COLOURS = ((255, 0, 255), (0, 255, 255), (255, 255, 0), (0, 255, 0))  # none is a ShapesWorld colour
REMOTE_REFUSED = "remote URLs are not served by this demo"


# -- media kinds ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MediaKind:
    """One kind of upload: what the upload box accepts (Gradio's ``file_types``: a MIME category such as
    ``"image"`` or a suffix such as ``".mp4"``) and how a file becomes model input (``load(path, processor)``;
    with no processor a video stays a path, decoded by the engine)."""

    name: str
    file_types: tuple[str, ...]
    load: Callable[[str, Any], Any]

    def accepts(self, path: str) -> bool:
        """Gradio's own test of an upload against ``file_types``, so the box and the handler agree."""
        from gradio_client.utils import is_valid_file

        return is_valid_file(path, list(self.file_types))


def _load_video(path: str, processor: Any) -> Any:
    """The model's frames (its saved ``data.video`` sampling, shrunk while decoding), decoded once here so a
    bad file is refused before the question is shown; the path itself when there is no processor."""
    return path if processor is None else processor.load_video(path)


MEDIA_KINDS = {
    "image": MediaKind("image", ("image",), lambda path, _: load_image(path, max_pixels=MAX_PIXELS)),
    "video": MediaKind("video", (".mp4", ".webm", ".mkv", ".avi", ".mov"), _load_video),
}


def accepted_file_types() -> list[str]:
    return [t for kind in MEDIA_KINDS.values() for t in kind.file_types]


def media_kind(path: str) -> MediaKind:
    """The kind of an uploaded file by its name; ``ValueError`` for one the demo does not take."""
    for kind in MEDIA_KINDS.values():
        if kind.accepts(path):
            return kind
    raise ValueError(f"{Path(path).name}: not a supported upload ({', '.join(MEDIA_KINDS)} only)")


def load_media(paths: Sequence[str], processor: Any = None) -> tuple[list[Image.Image], list[Any]]:
    """Decode the uploads of one question, in order: ``(images, videos)``; a bad file's error names it, not
    the server's path."""
    loaded: dict[str, list[Any]] = {name: [] for name in MEDIA_KINDS}
    for path in paths:
        kind = media_kind(path)
        try:
            loaded[kind.name].append(kind.load(path, processor))
        except ValueError as err:  # MediaError: the reason, without the server's folder (a decoder names it)
            name, reason = Path(path).name, str(getattr(err, "reason", err))
            reason = reason.replace(str(path), name).replace(str(Path(path).parent), "…")
            raise ValueError(f"{name}: {reason}") from None
    return loaded["image"], loaded["video"]


# -- what is shown ----------------------------------------------------------------------------------------
def display_image(image: Image.Image, boxes: Sequence[Sequence[float]] = ()) -> Image.Image:
    """A copy of ``image`` for the panel beside the chat, enlarged if small, with ``boxes`` (pixels of the
    original) drawn as numbered rectangles."""
    scale = max(1.0, DISPLAY_MIN_SIDE / max(image.size))
    shown = image.convert("RGB")
    if scale > 1:
        size = (round(image.width * scale), round(image.height * scale))
        shown = shown.resize(size, Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(shown)
    width = max(2, round(max(shown.size) / 150))
    font = ImageFont.load_default(size=max(12, round(max(shown.size) / 24)))
    for i, box in enumerate(boxes):
        colour = BOX_COLOURS[i % len(BOX_COLOURS)]
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        label = str(i + 1)  # above the box where there is room, else inside it
        _, top, _, bottom = draw.textbbox((0, 0), label, font=font)
        y = y0 - (bottom - top) - width - 1 if y0 > bottom + width + 1 else y0 + width + 1
        draw.text((x0, y - top), label, fill=colour, font=font)
    return shown


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def format_stats(answer: Any, boxes: int) -> str:
    """One line under the chat: speed, the visual tokens the images and videos cost and the KV cache held."""
    kv = format_bytes(answer.kv_bytes)
    prompt_kv = getattr(answer, "kv_bytes_prompt", None)
    if prompt_kv is not None and prompt_kv != answer.kv_bytes:
        kv += f" (after the prompt: {format_bytes(prompt_kv)})"
    parts = [
        f"**{answer.tokens_per_s:.1f} tokens/s** ({answer.new_tokens} tokens in {answer.seconds:.2f} s, "
        f"first after {answer.first_token_seconds:.2f} s)",
        f"{answer.visual_tokens} visual tokens of {answer.prompt_tokens} in the prompt"
        + (f" (video: {answer.video_tokens})" if getattr(answer, "video_tokens", 0) else ""),
        f"KV cache {kv}",
        f"{boxes} box{'es' if boxes != 1 else ''} drawn",
    ]
    if answer.finish == "length":
        parts.append("stopped at max new tokens")
    return " · ".join(parts)


def error_markdown(model_dir: str | Path, err: BaseException) -> str:
    """The page shown instead of the chat when the model cannot be loaded: what failed and what to do."""
    reason = str(err).replace("`", "'") or type(err).__name__
    return (
        "## The demo could not load its model\n\n"
        f"Model directory: `{model_dir}`\n\n"
        f"Reason: `{reason}`\n\n"
        "Train the default model with `mm quickstart` (the demo then finds `quickstart/run/model` in this "
        "folder), or point the demo at a model directory written by `mm train`: `mm demo --model DIR`."
    )


# -- the app ----------------------------------------------------------------------------------------------
def load_engine(model_dir: str | Path, device: str | None = None, max_batch: int = DEFAULT_CONCURRENCY):
    """``(engine, None)``, or ``(None, error)`` for a model directory that is missing or does not load."""
    from mm.inference import Engine

    try:
        return Engine.load(model_dir, device=device, max_batch=max_batch), None
    except Exception as err:  # any failure becomes the error page; the console keeps the traceback
        log.error("could not load the model in %s", model_dir, exc_info=True)
        return None, err


def chat_fn(engine: Any) -> Callable[..., Iterator[tuple]]:
    """The submit handler bound to ``engine``; it yields (chat, textbox, image, stats, conversation)."""
    import gradio as gr

    from mm.generation import GenerationSettings
    from mm.inference import Conversation

    def chat(message, history, conversation, max_new_tokens, temperature, top_p, seed, delta=None):
        message = message or {}
        files = [str(f) for f in message.get("files") or []]
        # an empty chat is a new conversation (an API client that sends no history, or a cleared chat)
        conversation = conversation if conversation is not None and history else Conversation()
        try:
            images, videos = load_media(files, engine.processor)
            settings = GenerationSettings(
                max_new_tokens=int(max_new_tokens),
                do_sample=float(temperature) > 0,
                temperature=float(temperature),
                top_p=float(top_p),
                seed=int(seed),
            )
            request = conversation.request(
                message.get("text") or "",
                images,
                settings,
                None if delta is None else float(delta),
                videos=videos,
            )
            engine.prepare(request)  # a prompt that cannot be answered is refused before it is shown
        except ValueError as err:
            raise gr.Error(str(err), title="Cannot ask that") from None
        history = list(history or [])
        history += [{"role": "user", "content": {"path": f}} for f in files]
        history += [{"role": "user", "content": message["text"]}, {"role": "assistant", "content": ""}]
        shown = request.images[-1] if request.images else None
        busy = gr.MultimodalTextbox(value=None, interactive=False)
        yield history, busy, display_image(shown) if shown else None, "*answering…*", conversation
        handle = engine.submit(request)
        text = ""
        try:
            for piece in handle.stream():
                text += piece
                history[-1] = {"role": "assistant", "content": text}
                yield history, gr.skip(), gr.skip(), gr.skip(), conversation
            answer = handle.result()
        except Exception as err:  # the batch failed: say so in the page, keep the conversation as it was
            log.error("generation failed", exc_info=True)
            history[-1] = {"role": "assistant", "content": f"*(no answer: {type(err).__name__})*"}
            ready = gr.MultimodalTextbox(value=None, interactive=True)  # else the box stays locked
            yield history, ready, gr.skip(), "", conversation
            raise gr.Error(f"generation failed: {type(err).__name__}: {err}") from None
        conversation.commit(request, answer.text)
        boxes = engine.boxes(answer.text, shown) if shown else []
        history[-1] = {"role": "assistant", "content": answer.text}
        ready = gr.MultimodalTextbox(value=None, interactive=True)
        image = display_image(shown, boxes) if shown else None
        yield history, ready, image, format_stats(answer, len(boxes)), conversation

    return chat


def build_app(
    engine: Any = None,
    *,
    model_dir: str | Path = "",
    error: BaseException | None = None,
    examples_dir: Path = EXAMPLES_DIR,
    concurrency: int = DEFAULT_CONCURRENCY,
):
    """The Blocks app for ``engine``, or the error page when ``engine`` is None (``error`` says why)."""
    import gradio as gr

    title = "mmstack chat demo"
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(1800, 3600)) as app:
        if engine is None:
            gr.Markdown(
                error_markdown(model_dir, error or FileNotFoundError(model_dir)), elem_id="model-error"
            )
            return app
        proc, config = engine.processor, engine.model.config
        gr.Markdown(
            f"# {title}\nModel `{model_dir}` · {proc.tokens_per_image} visual tokens per image · boxes as "
            f"`{proc.box_format.template}` in 0..{proc.box_format.frame}. Attach an image or a video "
            "with the clip, ask a question; follow-up questions keep the conversation."
        )
        conversation = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    label="Chat",
                    elem_id="chat",
                    height=460,
                    feedback_options=None,
                    buttons=["copy", "copy_all"],
                )
                textbox = gr.MultimodalTextbox(
                    file_types=accepted_file_types(),
                    file_count="multiple",
                    placeholder="Ask about an image or a video (attach one with the clip)",
                    show_label=False,
                    elem_id="ask",
                    autofocus=True,
                )
                stats = gr.Markdown(elem_id="stats")
            with gr.Column(scale=2):
                image = gr.Image(
                    label="Image (boxes from the answer drawn)",
                    type="pil",
                    format="png",
                    interactive=False,
                    elem_id="boxes",
                    height=460,  # the chat's height: without it the panel crops the enlarged image's edges
                    buttons=["download", "fullscreen"],
                )
                with gr.Accordion("Settings", open=False):
                    max_new_tokens = gr.Slider(1, 1024, value=128, step=1, label="max new tokens")
                    temperature = gr.Slider(0, 2, value=0, step=0.05, label="temperature (0: greedy)")
                    top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="top-p")
                    seed = gr.Slider(0, 65535, value=0, step=1, label="seed (sampling only)")
                    settings = [max_new_tokens, temperature, top_p, seed]
                    if getattr(config, "v2pe", False):
                        settings.append(
                            gr.Slider(
                                1 / 256,
                                1,
                                value=float(config.visual_delta),
                                step=1 / 256,
                                label="V2PE delta (position step of visual tokens; smaller for long inputs)",
                            )
                        )
                new_chat = gr.Button("New chat", elem_id="new-chat")
        examples = load_examples(examples_dir)
        if examples:
            gr.Examples(
                [[{"text": e["question"], "files": [e["image"]]}] for e in examples],
                inputs=[textbox],
                label="ShapesWorld examples (click, then send)",
                cache_examples=False,
            )
        outputs = [chatbot, textbox, image, stats, conversation]
        textbox.submit(
            chat_fn(engine),
            inputs=[textbox, chatbot, conversation, *settings],
            outputs=outputs,
            api_name="chat",
            concurrency_limit=concurrency,
            show_progress="hidden",
        )

        # a new conversation: the button, or the chat's own clear icon (it must drop the model's context too)
        def reset():
            return [], gr.MultimodalTextbox(value=None, interactive=True), None, "", None

        new_chat.click(reset, outputs=outputs, api_name="new_chat")
        chatbot.clear(reset, outputs=outputs, api_visibility="private")
    return app


# -- serving ----------------------------------------------------------------------------------------------
class RefuseRemoteFiles:
    """ASGI middleware: Gradio's ``/file=`` route fetches an http(s) URL on the server's behalf; the demo
    serves local files only, so such a request gets 403 before Gradio sees it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            from urllib.parse import unquote

            path = unquote(scope.get("path", "")).lower()
            if "/file=http:" in path or "/file=https:" in path or "/file=//" in path:
                body = REMOTE_REFUSED.encode()
                headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": 403, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def launch_kwargs(
    host: str = DEFAULT_HOST,
    port: int | None = DEFAULT_PORT,
    max_file_size: str | int = DEFAULT_MAX_FILE_SIZE,
    examples_dir: Path = EXAMPLES_DIR,
) -> dict[str, Any]:
    """``Blocks.launch`` arguments: local bind, no share link, upload limit, only the examples folder
    allowed besides the uploads, no server-side rendering (no Node), no MCP server, no run history."""
    from starlette.middleware import Middleware

    return dict(
        server_name=host,
        server_port=port,
        share=False,
        max_file_size=max_file_size,
        allowed_paths=[str(Path(examples_dir).resolve())],
        show_error=False,
        ssr_mode=False,
        mcp_server=False,
        run_history=False,
        app_kwargs={"middleware": [Middleware(RefuseRemoteFiles)]},
    )


def create(
    model_dir: str | Path,
    *,
    device: str | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    examples_dir: Path = EXAMPLES_DIR,
):
    """``(app, engine or None)``: the queued app for ``model_dir`` (the error page if it does not load)."""
    engine, error = load_engine(model_dir, device, max_batch=concurrency)
    app = build_app(
        engine, model_dir=model_dir, error=error, examples_dir=examples_dir, concurrency=concurrency
    )
    app.queue(default_concurrency_limit=concurrency, max_size=16 * concurrency)
    return app, engine


def serve(
    model_dir: str | Path | None = None,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    device: str | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    max_file_size: str | int = DEFAULT_MAX_FILE_SIZE,
) -> int:
    """Serve the demo until Ctrl+C or SIGTERM. Uploads live in a private temporary folder, removed on exit
    (nothing a user sends is kept)."""
    model_dir = Path(model_dir) if model_dir else QUICKSTART_MODEL
    uploads = tempfile.mkdtemp(prefix="mm-demo-uploads-")
    os.environ["GRADIO_TEMP_DIR"] = uploads  # read when the components are built
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    engine = app = None
    try:
        app, engine = create(model_dir, device=device, concurrency=concurrency)
        if engine is None:
            print(
                f"mm demo: error: cannot load the model in {model_dir}; serving the error page",
                file=sys.stderr,
            )
        app.launch(**launch_kwargs(host, port, max_file_size), quiet=True, prevent_thread_lock=True)
        print(f"mm demo: serving {model_dir} at http://{host}:{app.server_port} (Ctrl+C stops)", flush=True)
        print(f"mm demo: uploads are kept in {uploads} until the demo stops", flush=True)
        while app.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        if app is not None:
            app.close(verbose=False)
        if engine is not None:
            engine.close()
        shutil.rmtree(uploads, ignore_errors=True)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """``python -m demo.app ARGS`` is ``mm demo ARGS``."""
    from mm.cli import main as mm_main

    return mm_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
