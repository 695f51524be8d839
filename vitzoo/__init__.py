"""vitzoo: tools shared by the zoo's model families (FLOPs, comparison, deployment, weights, detection).

Importing vitzoo registers every model family of the zoo in timm's factory.
"""
import nvit  # noqa: F401  (registers nvit_* / revit_*)
import shvit  # noqa: F401  (registers shvit_s*)

__version__ = "0.1.0"
