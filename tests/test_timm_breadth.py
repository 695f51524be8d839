"""Defects found by a breadth test of vitzoo's tools over many timm model families and user states.

Each test compares with an independent reference: the model's own eager output, or the error a user should get.
"""
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from vitzoo.inference import deploy
from vitzoo.torchscript_backend import onednn_graph_available


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("kind", ["script", "trace"])
@pytest.mark.parametrize("verify", [True, False])
def test_deploy_refuses_a_torchscript_module_in_words(kind, verify):
    # before: every backend, verify=False too, failed after fusing with torch's "requires_grad_ is not supported on
    # ScriptModules", which says neither what is wrong nor what to do
    model = _small_cnn()
    x = torch.randn(1, 3, 16, 16)
    scripted = torch.jit.script(model) if kind == "script" else torch.jit.trace(model, x)
    with pytest.raises(ValueError, match=r"TorchScript module .*Deploy the nn.Module it was made from"):
        deploy(scripted, x, verify=verify)


def test_deploy_keeps_a_scripted_submodule_and_matches_the_model():
    # a model holding a scripted part is deployed (that part kept as it is), and gives the model's own output
    model = _small_cnn()
    model[3] = torch.jit.script(model[3])
    x = torch.randn(2, 3, 16, 16)
    deployed = deploy(model, x)
    other = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = model(other)
    torch.testing.assert_close(deployed(other), expected, atol=1e-4, rtol=0)


_ONE_ROW_SCRIPT = textwrap.dedent("""
    import warnings
    import torch
    from torch import nn
    from vitzoo.inference import deploy

    class OneRowResidual(nn.Module):  # x + mlp(x) on one row per image, as VOLO's class-attention blocks at batch 1
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 24 * 24, 384)

        def forward(self, x):
            flat = x.flatten(1)  # (B, 1728): a product with more than 1024 inputs, which oneDNN Graph mishandles
            return flat[:, :384] + self.fc(flat)

    torch.manual_seed(0)
    model = OneRowResidual().eval()
    x = torch.randn(1, 3, 24, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deployed = deploy(model, x, backend="torchscript")
    for _ in range(4):  # the heap corruption aborted the process on the 2nd or 3rd call of the fused graph
        out = deployed(x)
    with torch.no_grad():
        expected = model(x)
    print("max abs diff", (out - expected).abs().max().item())
    print("notes", deployed.optimizations)
""")


@pytest.mark.skipif(not onednn_graph_available(), reason="needs oneDNN Graph (x86 CPU torch build)")
def test_torchscript_one_row_product_then_add_does_not_abort_the_process():
    # before: deploy(volo_d1_224, torch.randn(1, 3, 64, 64), backend="torchscript") killed the interpreter
    # (SIGABRT, "munmap_chunk(): invalid pointer"): torch 2.14's oneDNN Graph fuses the add into a one-row matrix
    # product with a heap corruption. Run in a child process, so that the old behaviour fails this test only.
    result = subprocess.run([sys.executable, "-c", _ONE_ROW_SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    diff = float(result.stdout.split("max abs diff", 1)[1].split()[0])
    assert diff <= 1e-4, result.stdout
    assert "oneDNN Graph not used for input shape [1, 3, 24, 24]" in result.stdout, result.stdout


def _fx_features(**kwargs) -> nn.Module:
    """timm's features_only model made by torch.fx (``feature_cls='fx'``: a torchvision ``DualGraphModule``, which
    runs a separate graph in training mode), with drop-path, BatchNorm statistics randomised, in eval mode."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", features_only=True, feature_cls="fx", drop_path_rate=0.5, **kwargs)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_count_flops_of_an_fx_features_model_in_eval_mode():
    # before: "fold_batchnorms needs an eval-mode model (BatchNorm graph_module.bn1 is in training mode)" for a model
    # the caller had put in eval mode: copy.deepcopy of a torch.fx GraphModule comes back in training mode
    import timm

    from vitzoo.flops import count_flops

    fx_model = _fx_features()
    listed = timm.create_model("resnet10t", features_only=True).eval()  # the same network, not traced by fx
    for fused in (True, False):
        assert count_flops(fx_model, 32, fused=fused).total == count_flops(listed, 32, fused=fused).total
    assert not any(m.training for m in fx_model.modules())  # the caller's modes are left as they were


class _PreActNet(nn.Module):
    """conv -> BN (folds) -> ReLU -> pre-activation BN (does not fold) -> conv, drop-path, residual add."""

    def __init__(self):
        super().__init__()
        from timm.layers import DropPath

        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.bn2, self.conv2 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.drop_path = DropPath(0.5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return x + self.drop_path(self.conv2(self.bn2(x)))


def test_batchnorm_folding_and_deploy_of_an_fx_features_model_keep_eval_mode():
    # before: the folded copy ran the training graph (batch statistics, random drop-path), so every fold was judged
    # to "change the model's output" and none was made; a copy kept by chance dropped paths in the deployed model
    from torchvision.models.feature_extraction import create_feature_extractor

    from vitzoo.batchnorm_folding import fold_batchnorms_detailed
    from vitzoo.module_hooks import deepcopy_keeping_modes

    torch.manual_seed(0)
    model = create_feature_extractor(_PreActNet(), {"add": "out"})  # as timm's feature_cls='fx' builds it
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    copied = deepcopy_keeping_modes(model)
    assert [m.training for m in copied.modules()] == [m.training for m in model.modules()]
    with torch.no_grad():
        torch.testing.assert_close(copied(x)["out"], model(x)["out"], atol=0, rtol=0)
    folding = fold_batchnorms_detailed(model, x)
    assert folding.folded == {"bn1": "conv1"}, folding.unfolded
    assert "changed" not in folding.unfolded["bn2"], folding.unfolded
    deployed = deploy(model, x)
    assert "BatchNorm folded into the conv/linear before it in 1 layers" in deployed.optimizations
    other = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = model(other)["out"]
    for _ in range(2):  # a random drop-path would differ between calls
        torch.testing.assert_close(deployed(other)["out"], expected, atol=1e-4, rtol=0)
