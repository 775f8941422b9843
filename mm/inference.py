"""One generation path for ``mm chat``, ``mm eval``, the demo and the batch scripts: the ``Engine``.

An ``Engine`` holds one loaded model and its processor. ``generate(requests)`` answers a list of requests
in left-padded batches (eval, batch scripts); ``submit(request)`` queues one request from any thread, and a
worker thread batches the requests that arrive together into one ``generate`` call, streaming each row's
text to its own ``Handle`` (the demo). Every request carries its own settings (max tokens, temperature,
top-p, top-k, seed, V2PE delta), so requests batched together do not change each other's answers.
A ``Conversation`` keeps the turns, images and videos of one chat.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from data.boxes import parse_boxes
from data.media import load_image
from data.processor import VLMProcessor
from data.templates import IMAGE_TOKEN, VIDEO_TOKEN

from .build import load_vlm
from .generation import GenerationSettings
from .model import VLM


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_visual_delta(model: VLM, delta: float) -> float:
    if not 0 < delta <= 1:
        raise ValueError(f"V2PE delta must be in (0, 1], got {delta}")
    if delta != 1 and getattr(model, "_learned_positions", False):
        raise ValueError(f"{type(model.llm).__name__} has learned absolute positions: V2PE delta must be 1")
    return float(delta)


def set_visual_delta(model: VLM, processor: VLMProcessor, delta: float) -> None:
    """Place every image at V2PE step ``delta`` from now on (e.g. 1/16 for contexts far past training)."""
    model.config.visual_delta = processor.delta = check_visual_delta(model, delta)


def load_model(
    model_dir: str | Path,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    visual_delta: float | None = None,
) -> tuple[VLM, VLMProcessor]:
    """A model directory on the requested (or best) device; bf16 on CUDA unless ``dtype`` says otherwise;
    ``visual_delta`` overrides the V2PE step the model was saved with."""
    device_ = pick_device(device)
    if dtype is None and device_.type == "cuda":
        dtype = torch.bfloat16
    model, processor = load_vlm(model_dir, device=device_, dtype=dtype)
    if visual_delta is not None:
        set_visual_delta(model, processor, visual_delta)
    return model, processor


def user_turn(question: str, num_images: int, num_videos: int = 0) -> dict[str, str]:
    """A user turn for ``question``; images (then videos) without a placeholder go first, LLaVA-style."""
    text = question.strip()
    if not text:
        raise ValueError("empty prompt: ask a question")
    lines = []
    for token, count, what in ((IMAGE_TOKEN, num_images, "image"), (VIDEO_TOKEN, num_videos, "video")):
        missing = count - text.count(token)
        if missing < 0:
            raise ValueError(f"the prompt has {text.count(token)} {token} but {count} {what}(s)")
        lines += [token] * missing
    return {"from": "human", "value": "\n".join([*lines, text])}


@dataclass
class Request:
    """One generation request: a conversation ending with a user turn, its images and its videos (files,
    decoded ``data.video.Video``s or frame arrays) in placeholder order, and its own decoding settings;
    ``visual_delta`` places its images and videos at that V2PE step (None: the model's)."""

    conversation: list[dict[str, str]]
    images: list[Image.Image] = field(default_factory=list)
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    visual_delta: float | None = None
    features: dict[str, Any] | None = field(default=None, repr=False)  # Engine.prepare's, once checked
    videos: list[Any] = field(default_factory=list)


@dataclass
class Answer:
    """A request's answer and what it cost: tokens in and out (``visual_tokens`` = ``image_tokens`` +
    ``video_tokens``), time from its batch's start (prefill included), and its KV cache: after the prefill
    (``kv_bytes_prompt``), after any compression (``kv_bytes_kept``) and at its end, with the new tokens
    (``kv_bytes``)."""

    text: str
    prompt_tokens: int
    visual_tokens: int
    new_tokens: int
    finish: str  # "eos" or "length"
    seconds: float
    first_token_seconds: float
    kv_bytes: int
    kv_bytes_prompt: int
    kv_bytes_kept: int
    image_tokens: int = 0
    video_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


class _TextPieces:
    """Incremental detokenisation of one row: the new text after each token, held back while it ends in a
    partial UTF-8 character."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece


class Handle:
    """A submitted request: ``stream()`` yields its text as it is generated, ``result()`` waits for the
    ``Answer``; an error in the request (or its batch) is raised by both."""

    def __init__(self, request: Request):
        self.request = request
        self._pieces: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._answer: Answer | None = None
        self._error: BaseException | None = None

    def _piece(self, text: str) -> None:
        if text:
            self._pieces.put(text)

    def _finish(self, answer: Answer | None = None, error: BaseException | None = None) -> None:
        self._answer, self._error = answer, error
        self._done.set()
        self._pieces.put(None)

    def stream(self) -> Iterator[str]:
        while (piece := self._pieces.get()) is not None:
            yield piece
        if self._error is not None:
            raise self._error

    def result(self, timeout: float | None = None) -> Answer:
        if not self._done.wait(timeout):
            raise TimeoutError(f"no answer after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._answer is not None
        return self._answer


class Engine:
    """One loaded model and processor, safe to call from several threads.

    ``max_batch``: most requests in one padded batch. ``batch_window_s``: how long the worker waits for
    more requests after the first one arrives, so that concurrent users share a batch."""

    def __init__(
        self, model: VLM, processor: VLMProcessor, *, max_batch: int = 8, batch_window_s: float = 0.01
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.processor = model, processor
        self.max_batch, self.batch_window_s = max_batch, batch_window_s
        self.device = next(model.parameters()).device
        self._lock = threading.Lock()  # one generate at a time on the model
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._closed = False
        self.batch_sizes: Counter[int] = Counter()  # how many batches of each size ran
        cfg = model.llm.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        heads = text_cfg.num_attention_heads
        head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads
        kv_heads = getattr(text_cfg, "num_key_value_heads", None) or heads
        elem = next(model.llm.parameters()).element_size()
        # a full (uncompressed) cache: keys and values of every layer for every token held
        self.kv_bytes_per_token = 2 * text_cfg.num_hidden_layers * kv_heads * head_dim * elem
        eos = getattr(getattr(model.llm, "generation_config", None), "eos_token_id", None)
        self.eos_ids = set([eos] if isinstance(eos, int) else eos or [])

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        visual_delta: float | None = None,
        **kwargs: Any,
    ) -> Engine:
        model, processor = load_model(model_dir, device, dtype, visual_delta)
        return cls(model, processor, **kwargs)

    # -- requests -----------------------------------------------------------------------------------
    def prepare(self, request: Request) -> dict[str, Any]:
        """The request's token ids and pixels (kept on it); ``ValueError`` for one that cannot be answered
        (an empty or too long prompt, a placeholder count that does not match its images or videos, an
        unreadable video file (``MediaError``), a bad delta)."""
        if request.features is None:
            features = self.processor(
                request.conversation, request.images, videos=request.videos, for_generation=True
            )
            if request.visual_delta is not None:
                delta = check_visual_delta(self.model, request.visual_delta)
                features["image_deltas"] = [delta] * (len(request.images) + len(request.videos))
            request.features = features
        return request.features

    def _batch(self, requests: Sequence[Request]) -> dict[str, Any]:
        batch = self.processor.collate([self.prepare(r) for r in requests], padding_side="left")
        pv = batch["pixel_values"]
        return {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
            "image_deltas": batch["image_deltas"].to(self.device),
            "pixel_values": None if pv is None else {k: v.to(self.device) for k, v in pv.items()},
        }

    @torch.inference_mode()
    def _run(self, requests: Sequence[Request], on_text: Callable[[int, str], None] | None) -> list[Answer]:
        """One padded batch (the caller holds the lock)."""
        batch = self._batch(requests)
        self.batch_sizes[len(requests)] += 1
        tokenizer = self.processor.tokenizer
        rows = len(requests)
        pieces = [_TextPieces(tokenizer) for _ in range(rows)]
        ended_at: list[float | None] = [0.0 if r.settings.max_new_tokens == 0 else None for r in requests]
        counts, first, last_token = [0] * rows, [0.0], [-1] * rows
        start = time.perf_counter()

        def on_step(tokens: torch.Tensor, finished: torch.Tensor) -> None:
            now = time.perf_counter()
            if not first[0]:
                first[0] = now - start
            for row in range(rows):
                if ended_at[row] is not None:
                    continue
                counts[row] += 1
                last_token[row] = int(tokens[row])
                piece = pieces[row].add(last_token[row])
                if on_text is not None and piece:
                    on_text(row, piece)
                if bool(finished[row]):
                    ended_at[row] = now - start

        stats: dict[str, Any] = {}
        settings = [r.settings for r in requests]
        ids = self.model.generate(**batch, settings=settings, on_step=on_step, stats=stats)
        per_entry = stats["kv_bytes_per_entry"]
        total = time.perf_counter() - start
        texts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids.tolist()]
        mask, input_ids = batch["attention_mask"], batch["input_ids"]
        prompt = mask.sum(1).tolist()
        real = mask.bool()
        image = (input_ids == self.processor.image_token_id).logical_and(real).sum(1).tolist()
        video = (input_ids == self.processor.video_token_id).logical_and(real).sum(1).tolist()
        answers = []
        for row in range(rows):
            n = counts[row]
            answers.append(
                Answer(
                    text=texts[row],
                    prompt_tokens=int(prompt[row]),
                    visual_tokens=int(image[row] + video[row]),
                    new_tokens=n,
                    finish="eos" if last_token[row] in self.eos_ids else "length",
                    seconds=ended_at[row] if ended_at[row] is not None else total,
                    first_token_seconds=first[0],
                    kv_bytes=per_entry * int(stats["kv_entries_after"][row] + n),
                    kv_bytes_prompt=per_entry * int(stats["kv_entries_before"][row]),
                    kv_bytes_kept=per_entry * int(stats["kv_entries_after"][row]),
                    image_tokens=int(image[row]),
                    video_tokens=int(video[row]),
                )
            )
        return answers

    def generate(
        self, requests: Sequence[Request], on_text: Callable[[int, str], None] | None = None
    ) -> list[Answer]:
        """Answers to ``requests`` in order, ``max_batch`` at a time; ``on_text(index, piece)`` streams
        them. Raises ``ValueError`` for a request that cannot be answered (``prepare`` each first to
        find which)."""
        for r in requests:
            self.prepare(r)
        answers: list[Answer] = []
        for lo in range(0, len(requests), self.max_batch):
            chunk = requests[lo : lo + self.max_batch]
            callback = None if on_text is None else (lambda row, piece, lo=lo: on_text(lo + row, piece))
            with self._lock:
                answers += self._run(chunk, callback)
        return answers

    # -- concurrent use -----------------------------------------------------------------------------
    def submit(self, request: Request) -> Handle:
        """Queue ``request``; requests that arrive together are answered in one batch."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        handle = Handle(request)
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name="mm-engine", daemon=True)
                self._worker.start()
        self._queue.put(handle)
        return handle

    def stream(self, request: Request) -> Iterator[str]:
        return self.submit(request).stream()

    def _serve(self) -> None:
        while (handle := self._queue.get()) is not None:
            handles = [handle]
            deadline = time.monotonic() + self.batch_window_s
            while len(handles) < self.max_batch:
                try:
                    more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                handles.append(more)
            self._answer(handles)

    def _answer(self, handles: list[Handle]) -> None:
        good = []
        for h in handles:
            try:
                self.prepare(h.request)
                good.append(h)
            except Exception as err:  # this request only: the others still run
                h._finish(error=err)
        if not good:
            return
        try:
            with self._lock:
                answers = self._run([h.request for h in good], lambda row, piece: good[row]._piece(piece))
        except Exception as err:  # the batch failed: every request in it hears why
            for h in good:
                h._finish(error=err)
            return
        for h, answer in zip(good, answers):
            h._finish(answer)

    def close(self) -> None:
        """Stop the worker after the queued requests."""
        self._closed = True
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None

    def boxes(self, answer: str, image: Image.Image) -> list[tuple[float, float, float, float]]:
        """Boxes in ``answer`` in absolute pixels of ``image`` (the box format the model was trained with)."""
        return parse_boxes(answer, image.size, self.processor.box_format)


