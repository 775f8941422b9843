"""Training on accelerate: stages ``align`` (projector only) and ``sft`` (projector + LLM, optionally
experts).

AdamW with warmup + cosine decay, gradient accumulation, bf16 where the hardware has it, periodic
validation loss, atomic resumable checkpoints (model, optimizer, scheduler, sampler position, RNG), a final
HF-directory export, JSONL + tensorboard logs and a progress bar. The same code runs in one CPU process and
under ``accelerate launch`` (DDP / DeepSpeed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from data.dataset import Collator, ConversationDataset, ResumableSampler
from data.schema import load_llava_json

from .build import build_tokenizer, build_vlm, load_vlm, make_processor, save_vlm
from .config import RunConfig, save_config
from .model import VLM

log = logging.getLogger("mm.train")
CHECKPOINTS = "checkpoints"
LATEST = "latest"


# -- freezing -------------------------------------------------------------------------------------------
def apply_stage(model: VLM, stage: str, train_experts: bool) -> dict[str, int]:
    """Freeze/unfreeze by stage; returns trainable parameter counts per part (logged, prismatic-style)."""
    if stage not in ("align", "sft"):
        raise ValueError(f"unknown training stage {stage!r}; known: ['align', 'sft']")
    model.llm.requires_grad_(stage == "sft")
    for expert in model.experts.values():
        expert.requires_grad_(train_experts and not expert.cfg.frozen)
    model.projectors.requires_grad_(True)
    parts = {"llm": model.llm, "experts": model.experts, "projectors": model.projectors}
    return {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in parts.items()}


def param_groups(model: VLM, cfg: RunConfig) -> list[dict[str, Any]]:
    """AdamW groups: per-part learning rates; no weight decay on biases, norms and embeddings."""
    t = cfg.train
    lrs = {"llm": t.lr, "projectors": t.projector_lr or t.lr, "experts": t.expert_lr or t.lr}
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = name.split(".", 1)[0]
        decay = p.ndim >= 2 and "embed" not in name
        groups.setdefault((part, decay), []).append(p)
    return [
        {"params": ps, "lr": lrs[part], "weight_decay": t.weight_decay if decay else 0.0, "name": f"{part}"}
        for (part, decay), ps in groups.items()
    ]


# -- schedule -------------------------------------------------------------------------------------------
@dataclass
class Schedule:
    """Linear warmup, then cosine to ``min_lr_ratio`` over training progress.

    Progress is ``step / max_steps``, or the fraction of the wall-clock budget spent if that is larger, so a
    time-budgeted run still anneals fully and stops on time. Deterministic when no budget is set.
    """

    max_steps: int
    warmup_steps: int
    min_lr_ratio: float
    max_seconds: float | None = None

    def progress(self, step: int, elapsed: float) -> float:
        p = step / max(1, self.max_steps)
        if self.max_seconds:
            p = max(p, elapsed / self.max_seconds)
        return min(1.0, p)

    def factor(self, step: int, elapsed: float) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        p = self.progress(step, elapsed)
        # cosine over the part of progress after warmup
        w = self.warmup_steps / max(1, self.max_steps)
        q = 0.0 if p <= w else min(1.0, (p - w) / max(1e-9, 1 - w))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * q))


@dataclass
class TrainerState:
    """Everything besides model/optimizer tensors that a resumed run needs (checkpointed with them)."""

    step: int = 0
    elapsed: float = 0.0
    samples: int = 0
    epoch: int = 0  # data epoch and samples of it consumed by training (not merely prefetched)
    consumed: int = 0
    best_val_loss: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)


# -- helpers --------------------------------------------------------------------------------------------
def _mixed_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # CPUs with AMX/AVX512-BF16 run bf16 matmuls natively (several times faster than fp32).
    return "bf16" if torch.backends.mkldnn.is_available() and _cpu_has_native_bf16() else "no"


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _batch_fingerprint(ids: list[Any]) -> str:
    return hashlib.sha1(json.dumps([str(i) for i in ids]).encode()).hexdigest()[:12]


class JsonlLog:
    """Append-only metrics log (never truncated, so a resumed run keeps its history)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record.get("step", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "labels",
    "segment_ids",
    "branch_input_ids",
    "branch_attention_mask",
    "branch_labels",
    "branch_owner",
    "branch_groups",
)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    # tensors move; the rest (labels None when no prefix token is labelled, branch_groups ints) passes as is
    out = {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
        for k, v in batch.items()
        if k in MODEL_INPUTS
    }
    pv = batch.get("pixel_values")
    out["pixel_values"] = None if pv is None else {k: v.to(device, non_blocking=True) for k, v in pv.items()}
    return out


def latest_checkpoint(output_dir: Path) -> Path | None:
    pointer = output_dir / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = output_dir / CHECKPOINTS / pointer.read_text().strip()
    return path if path.is_dir() else None


