"""Training-step throughput and MFU: our VLM against HF ``LlavaForConditionalGeneration`` in the same run.

Both random init at the same shapes: a Qwen2-1.5B-shaped LLM (d 1536, 28 layers, 12 heads, 2 KV heads, MLP
8960, vocabulary 151,936, tied head) with a CLIP ViT-L/14-336-shaped tower (d 1024, 24 layers, 577 tokens,
read at the penultimate layer as LLaVA-1.5 does, frozen) and LLaVA's 2-layer GELU projector. bf16 weights,
fused AdamW (projector + LLM train), SDPA attention. Every row holds one image (576 visual tokens) and
``--seq`` tokens in all; the last ``--label-fraction`` of its text tokens are labelled (the answer), as in
LLaVA's SFT data where the question and image are not trained.

    python bench/train_mfu.py --json mfu.json                   # GPU: batch 4 and 8, checkpointing off / on
    python bench/train_mfu.py --tiny --steps 2 --warmup 1      # CPU smoke test at tiny shapes

MFU counts the FLOPs of the standard computation, whatever an implementation skips (the LM head on
unlabelled positions, the tower's last layer, full-vocabulary logits), over the card's dense bf16 peak:

    LLM      6 * P_matmul * B * S                P_matmul: every Linear of the decoder + the LM head (V * d)
           + 6 * L * B * S^2 * d                 causal attention: QK^T and AV, 2 * 2 * S^2 * d / 2 forward
    tower    2 * P_tower * B * T + 4 * L_v * B * T^2 * d_v   forward only (frozen), all layers, T = 577
    proj     6 * P_proj * B * 576

Rows share nothing (no packing: every row is full, nothing is padded). Prints a table (tokens/s, MFU, peak
GiB, our / HF at each setting) and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config  # noqa: E402

from vision.experts.base import set_hf_checkpointing  # noqa: E402

IMAGE_TOKEN_ID = 151655  # Qwen2's <|image_pad|>: any id works, both models get the same one
CLIP_MEAN, CLIP_STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def shapes(tiny: bool) -> tuple[Qwen2Config, CLIPVisionConfig]:
    if tiny:
        text = Qwen2Config(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=IMAGE_TOKEN_ID + 1,
            tie_word_embeddings=True,
        )
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
        )
        return text, vision
    text = Qwen2Config(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    )
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    return text, vision


def build_hf(text: Qwen2Config, vision: CLIPVisionConfig) -> torch.nn.Module:
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.requires_grad_(False)
    return model


def build_ours(text: Qwen2Config, vision: CLIPVisionConfig) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from mm.model import VLM, VLMConfig

    tower = {k: v for k, v in vision.to_dict().items() if k not in ("transformers_version", "dtype")}
    expert = {
        "name": "clip",
        "kind": "hf",
        "model": "clip-vit-l-336 (random)",
        "feature_index": -2,
        "resize": "pad",
        "image_size": vision.image_size,
        "interpolation": "bicubic",
        "mean": CLIP_MEAN,
        "std": CLIP_STD,
        "frozen": True,
        "tower_config": tower,
    }
    config = VLMConfig(
        text_config=text,
        experts=[expert],
        projector={"type": "concat", "depth": 2},
        image_token_id=IMAGE_TOKEN_ID,
    )
    model = VLM(config, llm=AutoModelForCausalLM.from_config(text))
    model.fused_loss = True  # what the trainer sets (train.fused_loss, on by default)
    return model


def flops_per_row(text: Qwen2Config, vision: CLIPVisionConfig, seq: int, image_tokens: int) -> float:
    """Training FLOPs of one row by the formula in the module docstring."""
    d, f, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    kv = d // text.num_attention_heads * text.num_key_value_heads
    decoder = layers * (d * d + 2 * d * kv + d * d + 3 * d * f)  # q, k, v, o, gate, up, down
    llm = 6 * (decoder + text.vocab_size * d) * seq + 6 * layers * seq * seq * d
    dv, fv, lv = vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers
    tokens = image_tokens + 1
    tower = 2 * lv * (4 * dv * dv + 2 * dv * fv) * tokens + 4 * lv * tokens * tokens * dv
    projector = 6 * (dv * d + d * d) * image_tokens
    return float(llm + tower + projector)


def make_batch(batch: int, seq: int, image_tokens: int, image_size: int, vocab: int, fraction: float, device):
    """One image at the start of every row, random text after it, labels on the last part of the text."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab, IMAGE_TOKEN_ID) - 1, (batch, seq), generator=g)
    ids[:, 1 : 1 + image_tokens] = IMAGE_TOKEN_ID
    labels = torch.full_like(ids, -100)
    text = seq - 1 - image_tokens
    first = seq - max(1, int(text * fraction))
    labels[:, first:] = ids[:, first:]
    pixels = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
        "pixels": pixels.to(device),
    }


