"""Visual experts: one interface over vision backbones (ours, timm, later open_clip / HF towers).

An expert turns pixels into a token grid ``[B, N, C]`` (row-major, ``N = h * w``). It owns its
preprocessing (resize + normalise a decoded PIL image), says which layer it takes, and whether it is
frozen. Projectors and the VLM only see ``out_dim`` and ``num_tokens``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import timm
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXPERT_KINDS = ("timm",)


@dataclass
class ExpertConfig:
    """How to build one visual expert. ``pretrained`` is a LOCAL checkpoint file (nothing downloads)."""

    name: str = "main"
    kind: str = "timm"
    model: str = "resnet18"
    pretrained: str | None = None
    image_size: int = 224
    feature_index: int = -1  # which stage's feature map (timm forward_intermediates index)
    frozen: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in EXPERT_KINDS:
            raise ValueError(f"kind: unknown expert kind {self.kind!r}; known: {', '.join(EXPERT_KINDS)}")
        self.mean, self.std = tuple(self.mean), tuple(self.std)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExpertConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown expert config keys {unknown}")
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


class VisualExpert(nn.Module):
    """A timm-created backbone read out at one stage as a token grid."""

    def __init__(self, cfg: ExpertConfig):
        super().__init__()
        import vision  # noqa: F401  (registers our backbones with timm)

        self.cfg = cfg
        create_kwargs: dict[str, Any] = dict(num_classes=0, **cfg.model_kwargs)
        if cfg.pretrained:
            create_kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=cfg.pretrained))
        try:
            self.model = timm.create_model(cfg.model, **create_kwargs)
        except RuntimeError as err:
            raise RuntimeError(f"expert {cfg.name!r}: cannot build timm model {cfg.model!r}: {err}") from err
        info = self.model.feature_info
        infos = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
        self._stage = cfg.feature_index % len(infos)
        self.out_dim = int(infos[self._stage]["num_chs"])
        reduction = int(infos[self._stage]["reduction"])
        if cfg.image_size % reduction:
            raise ValueError(
                f"expert {cfg.name!r}: image_size {cfg.image_size} is not a multiple of the stride "
                f"{reduction} of stage {self._stage} of {cfg.model}"
            )
        self.grid_size = (cfg.image_size // reduction, cfg.image_size // reduction)
        self.num_tokens = self.grid_size[0] * self.grid_size[1]
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1))
        if cfg.frozen:
            self.model.requires_grad_(False)
        self._prune()

    def _prune(self) -> None:
        """Drop stages after the one we read, so they cost neither compute nor parameters."""
        if hasattr(self.model, "prune_intermediate_layers"):
            self.model.prune_intermediate_layers([self._stage], prune_norm=True, prune_head=True)

    def train(self, mode: bool = True) -> VisualExpert:
        # A frozen expert stays in eval mode (BatchNorm statistics, dropout) whatever the VLM does.
        super().train(mode)
        if self.cfg.frozen:
            self.model.eval()
        return self

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """Decoded RGB PIL images -> ``uint8 [N, 3, S, S]`` (normalisation happens in ``forward``)."""
        size = [self.cfg.image_size, self.cfg.image_size]
        out = [TF.resize(TF.pil_to_tensor(im), size, antialias=True) for im in images]
        return torch.stack(out) if out else torch.empty(0, 3, *size, dtype=torch.uint8)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` uint8 or float in [0, 1] -> tokens ``[B, N, C]``."""
        x = pixel_values
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        x = (x - self.mean) / self.std
        x = x.to(next(self.model.parameters()).dtype)
        if hasattr(self.model, "forward_tokens"):
            tokens, _ = self.model.forward_tokens(x, index=self._stage)
            return tokens
        feats = self.model.forward_intermediates(x, indices=[self._stage], intermediates_only=True)[0]
        return feats.flatten(2).transpose(1, 2)


def build_expert(cfg: ExpertConfig | dict[str, Any]) -> VisualExpert:
    return VisualExpert(cfg if isinstance(cfg, ExpertConfig) else ExpertConfig.from_dict(cfg))
