"""Convert a timm ViT / DeiT into an NViT with its dims, block by block (uniform for timm's own ViTs: the starting
point of NViT pruning)."""
import copy
from typing import Optional, Union

import torch.nn as nn
from timm.layers import GELU, Attention, GELUTanh, Mlp, PatchEmbed, resample_abs_pos_embed
from timm.models._input import update_model_args
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer

from .dims import NViTDims
from .model import POOL_TYPES, NViT

__all__ = ['from_vit']


def _other_layers(vit: VisionTransformer) -> list:
    """Blocks, attention or MLP layers other than timm's pre-norm ``Block`` with ``Attention`` and ``Mlp`` (what NViT's
    blocks compute), by class name: e.g. ``ResPostBlock`` (norm after attention / MLP), ``ParallelScalingBlock``,
    ``GluMlp``, ``DiffAttention``, a hybrid ViT's ``HybridEmbed``. Exact types: a subclass may compute something
    else."""
    found = [] if type(vit.patch_embed) is PatchEmbed else [f'{type(vit.patch_embed).__name__} patch embedding']
    for blk in vit.blocks:
        parts = [(blk, Block, 'blocks')]
        if type(blk) is Block:
            parts += [(blk.attn, Attention, 'attention'), (blk.mlp, Mlp, 'MLP')]
        for layer, plain, what in parts:
            name = f'{type(layer).__name__} {what}'
            if type(layer) is not plain and name not in found:
                found.append(name)
    return found


def _unsupported(vit: VisionTransformer) -> list:
    """Features of a timm ViT that NViT does not have (empty when the conversion is exact)."""
    other = _other_layers(vit)
    if other:  # the checks below read the attributes of timm's plain Block
        return other
    blocks = list(vit.blocks)
    fc_norm = getattr(vit, 'fc_norm', nn.Identity())

    def in_any_block(has) -> bool:
        return any(has(blk) for blk in blocks)
    checks = {
        'register tokens': getattr(vit, 'num_reg_tokens', 0) > 0,
        'no class token': not getattr(vit, 'has_class_token', True),
        'no_embed_class position embedding': getattr(vit, 'no_embed_class', False),
        'pre-norm (norm_pre)': not isinstance(getattr(vit, 'norm_pre', nn.Identity()), nn.Identity),
        'a final norm both before and after pooling (norm and fc_norm)': not isinstance(vit.norm, nn.Identity)
        and not isinstance(fc_norm, nn.Identity),
        # timm's distilled head reads the two tokens as they are: its fc_norm is never applied
        'fc_norm on a distilled DeiT (which timm never applies)': isinstance(vit, VisionTransformerDistilled)
        and not isinstance(fc_norm, nn.Identity),
        'attention pooling': getattr(vit, 'attn_pool', None) is not None,
        f'global_pool={vit.global_pool!r}': vit.global_pool not in POOL_TYPES,
        'patch-embed norm': not isinstance(vit.patch_embed.norm, nn.Identity),
        'non-LayerNorm norms': (not isinstance(vit.norm, (nn.LayerNorm, nn.Identity))
                                or not isinstance(fc_norm, (nn.LayerNorm, nn.Identity))
                                or in_any_block(lambda blk: not isinstance(blk.norm1, nn.LayerNorm)
                                                or not isinstance(blk.norm2, nn.LayerNorm))),
        'no final norm': isinstance(vit.norm, nn.Identity) and isinstance(fc_norm, nn.Identity),
        # NViT builds every LayerNorm with one eps (a timm ViT does too; a hand-built one may not)
        f'LayerNorms of different eps ({_eps_groups(vit)})': len(set(_eps_of_norms(vit).values())) > 1,
        'layer scale': in_any_block(lambda blk: not isinstance(getattr(blk, 'ls1', nn.Identity()), nn.Identity)),
        'q/k norm': in_any_block(lambda blk: not isinstance(getattr(blk.attn, 'q_norm', nn.Identity()), nn.Identity)),
        'attention output norm (scale_attn_norm)': in_any_block(
            lambda blk: not isinstance(getattr(blk.attn, 'norm', nn.Identity()), nn.Identity)),
        'gated attention (gated=True)': in_any_block(lambda blk: getattr(blk.attn, 'gate', None) is not None),
        'MLP norm (scale_mlp_norm)': in_any_block(
            lambda blk: not isinstance(getattr(blk.mlp, 'norm', nn.Identity()), nn.Identity)),
        'no attention projection bias (proj_bias=False)': in_any_block(lambda blk: blk.attn.proj.bias is None),
        'q/k/v bias in some blocks only': len({blk.attn.qkv.bias is None for blk in blocks}) > 1,
        'patch dropout': not isinstance(getattr(vit, 'patch_drop', nn.Identity()), nn.Identity),
        'non-GELU MLP': in_any_block(lambda blk: _gelu_name(getattr(blk.mlp, 'act', None)) is None),
        'GELUs of different kinds (exact and tanh)': len({_gelu_name(getattr(blk.mlp, 'act', None))
                                                          for blk in blocks}) > 1,
        'attention scales other than head_dim ** -0.5 that differ between blocks': _attn_scale(vit) is None,
        'non-square patches': vit.patch_embed.patch_size[0] != vit.patch_embed.patch_size[1],
        'no position embedding': vit.pos_embed is None,
        'pooling over the prefix tokens too (pool_include_prefix=True)': (
            getattr(vit, 'pool_include_prefix', False) and vit.global_pool in ('avg', 'avgmax', 'max')),
    }
    return [name for name, bad in checks.items() if bad]


