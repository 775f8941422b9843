"""Vision backbones and visual experts.

Importing this package registers our backbones (CSWin, BiFormer, SG-Former) with timm,
so ``timm.create_model("cswin_tiny_224")`` works after ``import vision``.
"""

from .official import from_official, official_archs, register_official

__all__ = ["from_official", "official_archs", "register_official"]

# Backbone families register themselves with timm and with `from_official` on import.
from . import biformer, cswin, sgformer  # noqa: E402,F401
