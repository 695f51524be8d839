"""Run timm's own ``test_models.py`` (fetched into ``test_timm_models.py``) against our models only.

- ``TORCH_BACKEND=shvit`` makes that file import ``shvit`` before it builds its model lists, so our registered
  ``shvit_s*`` entrypoints (which replace timm's) are the ones under test; ``nvit`` is imported here for the same
  reason (``nvit_*`` / ``revit_*`` are new names).
- ``GITHUB_ACTIONS`` is set as in timm's CI: its two pretrained-download tests need the network and are then skipped.
- Every item of that file whose ``model_name`` is not ``shvit_*`` or ``revit_*`` is deselected (non-model tests too).
  ``nvit_b/h/s/t`` are left out: their per-block dims are stored only in the released checkpoints (not in the
  package), so ``timm.create_model('nvit_b')`` without weights or ``dims=`` raises by design; they share ReViT's code.
"""
import os

import pytest

os.environ['TORCH_BACKEND'] = 'shvit'
os.environ.setdefault('GITHUB_ACTIONS', 'true')

import nvit  # noqa: E402,F401  registers nvit_* / revit_* before the upstream file lists models

_UPSTREAM_FILE = 'test_timm_models.py'
_OUR_PREFIXES = ('shvit_', 'revit_')
_TIMM_MARKERS = ('base', 'cfg', 'cfg_nonstd', 'forward', 'backward', 'torchscript', 'features', 'fxforward',
                 'fxbackward')


def pytest_configure(config):
    for marker in _TIMM_MARKERS:
        config.addinivalue_line('markers', f'{marker}: timm test_models.py marker')


def _is_ours(item) -> bool:
    params = getattr(getattr(item, 'callspec', None), 'params', {})
    return str(params.get('model_name', '')).startswith(_OUR_PREFIXES)


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        upstream = item.path.name == _UPSTREAM_FILE
        (drop if upstream and not _is_ours(item) else keep).append(item)
        if upstream:
            item.add_marker(pytest.mark.upstream)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