def step_inputs(kind: str, batch: dict, dtype: torch.dtype) -> dict:
    common = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    if kind == "hf":  # CLIP's mean / std, as its image processor would give
        mean = torch.tensor(CLIP_MEAN, device=batch["pixels"].device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=batch["pixels"].device).view(1, 3, 1, 1)
        return {**common, "pixel_values": ((batch["pixels"].float() / 255 - mean) / std).to(dtype)}
    return {**common, "pixel_values": {"clip": batch["pixels"]}}  # our expert normalises uint8 itself


def measure(model, kind: str, batch: dict, steps: int, warmup: int, dtype, device) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses = []
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        # the batch's pixels are converted inside the step, as a data loader's uint8 batch would be
        loss = model(**step_inputs(kind, batch, dtype)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del optimizer
    return {
        "seconds_per_step": seconds / steps,
        "first_loss": round(float(losses[0]), 4),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--models", nargs="+", default=["hf", "ours"], choices=["hf", "ours"])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--label-fraction", type=float, default=0.5, help="of each row's text tokens")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="ours: torch.compile each decoder layer")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="default: from the GPU's name")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" or args.tiny else torch.float32
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    text, vision = shapes(args.tiny)
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    seq = min(args.seq, 4 * image_tokens) if args.tiny else args.seq
    row_flops = flops_per_row(text, vision, seq, image_tokens)
    rows: list[dict] = []
    head = f"{'model':>6} {'batch':>5} {'ckpt':>4} {'tok/s':>9} {'MFU':>6} "
    head += f"{'peak GiB':>8} {'loss':>7} {'x HF':>6}"
    print(f"{name}, seq {seq}, {image_tokens} image tokens, {row_flops / 1e12:.2f} TFLOP per row")
    print(head, flush=True)
    for kind in args.models:
        torch.manual_seed(0)
        with torch.device(device):
            model = (build_hf if kind == "hf" else build_ours)(text, vision).to(dtype).train()
        if kind == "ours":
            model.experts.eval()
            if args.compile:
                for layer in model.llm.get_decoder().layers:
                    layer.compile()
        for ckpt in args.checkpointing:
            llm = model.model.language_model if kind == "hf" else model.llm
            set_hf_checkpointing(llm, ckpt == "on")
            for b in args.batches:
                batch = make_batch(
                    b, seq, image_tokens, vision.image_size, text.vocab_size, args.label_fraction, device
                )
                row = {"model": kind, "batch": b, "checkpointing": ckpt == "on", "compile": args.compile}
                try:
                    row.update(measure(model, kind, batch, args.steps, args.warmup, dtype, device))
                except torch.OutOfMemoryError:
                    row["oom"] = True
                del batch
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if not row.get("oom"):
                    row["tokens_per_s"] = round(b * seq / row["seconds_per_step"], 1)
                    if peak:
                        row["mfu"] = round(b * row_flops / row["seconds_per_step"] / (peak * 1e12), 4)
                    base = next(
                        (
                            r
                            for r in rows
                            if r["model"] == "hf"
                            and r["batch"] == b
                            and r["checkpointing"] == row["checkpointing"]
                            and not r.get("oom")
                        ),
                        None,
                    )
                    if kind == "ours" and base:
                        row["x_hf"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
                        row["peak_x_hf"] = (
                            round(row["peak_gib"] / base["peak_gib"], 3) if row["peak_gib"] else None
                        )
                rows.append(row)
                print(
                    f"{kind:>6} {b:>5} {ckpt:>4} "
                    + (
                        "out of memory"
                        if row.get("oom")
                        else f"{row['tokens_per_s']:>9.0f} {row.get('mfu', 0):>6.1%} "
                        f"{row['peak_gib'] or 0:>8.1f} {row['first_loss']:>7.3f} {row.get('x_hf', 0):>6.2f}"
                    ),
                    flush=True,
                )
                if args.json:
                    args.json.write_text(
                        json.dumps(
                            {
                                "date": datetime.date.today().isoformat(),
                                "device": name,
                                "torch": torch.__version__,
                                "peak_tflops": peak,
                                "seq": seq,
                                "image_tokens": image_tokens,
                                "tflop_per_row": round(row_flops / 1e12, 4),
                                "settings": {k: v for k, v in vars(args).items() if k != "json"},
                                "rows": rows,
                            },
                            indent=1,
                        )
                    )
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
