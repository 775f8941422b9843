"""Datasets over LLaVA-format records, a resumable sampler, and collation that skips bad media.

Conversations are tokenized once up front (records that cannot be tokenized become ``Skip``s); images and
videos are decoded when a sample is drawn (optionally cached, for small datasets trained on a CPU; videos
with the processor's ``data.video`` sampling). A bad image or video never stops a long run: the sample is
dropped from its batch and reported under ``skipped``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from .media import MediaError, MediaPaths, load_image
from .processor import VLMProcessor
from .schema import image_list, video_list
from .skips import Skip


class ConversationDataset(Dataset):
    """Tokenized conversations with their images, ready for ``VLMProcessor.collate``.

    ``indices`` are the records' positions in their file (for skip reports); ``split`` names the set in them.
    """

    def __init__(
        self,
        records: Sequence[dict[str, Any]],
        processor: VLMProcessor,
        media: MediaPaths,
        *,
        indices: Sequence[int] | None = None,
        split: str = "train",
        cache_pixels: bool = False,
        blind: bool = False,
        branch_turns: bool = False,
        deltas: Sequence[float] | None = None,
        seed: int = 0,
        progress: bool = True,
    ):
        """``deltas``: V2PE training; each image of record ``index`` draws its delta from this set with a
        generator seeded by (``seed``, ``index``), so a resumed or repeated run draws the same ones."""
        self.processor = processor
        self.media = media
        self.split = split
        self.cache_pixels = cache_pixels
        self.blind = blind  # black images: trains/evaluates the no-vision baseline with identical sequences
        self._pixel_cache: dict[int, tuple[dict[str, torch.Tensor] | None, ...]] = {}
        self.records: list[dict[str, Any]] = []
        self.features: list[dict[str, Any]] = []
        self.indices: list[int] = []
        self.skipped: list[Skip] = []
        indices = list(range(len(records))) if indices is None else list(indices)
        for index, rec in zip(indices, tqdm(records, desc="tokenize", disable=not progress, leave=False)):
            entries, videos = image_list(rec), video_list(rec)
            try:
                if branch_turns:
                    feats = processor.tokenize_branched(rec["conversations"], len(entries), len(videos))
                else:
                    feats = processor.tokenize(rec["conversations"], len(entries), num_videos=len(videos))
            except ValueError as err:
                self.skipped.append(Skip.from_error(split, index, rec.get("id"), err))
                continue
            if deltas and (entries or videos):  # one delta per visual block, images and videos alike
                draw = random.Random(f"v2pe:{seed}:{index}")
                feats["image_deltas"] = [float(draw.choice(list(deltas))) for _ in entries + videos]
            self.records.append({**rec, "_media": entries, "_videos": videos})
            self.features.append(feats)
            self.indices.append(index)

    def __len__(self) -> int:
        return len(self.records)

    def lengths(self) -> list[int]:
        """Tokens of each sample (a branched sample: its prefix and every branch), for length grouping."""
        return [
            len(f["input_ids"]) + sum(len(b["input_ids"]) for b in f.get("branches", ()))
            for f in self.features
        ]

    def _pixels(self, i: int) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
        """(image pixels, video frames' pixels) of record ``i``, each None when it has none."""
        if i in self._pixel_cache:
            return self._pixel_cache[i]
        entries, videos = self.records[i]["_media"], self.records[i]["_videos"]
        # refused paths raise before any read
        paths, clips = [self.media.resolve(e) for e in entries], [self.media.resolve(e) for e in videos]
        pixels = frames = None
        if paths:
            images = [Image.new("RGB", (32, 32)) if self.blind else load_image(p) for p in paths]
            pixels = self.processor.pixels(images)
        if clips:
            blank = np.zeros((1, 32, 32, 3), np.uint8)  # the no-vision baseline: black frames
            frames = self.processor.video_pixels([blank if self.blind else c for c in clips])
        if self.cache_pixels:
            self._pixel_cache[i] = (pixels, frames)
        return pixels, frames

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        try:
            pixels, frames = self._pixels(i)
        except MediaError as err:
            return {"skip": Skip.from_error(self.split, self.indices[i], rec.get("id"), err)}
        return {
            **self.features[i],
            "pixel_values": pixels,
            "video_values": frames,
            "id": rec.get("id"),
            "index": self.indices[i],
        }


class Collator:
    """Drops samples whose media failed (reported under ``skipped``) and pads the rest."""

    def __init__(
        self,
        processor: VLMProcessor,
        padding_side: str = "right",
        branch_groups: int = 2,
        pack_to: int | None = None,
    ):
        self.processor = processor
        self.padding_side = padding_side
        self.branch_groups = branch_groups  # branch rows run in this many length groups (VLM.forward)
        self.pack_to = pack_to  # data.packing: samples share rows of at most this many tokens

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        good = [s for s in samples if "skip" not in s]
        batch: dict[str, Any] = {}
        if good:
            batch = self.processor.collate(
                good, padding_side=self.padding_side, branch_groups=self.branch_groups, pack_to=self.pack_to
            )
        batch["skipped"] = [s["skip"] for s in samples if "skip" in s]
        batch["ids"] = [s["id"] for s in good]
        return batch


def group_by_length(order: Sequence[int], lengths: Sequence[int], megabatch: int) -> list[int]:
    """HF Trainer's ``group_by_length``: cut ``order`` into megabatches, each sorted longest first (ties keep
    their shuffled order), so consecutive batches hold samples of similar length and pad little."""
    out: list[int] = []
    for start in range(0, len(order), megabatch):
        out += sorted(order[start : start + megabatch], key=lambda i: -lengths[i])
    return out


class ResumableSampler(Sampler[int]):
    """Shuffled epochs that can stop anywhere and resume at the same sample.

    The order of epoch ``e`` is a permutation seeded by ``(seed, e)``; with several processes each rank
    takes every ``world_size``-th index, the order padded from its start so that every rank has as many.
    ``state_dict`` records the epoch and how many indices this rank has yielded, so a resumed run draws
    exactly the batches an uninterrupted run would have drawn next. With ``lengths`` and ``batch_size``
    (``data.group_by_length``) the permutation is length-grouped (``group_by_length``) in megabatches of 50
    global batches (HF's factor; fewer on small sets, so there are at least 4 megabatches).
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        lengths: Sequence[int] | None = None,
        batch_size: int = 1,
    ):
        if num_samples < 1:
            raise ValueError("cannot sample from an empty dataset")
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"lengths: {len(lengths)} given for {num_samples} samples")
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.shuffle = shuffle
        self.lengths = lengths
        step = batch_size * world_size
        self.megabatch = step * max(1, min(50, num_samples // (4 * step)))
        self.epoch = 0
        self.position = 0  # indices of the current epoch already yielded by this rank

    def _order(self) -> list[int]:
        if not self.shuffle:
            order = list(range(self.num_samples))
        else:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        if self.lengths is not None:
            order = group_by_length(order, self.lengths, self.megabatch)
        if self.world_size > 1:  # every rank the same count (DistributedSampler's rule): equal step counts
            padded = -(-len(order) // self.world_size) * self.world_size
            order = (order * -(-padded // len(order)))[:padded]
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(self._order())

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        while self.position < len(order):
            index = order[self.position]
            self.position += 1
            yield index
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
