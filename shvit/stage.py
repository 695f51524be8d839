"""SHViT stages: BasicBlock (dw-conv, optional SHSA, FFN; all residual) and the stage with its downsampler."""
import contextlib
from typing import ContextManager, Iterator, List, Optional, Tuple, Type

import torch
import torch.nn as nn
from timm.layers import GroupNorm1, use_reentrant_ckpt
from timm.models._manipulate import checkpoint

from .attention import SHSA
from .layers import FFN, DWConvResidual, Residual
from .patch_merging import PatchMerging

__all__ = ['BasicBlock', 'SHViTStage']


class BasicBlock(nn.Module):
    """``ffn(mixer(conv(x)))``, each a residual: depthwise 3x3, SHSA (type ``'s'``) or nothing (``'i'``), FFN.

    Args:
        dim: Channels.
        qk_dim: SHSA query / key width.
        pdim: SHSA partial channels.
        block_type: ``'s'`` for single-head attention, ``'i'`` for none (stage 1).
        drop_path: Stochastic depth rate for the three residual branches.
        norm_layer: SHSA pre-norm layer type.
        act_layer: Activation layer type.
        device: Parameter device.
        dtype: Parameter dtype.
    """

    def __init__(
            self,
            dim: int,
            qk_dim: int,
            pdim: int,
            block_type: str,
            drop_path: float = 0.,
            norm_layer: Type[nn.Module] = GroupNorm1,
            act_layer: Type[nn.Module] = nn.ReLU,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if block_type not in ('s', 'i'):
            raise ValueError(f"block_type must be 's' (attention) or 'i' (no attention), got {block_type!r}.")
        self.conv = DWConvResidual(dim, bn_weight_init=0., drop_path=drop_path, **dd)
        if block_type == 's':
            mixer = SHSA(dim, qk_dim, pdim, norm_layer=norm_layer, act_layer=act_layer, **dd)
            self.mixer = Residual(mixer, drop_path=drop_path)
        else:
            self.mixer = nn.Identity()
        self.ffn = Residual(FFN(dim, 2 * dim, act_layer=act_layer, **dd), drop_path=drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.mixer(self.conv(x)))


def _downsample(
        in_dim: int,
        out_dim: int,
        act_layer: Type[nn.Module],
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
) -> nn.Sequential:
    """Residual dw-conv + FFN at the old width, PatchMerging (stride 2), residual dw-conv + FFN at the new width."""
    dd = dict(device=device, dtype=dtype)
    return nn.Sequential(
        DWConvResidual(in_dim, **dd),
        Residual(FFN(in_dim, 2 * in_dim, act_layer=act_layer, **dd)),
        PatchMerging(in_dim, out_dim, act_layer=act_layer, **dd),
        DWConvResidual(out_dim, **dd),
        Residual(FFN(out_dim, 2 * out_dim, act_layer=act_layer, **dd)),
    )


class SHViTStage(nn.Module):
    """One stage: ``downsample`` (stride 2, only when ``downsample=True``) then ``depth`` BasicBlocks.

    Args:
        in_dim: Input channels.
        dim: Stage channels.
        depth: Number of BasicBlocks.
        qk_dim: SHSA query / key width.
        pdim: SHSA partial channels.
        block_type: ``'s'`` or ``'i'``.
        downsample: Whether the stage starts with the stride-2 downsampler (decided by stage index, not widths).
        drop_path: Per-block stochastic depth rates (length ``depth``).
        norm_layer: SHSA pre-norm layer type.
        act_layer: Activation layer type.
        device: Parameter device.
        dtype: Parameter dtype.
    """

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            qk_dim: int,
            pdim: int,
            block_type: str,
            downsample: bool,
            drop_path: Optional[List[float]] = None,
            norm_layer: Type[nn.Module] = GroupNorm1,
            act_layer: Type[nn.Module] = nn.ReLU,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if not downsample and in_dim != dim:
            raise ValueError(f'A stage without downsampling keeps its width: in_dim={in_dim} != dim={dim}.')
        drop_path = drop_path or [0.] * depth
        self.grad_checkpointing = False
        self.downsample = _downsample(in_dim, dim, act_layer, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            BasicBlock(dim, qk_dim, pdim, block_type, drop_path=drop_path[j], norm_layer=norm_layer,
                       act_layer=act_layer, **dd)
            for j in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return self._checkpointed_blocks(x)
        return self.blocks(x)

    @torch.jit.unused
    def _checkpointed_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks, each checkpointed (timm's ``use_reentrant_ckpt()`` setting). Recomputing a block in backward
        runs its BatchNorms in training mode again; non-reentrant checkpointing (timm's default) keeps their running
        statistics as the forward left them, so a step updates them once, as without checkpointing."""
        reentrant = use_reentrant_ckpt()
        for block in self.blocks:
            if reentrant:  # torch runs no context around a reentrant recomputation
                x = checkpoint(block, x, use_reentrant=True)
            elif torch.compiler.is_compiling():  # dynamo takes no context_fn; its backward does not repeat the update
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = checkpoint(block, x, use_reentrant=False, context_fn=lambda b=block: _recompute_contexts(b))
        return x


def _recompute_contexts(block: nn.Module) -> Tuple[ContextManager, ContextManager]:
    """``torch.utils.checkpoint``'s ``context_fn``: none around the forward, :func:`_buffers_kept` around the
    recomputation."""
    return contextlib.nullcontext(), _buffers_kept(block)


@contextlib.contextmanager
def _buffers_kept(module: nn.Module) -> Iterator[None]:
    """``module``'s buffers (BatchNorm running statistics and batch counts) restored on exit to their values on
    entry."""
    buffers = list(module.buffers())
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)
