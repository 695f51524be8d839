"""Feature pyramid network with the SHViT paper's extra levels.

The SHViT detection neck (borrowed by the paper from EfficientViT) is a standard FPN (1x1 laterals, top-down path,
3x3 output convs) over backbone maps at strides 16/32/64, plus:

* finer levels: a chain of ``ConvTranspose2d(k=2, s=2)`` starting from the stride-16 lateral (after the top-down
  path), each followed by a 3x3 conv (RetinaNet: stride 8; Mask R-CNN: strides 8 and 4);
* coarser levels: stride-2 3x3 convs, the first on the raw last backbone map ("on_input"), the following ones on the
  previous extra level (RetinaNet: stride 128).

:class:`ExtraLevelFPN` implements this for any set of consecutive input strides and any consecutive output strides
that contain them, so the same neck serves SHViT (16/32/64), ViT simple pyramids and plain timm CNNs.
"""
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['ExtraLevelFPN', 'level_name']


def level_name(stride: int) -> str:
    """Name of the pyramid level with the given stride: ``'p3'`` for stride 8, ``'p7'`` for stride 128."""
    return f'p{int(stride).bit_length() - 1}'


def _check_strides(strides: Sequence[int], what: str) -> List[int]:
    strides = [int(s) for s in strides]
    if not strides:
        raise ValueError(f'{what} is empty; give at least one stride.')
    for s in strides:
        if s < 1 or s & (s - 1):
            raise ValueError(f'{what} {strides} contains {s}, which is not a power of two.')
    for a, b in zip(strides, strides[1:]):
        if b != 2 * a:
            raise ValueError(f'{what} {strides} must be increasing by a factor of 2 from one level to the next.')
    return strides


class ExtraLevelFPN(nn.Module):
    """FPN whose output levels may extend below and above the backbone's strides.

    Args:
        in_channels: Channels of each backbone map, finest first.
        in_strides: Stride of each backbone map, finest first, consecutive powers of two (e.g. ``(16, 32, 64)``).
        out_strides: Strides of the output levels, consecutive powers of two that contain ``in_strides``
            (e.g. ``(8, 16, 32, 64, 128)`` for RetinaNet, ``(4, 8, 16, 32, 64)`` for Mask R-CNN).
        out_channels: Channels of every output level.
        device: Parameter device.
        dtype: Parameter dtype.
    """

    def __init__(
            self,
            in_channels: Sequence[int],
            in_strides: Sequence[int],
            out_strides: Sequence[int],
            out_channels: int = 256,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        in_strides = _check_strides(in_strides, 'in_strides')
        out_strides = _check_strides(out_strides, 'out_strides')
        if len(in_channels) != len(in_strides):
            raise ValueError(f'in_channels {list(in_channels)} and in_strides {in_strides} differ in length.')
        if in_strides[0] < out_strides[0] or in_strides[-1] > out_strides[-1]:
            raise ValueError(
                f'out_strides {out_strides} must contain every backbone stride {in_strides}; '
                'select backbone levels inside the detector\'s stride range.')
        self.in_strides = in_strides
        self.out_strides = out_strides
        self.out_channels = out_channels
        self.finer_strides = [s for s in out_strides if s < in_strides[0]][::-1]  # nearest to the backbone first
        self.coarser_strides = [s for s in out_strides if s > in_strides[-1]]

        self.lateral_convs = nn.ModuleList([nn.Conv2d(c, out_channels, 1, **dd) for c in in_channels])
        self.output_convs = nn.ModuleList(
            [nn.Conv2d(out_channels, out_channels, 3, padding=1, **dd) for _ in in_strides])
        self.up_convs = nn.ModuleList(
            [nn.ConvTranspose2d(out_channels, out_channels, 2, stride=2, **dd) for _ in self.finer_strides])
        self.up_output_convs = nn.ModuleList(
            [nn.Conv2d(out_channels, out_channels, 3, padding=1, **dd) for _ in self.finer_strides])
        self.down_convs = nn.ModuleList([
            nn.Conv2d(in_channels[-1] if i == 0 else out_channels, out_channels, 3, stride=2, padding=1, **dd)
            for i in range(len(self.coarser_strides))
        ])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases for every conv (the usual FPN initialisation)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Build the pyramid.

        Args:
            features: Backbone maps (NCHW), finest first, at ``in_strides``.

        Returns:
            Ordered dict ``{level_name(stride): map}`` for every stride in ``out_strides``, finest first.
        """
        if len(features) != len(self.lateral_convs):
            raise ValueError(f'ExtraLevelFPN expects {len(self.lateral_convs)} maps, got {len(features)}.')
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down path
            upsampled = F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode='nearest')
            laterals[i - 1] = laterals[i - 1] + upsampled
        outs: Dict[int, torch.Tensor] = {}
        for stride, conv, lat in zip(self.in_strides, self.output_convs, laterals):
            outs[stride] = conv(lat)
        x = laterals[0]
        for stride, up, conv in zip(self.finer_strides, self.up_convs, self.up_output_convs):
            x = up(x)
            outs[stride] = conv(x)
        x = features[-1]
        for stride, down in zip(self.coarser_strides, self.down_convs):
            x = down(x)
            outs[stride] = x
        return OrderedDict((level_name(s), outs[s]) for s in self.out_strides)
