"""``timm`` experts: any timm model (ours included: ``cswin_*``, ``biformer_*``, ``sgformer_*``) read at one
stage, or for ViTs at one block, through timm's ``forward_intermediates``."""

from __future__ import annotations

from typing import Any

import timm
import torch

from .base import IMAGENET_MEAN, IMAGENET_STD, ExpertConfig, VisualExpert


class TimmExpert(VisualExpert):
    def build(self, cfg: ExpertConfig, load_weights: bool) -> dict[str, Any]:
        import vision  # noqa: F401  (registers our backbones with timm)

        create_kwargs: dict[str, Any] = dict(num_classes=0, **cfg.model_kwargs)
        if cfg.pretrained and load_weights:
            create_kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=cfg.pretrained))
        try:
            self.model = timm.create_model(cfg.model, **create_kwargs)
        except RuntimeError as err:
            raise RuntimeError(f"expert {cfg.name!r}: cannot build timm model {cfg.model!r}: {err}") from err
        info = self.model.feature_info
        infos = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
        index = -1 if cfg.feature_index is None else cfg.feature_index
        self._stage = index % len(infos)
        self.out_dim = int(infos[self._stage]["num_chs"])
        reduction = int(infos[self._stage]["reduction"])
        pcfg = getattr(self.model, "pretrained_cfg", {}) or {}
        patch_embed = getattr(self.model, "patch_embed", None)
        native = getattr(patch_embed, "img_size", None) or pcfg.get("input_size", (3, 224, 224))[-2:]
        size = cfg.image_size or int(native[0] if isinstance(native, (tuple, list)) else native)
        if size % reduction:
            raise ValueError(
                f"expert {cfg.name!r}: image_size {size} is not a multiple of the stride {reduction} of "
                f"stage {self._stage} of {cfg.model}"
            )
        self.grid_size = (size // reduction, size // reduction)
        if hasattr(self.model, "prune_intermediate_layers"):  # later stages cost neither compute nor params
            self.model.prune_intermediate_layers([self._stage], prune_norm=True, prune_head=True)
        return {
            "image_size": size,
            "feature_index": index,
            "resize": "squash",
            "interpolation": "bilinear",
            "mean": tuple(pcfg.get("mean", IMAGENET_MEAN)),
            "std": tuple(pcfg.get("std", IMAGENET_STD)),
        }

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.model, "forward_tokens"):
            tokens, _ = self.model.forward_tokens(x, index=self._stage)
            return tokens
        feats = self.model.forward_intermediates(x, indices=[self._stage], intermediates_only=True)[0]
        return feats.flatten(2).transpose(1, 2)