def _attn_scale(vit: VisionTransformer) -> Union[float, str, None]:
    """NViT's ``attn_scale`` for the ViT's blocks: their one scale, ``'per_block'`` when each block's is its
    ``head_dim ** -0.5``, None when neither (NViT has no other per-block scales). A block's scale is the one its
    forward applies: ``attn.scale`` on timm's explicit path, ``head_dim ** -0.5`` on its fused one, where
    ``F.scaled_dot_product_attention`` is called without it (found by a review)."""
    scales = [blk.attn.head_dim ** -0.5 if getattr(blk.attn, 'fused_attn', False) else float(blk.attn.scale)
              for blk in vit.blocks]
    if len(set(scales)) == 1:
        return scales[0]
    if all(scale == blk.attn.head_dim ** -0.5 for scale, blk in zip(scales, vit.blocks)):
        return 'per_block'
    return None


def _eps_of_norms(vit: VisionTransformer) -> dict:
    """The eps of each LayerNorm of ``vit``, by module name (checked after the norms are known to be LayerNorms)."""
    return {name: m.eps for name, m in vit.named_modules() if isinstance(m, nn.LayerNorm)}


def _eps_groups(vit: VisionTransformer) -> str:
    """The LayerNorms of ``vit`` by eps, in words: "eps 1e-06: 24 norms (blocks.0.norm1, ...); eps 1e-05:
    blocks.3.norm2"."""
    groups: dict = {}
    for name, eps in _eps_of_norms(vit).items():
        groups.setdefault(eps, []).append(name)
    named = {eps: ', '.join(names) if len(names) <= 3 else f'{len(names)} norms ({names[0]}, ...)'
             for eps, names in groups.items()}
    return '; '.join(f'eps {eps:g}: {names}' for eps, names in named.items())


def _gelu_name(act: object) -> Optional[str]:
    """timm's name of a GELU module (``'gelu'``, or ``'gelu_tanh'`` for the tanh approximation), else None."""
    if isinstance(act, nn.GELU):
        return 'gelu_tanh' if act.approximate == 'tanh' else 'gelu'
    if isinstance(act, (GELU, GELUTanh)):  # what timm's act_layer='gelu' / 'gelu_tanh' build
        return 'gelu_tanh' if isinstance(act, GELUTanh) else 'gelu'
    return None


# pretrained cfg entries that say where the ViT's weights come from: the NViT's own are in memory, not there
_WEIGHT_SOURCE_KEYS = ('url', 'hf_hub_id', 'hf_hub_filename', 'file', 'state_dict', 'source', 'tag')
# the registered name that rebuilds an NViT from its recorded arguments (the nvit_* names take any dims)
_ARCHITECTURE = 'nvit_b'


