"""Detection with zoo backbones: backbone adapter + FPN, torchvision detectors, COCO data, evaluation, fine-tuning."""
from .backbone import BackboneError, DetectionBackbone, create_body
from .detectors import (
    DETECTOR_STRIDES, AlignedMultiScaleRoIAlign, ForegroundRetinaNet, UnroundedAnchorGenerator, build_backbone,
    build_detector,
)
from .fpn import ExtraLevelFPN, level_name
from .mmdet_weights import MMDetWeightsError, load_mmdet_detector
from .simple_pyramid import SimpleFeaturePyramid

__all__ = [
    'AlignedMultiScaleRoIAlign', 'BackboneError', 'DETECTOR_STRIDES', 'DetectionBackbone', 'ExtraLevelFPN',
    'ForegroundRetinaNet', 'MMDetWeightsError', 'SimpleFeaturePyramid', 'UnroundedAnchorGenerator', 'build_backbone',
    'build_detector', 'create_body', 'level_name', 'load_mmdet_detector',
]
