"""``tests/upstream/fetch_timm_tests.py`` adds our model families to timm's test lists, or fails loudly."""
import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "upstream", "fetch_timm_tests.py")


def _fetcher():
    spec = importlib.util.spec_from_file_location("fetch_timm_tests", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_our_families_are_added_before_the_count_line():
    fetcher = _fetcher()
    # the shape of timm's file around the anchor: both lists defined, then counted
    source = ("FEAT_INTER_FILTERS = [\n    'vision_transformer',\n]\nNON_STD_FILTERS = [\n    'vit_*',\n]\n"
              "NUM_NON_STD = len(NON_STD_FILTERS)\n")
    namespace = {}
    exec(fetcher._add_our_models(source, "tests/test_models.py"), namespace)  # the patched file still runs
    assert namespace["NON_STD_FILTERS"] == ["vit_*", "nvit_*", "revit_*"]
    assert namespace["FEAT_INTER_FILTERS"] == ["vision_transformer", "nvit"]
    assert namespace["NUM_NON_STD"] == 3  # counted after our entries, as timm's own are


def test_missing_anchor_is_a_clear_error():
    fetcher = _fetcher()
    with pytest.raises(RuntimeError, match=r"timm-9\.9\.9/tests/test_models\.py no longer has exactly one line "
                                           r"starting `NUM_NON_STD = len\(NON_STD_FILTERS\)`.*update ANCHOR"):
        fetcher._add_our_models("NON_STD_FILTERS = []\n", "timm-9.9.9/tests/test_models.py")
