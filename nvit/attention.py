"""NViT attention: per-block head count, q/k width different from v width, fixed scale, optional token scale."""
from typing import List, Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function, resample_abs_pos_embed, use_fused_attn

__all__ = ['NViTAttention', 'resample_token_mask', 'check_attn_mask_args', 'mask_attn_scores']


@register_notrace_function  # one call in timm's fx graphs: traced sizes cannot steer the resampler's size checks
def resample_token_mask(
        token_mask: torch.Tensor,
        new_size: List[int],
        old_size: List[int],
        num_prefix_tokens: int,
) -> torch.Tensor:
    """Resample a per-token scale ``[T, 1]`` to another patch grid.

    Prefix-token (class/distillation) entries are kept; the patch entries are treated as a 1-channel image on the
    ``old_size`` grid and resized to ``new_size`` exactly like the position embedding (bicubic, antialias, via
    ``timm.layers.resample_abs_pos_embed``).
    """
    resized = resample_abs_pos_embed(
        token_mask.unsqueeze(0), new_size=new_size, old_size=old_size, num_prefix_tokens=num_prefix_tokens)
    return resized.squeeze(0)


def check_attn_mask_args(attn_mask: Optional[torch.Tensor], is_causal: bool) -> None:
    """Refuse ``attn_mask`` together with ``is_causal=True``, as ``F.scaled_dot_product_attention`` does."""
    if is_causal and attn_mask is not None:
        raise ValueError('NViT attention: give attn_mask or is_causal=True, not both (as '
                         'F.scaled_dot_product_attention takes them).')


def mask_attn_scores(attn: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
    """Scores ``[B, heads, N, N]`` masked as ``F.scaled_dot_product_attention`` masks them: ``is_causal`` keeps each
    token's own and earlier keys; a boolean ``attn_mask`` keeps the keys where it is True; a float one is added."""
    if is_causal:
        n = attn.shape[-1]
        attn_mask = torch.ones(n, n, dtype=torch.bool, device=attn.device).tril()
    if attn_mask is None:
        return attn
    if attn_mask.dtype == torch.bool:
        return attn.masked_fill(attn_mask.logical_not(), float('-inf'))
    return attn + attn_mask


# FX leaves (torch.fx.wrap for symbolic_trace, and timm's notrace list): the mask and flag are graph inputs under FX,
# which these cannot branch on; each is one call in the graph, as F.scaled_dot_product_attention is
torch.fx.wrap('check_attn_mask_args')
torch.fx.wrap('mask_attn_scores')
register_notrace_function(check_attn_mask_args)
register_notrace_function(mask_attn_scores)


class NViTAttention(nn.Module):
    """Multi-head self-attention whose q/k and v widths per head may differ.

    q, k and v come from one fused Linear split unevenly into ``[heads*qk_dim, heads*qk_dim, heads*v_dim]``; rows are
    head-major inside each part, as in the official checkpoints. With ``num_tokens`` set, a learned per-token scale
    ``token_mask`` ``[num_tokens, 1]`` multiplies q, k and v (bias included), as in the released NViT checkpoints.
    """
    fused_attn: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int,
            qk_dim: int,
            v_dim: int,
            scale: float = 64 ** -0.5,
            qkv_bias: bool = True,
            num_tokens: Optional[int] = None,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        """
        Args:
            dim: Input/output (embedding) width.
            num_heads: Number of heads.
            qk_dim: Query/key width per head.
            v_dim: Value width per head.
            scale: Attention logit scale (the released models use 64 ** -0.5 whatever ``qk_dim`` is).
            qkv_bias: Bias on the q/k/v projection.
            num_tokens: Token count of the per-token q/k/v scale; None disables it.
            attn_drop: Attention-probability dropout.
            proj_drop: Output dropout.
            device: Parameter device.
            dtype: Parameter dtype.
        """
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        self.num_heads = num_heads
        self.qk_dim = qk_dim
        self.v_dim = v_dim
        self.scale = scale
        self.fused_attn = use_fused_attn()
        self.pad_head_dims = False
        self.qkv = nn.Linear(dim, num_heads * (2 * qk_dim + v_dim), bias=qkv_bias, **dd)
        if num_tokens is not None:
            self.token_mask = nn.Parameter(torch.ones(num_tokens, 1, **dd))
        else:
            self.register_parameter('token_mask', None)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * v_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

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
            token_mask: Per-token scale ``[N, 1]`` replacing the stored one (the model passes a resampled copy when
                the token count differs from the one it was built for).
            attn_mask: Attention mask broadcastable to ``[B, heads, N, N]``, as ``F.scaled_dot_product_attention``
                takes it (and timm's ViT): boolean, True where a query may attend; or float, added to the scores.
            is_causal: Each token attends only to itself and the tokens before it (not with ``attn_mask``).
        """
        check_attn_mask_args(attn_mask, is_causal)
        B, N, _ = x.shape
        qkv = self.qkv(x)
        if token_mask is None:
            token_mask = self.token_mask
        if token_mask is not None:
            # explicit broadcast: oneDNN Graph fails on a [N, 1] operand; the scale takes qkv's dtype, so under
            # autocast the fp32 parameter does not promote q/k/v (and the attention kernel) back to fp32
            qkv = qkv * token_mask.to(qkv.dtype).expand_as(qkv)
        qk_width = self.num_heads * self.qk_dim
        q, k, v = qkv.split([qk_width, qk_width, self.num_heads * self.v_dim], dim=-1)
        q = q.reshape(B, N, self.num_heads, self.qk_dim).transpose(1, 2)
        k = k.reshape(B, N, self.num_heads, self.qk_dim).transpose(1, 2)
        v = v.reshape(B, N, self.num_heads, self.v_dim).transpose(1, 2)

        if self.fused_attn:
            dropout_p = self.attn_drop.p if self.training else 0.
            if self.pad_head_dims and self.qk_dim != self.v_dim:
                width = max(self.qk_dim, self.v_dim)
                q = F.pad(q, [0, width - self.qk_dim])
                k = F.pad(k, [0, width - self.qk_dim])
                x = F.scaled_dot_product_attention(
                    q, k, F.pad(v, [0, width - self.v_dim]), attn_mask=attn_mask, dropout_p=dropout_p,
                    is_causal=is_causal, scale=self.scale)
                x = x[..., :self.v_dim]
            else:
                x = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.scale)
        else:
            attn = mask_attn_scores((q * self.scale) @ k.transpose(-2, -1), attn_mask, is_causal)
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v

        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.v_dim)
        return self.proj_drop(self.proj(x))
