"""Vision backbones and visual experts.

Importing this package registers our backbones (CSWin, BiFormer, SG-Former) with timm,
so ``timm.create_model("cswin_tiny_224")`` works after ``import vision``.
"""
