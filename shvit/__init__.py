"""SHViT (Yun & Ro, CVPR 2024) for timm. ``import shvit`` registers ``shvit_s1`` ... ``shvit_s4``."""
