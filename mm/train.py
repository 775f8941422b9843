"""Training on accelerate: stages ``align`` (projector only) and ``sft`` (+ LLM, optionally experts).

AdamW with warmup + cosine decay (by steps or a wall-clock budget), gradient accumulation, bf16 where the
hardware has it, periodic validation loss, atomic resumable checkpoints (``mm.checkpoints``), a final HF
directory, JSONL + tensorboard logs cut back to the resumed step, and every skipped input recorded once in
``skipped.jsonl``. The same code runs in one CPU process and under ``accelerate launch``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from data.dataset import Collator, ConversationDataset, ResumableSampler
from data.media import MediaPaths
from data.schema import RecordFile, load_record_file
from data.skips import NothingUsable, Skip, SkipLog

from .build import ModelLoadError, build_tokenizer, build_vlm, load_vlm, make_processor, save_vlm
from .checkpoints import Checkpoint, CheckpointError, CheckpointManager, claim_output_dir
from .config import ConfigError, RunConfig, save_config
from .model import VLM
from .optim import apply_stage, param_groups
from .run_log import RunLog
from .schedule import Progress, Schedule

log = logging.getLogger("mm.train")


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


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The model's inputs of a collated batch, on ``device`` (labels may be None, see VLMProcessor)."""
    out = {
        k: batch[k].to(device, non_blocking=True) if torch.is_tensor(batch[k]) else batch[k]
        for k in ("input_ids", "attention_mask", "labels", "image_deltas")
    }
    pv = batch.get("pixel_values")
    out["pixel_values"] = None if pv is None else {k: v.to(device, non_blocking=True) for k, v in pv.items()}
    if "branches" in batch:
        out["branches"] = batch["branches"].to(device, non_blocking=True)
    return out


def _corpus(records: list[dict[str, Any]]):
    for rec in records:
        for turn in rec["conversations"]:
            yield turn["value"]


