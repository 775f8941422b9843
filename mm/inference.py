"""One generation API for the CLI, the demo and batch scripts: load a model directory, ask about images.

``Assistant`` keeps a conversation (text turns + images) and answers with streaming or not; boxes in an
answer can be parsed back to absolute pixels with the box format the model was trained with.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import TextIteratorStreamer

from data.boxes import BoxFormat, parse_boxes
from data.media import load_image
from data.templates import IMAGE_TOKEN

from .build import load_vlm


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Assistant:
    """A loaded VLM plus the running conversation."""

    def __init__(self, model_dir: str | Path, device: str | None = None, dtype: torch.dtype | None = None):
        self.device = pick_device(device)
        if dtype is None and self.device.type == "cuda":
            dtype = torch.bfloat16
        self.model, self.processor = load_vlm(model_dir, device=self.device, dtype=dtype)
        self.reset()

    def reset(self) -> None:
        self.turns: list[dict[str, str]] = []
        self.images: list[Image.Image] = []

    @property
    def box_format(self) -> BoxFormat:
        fmt = self.processor.extra.get("box_format") or {}
        return BoxFormat(**{k: v for k, v in fmt.items() if k in ("frame", "template")})

    def _prepare(self, question: str, images: Sequence[str | Path | Image.Image]) -> dict[str, Any]:
        if not question or not question.strip():
            raise ValueError("empty prompt: ask a question")
        new = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        text = question.strip()
        missing = len(new) - text.count(IMAGE_TOKEN)
        if missing < 0:
            raise ValueError(
                f"the prompt has {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} but {len(new)} image(s)"
            )
        if missing:  # images without a placeholder go first, LLaVA-style
            text = "\n".join([IMAGE_TOKEN] * missing + [text])
        turns = self.turns + [{"from": "human", "value": text}]
        feats = self.processor(turns, self.images + new, for_generation=True)
        batch = self.processor.collate([feats], padding_side="left")
        self._pending = (turns, new)
        pv = batch["pixel_values"]
        return {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
            "pixel_values": None if pv is None else {k: v.to(self.device) for k, v in pv.items()},
        }

    def _commit(self, answer: str) -> None:
        turns, new = self._pending
        self.turns = turns + [{"from": "gpt", "value": answer}]
        self.images += new

    def ask(self, question: str, images: Sequence[str | Path | Image.Image] = (), **settings: Any) -> str:
        inputs = self._prepare(question, images)
        new = self.model.generate(**inputs, **settings)
        answer = self.processor.tokenizer.decode(new[0].tolist(), skip_special_tokens=True).strip()
        self._commit(answer)
        return answer

    def stream(
        self, question: str, images: Sequence[str | Path | Image.Image] = (), **settings: Any
    ) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is generated."""
        inputs = self._prepare(question, images)
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.model.generate(**inputs, streamer=streamer, **settings)
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
        self._commit("".join(pieces).strip())

    def boxes(self, answer: str, image: Image.Image) -> list[tuple[float, float, float, float]]:
        return parse_boxes(answer, image.size, self.box_format)
