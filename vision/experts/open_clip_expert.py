"""``open_clip`` experts: the visual tower of an open_clip architecture, weights from a local file.

``model`` is an architecture name (``ViT-L-14-336``; weights from ``pretrained``, a local ``.safetensors``,
``.bin`` or ``.pt``) or ``local-dir:PATH`` (a folder with ``open_clip_config.json`` and the weights, as
open_clip saves them). Only the visual tower is built: a CLIP's text tower is never allocated. The readout
is one block (default the penultimate), class token dropped; later blocks, the final norm and the
projection are removed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .base import ExpertConfig, VisualExpert

RESIZE_MODES = {"shortest": "crop", "longest": "pad", "squash": "squash"}  # open_clip's names -> ours


def _tower_spec(cfg: ExpertConfig) -> tuple[dict[str, Any], str | None]:
    """The architecture (``model_cfg`` + ``preprocess_cfg``) and the weights file of ``cfg.model``."""
    import open_clip

    if cfg.model.startswith("local-dir:"):
        directory = Path(cfg.model[len("local-dir:") :])
        config_file = directory / "open_clip_config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"expert {cfg.name!r}: {config_file} does not exist")
        spec = json.loads(config_file.read_text())
        if "model_cfg" not in spec:
            raise ValueError(f"expert {cfg.name!r}: {config_file} has no model_cfg")
        weights = next(
            (
                str(directory / n)
                for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_model.pt")
                if (directory / n).is_file()
            ),
            None,
        )
        if weights is None:
            raise FileNotFoundError(f"expert {cfg.name!r}: no open_clip weights file in {directory}")
        return {"model_cfg": spec["model_cfg"], "preprocess_cfg": spec.get("preprocess_cfg", {})}, weights
    model_cfg = open_clip.get_model_config(cfg.model)
    if model_cfg is None:
        raise ValueError(
            f"expert {cfg.name!r}: unknown open_clip architecture {cfg.model!r} "
            "(see open_clip.list_models(), or use local-dir:PATH)"
        )
    if cfg.pretrained and not Path(cfg.pretrained).is_file():
        raise FileNotFoundError(f"expert {cfg.name!r}: weights file {cfg.pretrained} does not exist")
    return {"model_cfg": model_cfg, "preprocess_cfg": {}}, cfg.pretrained


class OpenCLIPExpert(VisualExpert):
    def build(self, cfg: ExpertConfig, load_weights: bool) -> dict[str, Any]:
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        from open_clip.factory import load_state_dict
        from open_clip.model import _build_vision_tower

        if not load_weights and cfg.tower_config is not None:  # a saved VLM: its safetensors hold the weights
            spec, weights = cfg.tower_config, None
        else:
            spec, weights = _tower_spec(cfg)
        model_cfg, pre = spec["model_cfg"], spec.get("preprocess_cfg", {})
        vision_cfg = dict(model_cfg["vision_cfg"])
        if "timm_model_name" in vision_cfg:
            raise ValueError(
                f"expert {cfg.name!r}: {cfg.model} is a timm tower inside open_clip; use kind: timm for it"
            )
        self.model = _build_vision_tower(
            model_cfg["embed_dim"], vision_cfg, quick_gelu=model_cfg.get("quick_gelu", False)
        )
        if load_weights and weights:
            state = load_state_dict(weights)
            visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
            if not visual:
                raise ValueError(f"expert {cfg.name!r}: {weights} holds no visual.* weights")
            self.model.load_state_dict(visual, strict=True)
        native = vision_cfg.get("image_size", 224)
        native = int(native[0] if isinstance(native, (list, tuple)) else native)
        if cfg.image_size not in (None, native):
            raise ValueError(
                f"expert {cfg.name!r}: the open_clip tower {cfg.model} takes image_size {native}, "
                f"got {cfg.image_size} (leave image_size unset)"
            )
        blocks = len(self.model.transformer.resblocks)
        index = -2 if cfg.feature_index is None else cfg.feature_index
        self._block = index % blocks
        self.model.prune_intermediate_layers([self._block], prune_norm=True, prune_head=True)
        patch = self.model.patch_size[0]
        self.grid_size = (native // patch, native // patch)
        self.out_dim = int(self.model.transformer.width)
        return {
            "image_size": native,
            "feature_index": index,
            "resize": RESIZE_MODES.get(pre.get("resize_mode", "shortest"), "crop"),
            "interpolation": pre.get("interpolation", "bicubic"),
            "mean": tuple(pre.get("mean", OPENAI_DATASET_MEAN)),
            "std": tuple(pre.get("std", OPENAI_DATASET_STD)),
            "tower_config": spec,
        }

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_intermediates(
            x, indices=[self._block], intermediates_only=True, output_fmt="NLC"
        )
        return out["image_intermediates"][0]