# -- the trainer ----------------------------------------------------------------------------------------
class Trainer:
    """Set up in four named steps (run folder, model, data, optimisation), then ``train``."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        resume: bool = False,
        resume_from: str | Path | None = None,
        overwrite: bool = False,
        progress: bool = True,
    ):
        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.train.output_dir)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if not torch.cuda.is_available():
            # DeepSpeed, which accelerate imports to save state, prints "Setting accelerator to CPU" to stdout
            # on every run without CUDA; naming the accelerator it would pick anyway keeps it quiet.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self.accelerator = Accelerator(
            mixed_precision=_mixed_precision(cfg.train.mixed_precision),
            gradient_accumulation_steps=cfg.train.grad_accum,
        )
        self.is_main = self.accelerator.is_main_process
        set_seed(cfg.train.seed)
        start = self._setup_run_dir(resume or resume_from is not None, resume_from, overwrite)
        self.skips = SkipLog(self.out / "skipped.jsonl" if self.is_main else None)
        model = self._setup_model(start)
        self._setup_data()
        self._setup_optimisation(model, start)

    # -- set-up, step by step ---------------------------------------------------------------------------
    def _setup_run_dir(
        self, resume: bool, resume_from: str | Path | None, overwrite: bool
    ) -> Checkpoint | None:
        """Claim the output folder and find the checkpoint to continue from (None: a new run)."""
        if self.is_main:
            claim_output_dir(self.out, resume=resume, overwrite=overwrite)
        self.accelerator.wait_for_everyone()
        self.checkpoints = CheckpointManager(self.out, self.cfg.train.keep_checkpoints)
        start = None
        if resume_from is not None:
            start = Checkpoint.at(resume_from)
            problem = self.checkpoints.problem(start)
            if problem:
                raise CheckpointError(f"cannot resume from {start.path}: {problem}")
        elif resume:
            start = self.checkpoints.resume_point()
            if start is None:
                log.warning(
                    "--resume: no complete checkpoint under %s; starting from step 0", self.checkpoints.root
                )
        return start

    def _setup_model(self, start: Checkpoint | None) -> VLM:
        cfg = self.cfg
        if not cfg.data.train:
            raise ConfigError("data.train: no training file given (a LLaVA .json or .jsonl)")
        self.train_file = self._records(cfg.data.train, "train")
        if start is not None:  # tokenizer, model layout and processor come from the checkpoint, not rebuilt
            try:
                model, processor = load_vlm(start.path / "export")
            except (ModelLoadError, FileNotFoundError) as err:
                raise CheckpointError(f"{err}; {self.checkpoints.previous_hint(start)}") from err
        elif cfg.model.init_from:
            model, processor = load_vlm(cfg.model.init_from)
            if cfg.model.v2pe and not model.config.v2pe:  # fine-tune a plain model with V2PE
                model.enable_v2pe()
        else:
            tokenizer = build_tokenizer(cfg.model, _corpus(self.train_file.records))
            model = build_vlm(cfg.model, tokenizer)
            processor = make_processor(model, tokenizer, cfg.data)
        processor.max_length = cfg.data.max_length
        processor.system_prompt = cfg.data.system_prompt
        processor.box_format = cfg.data.box_format
        self.processor = processor
        self.processor_v2pe = bool(model.config.v2pe)  # images draw their deltas in training
        self.counts = apply_stage(model, cfg.train.stage, cfg.train.train_experts)
        model.loss_weighting = cfg.train.loss_weighting
        if cfg.train.attn_implementation:
            model.llm.set_attn_implementation(cfg.train.attn_implementation)
        if cfg.train.gradient_checkpointing:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model.train()

    def _records(self, path: str | None, split: str) -> RecordFile:
        """A LLaVA file's valid records; broken ones are skipped and recorded (``data.strict``: raised)."""
        loaded = load_record_file(path, strict=self.cfg.data.strict)
        self.skips.extend(Skip.from_error(split, None, None, err) for err in loaded.errors)
        return loaded

    def _dataset(self, loaded: RecordFile, split: str, limit: int | None = None) -> ConversationDataset:
        data = self.cfg.data
        media = MediaPaths(data.image_folder or loaded.path.parent, data.media_roots)
        dataset = ConversationDataset(
            loaded.records[:limit],
            self.processor,
            media,
            indices=loaded.indices[:limit],
            split=split,
            cache_pixels=data.cache_pixels or split == "val",
            blind=data.blind,
            branch_turns=data.branch_turns and split == "train",
            deltas=data.v2pe_deltas if split == "train" and self.processor_v2pe else None,
            seed=self.cfg.train.seed,
            progress=self.progress and self.is_main and split == "train",
        )
        self.skips.extend(dataset.skipped)
        return dataset

    def _setup_data(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        self.train_set = self._dataset(self.train_file, "train")
        if len(self.train_set) == 0:
            raise NothingUsable(f"nothing to train on: {self.skips.summary('train', self.train_file.total)}")
        self.val_set = None
        if cfg.data.val:
            self.val_set = self._dataset(self._records(cfg.data.val, "val"), "val", cfg.data.val_max_records)
        self.sampler = ResumableSampler(
            len(self.train_set), seed=cfg.train.seed, rank=acc.process_index, world_size=acc.num_processes
        )
        self.collate = Collator(self.processor)

    def _setup_optimisation(self, model: VLM, start: Checkpoint | None) -> None:
        t, acc = self.cfg.train, self.accelerator
        optimizer = torch.optim.AdamW(
            param_groups(model, self.cfg), lr=t.lr, betas=tuple(t.betas), fused=torch.cuda.is_available()
        )
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.schedule = Schedule(
            t.max_steps, t.warmup_steps, t.min_lr_ratio, t.max_minutes * 60 if t.max_minutes else None
        )
        self.state = TrainerState()
        acc.register_for_checkpointing(self.state)
        if start is not None:
            try:
                acc.load_state(str(start.path))
            except Exception as err:  # torch / safetensors / pickle each raise their own type
                hint = self.checkpoints.previous_hint(start)
                raise CheckpointError(f"cannot resume from {start.path}: {err}; {hint}") from err
            log.info("resumed from %s at step %d", start.path, self.state.step)
        self.log = RunLog(self.out, self.is_main, resumed_step=self.state.step)
        if self.is_main:
            save_config(self.cfg, self.out / "config.yaml")

    # -- the loop -----------------------------------------------------------------------------------------
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

    def _done(self) -> bool:
        s = self.state
        return s.step >= self.cfg.train.max_steps or self.schedule.progress(s.step, s.elapsed) >= 1.0

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean validation loss, or None (with a warning) when no validation record is usable."""
        if self.val_set is None:
            return None
        model = self.model
        model.eval()
        total, count = 0.0, 0
        loader = DataLoader(self.val_set, batch_size=self.cfg.train.batch_size, collate_fn=self.collate)
        for batch in loader:
            self.skips.extend(batch["skipped"])
            if not batch["ids"]:
                continue
            with self.accelerator.autocast():
                loss = model(**_to_device(batch, self.accelerator.device)).loss
            total += float(loss) * len(batch["ids"])
            count += len(batch["ids"])
        model.train()
        if count == 0:
            if not getattr(self, "_warned_val", False):
                log.warning("no validation loss: %s", self.skips.summary("val"))
                self._warned_val = True
            return None
        return total / count

    def save_checkpoint(self) -> Path:
        """All ranks save their state into a temporary folder; the main rank seals and renames it."""
        acc = self.accelerator
        acc.wait_for_everyone()
        tmp = self.checkpoints.root / f"step_{self.state.step:07d}.tmp"
        if self.is_main:
            tmp = self.checkpoints.begin(self.state.step)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        final = self.checkpoints.root / f"step_{self.state.step:07d}"
        if self.is_main:
            save_vlm(acc.unwrap_model(self.model), self.processor, tmp / "export")
            final = self.checkpoints.commit(self.state.step)
        acc.wait_for_everyone()
        return final

    def _step(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        """One micro-batch; returns the log record when it completed an optimizer step."""
        cfg, acc, state = self.cfg.train, self.accelerator, self.state
        with acc.accumulate(self.model):
            lr_factor = self._set_lr()
            with acc.autocast():
                loss = self.model(**_to_device(batch, acc.device)).loss
            acc.backward(loss)
            if acc.sync_gradients and cfg.grad_clip:
                acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        state.samples += len(batch["ids"])
        self._window_tokens += int(batch["attention_mask"].sum())  # the CPU copy: no device sync
        if "branches" in batch:
            self._window_tokens += int(batch["branches"].attention_mask.sum())
        if not acc.sync_gradients:
            return None
        state.step += 1
        record = {
            "step": state.step,
            "loss": float(loss.detach()),  # one sync per optimizer step, only for logging
            "lr": lr_factor * cfg.lr,
            "samples": state.samples,
            "elapsed": round(state.elapsed, 3),
            "batch": _batch_fingerprint(batch["ids"]),
        }
        if state.step == 1:  # what each image costs the LLM, once in the log
            record["visual_tokens_per_image"] = self.processor.tokens_per_image
            record["positions_per_image"] = self.processor.positions_per_image
        if state.step % cfg.log_every == 0:
            now = time.perf_counter()
            record["tokens_per_s"] = self._window_tokens / max(1e-9, now - self._window_start)
            self._window_tokens, self._window_start = 0, now
        return record

    def train(self) -> Path:
        cfg, state = self.cfg.train, self.state
        if self.is_main:
            log.info("trainable parameters: %s", self.counts)
            log.info(
                "each image: %d visual tokens at %g LLM positions (%s)",
                self.processor.tokens_per_image,
                self.processor.positions_per_image,
                ", ".join(e.describe() for e in self.accelerator.unwrap_model(self.model).experts.values()),
            )
        bar = Progress(self.schedule, state, f"train[{cfg.stage}]", self.progress and self.is_main)
        start = time.perf_counter() - state.elapsed
        self._window_tokens, self._window_start = 0, time.perf_counter()
        loss_ema = None
        while not self._done():
            self.sampler.load_state_dict({"epoch": state.epoch, "position": state.consumed, "seed": cfg.seed})
            full_pass, used = state.consumed == 0, 0
            for batch in self._loader():
                self.skips.extend(batch["skipped"])
                state.consumed += len(batch["ids"]) + len(batch["skipped"])
                used += len(batch["ids"])
                record = self._step(batch) if batch["ids"] else None
                state.elapsed = time.perf_counter() - start
                if record is not None:
                    loss_ema = record["loss"] if loss_ema is None else 0.9 * loss_ema + 0.1 * record["loss"]
                    if cfg.eval_every and state.step % cfg.eval_every == 0:
                        val = self.validate()
                        if val is not None:
                            record["val_loss"] = val
                    self.log.write(record)
                    bar.update(loss=f"{loss_ema:.3f}", lr=f"{record['lr']:.2e}")
                    if cfg.save_every and state.step % cfg.save_every == 0 and not self._done():
                        self.save_checkpoint()
                if self._done():
                    break
            else:
                if full_pass and used == 0:
                    total = self.train_file.total
                    raise NothingUsable(f"nothing to train on: {self.skips.summary('train', total)}")
                state.epoch, state.consumed = state.epoch + 1, 0
        bar.close()
        return self._finish()

    def _finish(self) -> Path:
        """Final validation, a last checkpoint, the exported model, and what was skipped."""
        val = self.validate()
        if val is not None:
            self.log.write({"step": self.state.step, "val_loss": val, "final": True})
        self.save_checkpoint()
        export = self.out / "model"
        if self.is_main:
            save_vlm(self.accelerator.unwrap_model(self.model), self.processor, export)
            for split, total in (("train", self.train_file.total), ("val", None)):
                if self.skips.count(split):
                    log.warning(self.skips.summary(split, total))
        self.accelerator.wait_for_everyone()
        self.log.close()
        return export


def train(
    cfg: RunConfig,
    *,
    resume: bool = False,
    resume_from: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Run training; returns the exported model directory."""
    return Trainer(
        cfg, resume=resume, resume_from=resume_from, overwrite=overwrite, progress=progress
    ).train()
