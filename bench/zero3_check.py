"""Does each backbone train one step under DeepSpeed ZeRO-3 (parameters partitioned)?

ZeRO-3 gathers a module's parameters in its forward/backward hooks; a module that reads another module's
weights without calling it needs them registered as external parameters. Prints one line per model.

    python bench/zero3_check.py cswin_tiny_224 biformer_tiny sgformer_s convnext_tiny
    torchrun --nproc_per_node 2 bench/zero3_check.py cswin_tiny_224 biformer_tiny sgformer_s
    python bench/zero3_check.py --fp32 sgformer_s    # fp32 weights (default: DeepSpeed bf16)

In bf16 SG-Former's token sort (significance near-ties, see vision/sgformer.py) can turn a last-bit difference
into a slightly different loss; in fp32 the ZeRO step must match the plain step to rounding.
"""

from __future__ import annotations

import copy
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

import vision  # noqa: E402,F401


def check(name: str, dtype: torch.dtype) -> str:
    import deepspeed  # only this check needs it

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, drop_path_rate=0.0)
    x = torch.randn(2, 3, 224, 224, device="cuda", dtype=dtype)
    reference = copy.deepcopy(model).cuda().to(dtype)
    expected = float(reference(x).float().square().mean())  # the same first step without ZeRO
    del reference
    config = {
        "train_micro_batch_size_per_gpu": 2,
        # partition everything and keep nothing gathered between modules: a weight read outside its module's
        # own forward is then only there if DeepSpeed was told to gather it
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_max_live_parameters": 0,
            "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": 0,
        },
        "bf16": {"enabled": dtype == torch.bfloat16},
    }
    # a client torch optimizer: DeepSpeed's own fused Adam would JIT-compile a CUDA extension first
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, config=config, optimizer=optimizer)
    losses = []
    for _ in range(2):
        loss = engine(x).float().square().mean()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return f"ok, losses {losses[0]:.6f} -> {losses[1]:.6f} (without ZeRO: {expected:.6f})"


def main() -> None:
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", "29511")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one GPU per rank under torchrun
    names = [a for a in sys.argv[1:] if a != "--fp32"]
    dtype = torch.float32 if "--fp32" in sys.argv[1:] else torch.bfloat16
    for name in names:
        try:
            result = check(name, dtype)
        except Exception as exc:  # noqa: BLE001  (report and go on)
            result = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            traceback.print_exc(limit=-3)
        print(f"[zero3] rank {os.environ['RANK']}/{os.environ['WORLD_SIZE']} {name}: {result}", flush=True)


if __name__ == "__main__":
    main()
