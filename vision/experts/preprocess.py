"""Pixel preprocessing of one expert: resize a decoded RGB image to the expert's square input.

Three resize modes, as the towers users bring expect them:
- ``squash``: stretch to ``size x size`` (timm's default for fixed-size inputs; SigLIP).
- ``crop``: shortest side to ``size``, then the centre ``size x size`` (CLIP, DINOv2).
- ``pad``: pad the shorter side to a square with the mean colour, then resize (LLaVA-1.5's ``expand2square``),
  so nothing of the image is cut and nothing is stretched.
Output is ``uint8 [N, 3, size, size]``: caching and collating bytes is 4x cheaper than floats; the expert
normalises with its own mean / std on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

RESIZE_MODES = ("squash", "crop", "pad")
INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


@dataclass(frozen=True)
class Preprocessing:
    size: int
    resize: str = "squash"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize: unknown mode {self.resize!r}; known: {', '.join(RESIZE_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation: unknown {self.interpolation!r}; known: {', '.join(INTERPOLATIONS)}"
            )
        if self.size < 1:
            raise ValueError(f"image_size: must be >= 1, got {self.size}")

    def pad_colour(self) -> tuple[int, int, int]:
        """The mean colour in 0..255, as LLaVA fills the padding (``int(x * 255)``)."""
        return tuple(int(m * 255) for m in self.mean)

    def one(self, image: Image.Image) -> torch.Tensor:
        """One decoded RGB image -> ``uint8 [3, size, size]``."""
        x = TF.pil_to_tensor(image)
        mode = INTERPOLATIONS[self.interpolation]
        s = self.size
        if self.resize == "pad":
            _, h, w = x.shape
            side = max(h, w)
            if h != w:
                canvas = (
                    torch.tensor(self.pad_colour(), dtype=torch.uint8).view(3, 1, 1).expand(3, side, side)
                )
                canvas = canvas.clone()
                top, left = (side - h) // 2, (side - w) // 2
                canvas[:, top : top + h, left : left + w] = x
                x = canvas
            return TF.resize(x, [s, s], interpolation=mode, antialias=True)
        if self.resize == "crop":
            x = TF.resize(x, s, interpolation=mode, antialias=True)  # shortest side to s
            return TF.center_crop(x, [s, s])
        return TF.resize(x, [s, s], interpolation=mode, antialias=True)

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        out = [self.one(im) for im in images]
        return torch.stack(out) if out else torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)
