"""SHViT building units: Conv+BN, BN+Linear, residual wrappers and the 1x1 FFN.

Every unit that can be re-parameterised for inference has a ``fuse()`` that returns the replacement module, so
``timm.utils.reparameterize_model`` (which replaces each child by ``child.fuse()``) fuses the whole network.
"""
from typing import Optional, Type

import torch
import torch.nn as nn
from timm.layers import DropPath, create_act_layer, trunc_normal_

__all__ = ['ConvNorm', 'NormLinear', 'Residual', 'DWConvResidual', 'FFN']


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype to fold in: float32, or float64 for a float64 model. A bf16 / fp16 model folds in float32 and is
    rounded once, at the end (folding in bf16 put S4's fused output 1.17% off, against 0.66%; found by an audit)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _bn_scale_shift(bn: nn.Module, dtype: torch.dtype = torch.float32):
    """Per-channel ``(scale, shift)`` such that ``bn(x) == x * scale + shift`` in eval mode, in ``dtype``."""
    scale = bn.weight.to(dtype) / torch.sqrt(bn.running_var.to(dtype) + bn.eps)
    shift = bn.bias.to(dtype) - bn.running_mean.to(dtype) * scale
    return scale, shift


class ConvNorm(nn.Module):
    """Bias-free ``Conv2d`` followed by ``BatchNorm2d`` (the official ``Conv2d_BN``, keys ``c.*`` and ``bn.*``).

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        kernel_size: Convolution kernel size.
        stride: Convolution stride.
        padding: Convolution zero padding.
        groups: Convolution groups (``in_chs`` for a depthwise conv).
        bn_weight_init: Initial BatchNorm scale (0 makes a residual branch start as identity).
        device: Parameter device.
        dtype: Parameter dtype.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int = 1,
            stride: int = 1,
            padding: int = 0,
            groups: int = 1,
            bn_weight_init: float = 1.,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.bn_weight_init = bn_weight_init
        self.c = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False, **dd)
        self.bn = nn.BatchNorm2d(out_chs, **dd)
        self._init_norm()

    def _init_norm(self) -> None:
        nn.init.constant_(self.bn.weight, self.bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def reset_parameters(self) -> None:
        """The constructor's initialisation again (PyTorch's conv init, BatchNorm scale ``bn_weight_init``), drawing
        random numbers in the constructor's order."""
        self.c.reset_parameters()
        self.bn.reset_parameters()
        self._init_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x))

    @torch.no_grad()
    def fuse(self, identity: bool = False) -> nn.Conv2d:
        """Fold the BatchNorm (running statistics) into a single ``Conv2d`` with bias; with ``identity`` (a
        depthwise 3x3 residual, :class:`DWConvResidual`) also add its input, before rounding to the model's dtype."""
        c = self.c
        dtype = _work_dtype(c.weight, self.bn.running_var)
        scale, shift = _bn_scale_shift(self.bn, dtype)
        weight = c.weight.to(dtype) * scale.view(-1, 1, 1, 1)
        if identity:
            k_h, k_w = c.kernel_size
            weight[:, 0, k_h // 2, k_w // 2] += 1.
        fused = nn.Conv2d(
            c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
            dilation=c.dilation, groups=c.groups, bias=True, device=c.weight.device, dtype=c.weight.dtype,
        )
        fused.weight.copy_(weight)
        fused.bias.copy_(shift)
        return fused.train(self.training)  # a fused eval model is eval throughout


class NormLinear(nn.Module):
    """``BatchNorm1d`` followed by ``Linear`` (the official ``BN_Linear`` head, keys ``bn.*`` and ``l.*``).

    Args:
        in_features: Input width.
        out_features: Number of outputs (classes).
        std: Std of the truncated-normal weight init.
        device: Parameter device.
        dtype: Parameter dtype.
    """

    def __init__(
            self,
            in_features: int,
            out_features: int,
            std: float = 0.02,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.std = std
        self.bn = nn.BatchNorm1d(in_features, **dd)
        self.l = nn.Linear(in_features, out_features, **dd)  # noqa: E741 (the checkpoints name it head.l)
        self._init_linear()

    def _init_linear(self) -> None:
        trunc_normal_(self.l.weight, std=self.std)
        nn.init.zeros_(self.l.bias)

    def reset_parameters(self) -> None:
        """The constructor's initialisation again, drawing random numbers in the constructor's order."""
        self.bn.reset_parameters()
        self.l.reset_parameters()
        self._init_linear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(self.bn(x))

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        """Fold the BatchNorm into the Linear: ``W' = W diag(s)``, ``b' = W t + b``."""
        linear = self.l
        dtype = _work_dtype(linear.weight, self.bn.running_var)
        scale, shift = _bn_scale_shift(self.bn, dtype)
        fused = nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device,
                          dtype=linear.weight.dtype)
        weight = linear.weight.to(dtype)
        fused.weight.copy_(weight * scale.view(1, -1))
        fused.bias.copy_(weight @ shift + linear.bias.to(dtype))
        return fused.train(self.training)


class Residual(nn.Module):
    """``x + drop_path(m(x))``. Not fusable itself; its inner unit is fused in place.

    Args:
        m: The residual branch.
        drop_path: Stochastic depth rate of the branch.
    """

    def __init__(self, m: nn.Module, drop_path: float = 0.):
        super().__init__()
        self.m = m
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # not added in place into the branch's output: that tensor is also what forward hooks on the branch (or
        # its last layer) see and what backward hooks wrap, so an in-place add broke Grad-CAM-style hooks.
        # vitzoo.deploy fuses the add into the convolution anyway.
        return x + self.drop_path(self.m(x))


class DWConvResidual(Residual):
    """Residual depthwise 3x3 ``ConvNorm`` (also SHViT's conditional position encoding).

    ``fuse()`` returns one depthwise conv with the identity folded into the centre tap (RepVGG style).

    Args:
        dim: Channels.
        bn_weight_init: Initial BatchNorm scale of the branch.
        drop_path: Stochastic depth rate of the branch (inactive in eval, so fusing is exact).
        device: Parameter device.
        dtype: Parameter dtype.
    """

    def __init__(
            self,
            dim: int,
            bn_weight_init: float = 1.,
            drop_path: float = 0.,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__(
            ConvNorm(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=bn_weight_init, device=device, dtype=dtype),
            drop_path=drop_path,
        )

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        return self.m.fuse(identity=True)


class FFN(nn.Module):
    """Pointwise feed-forward: 1x1 ``ConvNorm`` -> act -> 1x1 ``ConvNorm`` (zero-init BN scale).

    Args:
        dim: Input / output channels.
        hidden_dim: Hidden channels (2x ``dim`` in SHViT).
        act_layer: Activation layer type.
        device: Parameter device.
        dtype: Parameter dtype.
    """

    def __init__(
            self,
            dim: int,
            hidden_dim: int,
            act_layer: Type[nn.Module] = nn.ReLU,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.pw1 = ConvNorm(dim, hidden_dim, **dd)
        self.act = create_act_layer(act_layer)
        self.pw2 = ConvNorm(hidden_dim, dim, bn_weight_init=0., **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(self.act(self.pw1(x)))
