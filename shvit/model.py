"""The SHViT model: 16x16 overlapping-patch stem, three stages, BN+Linear head (optionally a distillation head)."""
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.fx
import torch.nn as nn
from timm.layers import GroupNorm1, SelectAdaptivePool2d, create_act_layer, get_device_dtype, register_notrace_function
from timm.models._features import feature_take_indices
from timm.models._manipulate import reparameterize_model

from .layers import ConvNorm, NormLinear
from .stage import SHViTStage

__all__ = ['SHViT']


def check_input(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Return ``x`` unchanged if it is a (B, in_chans, H, W) tensor, else raise a ValueError saying why.

    Any height and width work, as in timm's and the official SHViT (every convolution is padded; below 64 px the
    last stage's map is 1x1).

    Registered as an FX leaf (``torch.fx.wrap`` and timm's notrace list) so models stay traceable; it returns its
    input so the check stays in the traced graph.
    """
    if torch.jit.is_tracing():  # export / FLOP counting: shapes are fixed by the example input
        return x
    if x.dim() != 4:
        hint = ' For a single image add the batch dimension with x.unsqueeze(0).' if x.dim() == 3 else ''
        raise ValueError(
            'SHViT expects a 4-D (batch, channels, height, width) tensor, got a {}-D tensor of shape {}.{}'.format(
                x.dim(), list(x.shape), hint))
    if x.shape[1] != in_chans:
        raise ValueError(
            'SHViT takes {}-channel input (the channels of its first convolution), got {} channels in shape {}. '
            'Create the model with in_chans={} or convert the images.'.format(
                in_chans, x.shape[1], list(x.shape), x.shape[1]))
    return x


def stem_in_chans(stem: nn.Module, default: int) -> int:
    """The input channels of ``stem``'s first convolution, fused or not, else ``default``: what the model takes
    after its first convolution was replaced by hand (``model.patch_embed[0].c = nn.Conv2d(4, ...)``; found by an
    audit: the check compared with the constructor's ``in_chans`` and refused the input the stem takes, where timm's
    SHViT, which only records ``in_chans``, ran)."""
    first = stem[0] if isinstance(stem, nn.Sequential) and len(stem) else stem  # the module the stem runs first
    conv = getattr(first, 'c', first)  # a ConvNorm's conv, or the conv fusing made of it
    # only a plain convolution that has its size (a LazyConv2d has 0 until its first call); any other module (timm's
    # MixedConv2d, a hand-written one) leaves the constructor's in_chans (found in review: the first nn.Conv2d
    # anywhere in the stem was taken, a later layer's or a MixedConv2d's split)
    return conv.in_channels if isinstance(conv, nn.Conv2d) and conv.in_channels > 0 else default


torch.fx.wrap('check_input')
check_input.returns_its_input = True  # an identity for graph rewrites (vitzoo.deploy) once the check passed
register_notrace_function(check_input)


def _stem(in_chans: int, dim: int, act_layer: Type[nn.Module], **dd: Any) -> nn.Sequential:
    """Four 3x3 stride-2 ConvNorms (dim // 8, dim // 4, dim // 2, dim) with activations between them: stride 16."""
    widths = [in_chans, dim // 8, dim // 4, dim // 2, dim]
    layers: List[nn.Module] = []
    for i in range(4):
        if i > 0:
            layers.append(create_act_layer(act_layer))
        layers.append(ConvNorm(widths[i], widths[i + 1], 3, 2, 1, **dd))
    return nn.Sequential(*layers)


def _classifier(head: Optional[nn.Module]) -> Optional[nn.Module]:
    """The Linear of a head, whether it is a NormLinear, a fused Linear or an Identity (no classes)."""
    return head.l if isinstance(head, NormLinear) else head


def _reset_parameters(module: nn.Module) -> None:
    """``reset_parameters()`` of ``module``, or else of each child, in the order they were built: a ``ConvNorm`` or
    ``NormLinear`` resets its own layers with its own initialisation, so it is not descended into."""
    if hasattr(module, 'reset_parameters'):
        module.reset_parameters()
        return
    for child in module.children():
        _reset_parameters(child)


class UnsupportedPoolError(ValueError, AssertionError):
    """A ``global_pool`` this model does not support. A ``ValueError``, and an ``AssertionError`` as timm's own
    models raise (timm's ``test_catavgmax_unsupported`` and user code catch that)."""


class SHViT(nn.Module):
    """SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design (Yun & Ro, CVPR 2024).

    Args:
        in_chans: Input image channels.
        num_classes: Classifier outputs; 0 removes the head (the model returns pooled features).
        global_pool: Pooling type (``'avg'``, ``'max'``, ``'avgmax'``, ``'fast'`` ...; ``''`` for none).
        embed_dim: Channels of the three stages.
        partial_dim: SHSA partial channels of each stage (unused where the type is ``'i'``).
        qk_dim: SHSA query / key width of each stage.
        depth: BasicBlocks per stage.
        types: ``'s'`` (single-head attention) or ``'i'`` (no attention) per stage.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth, rising linearly from 0 over all BasicBlocks (official default 0).
        distilled: Add a second (distillation) head. ``forward`` returns the mean of both heads; in training mode
            after ``set_distilled_training(True)`` the pair ``(head, head_dist)`` (timm's DeiT convention).
        norm_layer: SHSA pre-norm layer type, called as ``norm_layer(channels)`` (default ``GroupNorm1``, the
            official ``GroupNorm(1, pdim)``; timm's SHViT has the same argument).
        act_layer: Activation layer type, used for every activation (stem, patch mergings, SHSA projection, all
            FFNs; timm's SHViT leaves its BasicBlocks' FFNs at ReLU, see docs/shvit.md).
        device: Parameter device.
        dtype: Parameter dtype.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: Sequence[int] = (128, 224, 320),
            partial_dim: Sequence[int] = (32, 48, 68),
            qk_dim: Sequence[int] = (16, 16, 16),
            depth: Sequence[int] = (2, 4, 5),
            types: Sequence[str] = ('i', 's', 's'),
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            distilled: bool = False,
            norm_layer: Type[nn.Module] = GroupNorm1,
            act_layer: Type[nn.Module] = nn.ReLU,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        num_stages = len(embed_dim)
        if not all(len(v) == num_stages for v in (partial_dim, qk_dim, depth, types)):
            raise ValueError(
                'embed_dim, partial_dim, qk_dim, depth and types need one entry per stage, got lengths '
                f'{[len(v) for v in (embed_dim, partial_dim, qk_dim, depth, types)]}.')
        if embed_dim[0] < 8:  # any other width builds, rounded down as by timm's and the official stem (an audit)
            raise ValueError(
                f'embed_dim[0] must be at least 8 (the stem widths are embed_dim[0] // 8, // 4, // 2), got '
                f'{embed_dim[0]}.')
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.distilled = distilled
        self.distilled_training = False
        self.embed_dim = tuple(embed_dim)
        self.depth = tuple(depth)

        self.patch_embed = _stem(in_chans, embed_dim[0], act_layer, **dd)

        total_blocks = sum(depth)
        dpr = [drop_path_rate * j / max(total_blocks - 1, 1) for j in range(total_blocks)]
        stages = []
        self.feature_info = []
        prev_dim = embed_dim[0]
        for i in range(num_stages):
            stages.append(SHViTStage(
                prev_dim, embed_dim[i], depth[i], qk_dim[i], partial_dim[i], types[i],
                downsample=i > 0,
                drop_path=dpr[sum(depth[:i]):sum(depth[:i + 1])],
                norm_layer=norm_layer,
                act_layer=act_layer,
                **dd,
            ))
            prev_dim = embed_dim[i]
            self.feature_info.append(dict(num_chs=prev_dim, reduction=2 ** (4 + i), module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = embed_dim[-1]
        self.global_pool = self._make_pool(global_pool)
        self._check_pooled(num_classes, self.global_pool)
        self.head_drop = nn.Dropout(drop_rate)
        self.head, self.head_dist = self._make_heads(num_classes, **dd)

    def _make_heads(self, num_classes: int, **dd: Any) -> Tuple[nn.Module, Optional[nn.Module]]:
        """``(head, head_dist)``: ``head_dist`` is None unless distilled; without classes both are an ``Identity``
        (no state-dict keys), so a distilled model always has the pair, as timm's distilled DeiT."""
        if num_classes <= 0:
            return nn.Identity(), nn.Identity() if self.distilled else None
        head = NormLinear(self.head_hidden_size, num_classes, **dd)
        head_dist = NormLinear(self.head_hidden_size, num_classes, **dd) if self.distilled else None
        return head, head_dist

    @staticmethod
    def _check_pooled(num_classes: int, pool: SelectAdaptivePool2d) -> None:
        if num_classes > 0 and pool.is_identity():
            raise ValueError(
                f"a classifier head ({num_classes} classes) needs pooled features, but global_pool='' keeps the "
                "(B, C, H, W) maps. Pass num_classes=0 to get the maps, or a pool type ('avg', 'max', 'avgmax', "
                "'fast').")

    @staticmethod
    def _make_pool(global_pool: str) -> SelectAdaptivePool2d:
        try:
            pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))  # '' keeps the map
        except AssertionError:  # timm's message for an unknown name is an assert ('Invalid pool type')
            raise UnsupportedPoolError(
                f"unknown global_pool={global_pool!r}; use 'avg', 'max', 'avgmax', 'fast' or ''.") from None
        if pool.feat_mult() != 1:
            raise UnsupportedPoolError(
                f"global_pool={global_pool!r} changes the pooled width, which the BN+Linear head does not support; "
                "use 'avg', 'max', 'avgmax', 'fast' or ''.")
        return pool

    def init_weights(self, needs_reset: bool = True) -> None:
        """Initialise every parameter and buffer as the constructor does (timm's re-initialisation of a model
        created on the ``meta`` device and moved with ``to_empty``).

        Args:
            needs_reset: False does nothing: ``__init__`` has initialised the layers (timm's LeViT / EfficientViT
                signature).

        Raises:
            RuntimeError: The model is fused (``fuse()``): its layers no longer carry the constructor's
                initialisation (zero BatchNorm scales of the residual branches, the head's truncated normal).
        """
        if needs_reset and not any(isinstance(m, ConvNorm) for m in self.modules()):
            raise RuntimeError('SHViT.init_weights() needs the unfused model: this one is fused (fuse() / '
                               'timm.utils.reparameterize_model), whose plain convolutions would get PyTorch\'s '
                               'default init instead of the constructor\'s. Create the model again and initialise '
                               'that, then fuse it.')
        if needs_reset:
            _reset_parameters(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^patch_embed',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """In training mode, return ``(head, head_dist)`` logits instead of their mean (distillation training)."""
        self.distilled_training = enable

    @torch.jit.ignore
    def get_classifier(self) -> Union[nn.Module, Tuple[nn.Module, nn.Module]]:
        """The final Linear (a tuple ``(head, head_dist)`` when distilled); valid fused, unfused and without classes."""
        if self.head_dist is not None:
            return _classifier(self.head), _classifier(self.head_dist)
        return _classifier(self.head)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head(s) for ``num_classes`` outputs (0 removes them).

        ``global_pool=None`` keeps the pooling, except that a head asked for after the pooling was removed
        (``reset_classifier(0, '')``, ``prune_intermediate_layers``) brings back ``'avg'``: the head needs pooled
        features. A head and ``global_pool=''`` in one call raise ``ValueError`` before anything changes.
        """
        dd = get_device_dtype(self)
        if global_pool is None:
            keep = num_classes == 0 or not self.global_pool.is_identity()
            pool = self.global_pool if keep else self._make_pool('avg')
        else:
            pool = self._make_pool(global_pool)
        self._check_pooled(num_classes, pool)
        self.num_classes = num_classes
        self.global_pool = pool
        self.head, self.head_dist = self._make_heads(num_classes, **dd)
        for module in (self.global_pool, self.head, self.head_dist):
            if module is not None:
                module.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns the outputs of the selected stages.

        Args:
            x: Input images (B, C, H, W).
            indices: Last n stages if int, all if None, else the stage indices to return.
            norm: Unused (SHViT has no final norm); accepted for the timm API.
            stop_early: Stop after the last requested stage.
            output_fmt: Only ``'NCHW'``.
            intermediates_only: Return only the intermediates.

        Returns:
            ``intermediates`` or ``(final_features, intermediates)``.
        """
        if output_fmt != 'NCHW':
            raise ValueError("SHViT intermediates are NCHW only, got output_fmt='" + output_fmt + "'.")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates: List[torch.Tensor] = []
        x = self.patch_embed(check_input(x, self._input_chans()))
        if torch.jit.is_scripting() or not stop_early:  # stages cannot be sliced in TorchScript
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last requested one (and the head when asked or needed); returns the indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        truncated = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if truncated:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or truncated:
            self.reset_classifier(0, '')
        return take_indices

    def _input_chans(self) -> int:
        """The channels the stem takes (:func:`stem_in_chans`); in TorchScript, the constructor's ``in_chans``."""
        if torch.jit.is_scripting():
            return self.in_chans
        else:
            return stem_in_chans(self.patch_embed, self.in_chans)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(check_input(x, self._input_chans()))
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        if pre_logits:
            return x
        if self.head_dist is not None:
            x, x_dist = self.head(x), self.head_dist(x)
            if self.distilled_training and self.training and not torch.jit.is_scripting():
                return x, x_dist  # distillation training: both predictions
            if self.num_classes <= 0:
                return x  # both heads are an Identity: their mean is the pooled features themselves
            return (x + x_dist) / 2
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def fuse(self) -> 'SHViT':
        """Re-parameterise for inference in place (Conv+BN, dw residual identity, BN+Linear) and return self.

        Same result as ``timm.utils.reparameterize_model(model, inplace=True)``. Call it on an eval-mode model.
        """
        return reparameterize_model(self, inplace=True)
