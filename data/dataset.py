"""Datasets over LLaVA-format records, a resumable sampler, and collation that skips bad media.

Conversations are tokenized once up front (records that cannot be tokenized are skipped with a reason);
images are decoded when a sample is drawn (optionally cached, for small datasets trained on a CPU). A bad
image never stops a long run: the sample is dropped from its batch and recorded in ``skipped``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from .media import MediaError, load_image
from .processor import VLMProcessor
from .schema import resolve_image_paths

log = logging.getLogger(__name__)


class ConversationDataset(Dataset):
    """Tokenized conversations with their images, ready for ``VLMProcessor.collate``."""

    def __init__(
        self,
        records: Sequence[dict[str, Any]],
        processor: VLMProcessor,
        base_dir: str | Path,
        *,
        cache_pixels: bool = False,
        blind: bool = False,
        branch_turns: bool = False,
        progress: bool = True,
    ):
        self.processor = processor
        self.base_dir = Path(base_dir)
        self.cache_pixels = cache_pixels
        self.blind = blind  # black images: trains/evaluates the no-vision baseline with identical sequences
        self._pixel_cache: dict[int, dict[str, torch.Tensor]] = {}
        self.records: list[dict[str, Any]] = []
        self.features: list[dict[str, list[int]]] = []
        self.skipped: list[dict[str, Any]] = []
        for index, rec in enumerate(tqdm(records, desc="tokenize", disable=not progress, leave=False)):
            paths = resolve_image_paths(rec, self.base_dir)
            try:
                if branch_turns:
                    feats = processor.tokenize_branched(rec["conversations"], len(paths))
                else:
                    feats = processor.tokenize(rec["conversations"], len(paths))
            except ValueError as err:
                self.skipped.append({"index": index, "id": rec.get("id"), "reason": str(err)})
                continue
            self.records.append({**rec, "_paths": paths})
            self.features.append(feats)
        if self.skipped:
            log.warning(
                "skipped %d of %d records that could not be tokenized", len(self.skipped), len(records)
            )

    def __len__(self) -> int:
        return len(self.records)

    def lengths(self) -> list[int]:
        return [len(f["input_ids"]) for f in self.features]

    def _pixels(self, i: int) -> dict[str, torch.Tensor] | None:
        if i in self._pixel_cache:
            return self._pixel_cache[i]
        paths = self.records[i]["_paths"]
        if not paths:
            return None
        images = [Image.new("RGB", (32, 32)) if self.blind else load_image(p) for p in paths]
        pixels = self.processor.pixels(images)
        if self.cache_pixels:
            self._pixel_cache[i] = pixels
        return pixels

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        try:
            pixels = self._pixels(i)
        except MediaError as err:
            return {"error": str(err), "id": rec.get("id"), "index": i}
        return {**self.features[i], "pixel_values": pixels, "id": rec.get("id"), "index": i}


class Collator:
    """Drops samples whose media failed (reported under ``skipped``) and pads the rest."""

    def __init__(
        self,
        processor: VLMProcessor,
        padding_side: str = "right",
        split_branches: bool = False,
        branch_groups: int = 2,
    ):
        self.processor = processor
        self.padding_side = padding_side
        self.split_branches = split_branches  # branched records as prefix + branch rows (VLMProcessor)
        self.branch_groups = branch_groups

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        good = [s for s in samples if "error" not in s]
        bad = [{"id": s["id"], "index": s["index"], "reason": s["error"]} for s in samples if "error" in s]
        batch = self.processor.collate(good, padding_side=self.padding_side) if good else {}
        if good and self.split_branches:
            batch = self.processor.split_branches(batch, self.branch_groups)
        batch["skipped"] = bad
        batch["ids"] = [s["id"] for s in good]
        return batch


class ResumableSampler(Sampler[int]):
    """Shuffled epochs that can stop anywhere and resume at the same sample.

    The order of epoch ``e`` is a permutation seeded by ``(seed, e)``; with several processes each rank
    takes every ``world_size``-th index. ``state_dict`` records the epoch and how many indices this rank has
    yielded, so a resumed run draws exactly the batches an uninterrupted run would have drawn next.
    """

    def __init__(
        self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ):
        if num_samples < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # indices of the current epoch already yielded by this rank

    def _order(self) -> list[int]:
        if not self.shuffle:
            order = list(range(self.num_samples))
        else:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
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
