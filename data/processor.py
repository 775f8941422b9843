"""The processor: conversations + images -> model inputs.

Each ``<image>`` placeholder (any number per conversation, interleaved with text) tokenizes to one id and is
then expanded to exactly ``tokens_per_image`` copies — the number of visual embeddings the model will scatter
there. Labels train only assistant turns. Each expert has its own pixel preprocessing; an image is decoded
once and handed to every expert's transform. Each ``<video>`` expands to ``tokens_per_video`` copies of its
own id; its ``frames_per_video`` frames (``data.video_frames``) go through the same transforms. A collated
batch carries them in ``pixel_values`` beside the images, under ``video:<expert>`` (``[V, F, 3, S, S]``,
videos in placeholder order), so every path that moves pixels moves them too; the model pools them into
those tokens (``mm.video``).
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

import numpy as np
import torch
from PIL import Image

from .boxes import BoxFormat
from .templates import IGNORE_INDEX, IMAGE_TOKEN, VIDEO_TOKEN, llava_to_messages, tokenize_conversation
from .tokenizer import ensure_image_token, ensure_video_token
from .video import Video
from .video_frames import VideoSettings, frames_of, load_frames

PROCESSOR_FILE = "mm_processor.json"
ImageTransform = Callable[[list[Image.Image]], torch.Tensor]
VideoInput = str | os.PathLike | Video | np.ndarray  # a file, a decoded clip, or frames [N, H, W, 3]
VIDEO_PIXELS = "video:"  # pixel_values key prefix of video frames: "video:<expert>" -> [V, F, 3, S, S]


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


def _batch_pixels(features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor] | None:
    """Pixels of all images, then (under ``video:<expert>``) the frames of all videos, in feature order."""
    pixel_values = None
    with_pixels = [f["pixel_values"] for f in features if f.get("pixel_values")]
    if with_pixels:
        pixel_values = {name: torch.cat([p[name] for p in with_pixels]) for name in with_pixels[0]}
    with_videos = [f["video_values"] for f in features if f.get("video_values")]
    if with_videos:
        videos = {VIDEO_PIXELS + n: torch.cat([v[n] for v in with_videos]) for n in with_videos[0]}
        pixel_values = {**(pixel_values or {}), **videos}
    return pixel_values


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
        tokens_per_video: int | None = None,
        video_offsets: Sequence[float] | None = None,
        video_segments: int = 1,
        video: VideoSettings | None = None,
    ):
        """``tokens_per_video`` / ``video_offsets`` / ``video_segments``: the model's
        (``VLM.tokens_per_video``, its offsets, ``model.video.segments``); ``video``: how files become frames
        (``data.video``). Without ``tokens_per_video`` the processor refuses ``<video>``."""
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
        self.video_token_id = ensure_video_token(tokenizer)
        self.tokens_per_video = tokens_per_video
        self.video_offsets = [float(v) for v in (video_offsets or range(1, (tokens_per_video or 0) + 1))]
        if tokens_per_video is not None and len(self.video_offsets) != tokens_per_video:
            raise ValueError(
                f"video_offsets has {len(self.video_offsets)} entries for {tokens_per_video} tokens"
            )
        self.video_segments = video_segments
        self.video = video or VideoSettings()

    @property
    def video(self) -> VideoSettings:
        """How a video file becomes frames (``data.video``); each video gives the model this many frames, at
        least one per segment the model pools."""
        return self._video

    @video.setter
    def video(self, settings: VideoSettings) -> None:
        if settings.frames_per_video < self.video_segments:
            raise ValueError(
                f"data.video gives {settings.frames_per_video} frame(s) per video, fewer than the model's "
                f"{self.video_segments} temporal segments (model.video.segments)"
            )
        self._video = settings

    @property
    def positions_per_video(self) -> int:
        """LLM positions one video occupies at ``delta`` (0 for a model without video)."""
        return math.ceil(self.delta * max(self.video_offsets)) if self.video_offsets else 0

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
        counts = {self.image_token_id: self.tokens_per_image, self.video_token_id: self.tokens_per_video}
        for tok, lab in zip(ids, labels):
            if tok in counts:
                out_ids.extend([tok] * counts[tok])
                out_labels.extend([IGNORE_INDEX] * counts[tok])
            else:
                out_ids.append(tok)
                out_labels.append(lab)
        return out_ids, out_labels

    def tokenize(
        self,
        conversation: Sequence[Mapping[str, Any]],
        num_images: int,
        *,
        num_videos: int = 0,
        for_generation: bool = False,
    ) -> dict[str, list[int]]:
        """Token ids and labels with placeholders expanded; checks placeholder counts == ``num_images`` /
        ``num_videos``."""
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
        found = enc["input_ids"].count(self.video_token_id)
        if found != num_videos:
            raise ValueError(
                f"conversation has {found} {VIDEO_TOKEN} placeholder(s) but {num_videos} video(s) were given"
            )
        if num_videos and self.tokens_per_video is None:
            raise ValueError(
                f"this processor has no video settings (tokens_per_video): cannot take {VIDEO_TOKEN}"
            )
        ids, labels = self._expand(enc["input_ids"], enc["labels"])
        if self.max_length is not None and len(ids) > self.max_length:
            cut = {self.image_token_id, self.video_token_id} & set(ids[self.max_length :])
            if cut or (not for_generation and all(lab == IGNORE_INDEX for lab in labels[: self.max_length])):
                raise ValueError(
                    f"sequence of {len(ids)} tokens exceeds max_length={self.max_length} and truncating it "
                    "would cut an image, a video or every assistant token"
                )
            if for_generation:
                raise ValueError(f"prompt of {len(ids)} tokens exceeds max_length={self.max_length}")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return {"input_ids": ids, "labels": labels}

    def tokenize_branched(
        self, conversation: Sequence[Mapping[str, Any]], num_images: int, num_videos: int = 0
    ) -> dict[str, Any]:
        """A multi-turn, one-image conversation as independent single-turn branches on a shared prefix.

        Each (question, answer) pair becomes the single-turn chat ``<image>\n{question} -> {answer}``; the
        tokens they share (system prompt, user header, the image) are the prefix (``input_ids``/``labels``),
        and each pair's remaining tokens a branch (``branches``). The model encodes the prefix once and runs
        each branch on its KV cache at the positions a single-turn prompt would have: one image encoding
        serves every question, and no answer can be copied from another turn (the eval setting is
        single-turn). Conversations that do not fit the pattern (several images, images after the first
        turn, a single turn, any video) come back as ``tokenize`` gives them, without ``branches``.
        """
        if num_videos:
            return self.tokenize(conversation, num_images, num_videos=num_videos)
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

    # -- videos ---------------------------------------------------------------------------------------
    def load_video(self, video: VideoInput) -> np.ndarray:
        """A file (decoded by ``self.video``'s sampling), a decoded ``Video`` or frames -> the model's
        ``frames_per_video`` frames, uint8 ``[F, H, W, 3]``; an unreadable file raises ``MediaError``."""
        if isinstance(video, (str, os.PathLike)):
            return load_frames(video, self.video)
        return frames_of(video, self.video)

    def video_pixels(self, videos: Sequence[VideoInput]) -> dict[str, torch.Tensor]:
        """Videos -> ``{expert name: [num_videos, F, 3, S, S]}``: every frame through each expert's transform,
        as an image."""
        clips = [self.load_video(v) for v in videos]
        frames = [Image.fromarray(frame) for clip in clips for frame in clip]
        out = {}
        for name, fn in self.image_transforms.items():
            pixels = fn(frames)
            out[name] = pixels.reshape(len(clips), self.video.frames_per_video, *pixels.shape[1:])
        return out

    def token_counts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        """Visual tokens per medium of a batch (``{"image": n, "video": n}``, real tokens only)."""
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask > 0
        return {
            "image": int(((input_ids == self.image_token_id) & real).sum()),
            "video": int(((input_ids == self.video_token_id) & real).sum()),
        }

    def __call__(
        self,
        conversation: Sequence[Mapping[str, Any]],
        images: Sequence[Image.Image] = (),
        *,
        videos: Sequence[VideoInput] = (),
        for_generation: bool = False,
    ) -> dict[str, Any]:
        features: dict[str, Any] = self.tokenize(
            conversation, len(images), num_videos=len(videos), for_generation=for_generation
        )
        features["pixel_values"] = self.pixels(images) if images else None
        features["video_values"] = self.video_pixels(videos) if videos else None
        return features

    # -- batching -------------------------------------------------------------------------------------
    def collate(
        self,
        features: Sequence[Mapping[str, Any]],
        *,
        padding_side: str = "right",
        branch_groups: int = 2,
        pack_to: int | None = None,
    ) -> dict[str, Any]:
        """Pad to the longest sequence; concatenate pixels of all images (and, under ``video:<expert>``, the
        frames of all videos) in placeholder order.

        Features from ``tokenize_branched`` add ``branches`` (a ``BranchBatch``); ``labels`` is then None when
        no prefix token is labelled (the usual case), so the model skips the prefix rows' LM head.
        ``pack_to`` (``data.packing``): consecutive samples share a row of at most that many tokens; the batch
        gains ``segment_ids`` (1, 2, ... per sample in its row, 0 on padding), from which the model restarts
        positions per sample and keeps attention inside each sample.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if pack_to is not None:
            return self._collate_packed(features, pack_to)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = _pad([f["input_ids"] for f in features], pad_id, padding_side)
        mask = _pad([[1] * len(f["input_ids"]) for f in features], 0, padding_side)
        labels = _pad(
            [f.get("labels", [IGNORE_INDEX] * len(f["input_ids"])) for f in features],
            IGNORE_INDEX,
            padding_side,
        )
        # V2PE: each visual block's delta (images and videos in placeholder order), [rows, most blocks in a
        # row] (a feature's own draw, else ``delta``)
        counts = [self._blocks(f["input_ids"]) for f in features]
        deltas = torch.full((len(features), max([1, *counts])), self.delta, dtype=torch.float64)
        for row, f in enumerate(features):
            if f.get("image_deltas"):
                deltas[row, : len(f["image_deltas"])] = torch.tensor(f["image_deltas"], dtype=torch.float64)
        pixel_values = _batch_pixels(features)
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

    def _collate_packed(self, features: Sequence[Mapping[str, Any]], pack_to: int) -> dict[str, Any]:
        """``collate`` with consecutive samples packed into rows of at most ``pack_to`` tokens (a longer
        sample gets a row of its own); rows keep the samples' order, so pixels stay in placeholder order."""
        if any(f.get("branches") for f in features):
            raise ValueError("branched features cannot be packed: turn off data.branch_turns or data.packing")
        rows: list[list[Mapping[str, Any]]] = []
        length = 0
        for f in features:
            n = len(f["input_ids"])
            if not rows or length + n > pack_to:
                rows.append([])
                length = 0
            rows[-1].append(f)
            length += n
        merged = []
        for row in rows:
            deltas = [
                d for f in row for d in (f.get("image_deltas") or [self.delta] * self._blocks(f["input_ids"]))
            ]
            merged.append(
                {
                    "input_ids": [t for f in row for t in f["input_ids"]],
                    "labels": [t for f in row for t in f.get("labels", [IGNORE_INDEX] * len(f["input_ids"]))],
                    "segment_ids": [k + 1 for k, f in enumerate(row) for _ in f["input_ids"]],
                    "image_deltas": deltas,
                    "pixel_values": None,
                    "video_values": None,
                }
            )
        batch = self.collate(merged)
        batch["segment_ids"] = _pad([m["segment_ids"] for m in merged], 0, "right")
        batch["pixel_values"] = _batch_pixels(features)
        return batch

    def _blocks(self, ids: Sequence[int] | torch.Tensor) -> int:
        """Visual blocks (images + videos) in one row of token ids."""
        ids = torch.as_tensor(ids)
        images = int((ids == self.image_token_id).sum()) // self.tokens_per_image
        if not self.tokens_per_video:
            return images
        return images + int((ids == self.video_token_id).sum()) // self.tokens_per_video

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
            "video_token": VIDEO_TOKEN,
            "tokens_per_video": self.tokens_per_video,
            "video_offsets": self.video_offsets,
            "video_segments": self.video_segments,
            "video": self.video.to_dict(),
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
            # absent in directories saved before videos: load_vlm passes the model's
            tokens_per_video=settings.get("tokens_per_video"),
            video_offsets=settings.get("video_offsets"),
            video_segments=settings.get("video_segments", 1),
            video=VideoSettings.from_dict(settings["video"]) if settings.get("video") else None,
        )
