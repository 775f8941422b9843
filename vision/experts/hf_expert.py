"""``hf`` experts: a HuggingFace vision tower from a local directory, read LLaVA-style.

``model`` is a directory holding ``CLIPVisionModel`` / ``CLIPModel``, ``SiglipVisionModel`` / ``SiglipModel``,
``Dinov2Model`` or any ``AutoModel`` vision encoder (a two-tower directory gives its ``vision_config``). The
readout is one hidden layer (default the penultimate, as LLaVA reads CLIP) with the prefix tokens (CLS,
registers) dropped; layers after it are removed, as are the final norm and pooling head that the readout
never uses (they would cost compute, and a trainable expert would carry parameters without gradients).
Preprocessing comes from the directory's ``preprocessor_config.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import IMAGENET_MEAN, IMAGENET_STD, ExpertConfig, VisualExpert

RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL codes in HF image-processor configs


def _vision_config(directory: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    return getattr(config, "vision_config", None) or config


def _preprocessing_defaults(directory: Path, vision: Any) -> dict[str, Any]:
    """Size, resize mode, interpolation and mean / std from the directory's image-processor config."""
    out: dict[str, Any] = {
        "image_size": int(getattr(vision, "image_size", 224)),
        "resize": "squash",
        "interpolation": "bicubic",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return out
    pc = json.loads(path.read_text())

    def side(v: Any) -> int | None:
        if isinstance(v, int):
            return v
        if isinstance(v, dict):
            return v.get("height") or v.get("shortest_edge")
        return None

    if pc.get("do_center_crop") and side(pc.get("crop_size")):
        out.update(resize="crop", image_size=int(side(pc["crop_size"])))
    elif side(pc.get("size")):
        out["image_size"] = int(side(pc["size"]))
    out["interpolation"] = RESAMPLE.get(pc.get("resample"), out["interpolation"])
    for key, field in (("image_mean", "mean"), ("image_std", "std")):
        if pc.get(key):
            out[field] = tuple(float(v) for v in pc[key])
    return out


def _encoder_layers(model: nn.Module) -> nn.ModuleList | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith(("encoder.layers", "encoder.layer")):
            return module
    return None


class HFExpert(VisualExpert):
    def build(self, cfg: ExpertConfig, load_weights: bool) -> dict[str, Any]:
        from transformers import AutoConfig, AutoModel

        from_files = load_weights or cfg.tower_config is None  # else a saved VLM: its safetensors hold them
        if not from_files:
            spec = dict(cfg.tower_config)
            vision = AutoConfig.for_model(spec.pop("model_type"), **spec)
            defaults: dict[str, Any] = {}
        else:
            directory = Path(cfg.model)
            if not (directory / "config.json").is_file():
                raise FileNotFoundError(
                    f"expert {cfg.name!r}: {directory} is not a local HF model directory (no config.json)"
                )
            vision = _vision_config(directory)
            defaults = _preprocessing_defaults(directory, vision)
        if hasattr(vision, "vision_use_head"):
            vision.vision_use_head = False  # SigLIP's attention-pooling head: unused by a token readout
        num_layers = int(vision.num_hidden_layers)
        index = -2 if cfg.feature_index is None else cfg.feature_index
        layer = index % (num_layers + 1)  # hidden_states[0] is the embeddings, [i] the output of layer i
        if from_files:
            hf_logger = logging.getLogger("transformers")
            level = hf_logger.level
            hf_logger.setLevel(logging.ERROR)  # a two-tower directory's text weights are expected leftovers
            try:
                self.model = AutoModel.from_pretrained(cfg.model, config=vision, dtype=torch.float32)
            finally:
                hf_logger.setLevel(level)
        else:
            self.model = AutoModel.from_config(vision)
        layers = _encoder_layers(self.model)
        if layers is not None and len(layers) == num_layers:
            del layers[layer:]
        for owner in (self.model, getattr(self.model, "vision_model", None)):
            for attr in ("post_layernorm", "layernorm"):
                if owner is not None and isinstance(getattr(owner, attr, None), nn.LayerNorm):
                    setattr(owner, attr, nn.Identity())
        patch = vision.patch_size
        size = cfg.image_size or defaults.get("image_size") or int(vision.image_size)
        if size % patch:
            raise ValueError(f"expert {cfg.name!r}: image_size {size} is not a multiple of the patch {patch}")
        self.grid_size = (size // patch, size // patch)
        self.out_dim = int(vision.hidden_size)
        tower = vision.to_dict()
        for key in (
            "transformers_version",
            "dtype",
            "torch_dtype",
        ):  # the VLM's dtype decides, not the file's
            tower.pop(key, None)
        self._layer = layer
        if from_files:
            defaults["tower_config"] = tower
        return {**defaults, "feature_index": index}

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x, output_hidden_states=True)
        hidden = out.hidden_states[self._layer]  # (after the truncation above, also the last one)
        n = self.grid_size[0] * self.grid_size[1]
        return hidden[:, hidden.shape[1] - n :]
