"""Placeholder: fetches timm's own tests/test_models.py (filled in by the SHViT work)."""
