"""Random norm statistics and affines for test models.

timm initialises the last BatchNorm of every SHViT residual branch with scale 0, so at default initialisation
each branch is a no-op and the logits are ~1e-4: an output comparison at atol 1e-4 would then check almost
nothing. Tests that compare outputs randomise the norms first (outputs of order 1, every branch active).
"""
from typing import Optional

import torch
from torch import nn

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


@torch.no_grad()
def randomize_norms(model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Affines ~ U(0.5, 1.5) / N(0, 0.2); BatchNorm running mean ~ N(0, 0.2), var ~ U(0.5, 2). Returns ``model``
    (same object, mode unchanged)."""
    def uniform(t, low, high):
        t.copy_(torch.rand(t.shape, generator=generator) * (high - low) + low)

    def normal(t, std):
        t.copy_(torch.randn(t.shape, generator=generator) * std)

    for m in model.modules():
        if isinstance(m, _NORMS) and getattr(m, "weight", None) is not None:
            uniform(m.weight, 0.5, 1.5)
            if m.bias is not None:  # e.g. timm's MetaFormer norms (bias=False)
                normal(m.bias, 0.2)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            normal(m.running_mean, 0.2)
            uniform(m.running_var, 0.5, 2.0)
    return model
