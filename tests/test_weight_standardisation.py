"""Weight-standardised convolutions made plain for inference (vitzoo.weight_standardisation).

timm's StdConv2d / ScaledStdConv2d (and their "SAME" kinds) standardise their weight on every call. Before
2026-11-26 the fused FLOP count charged that on every call (fvcore's train-mode ``batch_norm``: 4 per weight
element, 5 with the NFNets' gain) and ``deploy()`` ran it, outside the oneDNN rewrite. References: the original
layers' own outputs, and fvcore's formula applied by hand to the weights.
"""
import onnx
import pytest
import timm
import torch
from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from torch import nn

import vitzoo
from vitzoo.export import export_verified_onnx
from vitzoo.weight_standardisation import standardise_weights

KINDS = [  # (layer, the plain kind it becomes)
    (lambda: StdConv2d(5, 8, 3, stride=2, bias=True), nn.Conv2d),
    (lambda: StdConv2dSame(5, 8, 3, stride=2), Conv2dSame),  # stride 2 "SAME": padded at run time
    (lambda: StdConv2dSame(5, 8, 3, stride=1), nn.Conv2d),  # stride 1 "SAME": a static padding
    (lambda: ScaledStdConv2d(5, 8, 3, groups=1, gamma=1.7), nn.Conv2d),
    (lambda: ScaledStdConv2dSame(5, 8, 3, stride=2), Conv2dSame),
]
STD_KINDS = (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)


def _randomized(layer):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + 0.2)  # the gain too (1.0 at init)
    return layer.eval()


@pytest.mark.parametrize("make, plain_kind", KINDS, ids=lambda v: getattr(v, "__name__", "layer"))
def test_the_plain_layer_gives_the_standardised_layers_output_bit_for_bit(make, plain_kind):
    original = _randomized(make())
    model = nn.Sequential(nn.Identity(), original)
    x = torch.randn(2, 5, 15, 13)  # odd sizes: the run-time "SAME" padding is uneven
    with torch.no_grad():
        expected = original(x)
        model, replaced = standardise_weights(model)
        got = model(x)
    assert replaced == 1 and type(model[1]) is plain_kind
    assert torch.equal(got, expected)
    assert sum(p.numel() for p in model.parameters()) == original.weight.numel() + (
        original.bias.numel() if original.bias is not None else 0)  # an NFNet's gain is in the weight


def test_a_bare_layer_is_returned_replaced():
    original = _randomized(StdConv2d(3, 4, 3))
    x = torch.randn(1, 3, 8, 8)
    plain, replaced = standardise_weights(original)
    assert replaced == 1 and type(plain) is nn.Conv2d
    with torch.no_grad():
        assert torch.equal(plain(x), original(x))


def test_a_layer_used_twice_is_replaced_everywhere_and_zero_padding_is_kept():
    """Found by a review: a layer at two places of one parent was replaced at the first only, and the replacement
    copied padding_mode, which timm's forward ignores (it always pads with zeros)."""
    shared = _randomized(StdConv2d(4, 4, 3))
    shared.padding_mode = "reflect"
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(1, 4, 9, 9)
    with torch.no_grad():
        expected = model(x)
        model, replaced = standardise_weights(model)
        got = model(x)
    assert replaced == 1 and type(model[0]) is nn.Conv2d and model[2] is model[0]
    assert torch.equal(got, expected)


def test_hooked_layers_and_subclasses_are_left_alone():
    class OwnWeights(StdConv2d):  # a subclass may compute its weight another way
        pass

    model = nn.Sequential(StdConv2d(3, 4, 3), OwnWeights(4, 4, 3))
    model[0].register_forward_hook(lambda m, a, out: None)
    model, replaced = standardise_weights(model)
    assert replaced == 0 and type(model[0]) is StdConv2d and type(model[1]) is OwnWeights


FIGURES = {  # docs/flops-and-compare.md, at the cfg size: (fused, unfused) MACs in millions
    "nf_resnet26": (2342.36, 2411.93),
    "resnetv2_50x1_bit": (4134.32, 4228.14),
    "nfnet_l0": (4255.21, 4364.07),
    "dm_nfnet_f0": (6977.11, 7209.52),
}


@pytest.mark.parametrize("name", FIGURES)
def test_the_fused_count_no_longer_charges_the_standardisation(name):
    model = timm.create_model(name)
    layers = [m for m in model.modules() if isinstance(m, STD_KINDS)]
    # fvcore counts a train-mode batch_norm as 4 FLOPs per element, 5 with an affine weight (the NFNets' gain)
    per_call = sum(m.weight.numel() * (5 if isinstance(m, (ScaledStdConv2d, ScaledStdConv2dSame)) else 4)
                   for m in layers)
    gains = sum(m.gain.numel() for m in layers if hasattr(m, "gain"))
    fused = vitzoo.count_flops(model)
    unfused = vitzoo.count_flops(model, fused=False)
    assert layers and per_call > 0
    assert unfused.total - fused.total == per_call
    assert fused.params_fused == fused.params - gains
    assert (round(fused.total / 1e6, 2), round(unfused.total / 1e6, 2)) == FIGURES[name]
    if name == "nfnet_l0":
        assert (fused.params_fused, fused.params) == (35_041_672, 35_074_488)


def test_deploy_runs_plain_convolutions_and_keeps_a_hooked_one():
    torch.manual_seed(0)
    model = timm.create_model("nf_resnet26", num_classes=10).eval()
    layers = [name for name, m in model.named_modules() if isinstance(m, STD_KINDS)]
    calls = []
    model.get_submodule(layers[3]).register_forward_hook(lambda m, a, out: calls.append(type(m)))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    deployed = vitzoo.deploy(model, x)
    assert f"weight-standardised convolutions made plain (weight standardised once): {len(layers) - 1}" \
        in deployed.optimizations
    assert "channels_last" in deployed.optimizations  # now plain convolutions: the oneDNN rewrite packs them
    calls.clear()
    got = deployed(x)
    assert calls == [ScaledStdConv2d]
    assert (got - expected).abs().max() <= 1e-4


def test_the_exported_graph_has_no_standardisation(tmp_path):
    model = _randomized(nn.Sequential(ScaledStdConv2d(3, 8, 3), nn.ReLU(), StdConv2d(8, 4, 3))).eval()
    model.in_chans = 3
    export_verified_onnx(model, tmp_path / "m.onnx", img_size=16)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "BatchNormalization" not in ops and ops >= {"Conv", "Relu"}