def from_vit(vit: VisionTransformer) -> NViT:
    """Build an NViT with the same weights and outputs as a timm ``VisionTransformer`` / DeiT.

    Each block gets its ViT block's heads, head width (for both q/k and v) and MLP width: uniform dims for timm's
    own ViTs, per-block ones for a ViT pruned or built block by block. The attention scale is the ViT's
    ``head_dim ** -0.5`` (not NViT's fixed 64 ** -0.5; ``'per_block'`` where the head widths differ), the GELU keeps
    its ``approximate`` setting, and every dropout and stochastic-depth rate is carried over block by block, so that
    training the result behaves like training the ViT. The final norm stays where the ViT has it: on the tokens
    (``norm``) or after pooling (``fc_norm``, timm's default for average / max pooling), under the same key names. A
    ``VisionTransformerDistilled`` keeps its distillation token and head. The result
    is on the ViT's device/dtype, in its train/eval mode and with its gradient-checkpointing setting. A fixed-size
    ViT with ``dynamic_img_pad`` at an ``img_size`` that is not a multiple of the patch gets its position embedding
    resampled to the padded grid (see docs/nvit.md).

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
        raise ValueError(f'from_vit: this ViT uses {", ".join(bad)}, which NViT does not support. from_vit converts '
                         'plain ViTs and DeiTs (class token, LayerNorm, GELU MLP, token/avg/max pooling with the '
                         'final norm before or after it), e.g. timm\'s deit_* and vit_*_patch16_* built without '
                         'those options.')
    attn = vit.blocks[0].attn
    head_dims = [blk.attn.head_dim for blk in vit.blocks]
    dims = NViTDims(embed_dim=vit.embed_dim, heads=[blk.attn.num_heads for blk in vit.blocks], qk_dim=head_dims,
                    v_dim=head_dims, mlp_dim=[blk.mlp.fc1.out_features for blk in vit.blocks])
    ref = vit.pos_embed
    args = dict(
        img_size=list(vit.patch_embed.img_size),
        patch_size=vit.patch_embed.patch_size[0],
        in_chans=vit.patch_embed.proj.in_channels,
        num_classes=vit.num_classes,
        global_pool=vit.global_pool,
        fc_norm=not isinstance(getattr(vit, 'fc_norm', nn.Identity()), nn.Identity),
        distilled=isinstance(vit, VisionTransformerDistilled),
        token_mask=False,
        attn_scale=_attn_scale(vit),
        qkv_bias=attn.qkv.bias is not None,
        dynamic_img_size=vit.dynamic_img_size,
        dynamic_img_pad=vit.patch_embed.dynamic_img_pad,
        norm_eps=vit.blocks[0].norm1.eps,
        act_layer=_gelu_name(vit.blocks[0].mlp.act),
    )
    state_dict = vit.state_dict()
    vit_grid = list(vit.patch_embed.grid_size)
    model = NViT(dims, **args, device=ref.device, dtype=ref.dtype)
    grid = list(model.patch_embed.grid_size)
    if grid != vit_grid:
        # a fixed-size ViT with dynamic_img_pad at an img_size that is not a multiple of the patch: its position
        # embedding has the whole patches only, and it fails on every input; resampled to the padded grid, as a
        # checkpoint loaded at that size is
        state_dict['pos_embed'] = resample_abs_pos_embed(
            state_dict['pos_embed'], new_size=grid, old_size=vit_grid, num_prefix_tokens=model.num_prefix_tokens)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f'from_vit: weights do not map one-to-one (missing {missing}, unexpected {unexpected}).')
    _copy_regularisation(vit, model)
    if isinstance(vit, VisionTransformerDistilled):
        model.distilled_training = vit.distilled_training
    model.set_grad_checkpointing(getattr(vit, 'grad_checkpointing', False))
    _copy_pretrained_cfg(vit, model)
    update_model_args(model, dims=dims.to_dict(), **args)
    return model.train(vit.training)


def _copy_pretrained_cfg(vit: VisionTransformer, model: NViT) -> None:
    """Give ``model`` the ViT's preprocessing (mean/std, crop, interpolation, input size, licence ...) under an NViT
    architecture name, so that timm's data config and ``save_for_hf`` work on it; the ViT's weight source is left out
    (the weights are the model's own)."""
    cfg = {k: v for k, v in (getattr(vit, 'pretrained_cfg', None) or {}).items() if k not in _WEIGHT_SOURCE_KEYS}
    cfg['architecture'] = _ARCHITECTURE
    model.pretrained_cfg = model.default_cfg = cfg


_DROPOUTS = ('pos_drop', 'head_drop')
_BLOCK_DROPOUTS = ('attn.attn_drop', 'attn.proj_drop', 'mlp.drop1', 'mlp.drop2')


def _copy_regularisation(vit: VisionTransformer, model: NViT) -> None:
    """Give ``model`` the ViT's dropout rates and its per-block stochastic-depth modules (any schedule)."""
    for name in _DROPOUTS:
        source = getattr(vit, name, None)
        if isinstance(source, nn.Dropout):
            getattr(model, name).p = source.p
    for src, dst in zip(vit.blocks, model.blocks):
        for name in _BLOCK_DROPOUTS:
            source, target = src.get_submodule(name), dst.get_submodule(name)
            if isinstance(source, nn.Dropout) and isinstance(target, nn.Dropout):
                target.p = source.p
        # the fused attention reads its dropout rate from attn_drop.p (as timm's does): copied above
        dst.drop_path1 = copy.deepcopy(src.drop_path1)
        dst.drop_path2 = copy.deepcopy(src.drop_path2)
