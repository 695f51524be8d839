"""NViT: a ViT / DeiT whose blocks each have their own head count, q/k, v and MLP widths.

Paper: Global Vision Transformer Pruning with Hessian-Aware Saliency (Yang et al., CVPR 2023),
https://arxiv.org/abs/2110.04869. Original code: https://github.com/NVlabs/NViT (NVIDIA Source Code License-NC).
This is a clean-room re-implementation; see docs/nvit.md for the differences from the official code.
"""
import numbers
from typing import Any, Dict, List, Optional, Set, Tuple, Type, Union

import torch
import torch.fx
import torch.nn as nn
from timm.layers import PatchEmbed, get_act_layer, register_notrace_function, resample_abs_pos_embed, trunc_normal_
from timm.models._features import feature_take_indices
from timm.models._input import update_model_args, update_model_input_size
from timm.models._manipulate import checkpoint

from .attention import resample_token_mask
from .block import NViTBlock
from .dims import DimsLike, resolve_dims

__all__ = ['NViT']


def check_input(
        x: torch.Tensor, in_chans: int, img_size: List[int], patch_size: int, dynamic: bool, pad: bool,
) -> torch.Tensor:
    """Return ``x`` if the model can take it, else raise a ValueError that says what it expects and how to adapt.

    An FX leaf (``torch.fx.wrap`` and timm's notrace list), so models stay traceable with the check in the graph.
    """
    if torch.jit.is_tracing():  # export / FLOP counting: shapes are fixed by the example input
        return x
    if x.dim() != 4:
        hint = '; add the batch dimension with x.unsqueeze(0)' if x.dim() == 3 else ''
        raise ValueError(
            'NViT expects images as a 4-D (batch, channels, height, width) tensor, got {}-D with shape {}{}.'.format(
                x.dim(), list(x.shape), hint))
    if x.shape[1] != in_chans:
        raise ValueError(
            'This NViT takes {}-channel images (the channels of its patch embedding), got {} channels in shape {}; '
            'create it with in_chans={} or convert the images.'.format(in_chans, x.shape[1], list(x.shape),
                                                                       x.shape[1]))
    if dynamic:
        if not pad and (x.shape[2] < patch_size or x.shape[3] < patch_size or x.shape[2] % patch_size
                        or x.shape[3] % patch_size):
            raise ValueError(
                'With dynamic_img_size=True, height and width must be multiples of the {}-pixel patch, got {}x{}; '
                'resize or crop the images, or create the model with dynamic_img_pad=True to zero-pad them.'.format(
                    patch_size, x.shape[2], x.shape[3]))
    elif x.shape[2] != img_size[0] or x.shape[3] != img_size[1]:
        h, w = x.shape[2], x.shape[3]
        if h % patch_size or w % patch_size:  # that img_size alone would leave the partial patches out: pad them
            padded_h, padded_w = -(-h // patch_size) * patch_size, -(-w // patch_size) * patch_size
            how = ('img_size=({}, {}), dynamic_img_pad=True (zero-pads them to {}x{}), or with dynamic_img_size=True, '
                   'dynamic_img_pad=True'.format(h, w, padded_h, padded_w))
        else:
            how = 'img_size=({}, {}), or with dynamic_img_size=True'.format(h, w)
        raise ValueError(
            'This NViT was built for {}x{} images, got {}x{}. Resize the images, create the model with {} to accept '
            'any size (position embedding and token scales are resampled).'.format(img_size[0], img_size[1], h, w, how))
    return x


torch.fx.wrap('check_input')
register_notrace_function(check_input)


POOL_TYPES = ('', 'token', 'avg', 'max', 'avgmax')
# the pools after which timm's ViT puts the final norm by default (``fc_norm=None``)
FC_NORM_POOLS = ('avg', 'avgmax', 'max')


class NViTPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` whose grid, with ``padded_grid`` and ``dynamic_img_pad``, counts the patches of the
    zero-padded image.

    The forward pads the image on the right and bottom up to a multiple of the patch, so an ``img_size`` that is not
    one gives ``ceil(img_size / patch)`` patches per side; timm's ``PatchEmbed`` counts ``floor`` (whole patches
    only), which sizes the position embedding of a fixed-size model for a grid its forward never makes. A model with
    ``dynamic_img_size`` resamples its position embedding to the grid of every input, so it keeps timm's grid
    (``padded_grid=False``) and timm's state-dict shapes. The forward is timm's own.
    """

    def __init__(self, *args: Any, padded_grid: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.padded_grid = padded_grid
        # timm's __init__ lays out the grid before it sets dynamic_img_pad: lay it out again now that it is set
        self.img_size, self.grid_size, self.num_patches = self._init_img_size(self.img_size)

    def _init_img_size(
            self,
            img_size: Optional[Union[int, Tuple[int, int]]],
    ) -> Tuple[Optional[Tuple[int, int]], Optional[Tuple[int, ...]], Optional[int]]:
        img_size, grid_size, num_patches = super()._init_img_size(img_size)
        padded = getattr(self, 'padded_grid', False) and getattr(self, 'dynamic_img_pad', False)
        if img_size is not None and padded:
            grid_size = tuple(-(-s // p) for s, p in zip(img_size, self.patch_size))  # ceil division
            num_patches = grid_size[0] * grid_size[1]
        return img_size, grid_size, num_patches


def _resolve_act_layer(act_layer: Union[str, Type[nn.Module]]) -> Type[nn.Module]:
    """A timm activation name (``'gelu'``, ``'gelu_tanh'``) as its layer class; a class as it is."""
    if not isinstance(act_layer, str):
        return act_layer
    try:
        return get_act_layer(act_layer)
    except KeyError:
        raise ValueError(f"act_layer={act_layer!r} is not a timm activation name (e.g. 'gelu', 'gelu_tanh'; see "
                         "timm.layers.get_act_layer), nor a module class.") from None


def _check_pool(global_pool: str) -> None:
    if global_pool not in POOL_TYPES:
        attention_pool = global_pool in ('map', 'prr')
        raise UnsupportedPoolError(
            f"global_pool must be 'token', 'avg', 'max', 'avgmax' or '' (no pooling), got {global_pool!r}"
            + ("; timm ViT's attention pools ('map', 'prr') are not supported." if attention_pool else "."))


class UnsupportedPoolError(ValueError, AssertionError):
    """A ``global_pool`` this model does not support. A ``ValueError``, and an ``AssertionError`` as timm's own
    models raise (timm's ``test_catavgmax_unsupported`` and user code catch that)."""


def _check_distilled_pool(global_pool: str, num_classes: int, distilled: bool) -> None:
    """A distilled model's two heads read the class and distillation tokens (or a pool of the patch tokens): without
    pooling they would classify every token, class and distillation tokens included, and average the two heads'
    per-token logits. timm's distilled DeiT asserts there; a non-distilled model keeps timm ViT's per-token head."""
    if distilled and num_classes > 0 and not global_pool:
        raise UnsupportedPoolError(
            f"a distilled NViT's classifier heads ({num_classes} classes) need pooled features (the class and "
            "distillation tokens, or a pool of the patch tokens), but global_pool='' keeps every token. Pass "
            "num_classes=0 to get the unpooled (B, tokens, C) tokens, or a pool type ('token', 'avg', 'max', "
            "'avgmax'; e.g. global_pool='token', as the released models).")


class NViT(nn.Module):
    """Vision Transformer with per-block widths (NViT / ReViT), optionally with a DeiT distillation token.

    ``forward_features`` returns the tokens ``[B, prefix + patches, embed_dim]``, normalised unless the final norm
    comes after pooling (``fc_norm``, timm ViT's default for average / max pooling). With a distillation token the
    model has two classifiers; ``forward`` returns their mean, or the pair ``(cls, dist)`` in training mode
    after ``set_distilled_training(True)`` (timm DeiT convention).
    """
    __jit_unused_properties__ = ['_model_args']

    def __init__(
            self,
            dims: DimsLike,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            distilled: bool = True,
            token_mask: bool = False,
            attn_scale: Union[float, str, None] = 64 ** -0.5,
            qkv_bias: bool = True,
            dynamic_img_size: bool = False,
            dynamic_img_pad: bool = False,
            norm_eps: float = 1e-6,
            act_layer: Union[str, Type[nn.Module]] = nn.GELU,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            fc_norm: Optional[bool] = None,
    ) -> None:
        """
        Args:
            dims: Architecture widths: an ``NViTDims``, a dict (our keys or the official EMB/head/QK/V/MLP) or JSON.
            img_size: Input size the position embedding (and token scales) are laid out for.
            patch_size: Patch size of the convolutional patch embedding: an int, or two equal sides (square
                patches only, as NViT's position embedding and input checks assume).
            in_chans: Input channels.
            num_classes: Classes; 0 gives no classifier.
            global_pool: 'token' (class / distillation tokens), 'avg', 'max' or 'avgmax' (mean, max, or the mean of
                both, over the patch tokens) or '' (no pooling).
            distilled: Add the DeiT distillation token and a second head (all released NViT models have it).
            token_mask: Add the learned per-token q/k/v scale of the released checkpoints to every block.
            attn_scale: Attention logit scale for every block; ``'per_block'`` (or None) uses ``qk_dim ** -0.5`` per
                block. Through ``timm.create_model`` pass ``'per_block'``: timm drops keyword arguments set to None.
            qkv_bias: Bias on q/k/v.
            dynamic_img_size: Accept any input size at run time (position embedding and token scales resampled);
                height and width must be multiples of the patch size unless ``dynamic_img_pad``.
            dynamic_img_pad: Zero-pad the input on the right and bottom to a multiple of the patch size (timm ViT).
                Without ``dynamic_img_size``, the position embedding (and token scales) are laid out for the
                padded grid, ``ceil(img_size / patch_size)`` per side, so an ``img_size`` that is not a multiple of
                the patch works; with it, for timm's whole-patch grid (resampled to every input's grid, as timm).
            norm_eps: LayerNorm epsilon.
            act_layer: MLP activation: a module class, or a timm activation name (``'gelu'``, ``'gelu_tanh'``;
                ``timm.layers.get_act_layer``), as timm's ViT takes.
            drop_rate: Dropout before the classifier.
            pos_drop_rate: Dropout after adding the position embedding.
            proj_drop_rate: Dropout after attention projection and in the MLP.
            attn_drop_rate: Attention-probability dropout.
            drop_path_rate: Stochastic-depth rate, linearly increasing to this value over the blocks.
            device: Parameter device.
            dtype: Parameter dtype.
            fc_norm: Apply the final LayerNorm after pooling (module ``fc_norm``; ``norm`` is then an Identity)
                instead of to the tokens before it, as timm's ViT does. None (default): on for 'avg', 'max' and
                'avgmax', off for 'token' and '' (timm ViT's rule).
        """
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        dims = resolve_dims(dims)
        if dims is None:
            raise ValueError('NViT needs dims (NViTDims, dict or JSON string); see nvit.NViTDims.')
        _check_pool(global_pool)
        _check_distilled_pool(global_pool, num_classes, distilled)
        if fc_norm is not None and not isinstance(fc_norm, bool):
            raise TypeError(f'fc_norm must be True, False or None (on for the avg / max pools), got {fc_norm!r}.')
        use_fc_norm = global_pool in FC_NORM_POOLS if fc_norm is None else fc_norm
        if not isinstance(patch_size, numbers.Integral):  # (16, 8) was built, then inputs checked against 16
            sides = tuple(patch_size)
            if len(sides) != 2 or sides[0] != sides[1]:
                raise ValueError(f'NViT: only square patches are supported, got patch_size={patch_size!r}.')
            patch_size = sides[0]
        patch_size = int(patch_size)
        act_layer = _resolve_act_layer(act_layer)
        per_block_scale = attn_scale is None or attn_scale == 'per_block'
        if isinstance(attn_scale, str) and not per_block_scale:
            raise ValueError(f"attn_scale must be a number or 'per_block' (qk_dim ** -0.5 in each block), got "
                             f"{attn_scale!r}.")
        self.dims = dims
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = self.head_hidden_size = dims.embed_dim
        self.num_prefix_tokens = 2 if distilled else 1
        self.dynamic_img_size = dynamic_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.in_chans = in_chans
        self.grad_checkpointing = False
        self.distilled_training = False

        embed_args = dict(strict_img_size=False, output_fmt='NHWC') if dynamic_img_size else {}
        self.patch_embed = NViTPatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=dims.embed_dim,
            dynamic_img_pad=dynamic_img_pad, padded_grid=not dynamic_img_size, **embed_args, **dd)
        num_tokens = self.patch_embed.num_patches + self.num_prefix_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims.embed_dim, **dd))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dims.embed_dim, **dd)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dims.embed_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        # stochastic depth rising linearly to drop_path_rate; plain floats, so that a meta-device build works
        dpr = [drop_path_rate * i / max(dims.depth - 1, 1) for i in range(dims.depth)]
        self.blocks = nn.ModuleList([
            NViTBlock(
                dims.embed_dim, dims.heads[i], dims.qk_dim[i], dims.v_dim[i], dims.mlp_dim[i],
                scale=dims.qk_dim[i] ** -0.5 if per_block_scale else attn_scale,
                qkv_bias=qkv_bias, num_tokens=num_tokens if token_mask else None,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i],
                act_layer=act_layer, norm_eps=norm_eps, **dd)
            for i in range(dims.depth)])
        reduction = self.patch_embed.patch_size[0]
        self.feature_info = [
            dict(module=f'blocks.{i}', num_chs=dims.embed_dim, reduction=reduction) for i in range(dims.depth)]
        # one final LayerNorm: on the tokens (norm), or on the pooled features (fc_norm), never both (timm ViT)
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(dims.embed_dim, eps=norm_eps, **dd)
        self.fc_norm = nn.LayerNorm(dims.embed_dim, eps=norm_eps, **dd) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head_dist = self._make_dist_head(**dd)
        self.init_weights(needs_reset=False)

    @property
    def _model_args(self) -> Dict[str, Any]:
        """timm's reconstruction arguments (what ``save_for_hf`` writes to config.json)."""
        return self.__dict__.get('_reconstruction_args', {})

    @_model_args.setter
    def _model_args(self, args: Dict[str, Any]) -> None:
        # timm's create_model stores the caller's kwargs here after our entrypoint returns; ``dims`` given as an
        # NViTDims (or JSON) is kept as its plain dict, so that save_for_hf can write it to config.json
        args = dict(args)
        if args.get('dims') is not None:
            args['dims'] = resolve_dims(args['dims']).to_dict()
        self.__dict__['_reconstruction_args'] = args

    def _make_dist_head(self, device=None, dtype=None) -> Optional[nn.Module]:
        if self.dist_token is None:
            return None
        if self.num_classes > 0:
            return nn.Linear(self.embed_dim, self.num_classes, device=device, dtype=dtype)
        return nn.Identity()

    def init_weights(self, mode: str = '', needs_reset: bool = True) -> None:
        """Truncated normal (std .02) for tokens, position embedding and Linear weights (zero biases), as the official
        DeiT code initialises its ViT (timm's ViT draws its class token with std 1e-6).

        Args:
            mode: Only timm's default ``''`` (the jax / moco variants of timm's ViT are not implemented).
            needs_reset: Also reset every other parameter: the patch embedding and LayerNorms through their
                ``reset_parameters()``, the per-token q/k/v scales to ones (timm's re-initialisation of a model
                created on the ``meta`` device and moved with ``to_empty``). ``__init__`` passes False: those
                modules initialised themselves.
        """
        if mode not in ('',):
            raise ValueError(f"NViT.init_weights: mode {mode!r} is not implemented; use mode='' (timm's default).")
        for p in (self.pos_embed, self.cls_token, self.dist_token):
            if p is not None:
                trunc_normal_(p, std=.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif needs_reset and m is not self and hasattr(m, 'reset_parameters'):
                m.reset_parameters()
            if needs_reset and getattr(m, 'token_mask', None) is not None and isinstance(m.token_mask, nn.Parameter):
                with torch.no_grad():
                    m.token_mask.fill_(1.)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {'pos_embed', 'cls_token', 'dist_token'} if self.dist_token is not None else {'pos_embed', 'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r'^cls_token|pos_embed|patch_embed|dist_token',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """In training mode, return ``(cls_logits, dist_logits)`` instead of their mean."""
        self.distilled_training = enable

    @torch.jit.ignore
    def get_classifier(self) -> Union[nn.Module, Tuple[nn.Module, nn.Module]]:
        """The classifier; ``(head, head_dist)`` with a distillation token (timm's DeiT convention)."""
        if self.head_dist is not None:
            return self.head, self.head_dist
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier(s), keeping device, dtype and train/eval mode.

        A new ``global_pool`` keeps the final norm where it is (before or after pooling, ``fc_norm``), as timm's
        ViT does; the placement is recorded in the model args, so a model rebuilt from them has it too.

        Args:
            num_classes: New class count (0: no classifier, ``forward`` returns pooled features).
            global_pool: New pooling ('token', 'avg', 'max', 'avgmax', ''); None keeps the current one.

        Raises:
            UnsupportedPoolError: An unknown pool, or classes for a distilled model whose pooling is (or would be)
                ``''`` (after ``reset_classifier(0, '')`` or ``prune_intermediate_layers``, pass a pool along with
                the classes). Nothing is changed then.
        """
        if global_pool is not None:
            _check_pool(global_pool)
        _check_distilled_pool(self.global_pool if global_pool is None else global_pool, num_classes,
                              self.dist_token is not None)
        if global_pool is not None:
            self.global_pool = global_pool
            update_model_args(self, fc_norm=not isinstance(self.fc_norm, nn.Identity))
        ref = self.pos_embed
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype) \
            if num_classes > 0 else nn.Identity()
        self.head_dist = self._make_dist_head(device=ref.device, dtype=ref.dtype)
        for head in (self.head, self.head_dist):
            if head is not None:
                head.train(self.training)

    def _input_chans(self) -> int:
        """The channels the patch embedding's convolution takes, else (and in TorchScript) the constructor's
        ``in_chans``: a model whose ``patch_embed.proj`` was replaced by hand takes what the new one takes, as a
        timm ViT does (found by an audit of the SHViT check, which refused such input)."""
        if torch.jit.is_scripting():
            return self.in_chans
        else:
            proj = getattr(self.patch_embed, 'proj', None)
            return proj.in_channels if isinstance(proj, nn.Conv2d) else self.in_chans

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        """Patch embedding, prefix tokens and position embedding; also returns the patch grid."""
        x = check_input(x, self._input_chans(), list(self.patch_embed.img_size), self.patch_embed.patch_size[0],
                        self.dynamic_img_size, self.dynamic_img_pad)
        x = self.patch_embed(x)
        grid = list(self.patch_embed.grid_size)
        if self.dynamic_img_size:
            B, H, W, C = x.shape
            feat_size = [H, W]
            pos_embed = resample_abs_pos_embed(
                self.pos_embed, new_size=feat_size, old_size=grid, num_prefix_tokens=self.num_prefix_tokens)
            x = x.reshape(B, H * W, C)
        else:
            feat_size = grid
            pos_embed = self.pos_embed
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat(prefix + [x], dim=1) + pos_embed
        return self.pos_drop(x), feat_size

    def _token_mask_for(self, token_mask: Optional[torch.Tensor], feat_size: List[int]) -> Optional[torch.Tensor]:
        """With ``dynamic_img_size``: the block's token scale for the grid ``feat_size`` (the stored one itself when
        the grid is the built one); else None (the block uses its stored scale).

        No comparison of ``feat_size`` with the built grid here: under torch.fx the sizes are traced values, which
        cannot steer Python control flow. ``resample_token_mask`` returns the stored scale itself at the built grid,
        and timm's fx tracer keeps ``resample_abs_pos_embed`` as one call (``register_notrace_function``)."""
        if token_mask is None or not self.dynamic_img_size:
            return None
        return resample_token_mask(token_mask, feat_size, list(self.patch_embed.grid_size), self.num_prefix_tokens)

    def _forward_blocks(
            self,
            x: torch.Tensor,
            feat_size: List[int],
            last: int,
            take_indices: List[int],
            norm: bool,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Run blocks ``0..last``; collect the outputs of ``take_indices`` (final-normed if ``norm``)."""
        intermediates: List[torch.Tensor] = []
        # the masking arguments reach the blocks only when given (as in timm's ViT): torch.onnx's TorchScript
        # exporter passes forward's default ``is_causal=False`` as a tensor, which scaled_dot_product_attention
        # refuses; tested against that exporter
        masked = attn_mask is not None or is_causal
        for i, blk in enumerate(self.blocks):
            if i <= last:
                token_mask = self._token_mask_for(blk.attn.token_mask, feat_size)
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = (checkpoint(blk, x, token_mask, attn_mask, is_causal) if masked
                         else checkpoint(blk, x, token_mask))
                elif masked:
                    x = blk(x, token_mask, attn_mask, is_causal)
                else:
                    x = blk(x, token_mask)
                if i in take_indices:
                    intermediates.append(self.norm(x) if norm else x)
        return x, intermediates

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            output_dict: bool = False,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """Forward that also returns block outputs (patch tokens), for dense tasks.

        Args:
            x: Images ``[B, C, H, W]``.
            indices: Blocks to take: last n if int, all if None, these (negative allowed) if a list.
            return_prefix_tokens: Return ``(patch_tokens, prefix_tokens)`` pairs.
            norm: Apply the final norm to each intermediate (none when it comes after pooling, ``fc_norm``: the
                intermediates and the returned final tokens are then not normalised, as in timm's ViT).
            stop_early: Stop after the last block needed.
            output_fmt: 'NCHW' (feature maps) or 'NLC' (token sequences).
            intermediates_only: Return only the intermediates.
            output_dict: Return a dict, as timm's ViT does: ``'image_intermediates'``, with
                ``return_prefix_tokens`` also ``'image_intermediates_prefix'``, and unless ``intermediates_only`` the
                final tokens as ``'image_features'``. Not under TorchScript.
            attn_mask, is_causal: Attention masking in every block (see ``NViTAttention.forward``).
        """
        if output_fmt not in ('NCHW', 'NLC'):
            # no !r: TorchScript compiles f-strings without conversions only (features_only models are scripted)
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got '{output_fmt}'.")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B = x.shape[0]
        x, feat_size = self._embed(x)
        last = max_index if stop_early else len(self.blocks) - 1
        x, intermediates = self._forward_blocks(x, feat_size, last, take_indices, norm, attn_mask, is_causal)

        prefix_tokens = [y[:, :self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == 'NCHW':
            intermediates = [
                y.reshape(B, feat_size[0], feat_size[1], -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if not torch.jit.is_scripting() and output_dict:
            result: Dict[str, Any] = {'image_intermediates': intermediates}
            if return_prefix_tokens:
                result['image_intermediates_prefix'] = prefix_tokens
            if not intermediates_only:
                result['image_features'] = self.norm(x)
            return result
        if not torch.jit.is_scripting() and return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def get_intermediate_layers(
            self,
            x: torch.Tensor,
            n: Union[int, List[int], Tuple[int, ...]] = 1,
            reshape: bool = False,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            attn_mask: Optional[torch.Tensor] = None,
    ) -> List[Any]:
        """Block outputs, DINO style (timm ViT's backward-compatible API; ``forward_intermediates`` is preferred).

        Args:
            x: Images ``[B, C, H, W]``.
            n: The last ``n`` blocks if an int, else these block indices (negative allowed).
            reshape: Patch tokens as feature maps ``[B, C, H, W]`` instead of ``[B, L, C]``.
            return_prefix_tokens: Each item is a ``(patch_tokens, prefix_tokens)`` pair.
            norm: Apply the final norm to each output.
            attn_mask: Attention mask, as ``forward`` takes it.
        """
        indices = list(n) if isinstance(n, (list, tuple)) else n
        return self.forward_intermediates(
            x, indices, return_prefix_tokens=return_prefix_tokens, norm=norm,
            output_fmt='NCHW' if reshape else 'NLC', intermediates_only=True, attn_mask=attn_mask)

    def set_input_size(
            self,
            img_size: Optional[Union[int, Tuple[int, int]]] = None,
            patch_size: Optional[Union[int, Tuple[int, int]]] = None,
    ) -> None:
        """Change the input size of a built model (timm ViT API).

        The position embedding and, if present, every block's per-token q/k/v scale are resampled from the old patch
        grid to the new one (bicubic, as with ``dynamic_img_size``). A new ``patch_size`` resamples the patch
        embedding's kernel (timm's ``PatchEmbed.set_input_size``); only square patches are supported.

        Args:
            img_size: New input size (int or ``(height, width)``); None keeps the current one.
            patch_size: New square patch size; None keeps the current one.
        """
        if patch_size is not None:
            ps = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
            if len(ps) != 2 or ps[0] != ps[1]:
                raise NotImplementedError(
                    f'NViT.set_input_size: only square patches are supported, got patch_size={patch_size!r}.')
            patch_size = ps
        old_grid = list(self.patch_embed.grid_size)
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        new_grid = list(self.patch_embed.grid_size)
        if new_grid != old_grid:
            with torch.no_grad():
                self.pos_embed = nn.Parameter(
                    resample_abs_pos_embed(
                        self.pos_embed, new_size=new_grid, old_size=old_grid, num_prefix_tokens=self.num_prefix_tokens),
                    requires_grad=self.pos_embed.requires_grad)
                for blk in self.blocks:
                    tm = blk.attn.token_mask
                    if tm is not None:
                        blk.attn.token_mask = nn.Parameter(
                            resample_token_mask(tm, new_grid, old_grid, self.num_prefix_tokens),
                            requires_grad=tm.requires_grad)
        reduction = self.patch_embed.patch_size[0]
        for info in self.feature_info:
            info['reduction'] = reduction
        update_model_input_size(
            self, self.patch_embed.img_size, patch_size=None if patch_size is None else patch_size[0])

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks (and optionally final norm / heads) not needed for ``indices``; returns the taps.

        ``prune_head`` also drops ``fc_norm`` and the pooling (timm ViT)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        # the dims describe the blocks the model has (a dims record written from it must load it)
        self.dims = self.dims.first_blocks(len(self.blocks))
        update_model_args(self, dims=self.dims.to_dict())
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(
            self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
    ) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> tokens ``[B, prefix + patches, embed_dim]`` (normalised unless ``fc_norm``);
        ``attn_mask`` / ``is_causal`` mask the attention of every block (see ``NViTAttention.forward``)."""
        x, feat_size = self._embed(x)
        x, _ = self._forward_blocks(x, feat_size, len(self.blocks) - 1, [], False, attn_mask, is_causal)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """Pool tokens, apply ``fc_norm`` (an Identity unless the final norm comes after pooling) and classify.
        Distilled models average the class and distillation heads (official eval)."""
        if self.global_pool in ('avg', 'max', 'avgmax'):
            patches = x[:, self.num_prefix_tokens:]  # prefix tokens excluded, as timm ViT's default
            if self.global_pool == 'avg':
                x = patches.mean(dim=1)
            elif self.global_pool == 'max':
                x = patches.amax(dim=1)
            else:
                x = 0.5 * (patches.amax(dim=1) + patches.mean(dim=1))
            x = self.fc_norm(x)
            x_dist = x
        elif self.global_pool == 'token':
            cls = self.fc_norm(x[:, 0])
            x_dist = self.fc_norm(x[:, 1]) if self.dist_token is not None else cls
            x = cls
        else:
            x = self.fc_norm(x)
            x_dist = x
        x = self.head_drop(x)
        if self.head_dist is None:
            return x if pre_logits else self.head(x)
        x_dist = self.head_drop(x_dist)
        if pre_logits:
            return (x + x_dist) / 2
        x = self.head(x)
        x_dist = self.head_dist(x_dist)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return x, x_dist
        return (x + x_dist) / 2

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        return self.forward_head(self.forward_features(x, attn_mask, is_causal))
