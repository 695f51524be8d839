"""The benchmark scripts' variants are what their tables say they are (the timing itself is not tested)."""
import os
import sys

import pytest
import timm
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_deploy_ablation as ablation  # noqa: E402
from _common import randomize_norm_stats  # noqa: E402
from vitzoo.inference import PackedConv2d  # noqa: E402


@pytest.fixture(scope="module")
def model_and_input():
    torch.manual_seed(0)
    return randomize_norm_stats(timm.create_model("shvit_s1")), torch.randn(2, 3, 96, 96)


@pytest.mark.parametrize("step", ablation.STEPS)
def test_ablation_steps_switch_on_in_order(step, model_and_input):
    model, x = model_and_input
    level = ablation.STEPS.index(step)
    deployed = ablation.build_deployed(step, model, x)
    packed = [m for m in deployed.modules() if isinstance(m, PackedConv2d)]
    assert (deployed.memory_format == torch.channels_last) == (level >= 1)
    assert bool(packed) == (level >= 2)
    assert any(m.pointwise for m in packed) == (level >= 3)
    # SHSA modules are traced away by the oneDNN rewrite, so the token-view switch is read from the report
    assert any("token view" in o for o in deployed.optimizations) == (level >= 4), deployed.optimizations
    if level < 2:
        assert any(isinstance(m, nn.Conv2d) for m in deployed.modules())
    with torch.no_grad():
        expected = model.eval()(x)
    torch.testing.assert_close(deployed(x), expected, atol=1e-4, rtol=0)  # same model, whatever the step
