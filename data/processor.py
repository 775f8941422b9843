"""The processor: conversations + images -> model inputs.

Each ``<image>`` placeholder (any number per conversation, interleaved with text) tokenizes to one id and is
then expanded to exactly ``tokens_per_image`` copies — the number of visual embeddings the model will scatter
there. Labels train only assistant turns. Each expert has its own pixel preprocessing; an image is decoded
once and handed to every expert's transform. Video frames will enter the same way (one placeholder each).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

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


def _pad_pairs(rows: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int):
    """Right-padded ids, attention mask and labels of (ids, labels) rows."""
    ids = _pad([i for i, _ in rows], pad_id)
    return ids, _pad([[1] * len(i) for i, _ in rows], 0), _pad([lab for _, lab in rows], IGNORE_INDEX)


class VLMProcessor:
    """Tokenizer + per-expert image transforms + placeholder expansion + collation."""

    def __init__(
        self,
        tokenizer: Any,
        image_transforms: Mapping[str, ImageTransform],
        tokens_per_image: int,
        *,
        chat_template: str | None = None,
        system_prompt: str | None = None,
        max_length: int | None = None,
        extra: dict[str, Any] | None = None,
    ):
        if tokens_per_image < 1:
            raise ValueError(f"tokens_per_image must be >= 1, got {tokens_per_image}")
        self.tokenizer = tokenizer
        self.image_token_id = ensure_image_token(tokenizer)
        self.image_transforms = dict(image_transforms)
        self.tokens_per_image = tokens_per_image
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.extra = dict(extra or {})  # e.g. the box format the model was trained with

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

    def tokenize_branched(
        self, conversation: Sequence[Mapping[str, Any]], num_images: int
    ) -> dict[str, list[int]]:
        """Pack a multi-turn, one-image conversation as independent single-turn branches on a shared prefix.

        Each (question, answer) pair becomes the single-turn chat ``<image>\n{question} -> {answer}``; the
        tokens they share (system prompt, user header, the image) are kept once as segment 0, and each pair's
        remaining tokens form segment k >= 1. With the segment-aware mask of ``mm.model`` a branch sees only
        the prefix and itself, at the positions a single-turn prompt would have: one image encoding serves
        every question, and no answer can be copied from another turn (the eval setting is single-turn).
        Falls back to ``tokenize`` for conversations that do not fit the pattern (several images, images
        after the first turn, a single turn).
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
            feats = self.tokenize(conversation, num_images)
            feats["segments"] = [0] * len(feats["input_ids"])
            return feats
        system = [t for t in conversation if t.get("from") == "system"]
        branches = []
        for k in range(pairs):
            question = turns[2 * k]["value"]
            if k == 0:
                question = question[len(IMAGE_TOKEN) :].lstrip("\n")
            single = system + [
                {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
                {"from": "gpt", "value": turns[2 * k + 1]["value"]},
            ]
            enc = tokenize_conversation(
                self._messages(single), self.tokenizer, chat_template=self.chat_template
            )
            branches.append(enc)
        prefix = 0
        ref = branches[0]["input_ids"]
        while prefix < len(ref) and all(
            prefix < len(b["input_ids"]) and b["input_ids"][prefix] == ref[prefix] for b in branches
        ):
            prefix += 1
        if self.image_token_id not in ref[:prefix] or any(
            lab != IGNORE_INDEX for b in branches for lab in b["labels"][:prefix]
        ):
            raise ValueError("branched packing: the turns share no prefix holding the image")
        ids, labels = list(ref[:prefix]), list(branches[0]["labels"][:prefix])
        segments = [0] * prefix
        for k, b in enumerate(branches, start=1):
            ids += b["input_ids"][prefix:]
            labels += b["labels"][prefix:]
            segments += [k] * (len(b["input_ids"]) - prefix)
        ids_x, labels_x = self._expand(ids, labels)
        segments_x: list[int] = []
        for tok, seg in zip(ids, segments):
            segments_x.extend([seg] * (self.tokens_per_image if tok == self.image_token_id else 1))
        if self.max_length is not None and len(ids_x) > self.max_length:
            raise ValueError(f"packed branches of {len(ids_x)} tokens exceed max_length={self.max_length}")
        return {"input_ids": ids_x, "labels": labels_x, "segments": segments_x}

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
        self, features: Sequence[Mapping[str, Any]], *, padding_side: str = "right"
    ) -> dict[str, Any]:
        """Pad to the longest sequence; concatenate pixels of all images in placeholder order."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        def field(key: str, default: int, fill: int) -> torch.Tensor:
            rows = [f.get(key, [default] * len(f["input_ids"])) for f in features]
            return _pad(rows, fill, padding_side)

        ids = field("input_ids", pad_id, pad_id)
        mask = _pad([[1] * len(f["input_ids"]) for f in features], 0, padding_side)
        labels = field("labels", IGNORE_INDEX, IGNORE_INDEX)
        segments = field("segments", 0, 0) if any("segments" in f for f in features) else None
        pixel_values = None
        with_pixels = [f["pixel_values"] for f in features if f.get("pixel_values")]
        if with_pixels:
            pixel_values = {name: torch.cat([p[name] for p in with_pixels]) for name in with_pixels[0]}
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixel_values}
        if segments is not None:
            batch["segment_ids"] = segments
        return batch

    def split_branches(self, batch: dict[str, Any], groups: int = 2) -> dict[str, Any]:
        """A packed branched batch (``segment_ids``) -> prefix rows + branch rows, for ``VLM.forward``.

        Each record's prefix (segment 0) stays a row of ``input_ids``; every branch (segment k >= 1) becomes a
        row of ``branch_input_ids`` with ``branch_owner`` naming its record. The model runs the prefixes once,
        copies their keys/values to each branch (a KV cache) and runs the branches as short rows: attention
        costs prefix x branch instead of the packed row's length squared, and no 4-D mask is needed. The
        result is the same as the packed mask (tested). ``labels`` becomes None when no prefix token is
        labelled (the usual case), so the model skips the prefix's LM head. Branch rows are sorted by length
        and cut into ``groups`` runs of about equal count, each padded only to its own longest row
        (``branch_groups``: ``(start, end, length)``), since short answers and boxes differ ~2x in length.
        Host-side work, in the collator.
        """
        if "segment_ids" not in batch:
            return batch
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        prefixes, branches, owners = [], [], []
        for row in range(batch["input_ids"].shape[0]):
            valid = batch["attention_mask"][row].bool()
            ids, labels = batch["input_ids"][row][valid], batch["labels"][row][valid]
            segments = batch["segment_ids"][row][valid].tolist()
            n_prefix = next((i for i, seg in enumerate(segments) if seg != 0), len(segments))
            if 0 in segments[n_prefix:]:
                raise ValueError(f"row {row}: segment 0 (the shared prefix) must come first")
            prefixes.append((ids[:n_prefix], labels[:n_prefix]))
            start = n_prefix
            while start < len(segments):
                end = start
                while end < len(segments) and segments[end] == segments[start]:
                    end += 1
                if labels[start] != IGNORE_INDEX:
                    raise ValueError(f"row {row}: a branch cannot begin with a labelled token")
                branches.append((ids[start:end], labels[start:end]))
                owners.append(row)
                start = end
        packed = ("input_ids", "attention_mask", "labels", "segment_ids")
        out = {k: v for k, v in batch.items() if k not in packed}
        out["input_ids"], out["attention_mask"], out["labels"] = _pad_pairs(prefixes, pad_id)
        if bool((out["labels"] == IGNORE_INDEX).all()):
            out["labels"] = None
        if branches:
            order = sorted(range(len(branches)), key=lambda i: len(branches[i][0]))
            ids, mask, labels = _pad_pairs([branches[i] for i in order], pad_id)
            out.update(branch_input_ids=ids, branch_attention_mask=mask, branch_labels=labels)
            out["branch_owner"] = torch.tensor([owners[i] for i in order], dtype=torch.long)
            groups = max(1, groups)
            cuts = sorted({round(len(order) * g / groups) for g in range(groups + 1)})
            out["branch_groups"] = [
                (start, end, len(branches[order[end - 1]][0]))
                for start, end in zip(cuts, cuts[1:])
                if end > start
            ]
        return out

    # -- persistence ----------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {
            "tokens_per_image": self.tokens_per_image,
            "image_token": IMAGE_TOKEN,
            "chat_template": self.chat_template,
            "system_prompt": self.system_prompt,
            "max_length": self.max_length,
            "extra": self.extra,
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
        return cls(
            tokenizer,
            image_transforms,
            settings["tokens_per_image"],
            chat_template=settings.get("chat_template"),
            system_prompt=settings.get("system_prompt"),
            max_length=settings.get("max_length"),
            extra=settings.get("extra"),
        )