class Conversation:
    """The turns, images and videos of one chat; ``request`` builds the next request, ``commit`` keeps its
    answer (nothing is kept for a question that got no answer). ``video_loader`` (the processor's
    ``load_video``) decodes a video file once, when it is added; without it the file is decoded per
    request."""

    def __init__(self, video_loader: Callable[[Any], Any] | None = None) -> None:
        self.turns: list[dict[str, str]] = []
        self.images: list[Image.Image] = []
        self.videos: list[Any] = []
        self.video_loader = video_loader

    def request(
        self,
        question: str,
        images: Sequence[str | Path | Image.Image] = (),
        settings: GenerationSettings | None = None,
        visual_delta: float | None = None,
        videos: Sequence[Any] = (),
    ) -> Request:
        turn = user_turn(question, len(images), len(videos))
        new = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        clips = [self.video_loader(v) if self.video_loader else v for v in videos]
        return Request(
            self.turns + [turn],
            self.images + new,
            settings or GenerationSettings(),
            visual_delta,
            videos=self.videos + clips,
        )

    def commit(self, request: Request, answer: str) -> None:
        self.turns = request.conversation + [{"from": "gpt", "value": answer}]
        self.images = list(request.images)
        self.videos = list(request.videos)


class Assistant:
    """An engine plus one conversation: what ``mm chat`` talks to."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        visual_delta: float | None = None,
    ):
        self.engine = Engine.load(model_dir, device, dtype, visual_delta)
        self.reset()

    def reset(self) -> None:
        self.conversation = Conversation(video_loader=self.engine.processor.load_video)

    def ask(
        self,
        question: str,
        images: Sequence[str | Path | Image.Image] = (),
        videos: Sequence[Any] = (),
        **settings: Any,
    ) -> str:
        request = self.conversation.request(question, images, GenerationSettings(**settings), videos=videos)
        answer = self.engine.generate([request])[0].text
        self.conversation.commit(request, answer)
        return answer

    def stream(
        self,
        question: str,
        images: Sequence[str | Path | Image.Image] = (),
        videos: Sequence[Any] = (),
        **settings: Any,
    ) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is generated."""
        request = self.conversation.request(question, images, GenerationSettings(**settings), videos=videos)
        handle = self.engine.submit(request)
        yield from handle.stream()
        self.conversation.commit(request, handle.result().text)

    def boxes(self, answer: str, image: Image.Image) -> list[tuple[float, float, float, float]]:
        return self.engine.boxes(answer, image)
