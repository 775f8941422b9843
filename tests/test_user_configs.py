"""The configs users copy (configs/llava15_*, configs/mousi_*) run through ``mm train``, both stages, with
tiny stand-ins built here for every checkpoint they name (same code path, tiny dims): a Qwen2 directory with
its own tokenizer, an HF CLIP directory, a DINOv2 directory and a timm ConvNeXt weights file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import make_hf_clip_dir, mm
from safetensors.torch import save_file
from test_llm_backends import write_hf_llm

from data.boxes import BoxFormat
from data.shapesworld import ensure_dataset
from mm.build import load_vlm
from mm.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COMMON = ["train.max_steps=2", "train.batch_size=2", "train.grad_accum=1", "train.warmup_steps=1"]
COMMON += ["train.mixed_precision=no", "train.save_every=2", "train.eval_every=2", "data.max_length=512"]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("stand_ins")
    qwen2 = write_hf_llm("qwen2", root / "qwen2")
    clip = make_hf_clip_dir(root / "clip", image_size=32)
    torch.manual_seed(0)
    dinov2 = root / "dinov2"
    tiny = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8
    )
    Dinov2Model(Dinov2Config(image_size=32, **tiny)).save_pretrained(dinov2)
    convnext = root / "convnext_atto.safetensors"
    save_file(timm.create_model("convnext_atto", num_classes=0).state_dict(), convnext)
    data = root / "sw"
    ensure_dataset(data, n=12, seed=0, image_size=96, box_format=BoxFormat(), progress=False)
    return {"qwen2": qwen2, "clip": clip, "dinov2": dinov2, "convnext": convnext, "data": data}


def stage_overrides(s, out: Path, align_model: Path | None) -> list[str]:
    data = [
        f"data.train={s['data'] / 'train.json'}",
        f"data.image_folder={s['data']}",
        f"train.output_dir={out}",
    ]
    return COMMON + data + ([f"model.init_from={align_model}"] if align_model else [])


def run_two_stages(s, tmp_path, first: str, second: str, model_overrides: list[str]) -> tuple[Path, Path]:
    """``mm train`` the align config, then the sft config from its model; returns both model directories."""
    align, sft = tmp_path / "align", tmp_path / "sft"
    result = mm("train", str(CONFIGS / first), *stage_overrides(s, align, None), *model_overrides, "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    result = mm("train", str(CONFIGS / second), *stage_overrides(s, sft, align / "model"), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    return align / "model", sft / "model"


def test_the_configs_are_valid_as_shipped():
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.train.max_steps > 0, path
    llava = load_config(CONFIGS / "llava15_clip_qwen2.yaml")
    assert (llava.train.stage, llava.train.lr, llava.train.batch_size * llava.train.grad_accum) == (
        "align",
        1e-3,
        256,
    )
    sft = load_config(CONFIGS / "llava15_clip_qwen2_sft.yaml")
    assert (sft.train.stage, sft.train.lr, sft.train.batch_size * sft.train.grad_accum) == ("sft", 2e-5, 128)
    mousi = load_config(CONFIGS / "mousi_clip_dinov2_convnext.yaml")
    assert [e.kind for e in mousi.model.experts] == ["hf", "hf", "timm"]
    assert mousi.model.visual_positions == "share_by_row"


def test_llava15_config_trains_align_then_sft_on_stand_ins(stand_ins, tmp_path):
    s = stand_ins
    align, sft = run_two_stages(
        s,
        tmp_path,
        "llava15_clip_qwen2.yaml",
        "llava15_clip_qwen2_sft.yaml",
        [f"model.llm.path={s['qwen2']}", f"model.experts.0.model={s['clip']}"],
    )
    first, _ = load_vlm(align)
    model, proc = load_vlm(sft)
    assert model.llm.config.model_type == "qwen2"
    clip = model.experts["clip"]
    assert (clip.cfg.resize, clip.cfg.image_size, clip.cfg.frozen) == ("pad", 32, True)
    assert proc.tokens_per_image == 16  # 32 px / patch 8, penultimate layer, CLS dropped
    # sft changed the LLM; the frozen tower never changed
    tower = clip.state_dict()
    key = next(k for k in tower if k.endswith("encoder.layers.0.mlp.fc1.weight"))
    assert torch.equal(first.experts["clip"].state_dict()[key], tower[key])
    lm = next(n for n, _ in model.llm.named_parameters() if n.endswith("layers.0.mlp.up_proj.weight"))
    assert not torch.equal(dict(first.llm.named_parameters())[lm], dict(model.llm.named_parameters())[lm])
    saved = json.loads((sft / "config.json").read_text())
    assert saved["experts"][0]["tower_config"]["model_type"] == "clip_vision_model"


def test_mousi_config_fuses_three_experts_with_shared_row_positions(stand_ins, tmp_path):
    s = stand_ins
    experts = [
        f"model.llm.path={s['qwen2']}",
        f"model.experts.0.model={s['clip']}",
        f"model.experts.1.model={s['dinov2']}",
        "model.experts.1.image_size=32",
        "model.experts.2.model=convnext_atto",
        f"model.experts.2.pretrained={s['convnext']}",
        "model.experts.2.image_size=64",
    ]
    _, sft = run_two_stages(
        s, tmp_path, "mousi_clip_dinov2_convnext.yaml", "mousi_clip_dinov2_convnext_sft.yaml", experts
    )
    model, proc = load_vlm(sft)
    assert list(model.experts) == ["clip", "dinov2", "convnext"]
    # clip 4x4, dinov2 4x4, convnext stage 2 at 64 px 4x4; each merged 2x2 -> 3 segments of 2x2
    assert model.fusion.layout == [(2, 2), (2, 2), (2, 2)]
    assert proc.tokens_per_image == 12 and proc.positions_per_image == 6  # 2 rows per expert
    log = [json.loads(line) for line in (sft.parent / "train_log.jsonl").read_text().splitlines()]
    first = next(r for r in log if r["step"] == 1)
    assert (first["visual_tokens_per_image"], first["positions_per_image"]) == (12, 6.0)
    config = yaml.safe_load((sft.parent / "config.yaml").read_text())
    assert config["train"]["stage"] == "sft"
