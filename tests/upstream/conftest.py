"""Run timm's own ``test_models.py`` (fetched into ``test_timm_models.py``) against our ``shvit_*`` models only.

- ``TORCH_BACKEND=shvit`` makes that file import ``shvit`` before it builds its model lists, so our registered
  ``shvit_s*`` entrypoints (which replace timm's) are the ones under test.
- ``GITHUB_ACTIONS`` is set as in timm's CI: its two pretrained-download tests need the network and are then skipped.
- Every item of that file whose ``model_name`` is not ``shvit_*`` is deselected (non-model tests too).
"""
import os

import pytest

os.environ['TORCH_BACKEND'] = 'shvit'
os.environ.setdefault('GITHUB_ACTIONS', 'true')

_UPSTREAM_FILE = 'test_timm_models.py'
_TIMM_MARKERS = ('base', 'cfg', 'cfg_nonstd', 'forward', 'backward', 'torchscript', 'features', 'fxforward',
                 'fxbackward')


def pytest_configure(config):
    for marker in _TIMM_MARKERS:
        config.addinivalue_line('markers', f'{marker}: timm test_models.py marker')


def _is_ours(item) -> bool:
    params = getattr(getattr(item, 'callspec', None), 'params', {})
    return str(params.get('model_name', '')).startswith('shvit_')


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
