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
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate import __version__ as accelerate_version
from accelerate.utils import DeepSpeedPlugin, DistributedType, broadcast, reduce, set_seed
from torch.utils.data import DataLoader

from data.dataset import Collator, ConversationDataset, ResumableSampler
from data.media import MediaPaths
from data.schema import RecordFile, load_record_file
from data.skips import NothingUsable, Skip, SkipLog
from vision.experts.base import set_hf_checkpointing

from .build import ModelLoadError, build_tokenizer, build_vlm, load_vlm, make_processor, save_vlm
from .checkpoints import Checkpoint, CheckpointError, CheckpointManager, claim_output_dir
from .config import ConfigError, RunConfig, save_config
from .lora import prepare_lora
from .model import VLM
from .optim import apply_stage, param_groups, stage_summary
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


def _deepspeed_plugin(path: str | None) -> DeepSpeedPlugin | None:
    """``train.deepspeed`` (or ``--deepspeed``): a DeepSpeed JSON for a launch that did not name one through
    ``accelerate launch``'s config (``deepspeed``, ``torchrun``, one process)."""
    if not path:
        return None
    if not Path(path).is_file():
        raise ConfigError(f"train.deepspeed: no DeepSpeed config at {path}")
    try:
        json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"train.deepspeed: {path} is not valid JSON ({err})") from err
    return DeepSpeedPlugin(hf_ds_config=str(path))


