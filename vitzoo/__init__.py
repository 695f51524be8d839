"""vitzoo: tools shared by the zoo's model families (FLOPs, comparison, deployment, weights, detection).

Importing vitzoo registers every model family of the zoo in timm's factory and exposes the two calls
people use most: ``vitzoo.count_flops(model)`` and ``vitzoo.deploy(model)``.
"""
import nvit  # noqa: F401  (registers nvit_* / revit_*)
import shvit  # noqa: F401  (registers shvit_s*)

from vitzoo.flops import FlopReport, count_flops
from vitzoo.inference import available_backends, deploy

__all__ = ["FlopReport", "available_backends", "count_flops", "deploy"]
__version__ = "0.1.0"
