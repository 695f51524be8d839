"""Run timm's own ``test_models.py`` (fetched into ``test_timm_models.py``) against our models only.

- ``TORCH_BACKEND=shvit`` makes that file import ``shvit`` before it builds its model lists, so our registered
  ``shvit_s*`` entrypoints (which replace timm's) are the ones under test; ``nvit`` is imported here for the same
  reason (``nvit_*`` / ``revit_*`` are new names).
- Its two pretrained-download tests (``test_model_load_pretrained``, ``test_model_features_pretrained``) need the
  network and are deselected by name. ``GITHUB_ACTIONS`` is not set, as timm's CI sets it: it would also leave out
  ``test_model_forward_fx_torchscript`` and ``test_model_forward_torchscript_with_features_fx`` (a RAM workaround for
  timm's whole model list), which run quickly on ours.
- Every item of that file whose ``model_name`` is not ``shvit_*`` or ``revit_*`` is deselected (non-model tests too).
  ``nvit_b/h/s/t`` are left out: their per-block dims are stored only in the released checkpoints (not in the
  package), so ``timm.create_model('nvit_b')`` without weights or ``dims=`` raises by design; they share ReViT's code.
"""
import os

import pytest

os.environ['TORCH_BACKEND'] = 'shvit'
os.environ.pop('GITHUB_ACTIONS', None)  # see above: it hides tests, and the network tests are deselected

import nvit  # noqa: E402,F401  registers nvit_* / revit_* before the upstream file lists models

_UPSTREAM_FILE = 'test_timm_models.py'
_OUR_PREFIXES = ('shvit_', 'revit_')
_NETWORK_TESTS = ('test_model_load_pretrained', 'test_model_features_pretrained')
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
        network = getattr(item, 'originalname', item.name) in _NETWORK_TESTS
        (drop if upstream and (network or not _is_ours(item)) else keep).append(item)
        if upstream:
            item.add_marker(pytest.mark.upstream)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