# -- the trainer ----------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: RunConfig, *, resume: bool = False, progress: bool = True):
        self.cfg = cfg
        self.out = Path(cfg.train.output_dir)
        self.progress = progress
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.accelerator = Accelerator(
            mixed_precision=_mixed_precision(t.mixed_precision), gradient_accumulation_steps=t.grad_accum
        )
        set_seed(t.seed)
        self.is_main = self.accelerator.is_main_process
        self.out.mkdir(parents=True, exist_ok=True)
        resume_from = latest_checkpoint(self.out) if resume else None
        if resume and resume_from is None:
            log.warning("--resume: no checkpoint under %s; starting from scratch", self.out / CHECKPOINTS)

        train_path = Path(cfg.data.train)
        records = load_llava_json(train_path)
        if resume_from is not None:
            # The tokenizer, model layout and processor come from the checkpoint's export, not retrained.
            model, processor = load_vlm(resume_from / "export")
        elif cfg.model.init_from:
            model, processor = load_vlm(cfg.model.init_from)
        else:
            tokenizer = build_tokenizer(cfg.model, _corpus(records))
            model = build_vlm(cfg.model, tokenizer)
            processor = make_processor(model, tokenizer, cfg.data)
        processor.max_length = cfg.data.max_length
        info = train_path.parent / "shapesworld.json"
        if info.is_file():  # remember how boxes are written, so inference can parse them back
            processor.extra["box_format"] = json.loads(info.read_text()).get("box_format")
        processor.system_prompt = cfg.data.system_prompt
        self.processor = processor
        self.counts = apply_stage(model, t.stage, t.train_experts)
        if t.expert_pretrain_steps and resume_from is None:
            self._pretrain_experts(model, records, train_path.parent)
        if t.attn_implementation:
            model.llm.set_attn_implementation(t.attn_implementation)
        if t.gradient_checkpointing:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()

        self.train_set = ConversationDataset(
            records,
            processor,
            train_path.parent,
            cache_pixels=cfg.data.cache_pixels,
            blind=cfg.data.blind,
            branch_turns=cfg.data.branch_turns,
            progress=progress and self.is_main,
        )
        self.val_set = None
        if cfg.data.val:
            val_path = Path(cfg.data.val)
            val_records = load_llava_json(val_path)[: cfg.data.val_max_records]
            self.val_set = ConversationDataset(
                val_records,
                processor,
                val_path.parent,
                cache_pixels=True,
                blind=cfg.data.blind,
                progress=False,
            )
        acc = self.accelerator
        self.sampler = ResumableSampler(
            len(self.train_set), seed=t.seed, rank=acc.process_index, world_size=acc.num_processes
        )
        # Branched records train as prefix + branch rows (cheap attention), unless gradient checkpointing is
        # on: HF's checkpointed layers drop the KV cache that the split layout relies on.
        split = cfg.data.branch_turns and cfg.data.branch_layout == "split" and not t.gradient_checkpointing
        self.collate = Collator(processor, split_branches=split)
        optimizer = torch.optim.AdamW(
            param_groups(model, cfg), lr=t.lr, betas=tuple(t.betas), fused=torch.cuda.is_available()
        )
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.schedule = Schedule(
            t.max_steps, t.warmup_steps, t.min_lr_ratio, t.max_minutes * 60 if t.max_minutes else None
        )
        self.state = TrainerState()
        acc.register_for_checkpointing(self.state)
        if resume_from is not None:
            acc.load_state(str(resume_from))
            log.info("resumed from %s at step %d", resume_from, self.state.step)
        self.log = JsonlLog(self.out / "train_log.jsonl", self.is_main)
        self.skipped_path = self.out / "skipped.jsonl"
        if self.is_main:
            save_config(cfg, self.out / "config.yaml")
            self._record_skips(self.train_set.skipped)

    def _pretrain_experts(self, model: VLM, records: list[dict[str, Any]], base_dir: Path) -> None:
        from .expert_pretrain import pretrain_expert

        t, acc = self.cfg.train, self.accelerator
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision)
        for name, expert in model.experts.items():
            if not any(p.requires_grad for p in expert.parameters()):
                continue
            expert.to(acc.device)
            history = pretrain_expert(
                expert,
                records,
                base_dir,
                steps=t.expert_pretrain_steps,
                batch_size=t.expert_pretrain_batch_size,
                lr=t.expert_pretrain_lr,
                max_minutes=t.expert_pretrain_minutes,
                device=acc.device,
                autocast_dtype=dtype,
                seed=t.seed,
                progress=self.progress and self.is_main,
            )
            if self.is_main:
                with open(self.out / "expert_pretrain_log.jsonl", "a") as f:
                    for row in history:
                        f.write(json.dumps({"expert": name, **row}) + "\n")
                log.info(
                    "expert %s pretrained: %d steps, final loss %.3f", name, len(history), history[-1]["loss"]
                )

    def _record_skips(self, skips: list[dict[str, Any]]) -> None:
        if skips and self.is_main:
            with open(self.skipped_path, "a") as f:
                for s in skips:
                    f.write(json.dumps(s) + "\n")

    def _loader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.cfg.train.batch_size,
            sampler=self.sampler,
            collate_fn=self.collate,
            num_workers=self.cfg.data.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def _set_lr(self) -> float:
        f = self.schedule.factor(self.state.step, self.state.elapsed)
        for g in self.optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
            g["lr"] = g["initial_lr"] * f
        return f

    @torch.no_grad()
    def validate(self) -> float | None:
        if self.val_set is None or len(self.val_set) == 0:
            return None
        model = self.model
        model.eval()
        total, count = 0.0, 0
        loader = DataLoader(self.val_set, batch_size=self.cfg.train.batch_size, collate_fn=self.collate)
        for batch in loader:
            if not batch.get("ids"):
                continue
            with self.accelerator.autocast():
                loss = model(**_to_device(batch, self.accelerator.device)).loss
            n = len(batch["ids"])
            total += float(loss) * n
            count += n
        model.train()
        return total / max(1, count)

    def save_checkpoint(self) -> Path:
        """Atomic: write into a temp folder, rename it into place, then move the ``latest`` pointer."""
        acc = self.accelerator
        ckpt_root = self.out / CHECKPOINTS
        name = f"step_{self.state.step:07d}"
        final, tmp = ckpt_root / name, ckpt_root / (name + ".tmp")
        acc.wait_for_everyone()
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if self.is_main:
            save_vlm(acc.unwrap_model(self.model), self.processor, tmp / "export")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer_tmp = ckpt_root / (LATEST + ".tmp")
            pointer_tmp.write_text(name)
            os.replace(pointer_tmp, ckpt_root / LATEST)
            old = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
            for p in old[: -self.cfg.train.keep_checkpoints]:
                shutil.rmtree(p, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def train(self) -> Path:
        cfg, acc, state = self.cfg.train, self.accelerator, self.state
        if self.is_main:
            log.info("trainable parameters: %s", self.counts)
        bar = tqdm(
            total=cfg.max_steps,
            initial=state.step,
            desc=f"train[{cfg.stage}]",
            disable=not (self.progress and self.is_main),
            dynamic_ncols=True,
        )
        start = time.perf_counter() - state.elapsed
        loss_ema = None
        window_tokens, window_start = 0, time.perf_counter()
        done = state.step >= cfg.max_steps or self.schedule.progress(state.step, state.elapsed) >= 1.0
        micro = 0
        while not done:
            self.sampler.load_state_dict({"epoch": state.epoch, "position": state.consumed, "seed": cfg.seed})
            for batch in self._loader():
                self._record_skips(batch["skipped"])
                if not batch.get("ids"):
                    continue
                inputs = _to_device(batch, acc.device)
                with acc.accumulate(self.model):
                    lr_factor = self._set_lr()
                    with acc.autocast():
                        loss = self.model(**inputs).loss
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.grad_clip:
                        acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                micro += 1
                state.samples += len(batch["ids"])
                state.consumed += len(batch["ids"]) + len(batch["skipped"])
                window_tokens += int(batch["attention_mask"].sum())  # the CPU copy: no device sync
                if "branch_attention_mask" in batch:
                    window_tokens += int(batch["branch_attention_mask"].sum())
                if not acc.sync_gradients:
                    continue
                state.step += 1
                state.elapsed = time.perf_counter() - start
                value = float(loss.detach())  # one sync per optimizer step, only for logging
                loss_ema = value if loss_ema is None else 0.9 * loss_ema + 0.1 * value
                record = {
                    "step": state.step,
                    "loss": value,
                    "lr": lr_factor * cfg.lr,
                    "samples": state.samples,
                    "elapsed": round(state.elapsed, 3),
                    "batch": _batch_fingerprint(batch["ids"]),
                }
                if state.step % cfg.log_every == 0:
                    now = time.perf_counter()
                    record["tokens_per_s"] = window_tokens / max(1e-9, now - window_start)
                    window_tokens, window_start = 0, now
                if cfg.eval_every and state.step % cfg.eval_every == 0:
                    val = self.validate()
                    if val is not None:
                        record["val_loss"] = val
                self.log.write(record)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_ema:.3f}", lr=f"{lr_factor * cfg.lr:.2e}")
                done = state.step >= cfg.max_steps or self.schedule.progress(state.step, state.elapsed) >= 1.0
                if cfg.save_every and state.step % cfg.save_every == 0 and not done:
                    self.save_checkpoint()
                if done:
                    break
            else:
                state.epoch, state.consumed = state.epoch + 1, 0
        bar.close()
        val = self.validate()
        if val is not None:
            self.log.write({"step": state.step, "val_loss": val, "final": True})
        self.save_checkpoint()
        export = self.out / "model"
        if self.is_main:
            save_vlm(acc.unwrap_model(self.model), self.processor, export)
        acc.wait_for_everyone()
        self.log.close()
        return export


def _corpus(records: list[dict[str, Any]]):
    for rec in records:
        for turn in rec["conversations"]:
            yield turn["value"]


def train(cfg: RunConfig, *, resume: bool = False, progress: bool = True) -> Path:
    """Run training; returns the exported model directory."""
    return Trainer(cfg, resume=resume, progress=progress).train()
