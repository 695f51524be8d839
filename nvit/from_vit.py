"""Convert a timm ViT / DeiT into an NViT with uniform dims (the starting point of NViT pruning)."""
import torch.nn as nn
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from .dims import NViTDims
from .model import NViT

__all__ = ['from_vit']


def _unsupported(vit: VisionTransformer) -> list:
    """Features of a timm ViT that NViT does not have (empty when the conversion is exact)."""
    blk = vit.blocks[0]
    checks = {
        'register tokens': getattr(vit, 'num_reg_tokens', 0) > 0,
        'no class token': not getattr(vit, 'has_class_token', True),
        'no_embed_class position embedding': getattr(vit, 'no_embed_class', False),
        'pre-norm (norm_pre)': not isinstance(getattr(vit, 'norm_pre', nn.Identity()), nn.Identity),
        'fc_norm': not isinstance(getattr(vit, 'fc_norm', nn.Identity()), nn.Identity),
        'attention pooling': getattr(vit, 'attn_pool', None) is not None,
        f'global_pool={vit.global_pool!r}': vit.global_pool not in ('token', 'avg', ''),
        'patch-embed norm': not isinstance(vit.patch_embed.norm, nn.Identity),
        'non-LayerNorm norms': not isinstance(vit.norm, nn.LayerNorm),
        'layer scale': not isinstance(getattr(blk, 'ls1', nn.Identity()), nn.Identity),
        'q/k norm': not isinstance(getattr(blk.attn, 'q_norm', nn.Identity()), nn.Identity),
        'non-GELU MLP': not isinstance(getattr(blk.mlp, 'act', None), nn.GELU),
        'non-square patches': vit.patch_embed.patch_size[0] != vit.patch_embed.patch_size[1],
        'no position embedding': vit.pos_embed is None,
    }
    return [name for name, bad in checks.items() if bad]


def from_vit(vit: VisionTransformer) -> NViT:
    """Build an NViT with the same weights and outputs as a timm ``VisionTransformer`` / DeiT.

    Uniform dims: every block gets the ViT's heads, head width (for both q/k and v) and MLP width. The attention
    scale is the ViT's ``head_dim ** -0.5`` (not NViT's fixed 64 ** -0.5). A ``VisionTransformerDistilled`` keeps its
    distillation token and head. The result is on the ViT's device/dtype and in its train/eval mode.

    Args:
        vit: A timm ``VisionTransformer`` (e.g. ``deit_base_patch16_224``) or ``VisionTransformerDistilled``.

    Raises:
        TypeError: ``vit`` is not a timm VisionTransformer.
        ValueError: ``vit`` uses a feature NViT lacks (register tokens, layer scale, ...), named in the message.
    """
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f'from_vit needs a timm VisionTransformer / DeiT, got {type(vit).__name__}.')
    bad = _unsupported(vit)
    if bad:
        raise ValueError(f'from_vit: this ViT uses {", ".join(bad)}, which NViT does not support.')
    attn = vit.blocks[0].attn
    dims = NViTDims.uniform(
        embed_dim=vit.embed_dim, depth=len(vit.blocks), heads=attn.num_heads, head_dim=attn.head_dim,
        mlp_dim=vit.blocks[0].mlp.fc1.out_features)
    ref = vit.pos_embed
    model = NViT(
        dims,
        img_size=tuple(vit.patch_embed.img_size),
        patch_size=vit.patch_embed.patch_size[0],
        in_chans=vit.patch_embed.proj.in_channels,
        num_classes=vit.num_classes,
        global_pool=vit.global_pool,
        distilled=isinstance(vit, VisionTransformerDistilled),
        attn_scale=attn.scale,
        qkv_bias=attn.qkv.bias is not None,
        dynamic_img_size=vit.dynamic_img_size,
        dynamic_img_pad=vit.patch_embed.dynamic_img_pad,
        norm_eps=vit.norm.eps,
        device=ref.device,
        dtype=ref.dtype,
    )
    missing, unexpected = model.load_state_dict(vit.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f'from_vit: weights do not map one-to-one (missing {missing}, unexpected {unexpected}).')
    if isinstance(vit, VisionTransformerDistilled):
        model.distilled_training = vit.distilled_training
    return model.train(vit.training)
