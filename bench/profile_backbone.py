"""Where one backbone step spends its GPU time: the top kernels of a bf16 training or inference step.

The steps are ``bench/backbones.py``'s own (channels-last, bf16 weights for inference, bf16 autocast + fused
AdamW for training, no CUDA graph; ``--compile``: torch.compile, as ``backbones.py --compile``). Prints, per
model and phase, the wall time and summed kernel time per step, the kernel count, and the kernels with the
most GPU time; ``--json`` keeps the rows.

    python bench/profile_backbone.py cswin_tiny_224 swin_tiny_patch4_window7_224 --phase train --json p.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from backbones import inference_step, parse_args, training_step  # run as a script: bench/ is on sys.path
from torch.profiler import ProfilerActivity, profile


def profile_model(name: str, phase: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    batch = args.batch or (128 if phase == "infer" else 64)
    compile_flag = ["--compile"] if args.compile else []
    bench_args = parse_args(["--batch-infer", str(batch), "--batch-train", str(batch), *compile_flag])
    if phase == "infer":
        step, _ = inference_step(name, args.res, bench_args, device)
    else:
        step = training_step(name, args.res, bench_args, device)
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(args.iters):
        step()
    torch.cuda.synchronize(device)
    wall = (time.perf_counter() - t) / args.iters
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.iters):
            step()
        torch.cuda.synchronize(device)
    host = None
    if args.host:  # host side: which ops cost the most CPU time to issue (self time, summed per op name)
        with profile(activities=[ProfilerActivity.CPU]) as hprof:
            for _ in range(args.iters):
                step()
            torch.cuda.synchronize(device)
        ops = [e for e in hprof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in ops)
        host = {
            "ms_per_step": total / args.iters / 1e3,
            "events_per_step": sum(e.count for e in ops) / args.iters,
            "top": [
                {
                    "op": e.key[:80],
                    "ms_per_step": e.self_cpu_time_total / args.iters / 1e3,
                    "calls_per_step": e.count / args.iters,
                }
                for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[: args.top]
            ],
        }
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or e.self_device_time_total > 0]
    kernel_us = sum(e.self_device_time_total for e in events) / args.iters
    kernels = sum(e.count for e in events) / args.iters
    top = sorted(events, key=lambda e: -e.self_device_time_total)[: args.top]
    rows = [
        {
            "kernel": e.key[:110],
            "ms_per_step": e.self_device_time_total / args.iters / 1e3,
            "calls_per_step": e.count / args.iters,
            "share": e.self_device_time_total / args.iters / max(kernel_us, 1e-9),
        }
        for e in top
    ]
    return {
        "model": name,
        "phase": phase,
        "batch": batch,
        "res": args.res,
        "wall_ms": wall * 1e3,
        "img_s": batch / wall,
        "kernel_ms": kernel_us / 1e3,
        "kernels_per_step": kernels,
        "top": rows,
        "host": host,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--phase", choices=("train", "infer", "both"), default="both")
    ap.add_argument("--batch", type=int, default=0, help="0: 128 for inference, 64 for training")
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--host", action="store_true", help="also profile the host side (CPU time per op)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (backbones.py --compile)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = torch.device("cuda")
    phases = ("infer", "train") if args.phase == "both" else (args.phase,)
    out = []
    for name in args.models:
        for phase in phases:
            r = profile_model(name, phase, args, device)
            out.append(r)
            print(
                f"[{name} {phase} b{r['batch']} @{r['res']}] wall {r['wall_ms']:.1f} ms "
                f"({r['img_s']:.0f} img/s), kernels {r['kernel_ms']:.1f} ms, "
                f"{r['kernels_per_step']:.0f} launches",
                flush=True,
            )
            for k in r["top"]:
                share, calls = k["share"], k["calls_per_step"]
                print(f"[  {k['ms_per_step']:7.2f} ms {share:5.1%} x{calls:5.0f}  {k['kernel']}")
            if r["host"]:
                h = r["host"]
                events = h["events_per_step"]
                print(f"[  host: {h['ms_per_step']:.1f} ms of profiled CPU time, {events:.0f} events")
                for k in h["top"]:
                    print(f"[  host {k['ms_per_step']:7.2f} ms x{k['calls_per_step']:5.0f}  {k['op']}")
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
