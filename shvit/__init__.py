"""SHViT (Yun & Ro, CVPR 2024) for timm. ``import shvit`` registers ``shvit_s1`` ... ``shvit_s4``.

The registration replaces timm's built-in ``shvit_s*`` entries on purpose (same names, tags and weight keys);
only timm's "Overwriting shvit_sX in registry" warning is silenced.
"""
import warnings

from .checkpoint import (
    CheckpointLayoutError, CheckpointMismatchError, ClassifierSizeError, CorruptCheckpointError, ExtraTensorsError,
    FusionMismatchError, IncompleteCheckpointError, InputChannelsError, PickleProtocolError, WeightFileNotFoundError,
    WeightsUnavailableError, checkpoint_filter_fn, remap_official_keys,
)
from .model import SHViT
from .variants import VARIANT_STATS, VARIANTS

with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message=r'Overwriting shvit_s\d+ in registry', category=UserWarning)
    from .shvit import default_cfgs, shvit_s1, shvit_s2, shvit_s3, shvit_s4  # noqa: E402  registers the models

__all__ = [
    'SHViT', 'checkpoint_filter_fn', 'remap_official_keys', 'CheckpointMismatchError', 'ClassifierSizeError',
    'ExtraTensorsError', 'IncompleteCheckpointError', 'InputChannelsError', 'CorruptCheckpointError',
    'WeightFileNotFoundError', 'WeightsUnavailableError', 'PickleProtocolError', 'CheckpointLayoutError',
    'FusionMismatchError', 'VARIANTS', 'VARIANT_STATS',
    'default_cfgs', 'shvit_s1', 'shvit_s2', 'shvit_s3', 'shvit_s4',
]
