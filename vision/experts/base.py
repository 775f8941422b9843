"""What every visual expert shares: its config, preprocessing, normalisation, freezing and readout contract.

An expert turns decoded images into a token grid ``[B, N, C]`` (row-major, ``N = h * w``) and declares
``out_dim`` (C) and ``grid_size`` (h, w). Each kind (``timm``, ``open_clip``, ``hf``) builds its tower, reads
its own defaults (input size, resize mode, mean / std) from the tower's config, and records the tower's
architecture in ``cfg.tower_config`` so a saved VLM rebuilds it without the original checkpoint files (the
VLM's own safetensors hold the weights).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from PIL import Image
from torch import nn

from .preprocess import Preprocessing

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ExpertConfig:
    """How to build one visual expert. Every path is LOCAL (nothing downloads).

    ``None`` means "the tower's own": input size, resize mode, interpolation, mean / std and the layer read
    (timm: the last stage; hf / open_clip: the penultimate block, as LLaVA reads CLIP).
    """

    name: str = "main"
    kind: str = "timm"  # a key of vision.experts.EXPERT_KINDS
    # timm: a model name (ours included); open_clip: an architecture or ``local-dir:PATH``; hf: a directory
    model: str = "resnet18"
    pretrained: str | None = None  # timm / open_clip by name: a local weights file
    image_size: int | None = None
    feature_index: int | None = None  # timm: stage (ViTs: block); hf: hidden layer; open_clip: block
    resize: Literal["squash", "crop", "pad"] | None = None  # see vision.experts.preprocess
    interpolation: Literal["bilinear", "bicubic"] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    frozen: bool = False  # no gradients, always in eval mode (MouSi freezes its experts)
    lr: float | None = None  # this expert's learning rate when it trains (default: train.expert_lr or lr)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # timm create_model keyword arguments
    # Filled in when the expert is first built from its files: the tower's architecture, so that a saved VLM
    # rebuilds it from its own config.json. Not something to write by hand.
    tower_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        from . import EXPERT_KINDS

        if self.kind not in EXPERT_KINDS:
            raise ValueError(f"kind: unknown expert kind {self.kind!r}; known: {', '.join(EXPERT_KINDS)}")
        if self.mean is not None:
            self.mean = tuple(self.mean)
        if self.std is not None:
            self.std = tuple(self.std)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExpertConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown expert config keys {unknown}")
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("mean", "std"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d


def set_hf_checkpointing(model: nn.Module, on: bool) -> None:
    """An HF model's per-layer activation checkpointing on (non-reentrant) or off. transformers 5.2x renamed
    ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old name warns on every
    call); the name the installed release has is used."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


class VisualExpert(nn.Module):
    """Base class: subclasses build ``self.model`` in ``build`` and implement ``tokens``."""

    def __init__(self, cfg: ExpertConfig, load_weights: bool = True):
        super().__init__()
        defaults = self.build(cfg, load_weights)  # sets self.model, self.out_dim, self.grid_size
        resolved = {k: getattr(cfg, k) if getattr(cfg, k) is not None else v for k, v in defaults.items()}
        self.cfg = dataclasses.replace(cfg, **resolved)
        self.preprocessing = Preprocessing(
            size=self.cfg.image_size,
            resize=self.cfg.resize,
            mean=tuple(self.cfg.mean),
            std=tuple(self.cfg.std),
            interpolation=self.cfg.interpolation,
        )
        self.num_tokens = self.grid_size[0] * self.grid_size[1]
        self.register_buffer("mean", torch.tensor(self.cfg.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.cfg.std).view(1, 3, 1, 1))
        if self.cfg.frozen:
            self.model.requires_grad_(False)

    # -- what a kind implements ---------------------------------------------------------------------
    def build(self, cfg: ExpertConfig, load_weights: bool) -> dict[str, Any]:
        """Build ``self.model`` (weights from the files when ``load_weights``), set ``out_dim`` and
        ``grid_size``; return the tower's defaults for the config fields left at None."""
        raise NotImplementedError

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, 3, S, S]`` -> ``[B, h*w, C]``, prefix (CLS / register) tokens dropped."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> VisualExpert:
        # A frozen expert stays in eval mode (BatchNorm statistics, dropout) whatever the VLM does.
        super().train(mode)
        if self.cfg.frozen:
            self.model.eval()
        return self

    def requires_grad_(self, requires_grad: bool = True) -> VisualExpert:
        # A frozen expert never trains, whatever the stage asks for.
        return super().requires_grad_(requires_grad and not self.cfg.frozen)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """Decoded RGB PIL images -> ``uint8 [N, 3, S, S]`` (normalisation happens in ``forward``)."""
        return self.preprocessing(images)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` uint8 or float in [0, 1] -> tokens ``[B, N, C]``."""
        x = pixel_values
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        x = (x - self.mean) / self.std
        x = x.to(next(self.model.parameters()).dtype)
        if self.cfg.frozen:
            with torch.no_grad():
                return self.tokens(x)
        return self.tokens(x)

    def set_checkpointing(self, on: bool) -> bool:
        """Recompute the tower's activations in the backward instead of keeping them (a trainable tower's
        memory): timm's and open_clip's ``set_grad_checkpointing``, HF's activation checkpointing. Returns
        whether the tower supports it (some timm models do not)."""
        if hasattr(self.model, "set_grad_checkpointing"):
            try:
                self.model.set_grad_checkpointing(on)
            except (AssertionError, NotImplementedError):  # timm: "gradient checkpointing not supported"
                return False
            return True
        if getattr(self.model, "supports_gradient_checkpointing", False):
            set_hf_checkpointing(self.model, on)
            return True
        return False

    def describe(self) -> str:
        h, w = self.grid_size
        return f"{self.cfg.kind}:{self.cfg.model} {self.cfg.image_size}px -> {h}x{w} x {self.out_dim}"
