"""NViT transformer block: pre-norm attention and MLP, each block with its own widths."""
from typing import Optional, Type

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp

from .attention import NViTAttention

__all__ = ['NViTBlock']


class NViTBlock(nn.Module):
    """``x = x + attn(norm1(x)); x = x + mlp(norm2(x))`` with drop-path; widths given per block."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            qk_dim: int,
            v_dim: int,
            mlp_dim: int,
            scale: float = 64 ** -0.5,
            qkv_bias: bool = True,
            num_tokens: Optional[int] = None,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_eps: float = 1e-6,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        """
        Args:
            dim: Embedding width.
            num_heads, qk_dim, v_dim, scale, qkv_bias, num_tokens, attn_drop: Attention settings of this block,
                see ``NViTAttention``.
            mlp_dim: MLP hidden width.
            proj_drop: Dropout after the attention projection and in the MLP.
            drop_path: Stochastic-depth rate of this block.
            act_layer: MLP activation.
            norm_eps: LayerNorm epsilon.
            device: Parameter device.
            dtype: Parameter dtype.
        """
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.attn = NViTAttention(
            dim, num_heads, qk_dim, v_dim, scale=scale, qkv_bias=qkv_bias, num_tokens=num_tokens,
            attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.mlp = Mlp(dim, hidden_features=mlp_dim, act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(
            self,
            x: torch.Tensor,
            token_mask: Optional[torch.Tensor] = None,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        """
        Args:
            x: Tokens ``[B, N, dim]``.
            token_mask: Optional resampled per-token scale ``[N, 1]`` (see ``NViTAttention.forward``).
            attn_mask, is_causal: Attention masking (see ``NViTAttention.forward``).
        """
        x = x + self.drop_path1(self.attn(self.norm1(x), token_mask, attn_mask, is_causal))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x
