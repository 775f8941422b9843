"""Shared fixtures for the mmstack foundation tests: one tiny VLM (2-layer Llama, resnet10t stage 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

torch.set_num_threads(1)

CORPUS = [
    "What colour is the circle?",
    "red",
    "Describe the image.",
    "2 objects: a small red circle and a big blue square.",
    "Where is the square?",
    "[12, 340, 560, 780]",
    "How many shapes are there?",
    "blue green yellow",
] * 40

TINY_LLM = {"family": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
TINY_EXPERT = {"name": "main", "model": "resnet10t", "image_size": 64, "feature_index": 2}
TINY_PROJECTOR = {"type": "concat", "pool": 2, "pos_embed": True}


def tiny_run_model() -> dict:
    """The ``model`` section of the tiny runs that train through ``mm train`` on 96 px ShapesWorld."""
    return {
        "llm": dict(TINY_LLM),
        "tokenizer": {"vocab_size": 400},
        "experts": [{"name": "main", "model": "resnet10t", "image_size": 96, "feature_index": 2}],
        "projector": dict(TINY_PROJECTOR),
    }


def tiny_model_section(**changes):
    from mm.config import ModelConfig, build

    values = dict(
        llm=dict(TINY_LLM),
        experts=[dict(TINY_EXPERT)],
        projector=dict(TINY_PROJECTOR),
        tokenizer={"vocab_size": 300},
        visual_delta=1.0,
    )
    values.update(changes)
    return build(ModelConfig, values, "model")


def build_tiny(visual_delta: float = 1.0, seed: int = 0):
    """(model in eval mode, processor) with random weights, reproducible from ``seed``."""
    from mm.build import build_tokenizer, build_vlm, make_processor

    torch.manual_seed(seed)
    section = tiny_model_section(visual_delta=visual_delta)
    tokenizer = build_tokenizer(section, CORPUS)
    model = build_vlm(section, tokenizer).eval()
    return model, make_processor(model, tokenizer)


@pytest.fixture(scope="session")
def tiny_vlm():
    return build_tiny()


@pytest.fixture(scope="session")
def tiny_model(tiny_vlm):
    return tiny_vlm[0]


@pytest.fixture(scope="session")
def tiny_processor(tiny_vlm):
    return tiny_vlm[1]


def overfit(model, batch: dict, steps: int, lr: float) -> float:
    """Train ``model`` on one collated ``batch`` (its trainable parameters, AdamW); returns the last loss.
    Experts stay in eval mode: BatchNorm on running statistics, so training matches inference."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    model.experts.eval()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return loss.item()


def solid_image(colour=(255, 0, 0), size=(80, 60)) -> Image.Image:
    return Image.new("RGB", size, colour)


@pytest.fixture
def red_image():
    return solid_image()


MM = Path(sys.executable).parent / "mm"


def mm(*args: str, timeout: float = 120, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``mm`` console script, as a user would."""
    if not MM.is_file():
        pytest.skip(f"console script {MM} is not installed (pip install -e .)")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(MM), *args], capture_output=True, text=True, timeout=timeout, env=env, input=stdin
    )


# -- tiny towers of every expert kind, written to disk as users have them -----------------------------------
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TINY_VIT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, patch_size=8
)


def make_hf_clip_dir(path: Path, image_size: int = 32, seed: int = 0) -> Path:
    """A two-tower ``CLIPModel`` directory with LLaVA's CLIP image-processor config (centre crop, bicubic)."""
    import json

    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(TINY_VIT, vocab_size=99, max_position_embeddings=16, bos_token_id=0, eos_token_id=1)
    text.pop("patch_size")
    config = CLIPConfig(
        vision_config=dict(TINY_VIT, image_size=image_size), text_config=text, projection_dim=16
    )
    CLIPModel(config).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "crop_size": {"height": image_size, "width": image_size},
                "do_center_crop": True,
                "size": {"shortest_edge": image_size},
                "resample": 3,
                "image_mean": CLIP_MEAN,
                "image_std": CLIP_STD,
            }
        )
    )
    return path


def make_open_clip_dir(path: Path, image_size: int = 32, seed: int = 0) -> tuple[Path, dict]:
    """An open_clip ``local-dir`` folder (config + safetensors of a whole CLIP) and its model_cfg."""
    import json

    from open_clip.model import CLIP
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": image_size, "layers": 3, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1},
    }
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in CLIP(**model_cfg).state_dict().items()}
    save_file(state, path / "open_clip_model.safetensors")
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "longest"}
    (path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess})
    )
    return path, model_cfg
