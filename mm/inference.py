"""One generation path for ``mm chat``, ``mm eval``, the demo and batch scripts.

``prepare`` (conversation + images -> features) -> ``collate`` (left-padded batch on the device) ->
``generate_ids`` (the VLM's decoding loop) -> ``decode`` (text). ``generate_batch`` chains them for many
prompts at once; ``Assistant`` keeps one conversation (text turns + images) and streams its answers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import TextIteratorStreamer

from data.boxes import parse_boxes
from data.media import load_image
from data.processor import VLMProcessor
from data.templates import IMAGE_TOKEN

from .build import load_vlm
from .generation import GenerationSettings
from .model import VLM


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_visual_delta(model: VLM, processor: VLMProcessor, delta: float) -> None:
    """Place every image at V2PE step ``delta`` from now on (e.g. 1/16 for contexts far past training)."""
    if not 0 < delta <= 1:
        raise ValueError(f"V2PE delta must be in (0, 1], got {delta}")
    if delta != 1 and getattr(model, "_learned_positions", False):
        raise ValueError(f"{type(model.llm).__name__} has learned absolute positions: V2PE delta must be 1")
    model.config.visual_delta = float(delta)
    processor.delta = float(delta)


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


@dataclass
class Prompt:
    """One generation request: a conversation ending with a user turn, its images in placeholder order."""

    conversation: list[dict[str, str]]
    images: list[Image.Image] = field(default_factory=list)


def user_turn(question: str, num_images: int) -> dict[str, str]:
    """A user turn for ``question``; images without a placeholder go first, LLaVA-style."""
    text = question.strip()
    if not text:
        raise ValueError("empty prompt: ask a question")
    missing = num_images - text.count(IMAGE_TOKEN)
    if missing < 0:
        raise ValueError(f"the prompt has {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} but {num_images} image(s)")
    return {"from": "human", "value": "\n".join([IMAGE_TOKEN] * missing + [text])}


def prepare(processor: VLMProcessor, prompt: Prompt) -> dict[str, Any]:
    """Token ids and pixels of one prompt (raises ``ValueError`` for a prompt that cannot be generated on)."""
    return processor(prompt.conversation, prompt.images, for_generation=True)


def collate(
    processor: VLMProcessor, features: Sequence[dict[str, Any]], device: torch.device
) -> dict[str, Any]:
    """Left-padded batch on ``device``: every row's prompt ends where generation starts."""
    batch = processor.collate(features, padding_side="left")
    pv = batch["pixel_values"]
    return {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
        "image_deltas": batch["image_deltas"].to(device),
        "pixel_values": None if pv is None else {k: v.to(device) for k, v in pv.items()},
    }


def generate_ids(
    model: VLM, batch: dict[str, Any], settings: GenerationSettings, streamer: Any = None
) -> torch.Tensor:
    """New tokens ``[B, T]`` for a collated batch (padding after each row's end of turn)."""
    return model.generate(**batch, streamer=streamer, **vars(settings))


def decode(processor: VLMProcessor, ids: torch.Tensor) -> list[str]:
    return [processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids.tolist()]


@torch.inference_mode()
def generate_batch(
    model: VLM, processor: VLMProcessor, prompts: Sequence[Prompt], settings: GenerationSettings | None = None
) -> list[str]:
    """Answers to ``prompts``, generated together in one left-padded batch."""
    device = next(model.parameters()).device
    batch = collate(processor, [prepare(processor, p) for p in prompts], device)
    return decode(processor, generate_ids(model, batch, settings or GenerationSettings()))


class Assistant:
    """A loaded VLM plus one running conversation."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        visual_delta: float | None = None,
    ):
        self.model, self.processor = load_model(model_dir, device, dtype, visual_delta)
        self.device = next(self.model.parameters()).device
        self.reset()

    def reset(self) -> None:
        self.turns: list[dict[str, str]] = []
        self.images: list[Image.Image] = []

    def _prompt(self, question: str, images: Sequence[str | Path | Image.Image]) -> tuple[Prompt, list]:
        """The conversation so far plus the new question; nothing is kept until an answer exists."""
        turn = user_turn(question, len(images))
        new = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        return Prompt(self.turns + [turn], self.images + new), new

    def _commit(self, prompt: Prompt, new_images: list, answer: str) -> None:
        self.turns = prompt.conversation + [{"from": "gpt", "value": answer}]
        self.images += new_images

    def ask(self, question: str, images: Sequence[str | Path | Image.Image] = (), **settings: Any) -> str:
        prompt, new = self._prompt(question, images)
        answer = generate_batch(self.model, self.processor, [prompt], GenerationSettings(**settings))[0]
        self._commit(prompt, new, answer)
        return answer

    def stream(
        self, question: str, images: Sequence[str | Path | Image.Image] = (), **settings: Any
    ) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is generated."""
        prompt, new = self._prompt(question, images)
        batch = collate(self.processor, [prepare(self.processor, prompt)], self.device)
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    generate_ids(self.model, batch, GenerationSettings(**settings), streamer)
            except BaseException as err:  # surfaced in the caller's thread below
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            yield piece
        thread.join()
        if errors:
            raise errors[0]
        self._commit(prompt, new, "".join(pieces).strip())

    def boxes(self, answer: str, image: Image.Image) -> list[tuple[float, float, float, float]]:
        """Boxes in ``answer`` in absolute pixels of ``image`` (the box format the model was trained with)."""
        return parse_boxes(answer, image.size, self.processor.box_format)
