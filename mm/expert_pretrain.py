"""Dense pretraining of a visual expert from object annotations, before the VLM learns to read it.

A from-scratch CNN trained only through the language-model loss learns slowly: one answer token of gradient
per question. When the data carries object annotations (ShapesWorld's ``meta.objects``: shape, colour, size,
box), every token of the expert's grid can be supervised directly, FCOS-style: each cell predicts the colour,
shape and size of the object whose box holds the cell centre (or background) and the distances from the cell
centre to that box's four edges. A few hundred steps give features that name and locate objects; the VLM
stage then trains on top of them (the heads are thrown away).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from data.media import MediaError, load_image
from data.schema import resolve_image_paths
from vision.experts import VisualExpert

log = logging.getLogger(__name__)


def vocabulary(records: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Sorted attribute values seen in the annotations (so class ids do not depend on a hard-coded list)."""
    values: dict[str, set[str]] = {"colour": set(), "shape": set(), "size": set()}
    for rec in records:
        for obj in (rec.get("meta") or {}).get("objects", []):
            for key in values:
                values[key].add(str(obj[key]))
    return {k: sorted(v) for k, v in values.items()}


def cell_targets(
    objects: Sequence[dict[str, Any]],
    image_wh: tuple[float, float],
    grid: tuple[int, int],
    vocab: dict[str, list[str]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell class ids ``[3, gh, gw]`` (colour, shape, size; 0 = background) and box-edge distances
    ``[4, gh, gw]`` (left, top, right, bottom as fractions of the image side; 0 on background)."""
    gh, gw = grid
    w, h = image_wh
    classes = torch.zeros(3, gh, gw, dtype=torch.long)
    edges = torch.zeros(4, gh, gw)
    area = torch.full((gh, gw), float("inf"))
    ys = (torch.arange(gh) + 0.5) * h / gh
    xs = (torch.arange(gw) + 0.5) * w / gw
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        inside = (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)
        box_area = (x1 - x0) * (y1 - y0)
        take = inside & (box_area < area)  # the smallest box wins where boxes overlap
        area = torch.where(take, torch.full_like(area, box_area), area)
        for k, key in enumerate(("colour", "shape", "size")):
            classes[k][take] = vocab[key].index(str(obj[key])) + 1
        dist = torch.stack([(cx - x0) / w, (cy - y0) / h, (x1 - cx) / w, (y1 - cy) / h])
        edges = torch.where(take, dist, edges)
    return classes, edges


class DenseHeads(nn.Module):
    def __init__(self, channels: int, vocab: dict[str, list[str]]):
        super().__init__()
        self.classes = nn.ModuleList(
            nn.Linear(channels, len(vocab[k]) + 1) for k in ("colour", "shape", "size")
        )
        self.edges = nn.Linear(channels, 4)

    def forward(self, tokens: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return [head(tokens) for head in self.classes], self.edges(tokens)


def _load(
    records: Sequence[dict[str, Any]], base_dir: Path, expert: VisualExpert, vocab: dict[str, list[str]]
):
    pixels, classes, edges = [], [], []
    for rec in tqdm(records, desc="expert data", leave=False, disable=len(records) < 500):
        meta = rec.get("meta") or {}
        paths = resolve_image_paths(rec, base_dir)
        if len(paths) != 1 or "objects" not in meta:
            continue
        try:
            image = load_image(paths[0])
        except MediaError as err:
            log.warning("expert pretraining skips %s", err)
            continue
        c, e = cell_targets(meta["objects"], image.size, expert.grid_size, vocab)
        pixels.append(expert.preprocess([image])[0])
        classes.append(c)
        edges.append(e)
    if not pixels:
        raise ValueError("expert pretraining needs records with one image and meta.objects annotations")
    return torch.stack(pixels), torch.stack(classes), torch.stack(edges)


def pretrain_expert(
    expert: VisualExpert,
    records: Sequence[dict[str, Any]],
    base_dir: str | Path,
    *,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 2e-3,
    max_minutes: float | None = None,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train ``expert`` in place on dense cell targets; returns the loss history (one dict per step)."""
    vocab = vocabulary(records)
    pixels, classes, edges = _load(records, Path(base_dir), expert, vocab)
    heads = DenseHeads(expert.out_dim, vocab).to(device)
    expert.train()
    params = [p for p in expert.parameters() if p.requires_grad] + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="expert pretrain", disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, len(pixels), (batch_size,), generator=gen)
        x = pixels[idx].to(device)
        cls = classes[idx].to(device)
        edg = edges[idx].to(device)
        with torch.autocast(
            torch.device(device).type,
            dtype=autocast_dtype or torch.float32,
            enabled=autocast_dtype is not None,
        ):
            tokens = expert(x)  # [B, N, C]
            logits, dist = heads(tokens)
        loss_cls = sum(
            F.cross_entropy(lg.float().flatten(0, 1), cls[:, k].flatten()) for k, lg in enumerate(logits)
        )
        fg = cls[:, 0].flatten() > 0
        pred_edges = dist.float().flatten(0, 1)
        target_edges = edg.permute(0, 2, 3, 1).flatten(0, 2)
        loss_box = (
            F.l1_loss(pred_edges[fg], target_edges[fg]) * 10 if bool(fg.any()) else pred_edges.sum() * 0
        )
        loss = loss_cls + loss_box
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        record = {
            "step": step + 1,
            "loss": float(loss.detach()),
            "loss_cls": float(loss_cls.detach()),
            "loss_box": float(loss_box.detach()),
        }
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}")
        if max_minutes and time.perf_counter() - start > max_minutes * 60:
            log.info("expert pretraining stopped at step %d (time budget)", step + 1)
            break
    bar.close()
    return history
