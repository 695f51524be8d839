"""Single-Head Self-Attention (SHSA), the SHViT token mixer."""
from typing import Optional, Type

import torch
import torch.nn as nn
from timm.layers import GroupNorm1, create_act_layer

from .layers import ConvNorm

__all__ = ['SHSA']


class SHSA(nn.Module):
    """Single-head attention on the first ``pdim`` channels; the other channels pass through untouched.

    ``x1, x2 = split(x)``; ``x1 = GroupNorm(1)(x1)``; one head with ``qk_dim``-wide queries/keys and ``pdim``-wide
    values attends over all ``H*W`` tokens; then ``proj(act(cat[x1, x2]))`` mixes all channels.
    The pre-norm is ``GroupNorm(1, pdim)`` (statistics over C, H, W per sample, per-channel affine) as in the official
    code, not the per-token LayerNorm the paper's text names; ``norm_layer`` swaps it, as in timm's SHViT.

    ``nhwc`` (default False) selects how the attention product is laid out. False computes it as the official code
    does, on ``(B, C, N)`` views, and is bit-identical to it. True computes the same product on the ``(B, N, C)``
    token view, which is how a channels-last tensor is stored, so a channels-last input goes through without layout
    copies and the output stays channels-last (with False, the ``cat`` before ``proj`` comes out NCHW and the 1x1
    ``proj`` conv then copies it back). Same maths; float rounding differs by ~1e-7. ``vitzoo.deploy`` switches it
    on when it converts the model to channels-last.

    Args:
        dim: Channels of the input and output.
        qk_dim: Query / key width (16 in all variants).
        pdim: Partial channels that go through attention (``dim`` for all of them).
        norm_layer: Pre-norm layer type, called as ``norm_layer(pdim)`` (default ``GroupNorm1``).
        act_layer: Activation before the output projection.
        device: Parameter device.
        dtype: Parameter dtype.
    """

    def __init__(
            self,
            dim: int,
            qk_dim: int,
            pdim: int,
            norm_layer: Type[nn.Module] = GroupNorm1,
            act_layer: Type[nn.Module] = nn.ReLU,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        # pdim == dim (every channel attends, nothing passes through) is built, as by timm's and the official SHSA
        # (found by an audit: it was refused, so such a model and its weights could not be built here)
        if not 0 < pdim <= dim:
            raise ValueError(f'SHSA needs 0 < pdim < dim, or pdim == dim (all channels attend), got pdim={pdim}, '
                             f'dim={dim}.')
        dd = dict(device=device, dtype=dtype)
        self.dim = dim
        self.pdim = pdim
        self.qk_dim = qk_dim
        self.scale = qk_dim ** -0.5
        self.nhwc = False
        self.pre_norm = norm_layer(pdim, **dd)
        self.qkv = ConvNorm(pdim, 2 * qk_dim + pdim, **dd)
        self.proj = nn.Sequential(
            create_act_layer(act_layer),
            ConvNorm(dim, dim, bn_weight_init=0., **dd),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nhwc:
            return self._forward_nhwc(x)
        x1, x2 = torch.split(x, [self.pdim, self.dim - self.pdim], dim=1)  # views, no copy
        x1 = self.pre_norm(x1)
        q, k, v = torch.split(self.qkv(x1), [self.qk_dim, self.qk_dim, self.pdim], dim=1)
        q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)  # (B, C, N)
        attn = (q.transpose(-2, -1) @ k).mul_(self.scale).softmax(dim=-1)  # (B, N, N)
        x1 = (v @ attn.transpose(-2, -1)).reshape_as(x1)  # (B, pdim, H, W)
        return self.proj(torch.cat([x1, x2], dim=1))

    def _forward_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.split(x, [self.pdim, self.dim - self.pdim], dim=1)
        x1 = self.pre_norm(x1)
        tokens = self.qkv(x1).flatten(2).transpose(1, 2)  # (B, N, C): a view when channels-last
        q, k, v = torch.split(tokens, [self.qk_dim, self.qk_dim, self.pdim], dim=2)
        attn = (q @ k.transpose(1, 2)).mul_(self.scale).softmax(dim=-1)  # (B, N, N)
        x1 = (attn @ v).transpose(1, 2).reshape_as(x1)  # (B, pdim, H, W) with channels-last strides, a view
        return self.proj(torch.cat([x1, x2], dim=1))
