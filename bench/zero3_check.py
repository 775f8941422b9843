"""Does each backbone train one step under DeepSpeed ZeRO-3 (parameters partitioned)?

ZeRO-3 gathers a module's parameters in its forward/backward hooks; a module that reads another module's
weights without calling it needs them registered as external parameters. Prints one line per model.

    python bench/zero3_check.py cswin_tiny_224 biformer_tiny sgformer_s convnext_tiny
    torchrun --nproc_per_node 2 bench/zero3_check.py cswin_tiny_224 biformer_tiny sgformer_s
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


def check(name: str) -> str:
    import deepspeed  # only this check needs it

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, drop_path_rate=0.0)
    x = torch.randn(2, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    reference = copy.deepcopy(model).cuda().to(torch.bfloat16)
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
        "bf16": {"enabled": True},
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
    return f"ok, losses {losses[0]:.5f} -> {losses[1]:.5f} (without ZeRO: {expected:.5f})"


def main() -> None:
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", "29511")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one GPU per rank under torchrun
    for name in sys.argv[1:]:
        try:
            result = check(name)
        except Exception as exc:  # noqa: BLE001  (report and go on)
            result = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            traceback.print_exc(limit=-3)
        print(f"[zero3] rank {os.environ['RANK']}/{os.environ['WORLD_SIZE']} {name}: {result}", flush=True)


if __name__ == "__main__":
    main()
