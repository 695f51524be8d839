"""NViT / ReViT (Yang et al., CVPR 2023) for timm. ``import nvit`` registers ``nvit_*`` and ``revit_*``."""
