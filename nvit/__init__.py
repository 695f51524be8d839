"""NViT / ReViT (Yang et al., CVPR 2023) for timm. ``import nvit`` registers ``nvit_*`` and ``revit_*``."""
from .checkpoint import (
    DIMS_METADATA_KEY,
    ClassifierSizeError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    PickleProtocolError,
    WeightsUnavailableError,
    check_dims_match,
    checkpoint_filter_fn,
    convert_official,
    dims_from_state_dict,
    dims_metadata,
    load_checkpoint,
)
from .dims import NViTDims, revit_dims
from .from_vit import from_vit
from .model import NViT
from .nvit import KNOWN_DIMS

__all__ = [
    'NViT', 'NViTDims', 'revit_dims', 'from_vit', 'load_checkpoint', 'checkpoint_filter_fn', 'convert_official',
    'dims_from_state_dict', 'check_dims_match', 'dims_metadata', 'DIMS_METADATA_KEY', 'KNOWN_DIMS',
    'ClassifierSizeError', 'CorruptCheckpointError', 'IncompatibleCheckpointError', 'WeightsUnavailableError',
    'PickleProtocolError',
]
