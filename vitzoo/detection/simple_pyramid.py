"""ViTDet-style simple feature pyramid: multi-scale maps from the single map of a plain (token) ViT.

A plain ViT (NViT / ReViT / DeiT) has one resolution (stride 16). Following ViTDet (Li et al., 2022), the last block's
map is resampled into a pyramid: transposed convs for finer strides (each halves the channels; LayerNorm + GELU
between two of them), identity for the native stride and 2x2 max-pooling for coarser strides. The maps then go into
:class:`~vitzoo.detection.fpn.ExtraLevelFPN` like the maps of a hierarchical backbone.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d

__all__ = ['SimpleFeaturePyramid']


class SimpleFeaturePyramid(nn.Module):
    """Resample one map into maps at several strides.

    Args:
        in_channels: Channels of the input map.
        in_stride: Stride of the input map (16 for patch-16 ViTs).
        out_strides: Output strides, consecutive powers of two (e.g. ``(8, 16, 32, 64)``).
        device: Parameter device.
        dtype: Parameter dtype.
    """

    def __init__(
            self,
            in_channels: int,
            in_stride: int = 16,
            out_strides: Sequence[int] = (8, 16, 32, 64),
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.in_stride = in_stride
        self.out_strides = [int(s) for s in out_strides]
        self.out_channels: List[int] = []
        self.branches = nn.ModuleList()
        for stride in self.out_strides:
            layers: List[nn.Module] = []
            chs = in_channels
            scale = stride
            while scale < in_stride:  # finer: transposed convs, halving channels
                if layers:
                    layers += [LayerNorm2d(chs, **dd), nn.GELU()]
                layers.append(nn.ConvTranspose2d(chs, chs // 2, 2, stride=2, **dd))
                chs //= 2
                scale *= 2
            while scale > in_stride:  # coarser: max-pooling
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
                scale //= 2
            if scale != in_stride:
                raise ValueError(f'the backbone\'s map has stride {in_stride}, and the pyramid level of stride '
                                 f'{stride} is not reachable from it by factors of 2: a single-scale backbone needs a '
                                 f'power-of-two patch size (a ViT of 14-pixel patches cannot be used; choose one of '
                                 f'8, 16 or 32).')
            self.branches.append(nn.Sequential(*layers) if layers else nn.Identity())
            self.out_channels.append(chs)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Map ``[B, C, H, W]`` at ``in_stride`` to one map per ``out_strides`` entry, finest first."""
        return [branch(x) for branch in self.branches]
