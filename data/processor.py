"""The processor: conversations + images -> model inputs.

Each ``<image>`` placeholder (any number per conversation, interleaved with text) tokenizes to one id and is
then expanded to exactly ``tokens_per_image`` copies — the number of visual embeddings the model will scatter
there. Labels train only assistant turns. Each expert has its own pixel preprocessing; an image is decoded
once and handed to every expert's transform. Video frames will enter the same way (one placeholder each).
Multi-turn one-image records can train as single-turn branches on one shared prefix (``tokenize_branched``):
the collated batch then carries the branches as a ``BranchBatch`` beside the prefix rows.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .boxes import BoxFormat
from .templates import IGNORE_INDEX, IMAGE_TOKEN, llava_to_messages, tokenize_conversation
from .tokenizer import ensure_image_token

PROCESSOR_FILE = "mm_processor.json"
ImageTransform = Callable[[list[Image.Image]], torch.Tensor]


def _pad(rows: Sequence[Sequence[int] | torch.Tensor], fill: int, side: str = "right") -> torch.Tensor:
    """Rows of different lengths -> one ``[N, L]`` long tensor, ``fill`` on the ``side`` each row is short."""
    length = max(len(r) for r in rows)
    out = torch.full((len(rows), length), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(length - len(r), length) if side == "left" else slice(0, len(r))
        out[i, cols] = torch.as_tensor(r, dtype=torch.long)
    return out


def _pad_pairs(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int):
    """Right-padded ids, attention mask and labels of (ids, labels) rows."""
    ids = _pad([i for i, _ in rows], pad_id)
    return ids, _pad([[1] * len(i) for i, _ in rows], 0), _pad([lab for _, lab in rows], IGNORE_INDEX)


@dataclass
class BranchBatch:
    """Single-turn branches, each continuing the prefix row ``owner[i]`` of its batch (``VLM.forward``).

    Rows are sorted by length and cut into ``groups`` of about equal count, ``(start, end, length)``, each
    padded only to its own longest row: short answers and boxes differ ~2x in length.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    owner: torch.Tensor
    groups: list[tuple[int, int, int]]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> BranchBatch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if f.name != "groups"
        }
        return BranchBatch(**moved, groups=self.groups)

    @classmethod
    def from_rows(
        cls, rows: Sequence[tuple[int, Sequence[int], Sequence[int]]], pad_id: int, groups: int = 2
    ) -> BranchBatch:
        """``rows``: (owner, ids, labels) per branch."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][1]))
        ids, mask, labels = _pad_pairs([rows[i][1:] for i in order], pad_id)
        cuts = sorted({round(len(order) * g / max(1, groups)) for g in range(max(1, groups) + 1)})
        spans = [(a, b, len(rows[order[b - 1]][1])) for a, b in zip(cuts, cuts[1:]) if b > a]
        owner = torch.tensor([rows[i][0] for i in order], dtype=torch.long)
        return cls(ids, mask, labels, owner, spans)


class VLMProcessor:
    """Tokenizer + per-expert image transforms + placeholder expansion + collation."""

    def __init__(
        self,
        tokenizer: Any,
        image_transforms: Mapping[str, ImageTransform],
        tokens_per_image: int,
        *,
        visual_offsets: Sequence[float] | None = None,
        delta: float = 1.0,
        chat_template: str | None = None,
        system_prompt: str | None = None,
        max_length: int | None = None,
        box_format: BoxFormat | None = None,
    ):
        if tokens_per_image < 1:
            raise ValueError(f"tokens_per_image must be >= 1, got {tokens_per_image}")
        self.tokenizer = tokenizer
        self.image_token_id = ensure_image_token(tokenizer)
        self.image_transforms = dict(image_transforms)
        self.tokens_per_image = tokens_per_image
        # each visual token's offset from the position before its image (the model's ``visual_offsets``,
        # MouSi occupancy), and the V2PE delta every image gets unless a record draws its own
        # (``image_deltas`` of a feature: the model places each image at its delta, mm.positions)
        self.visual_offsets = [float(v) for v in (visual_offsets or range(1, tokens_per_image + 1))]
        if len(self.visual_offsets) != tokens_per_image:
            raise ValueError(
                f"visual_offsets has {len(self.visual_offsets)} entries for {tokens_per_image} tokens"
            )
        self.delta = float(delta)
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.box_format = box_format or BoxFormat()  # how the model writes boxes (data.box_format)

    @property
    def positions_per_image(self) -> int:
        """LLM positions one image occupies at ``delta`` (``tokens_per_image`` unless shared or V2PE)."""
        return math.ceil(self.delta * max(self.visual_offsets))

    # -- text -----------------------------------------------------------------------------------------
    def _messages(self, conversation: Sequence[Mapping[str, Any]]) -> list[dict]:
        first = conversation[0] if conversation else {}
        if "from" in first:
            return llava_to_messages(conversation, system=self.system_prompt)
        messages = [dict(m) for m in conversation]
        if self.system_prompt and (not messages or messages[0]["role"] != "system"):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def _expand(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        out_ids: list[int] = []
        out_labels: list[int] = []
        n = self.tokens_per_image
        for tok, lab in zip(ids, labels):
            if tok == self.image_token_id:
                out_ids.extend([tok] * n)
                out_labels.extend([IGNORE_INDEX] * n)
            else:
                out_ids.append(tok)
                out_labels.append(lab)
        return out_ids, out_labels

    def tokenize(
        self, conversation: Sequence[Mapping[str, Any]], num_images: int, *, for_generation: bool = False
    ) -> dict[str, list[int]]:
        """Token ids and labels with placeholders expanded; checks placeholder count == ``num_images``."""
        messages = self._messages(conversation)
        if for_generation and messages and messages[-1]["role"] == "assistant":
            raise ValueError("a prompt for generation must end with a user turn, not an assistant reply")
        enc = tokenize_conversation(
            messages, self.tokenizer, chat_template=self.chat_template, add_generation_prompt=for_generation
        )
        found = enc["input_ids"].count(self.image_token_id)
        if found != num_images:
            raise ValueError(
                f"conversation has {found} {IMAGE_TOKEN} placeholder(s) but {num_images} image(s) were given"
            )
        ids, labels = self._expand(enc["input_ids"], enc["labels"])
        if self.max_length is not None and len(ids) > self.max_length:
            if ids[self.max_length :].count(self.image_token_id) or (
                not for_generation and all(lab == IGNORE_INDEX for lab in labels[: self.max_length])
            ):
                raise ValueError(
                    f"sequence of {len(ids)} tokens exceeds max_length={self.max_length} and truncating it "
                    "would cut an image or every assistant token"
                )
            if for_generation:
                raise ValueError(f"prompt of {len(ids)} tokens exceeds max_length={self.max_length}")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return {"input_ids": ids, "labels": labels}

    def tokenize_branched(self, conversation: Sequence[Mapping[str, Any]], num_images: int) -> dict[str, Any]:
        """A multi-turn, one-image conversation as independent single-turn branches on a shared prefix.

        Each (question, answer) pair becomes the single-turn chat ``<image>\n{question} -> {answer}``; the
        tokens they share (system prompt, user header, the image) are the prefix (``input_ids``/``labels``),
        and each pair's remaining tokens a branch (``branches``). The model encodes the prefix once and runs
        each branch on its KV cache at the positions a single-turn prompt would have: one image encoding
        serves every question, and no answer can be copied from another turn (the eval setting is
        single-turn). Conversations that do not fit the pattern (several images, images after the first
        turn, a single turn) come back as ``tokenize`` gives them, without ``branches``.
        """
        turns = [t for t in conversation if t.get("from", t.get("role")) not in ("system",)]
        first = turns[0]["value"] if turns and "value" in turns[0] else None
        pairs = len(turns) // 2
        if (
            num_images != 1
            or pairs < 2
            or first is None
            or not first.startswith(IMAGE_TOKEN)
            or sum(t["value"].count(IMAGE_TOKEN) for t in turns) != 1
        ):
            return self.tokenize(conversation, num_images)
        system = [t for t in conversation if t.get("from") == "system"]
        singles = []
        for k in range(pairs):
            question = turns[2 * k]["value"]
            if k == 0:
                question = question[len(IMAGE_TOKEN) :].lstrip("\n")
            single = system + [
                {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
                {"from": "gpt", "value": turns[2 * k + 1]["value"]},
            ]
            singles.append(
                tokenize_conversation(
                    self._messages(single), self.tokenizer, chat_template=self.chat_template
                )
            )
        ref = singles[0]["input_ids"]
        prefix = 0
        while prefix < len(ref) and all(
            prefix < len(b["input_ids"]) and b["input_ids"][prefix] == ref[prefix] for b in singles
        ):
            prefix += 1
        if self.image_token_id not in ref[:prefix] or any(
            lab != IGNORE_INDEX for b in singles for lab in b["labels"][:prefix]
        ):
            raise ValueError("branched packing: the turns share no prefix holding the image")
        ids, labels = self._expand(ref[:prefix], singles[0]["labels"][:prefix])
        branches = []
        for b in singles:
            if b["labels"][prefix] != IGNORE_INDEX:
                raise ValueError("branched packing: a branch cannot begin with a labelled token")
            branches.append({"input_ids": b["input_ids"][prefix:], "labels": b["labels"][prefix:]})
        total = len(ids) + sum(len(b["input_ids"]) for b in branches)
        if self.max_length is not None and total > self.max_length:
            raise ValueError(f"prefix and branches of {total} tokens exceed max_length={self.max_length}")
        return {
            "input_ids": ids,
            "labels": labels,
            "branches": branches,
        }

    # -- images ---------------------------------------------------------------------------------------
    def pixels(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Decoded images -> ``{expert name: [num_images, 3, S, S]}`` (each expert's own preprocessing)."""
        return {name: fn(list(images)) for name, fn in self.image_transforms.items()}

    def __call__(
        self,
        conversation: Sequence[Mapping[str, Any]],
        images: Sequence[Image.Image] = (),
        *,
        for_generation: bool = False,
    ) -> dict[str, Any]:
        features: dict[str, Any] = self.tokenize(conversation, len(images), for_generation=for_generation)
        features["pixel_values"] = self.pixels(images) if images else None
        return features

    # -- batching -------------------------------------------------------------------------------------
    def collate(
        self, features: Sequence[Mapping[str, Any]], *, padding_side: str = "right", branch_groups: int = 2
    ) -> dict[str, Any]:
        """Pad to the longest sequence; concatenate pixels of all images in placeholder order.

        Features from ``tokenize_branched`` add ``branches`` (a ``BranchBatch``); ``labels`` is then None when
        no prefix token is labelled (the usual case), so the model skips the prefix rows' LM head.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = _pad([f["input_ids"] for f in features], pad_id, padding_side)
        mask = _pad([[1] * len(f["input_ids"]) for f in features], 0, padding_side)
        labels = _pad(
            [f.get("labels", [IGNORE_INDEX] * len(f["input_ids"])) for f in features],
            IGNORE_INDEX,
            padding_side,
        )
        # V2PE: each image's delta, [rows, most images in a row] (a feature's own draw, else ``delta``)
        counts = [
            int((torch.as_tensor(f["input_ids"]) == self.image_token_id).sum()) // self.tokens_per_image
            for f in features
        ]
        deltas = torch.full((len(features), max([1, *counts])), self.delta, dtype=torch.float64)
        for row, f in enumerate(features):
            if f.get("image_deltas"):
                deltas[row, : len(f["image_deltas"])] = torch.tensor(f["image_deltas"], dtype=torch.float64)
        pixel_values = None
        with_pixels = [f["pixel_values"] for f in features if f.get("pixel_values")]
        if with_pixels:
            pixel_values = {name: torch.cat([p[name] for p in with_pixels]) for name in with_pixels[0]}
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "image_deltas": deltas,
            "pixel_values": pixel_values,
        }
        rows = [
            (row, b["input_ids"], b["labels"])
            for row, f in enumerate(features)
            for b in f.get("branches", ())
        ]
        if rows:
            if padding_side != "right":
                raise ValueError("branched features are for training: collate them with padding_side='right'")
            batch["branches"] = BranchBatch.from_rows(rows, pad_id, branch_groups)
            if bool((labels == IGNORE_INDEX).all()):
                batch["labels"] = None
        return batch

    # -- persistence ----------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {
            "tokens_per_image": self.tokens_per_image,
            "visual_offsets": self.visual_offsets,
            "delta": self.delta,
            "image_token": IMAGE_TOKEN,
            "chat_template": self.chat_template,
            "system_prompt": self.system_prompt,
            "max_length": self.max_length,
            "box_format": {"frame": self.box_format.frame, "template": self.box_format.template},
        }

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(out)
        tmp = out / (PROCESSOR_FILE + ".tmp")
        tmp.write_text(json.dumps(self.settings(), indent=2))
        os.replace(tmp, out / PROCESSOR_FILE)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, image_transforms: Mapping[str, ImageTransform], **overrides: Any
    ) -> VLMProcessor:
        from transformers import AutoTokenizer

        directory = Path(directory)
        settings_path = directory / PROCESSOR_FILE
        if not settings_path.is_file():
            raise FileNotFoundError(
                f"{settings_path}: no processor settings (is this an mmstack model directory?)"
            )
        settings = json.loads(settings_path.read_text())
        settings.update(overrides)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        # model directories written before box_format was a setting kept it under "extra"
        box_format = settings.get("box_format") or (settings.get("extra") or {}).get("box_format")
        return cls(
            tokenizer,
            image_transforms,
            settings["tokens_per_image"],
            visual_offsets=settings.get("visual_offsets"),  # absent in older directories: 1..N
            delta=settings.get("delta", 1.0),
            chat_template=settings.get("chat_template"),
            system_prompt=settings.get("system_prompt"),
            max_length=settings.get("max_length"),
            box_format=BoxFormat(**box_format) if box_format else None,
        )