def _deepspeed_launch() -> bool:
    """``accelerate launch`` with a DeepSpeed config (it says so in the environment)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def fill_deepspeed_auto(config: dict[str, Any], train_cfg: Any, world: int, hidden: int) -> dict[str, Any]:
    """Resolve a DeepSpeed config's ``"auto"`` fields from our ``train`` section (explicit values stay):
    micro-batch, accumulation, global batch, clipping (DeepSpeed clips; accelerate's ``clip_grad_norm_`` does
    nothing under it), ZeRO-3's gathered 16-bit weights, which the export needs, and the bucket sizes from
    the LLM's width (the HF Trainer's rule; our VLM config has no ``hidden_size`` for accelerate to read)."""
    values = {
        "train_micro_batch_size_per_gpu": train_cfg.batch_size,
        "gradient_accumulation_steps": train_cfg.grad_accum,
        "train_batch_size": train_cfg.batch_size * train_cfg.grad_accum * world,
        "gradient_clipping": train_cfg.grad_clip or 0.0,
    }
    for key, value in values.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    zero = config.get("zero_optimization", {})
    buckets = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for key, value in buckets.items():
        if zero.get(key) == "auto":
            zero[key] = value
    if zero.get("stage") == 3 and zero.get("stage3_gather_16bit_weights_on_model_save", "auto") == "auto":
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return config


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
        if cfg.train.deepspeed and "WORLD_SIZE" not in os.environ and not torch.distributed.is_initialized():
            # one DeepSpeed process outside a launcher: DeepSpeed needs a process group (of one), a local rank
            os.environ.setdefault("LOCAL_RANK", "0")
            torch.distributed.init_process_group(
                "nccl" if torch.cuda.is_available() else "gloo",
                store=torch.distributed.HashStore(),
                rank=0,
                world_size=1,
            )
        self.accelerator = Accelerator(
            mixed_precision=_mixed_precision(cfg.train.mixed_precision),
            gradient_accumulation_steps=cfg.train.grad_accum,
            deepspeed_plugin=_deepspeed_plugin(cfg.train.deepspeed),
            # without it accelerate runs each torchrun process of a machine without a GPU on its own (and
            # with it, it drops DeepSpeed); one process keeps accelerate's own choice (MPS on a Mac)
            cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1
            and not torch.cuda.is_available()
            and not cfg.train.deepspeed
            and not _deepspeed_launch(),
        )
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        # DeepSpeed calls torch.distributed's old collective names; torch warns at each call site, not ours
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.c10d_logger")
        self.deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        if (cfg.train.deepspeed or _deepspeed_launch()) and not self.deepspeed:
            kind = self.accelerator.distributed_type.value
            raise ConfigError(f"DeepSpeed was asked for but accelerate set up {kind}")
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.world:  # e.g. DeepSpeed on a machine without GPUs: each rank would train alone
            kind = self.accelerator.distributed_type.value
            raise ConfigError(
                f"launched as {launched} processes but only {self.world} joined the run ({kind}); accelerate "
                f"{accelerate_version} runs DeepSpeed across processes only on GPUs: drop --deepspeed / "
                "train.deepspeed, or run on GPUs"
            )
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
        processor.video = cfg.data.video  # the run's frame sampling (or the middle-frame baseline)
        self.processor = processor
        self.processor_v2pe = bool(model.config.v2pe)  # images draw their deltas in training
        prepare_lora(model, cfg.train.lora, cfg.train.stage, resumed=start is not None)
        self.counts = apply_stage(model, cfg.train.stage, cfg.train.train_experts)
        self.stage_summary = stage_summary(model, cfg.train.stage)
        model.loss_weighting = cfg.train.loss_weighting
        model.fused_loss = cfg.train.fused_loss
        if cfg.train.attn_implementation:
            model.llm.set_attn_implementation(cfg.train.attn_implementation)
        if cfg.train.compile:
            for layer in model.llm.get_decoder().layers:
                layer.compile()
        if cfg.train.gradient_checkpointing:
            set_hf_checkpointing(model.llm, True)
            for name, expert in model.experts.items():  # a trainable tower's activations too
                trains = any(p.requires_grad for p in expert.parameters())
                if trains and not expert.set_checkpointing(True):
                    log.info(
                        "expert %s (%s) has no gradient checkpointing: its activations are kept",
                        name,
                        expert.cfg.model,
                    )
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
            len(self.train_set),
            seed=cfg.train.seed,
            rank=acc.process_index,
            world_size=acc.num_processes,
            lengths=self.train_set.lengths() if cfg.data.group_by_length else None,
            batch_size=cfg.train.batch_size,
        )
        self.collate = Collator(self.processor, pack_to=cfg.data.max_length if cfg.data.packing else None)

    def _setup_optimisation(self, model: VLM, start: Checkpoint | None) -> None:
        t, acc = self.cfg.train, self.accelerator
        optimizer = torch.optim.AdamW(
            param_groups(model, self.cfg), lr=t.lr, betas=tuple(t.betas), fused=torch.cuda.is_available()
        )
        if self.deepspeed:
            hidden = model.llm.config.get_text_config().hidden_size
            fill_deepspeed_auto(acc.state.deepspeed_plugin.deepspeed_config, t, self.world, hidden)
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
        self.export(tmp / "export")
        acc.wait_for_everyone()  # every rank's shards are written before the main rank seals the folder
        final = self.checkpoints.root / f"step_{self.state.step:07d}"
        if self.is_main:
            final = self.checkpoints.commit(self.state.step)
        acc.wait_for_everyone()
        return final

    def export(self, out: Path) -> None:
        """The model as one HF directory. Every rank takes part: ZeRO-3 gathers the partitioned weights."""
        acc = self.accelerator
        state_dict = acc.get_state_dict(self.model) if self.deepspeed else None
        if self.is_main:
            save_vlm(acc.unwrap_model(self.model), self.processor, out, state_dict=state_dict)

    # -- agreement between ranks (no-ops in one process) -------------------------------------------------
    def _shared_clock(self, elapsed: float) -> float:
        """Rank 0's clock for every rank: the schedule and the stop decision follow one time."""
        if self.world == 1:
            return elapsed
        return float(broadcast(torch.tensor([elapsed], dtype=torch.float64, device=self.accelerator.device)))

    def _all_ranks(self, *values: float) -> list[float]:
        """Each value summed over the ranks (one collective)."""
        if self.world == 1:
            return [float(v) for v in values]
        summed = reduce(torch.tensor([float(v) for v in values], device=self.accelerator.device), "sum")
        return summed.tolist()

    def _step(self, batch: dict[str, Any], global_ids: int) -> dict[str, Any] | None:
        """One micro-batch (``global_ids`` records over all ranks); returns the log record when it completed
        an optimizer step."""
        cfg, acc, state = self.cfg.train, self.accelerator, self.state
        with acc.accumulate(self.model):
            lr_factor = self._set_lr()
            with acc.autocast():
                out = self.model(**_to_device(batch, acc.device))
            loss, weight = out.loss, out.loss_weight.float()
            if self.world > 1:
                # Ranks average gradients; weighing each rank's mean by its share of the global batch's
                # weight (labelled tokens or answers) makes that average the gradient of one global mean,
                # as one process with the whole batch would take.
                total = reduce(weight.clone(), "sum").clamp_min(1e-9)
                acc.backward(loss * (weight * self.world / total))
            else:
                acc.backward(loss)
            if acc.sync_gradients and cfg.grad_clip and not self.deepspeed:  # DeepSpeed clips (its config)
                acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        # the logged loss: every micro-batch of the step, every rank, weighed (no sync until the step ends)
        self._loss_sum = self._loss_sum + loss.detach().float() * weight
        self._weight_sum = self._weight_sum + weight
        state.samples += global_ids
        self._window_tokens += int(batch["attention_mask"].sum())  # the CPU copy: no device sync
        if "branches" in batch:
            self._window_tokens += int(batch["branches"].attention_mask.sum())
        if not acc.sync_gradients:
            return None
        state.step += 1
        sums = torch.stack([self._loss_sum, self._weight_sum])
        sums = reduce(sums, "sum") if self.world > 1 else sums
        self._loss_sum = self._weight_sum = torch.zeros((), device=acc.device)
        record = {
            "step": state.step,
            "loss": float(sums[0] / sums[1].clamp_min(1e-9)),  # one sync per optimizer step
            "lr": lr_factor * cfg.lr,
            "samples": state.samples,
            "elapsed": round(state.elapsed, 3),
            "batch": _batch_fingerprint(batch["ids"]),
        }
        if state.step == 1:  # what each image costs the LLM, once in the log
            record["visual_tokens_per_image"] = self.processor.tokens_per_image
            record["positions_per_image"] = self.processor.positions_per_image
            record["visual_tokens_per_video"] = self.processor.tokens_per_video
        if state.step % cfg.log_every == 0:
            now = time.perf_counter()
            record["tokens_per_s"] = self._window_tokens / max(1e-9, now - self._window_start)
            self._window_tokens, self._window_start = 0, now
        return record

    def train(self) -> Path:
        cfg, state = self.cfg.train, self.state
        if self.is_main:
            log.info(self.stage_summary)
            log.info(
                "each image: %d visual tokens at %g LLM positions (%s)",
                self.processor.tokens_per_image,
                self.processor.positions_per_image,
                ", ".join(e.describe() for e in self.accelerator.unwrap_model(self.model).experts.values()),
            )
        bar = Progress(self.schedule, state, f"train[{cfg.stage}]", self.progress and self.is_main)
        start = time.perf_counter() - state.elapsed
        self._window_tokens, self._window_start = 0, time.perf_counter()
        self._loss_sum = self._weight_sum = torch.zeros((), device=self.accelerator.device)
        loss_ema = None
        while not self._done():
            self.sampler.load_state_dict({"epoch": state.epoch, "position": state.consumed, "seed": cfg.seed})
            full_pass, used = state.consumed == 0, 0
            for batch in self._loader():
                self.skips.extend(batch["skipped"])
                state.consumed += len(batch["ids"]) + len(batch["skipped"])
                used += len(batch["ids"])
                # every rank steps or none does: a rank whose whole batch was unusable would otherwise
                # leave the others waiting in a collective
                empty_ranks, global_ids = self._all_ranks(not batch["ids"], len(batch["ids"]))
                if empty_ranks and batch["ids"]:
                    log.warning("step skipped on every rank: another rank's whole batch was unusable")
                record = self._step(batch, int(global_ids)) if not empty_ranks else None
                state.elapsed = self._shared_clock(time.perf_counter() - start)
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
                if full_pass and self._all_ranks(used)[0] == 0:
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
        self.export(export)
        if self.is_main:
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


def main(argv: list[str] | None = None) -> int:
    """``python -m mm.train CONFIG [overrides] [--deepspeed JSON]``: the module that ``torchrun``,
    ``deepspeed`` and ``accelerate launch`` start on every rank (the same options as ``mm train``)."""
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
