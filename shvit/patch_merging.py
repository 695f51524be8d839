"""PatchMerging: the stride-2 inverted-residual downsampler (with squeeze-excite) between SHViT stages."""
from typing import Optional, Type

import torch
import torch.nn as nn
from timm.layers import SEModule, create_act_layer

from .layers import ConvNorm

__all__ = ['PatchMerging']


class PatchMerging(nn.Module):
    """1x1 expand (4x) -> act -> depthwise 3x3 stride 2 -> act -> SE(0.25) -> 1x1 project. No residual.

    Args:
        dim: Input channels.
        out_dim: Output channels.
        act_layer: Activation layer type.
        device: Parameter device.
        dtype: Parameter dtype.
    """

    def __init__(
            self,
            dim: int,
            out_dim: int,
            act_layer: Type[nn.Module] = nn.ReLU,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        hidden_dim = 4 * dim
        self.conv1 = ConvNorm(dim, hidden_dim, **dd)
        self.act1 = create_act_layer(act_layer)
        self.conv2 = ConvNorm(hidden_dim, hidden_dim, 3, 2, 1, groups=hidden_dim, **dd)
        self.act2 = create_act_layer(act_layer)
        self.se = SEModule(hidden_dim, rd_ratio=0.25, **dd)
        self.conv3 = ConvNorm(hidden_dim, out_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv1(x))
        x = self.act2(self.conv2(x))
        return self.conv3(self.se(x))
