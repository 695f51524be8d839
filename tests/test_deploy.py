"""vitzoo.deploy: outputs within 1e-4 of the unfused model, no mutation of the caller's model, backends, errors."""
import collections
import copy
import importlib
import pickle
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from vitzoo import shsa_kernel
from vitzoo.inference import BACKENDS, DeployedModel, available_backends, deploy
from vitzoo.onednn_rewrite import PackedConv2d, PackedConvPair

from norms import randomize_norms  # tests/norms.py

ATOL = 1e-4


def _randomize_bn(model: nn.Module) -> nn.Module:
    # non-trivial BN stats/affine so that fusion actually changes the weights (zero-init gammas would hide errors)
    return randomize_norms(model).eval()


@pytest.fixture(scope="module")
def shvit_s1():
    torch.manual_seed(0)
    return _randomize_bn(timm.create_model("shvit_s1"))


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_eager_shvit_matches_unfused_and_leaves_caller_alone(shvit_s1):
    before = copy.deepcopy(shvit_s1.state_dict())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in shvit_s1.modules())
    deployed = deploy(shvit_s1, torch.randn(1, 3, 96, 96))
    assert any("oneDNN pre-packed convolutions" in o for o in deployed.optimizations), deployed.optimizations
    assert "channels_last" in deployed.optimizations
    # other batch sizes and resolutions than the example input, NCHW input converted automatically
    for shape in [(3, 3, 96, 96), (2, 3, 128, 160)]:
        x = torch.randn(shape)
        out = deployed(x)
        assert not out.requires_grad
        torch.testing.assert_close(out, _reference(shvit_s1, x), atol=ATOL, rtol=0)
    # caller's model untouched: same weights, BN still there
    assert sum(isinstance(m, nn.BatchNorm2d) for m in shvit_s1.modules()) == n_bn
    for k, v in shvit_s1.state_dict().items():
        assert torch.equal(v, before[k]), k
    # all convs swapped for fused oneDNN ones; some ReLUs and residual adds folded in
    packed = [m for m in deployed.modules() if isinstance(m, PackedConv2d)]
    assert packed and not any(isinstance(m, nn.Conv2d) for m in deployed.modules())
    assert any(m.unary == "relu" for m in packed)


@pytest.mark.parametrize("attention_kernel", [True, False])
def test_eager_shvit_convs_get_channels_last_inputs(shvit_s1, attention_kernel, monkeypatch):
    """No layout copies: every packed conv's input and residual is channels-last (SHSA runs on vitzoo's kernel, or
    without it on the token view), except the first one's where it reads the NCHW image itself (vitzoo.image_conv,
    alone or paired with the second)."""
    if not attention_kernel:
        monkeypatch.setattr(shsa_kernel, "load", lambda: None)
    deployed = deploy(shvit_s1, torch.randn(2, 3, 128, 128))
    on_kernel = attention_kernel and shsa_kernel.load() is not None
    assert any(("vitzoo's AVX-512 kernel: 9 blocks" if on_kernel else "token view in 9 layers") in o
               for o in deployed.optimizations), deployed.optimizations
    seen = []

    def check(module, args):
        wanted = torch.contiguous_format if isinstance(module, PackedConvPair) or module.image else torch.channels_last
        seen.append([tuple(a.stride()) for a in args if not a.is_contiguous(memory_format=wanted)])

    # the stem's first two convolutions run as one PackedConvPair where the image kernel pairs them
    pairs = [m for m in deployed.modules() if isinstance(m, PackedConvPair)]
    in_pairs = {id(m) for pair in pairs for m in (pair.first, pair.second)}
    called = pairs + [m for m in deployed.modules() if isinstance(m, PackedConv2d) and id(m) not in in_pairs]
    assert len(called) == 77 - len(pairs)
    for m in called:
        m.register_forward_pre_hook(check)
    deployed(torch.randn(2, 3, 128, 128))
    assert len(seen) == len(called) and not any(seen), [s for s in seen if s]


def test_eager_deit_matches():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", depth=2).eval()
    x = torch.randn(2, 3, 224, 224)
    deployed = deploy(model)  # example input from pretrained_cfg
    assert deployed.memory_format == torch.contiguous_format
    torch.testing.assert_close(deployed(x), _reference(model, x), atol=ATOL, rtol=0)


def test_eager_revit_matches():
    torch.manual_seed(0)
    model = timm.create_model("revit_t").eval()
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    deployed = deploy(model)
    assert any("zero-padded to equal head widths in 12" in o for o in deployed.optimizations), deployed.optimizations
    assert not any(getattr(m, "pad_head_dims", False) for m in model.modules()), "the caller's model was changed"
    torch.testing.assert_close(deployed(x), _reference(model, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kernel,groups,stride,residual,relu,bias", [
    (3, 1, 2, False, True, True), (3, 8, 1, True, False, True), (3, 1, 1, True, True, True),
    # pointwise: run as a oneDNN linear on the (B*H*W, C) view
    (1, 1, 1, False, False, True), (1, 1, 1, False, True, False), (1, 1, 1, True, False, True),
    (1, 1, 1, True, True, True),
    (1, 1, 2, False, True, True),  # strided 1x1: stays a convolution
])
def test_packed_conv_against_functional(kernel, groups, stride, residual, relu, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, kernel, stride, kernel // 2, groups=groups, bias=bias).eval()
    packed = PackedConv2d(conv, (4, 16, 20, 20))
    assert packed.pointwise == (kernel == 1 and stride == 1)
    packed.unary = "relu" if relu else "none"
    for shape in [(4, 16, 20, 20), (1, 16, 13, 9)]:  # a shape other than the one packed for, too
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        expected = F.conv2d(x, conv.weight, conv.bias, stride, kernel // 2, 1, groups)
        r = torch.randn_like(expected) if residual else None
        if residual:
            expected = expected + r
        if relu:
            expected = expected.relu()
        with torch.no_grad():
            out = packed(x, r) if residual else packed(x)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
            assert out.is_contiguous(memory_format=torch.channels_last)
            # a plain NCHW input (and residual) gives the same result
            nchw = packed(x.contiguous(), None if r is None else r.contiguous()) if residual else packed(x.contiguous())
            torch.testing.assert_close(nchw, expected, atol=1e-5, rtol=0)
    assert set(packed._packed) == {(4, 16, 20, 20), (1, 16, 13, 9)}  # packed once per input shape


@pytest.mark.parametrize("kernel,stride,dilation,groups,residual", [
    (3, 2, 1, 1, False), (5, 2, 1, 16, False), (3, 1, 2, 1, True), (4, 1, 1, 1, True),  # even kernel: odd padding
    (1, 2, 1, 1, False), (1, 1, 1, 1, True),  # a strided 1x1 (no padding at even sizes), a pointwise one
])
def test_packed_conv_pads_as_timms_conv2d_same(kernel, stride, dilation, groups, residual):
    """timm's Conv2dSame (TensorFlow "SAME", worked out per input size) is the reference, at the packed shape and
    at odd and even sizes it was not packed for."""
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    conv = Conv2dSame(16, 32, kernel, stride, dilation=dilation, groups=groups).eval()
    packed = PackedConv2d(conv, (2, 16, 20, 20))
    assert packed.same and packed.padding == [0, 0]
    for shape in [(2, 16, 20, 20), (1, 16, 13, 9), (3, 16, 7, 16)]:
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            expected = conv(x)
            r = torch.randn_like(expected) if residual else None
            out = packed(x, r) if residual else packed(x)
        torch.testing.assert_close(out, expected + r if residual else expected, atol=1e-5, rtol=0)


def test_conv2d_same_models_are_packed_and_verified():
    """tf_efficientnet's Conv2dSame made torch.fx fail ("symbolically traced variables cannot be used as inputs to
    control flow"), so the whole model was left unpacked; the layer is now kept whole in the trace and packed."""
    torch.manual_seed(0)
    model = _randomize_bn(timm.create_model("tf_efficientnet_b0", num_classes=10))
    deployed = deploy(model, torch.randn(2, 3, 64, 64))
    assert not any("skipped" in o for o in deployed.optimizations), deployed.optimizations
    packed = [m for m in deployed.modules() if isinstance(m, PackedConv2d)]
    assert sum(m.same for m in packed) == 5 and not any(isinstance(m, nn.Conv2d) for m in deployed.modules())
    for shape in [(2, 3, 64, 64), (1, 3, 75, 58)]:  # "SAME" padding differs at odd sizes
        x = torch.randn(shape)
        torch.testing.assert_close(deployed(x), _reference(model, x), atol=ATOL, rtol=0)


def test_models_with_modules_timm_cannot_trace_are_packed_around_them():
    """EfficientViT-M's attention branches on its input's size; torch.fx failed on it and the oneDNN rewrite skipped
    the whole model. It is now traced as timm's feature extraction traces (timm's untraceable modules whole)."""
    from timm.layers import get_notrace_modules

    torch.manual_seed(0)
    model = _randomize_bn(timm.create_model("efficientvit_m0", num_classes=10))
    deployed = deploy(model, torch.randn(2, 3, 64, 64))
    assert any("untraceable kept whole" in o for o in deployed.optimizations), deployed.optimizations
    assert sum(isinstance(m, PackedConv2d) for m in deployed.modules()) > 20
    assert any(isinstance(m, tuple(get_notrace_modules())) for m in deployed.modules())  # kept, still run
    for shape in [(2, 3, 64, 64), (3, 3, 96, 80)]:
        x = torch.randn(shape)
        torch.testing.assert_close(deployed(x), _reference(model, x), atol=ATOL, rtol=0)


def test_packed_conv_shape_cache_is_bounded_and_not_saved():
    conv = nn.Conv2d(8, 8, 1).eval()
    packed = PackedConv2d(conv, (1, 8, 4, 4))
    with torch.no_grad():
        for batch in range(2, 2 + PackedConv2d.max_cached_shapes + 2):
            packed(torch.randn(batch, 8, 4, 4).contiguous(memory_format=torch.channels_last))
    assert len(packed._packed) == PackedConv2d.max_cached_shapes
    assert set(packed.state_dict()) == {"bias"}  # packed (opaque) and plain weights stay out of state_dict()


def test_inplace_fuses_callers_model():
    torch.manual_seed(0)
    model = _randomize_bn(timm.create_model("shvit_s1"))
    x = torch.randn(1, 3, 64, 64)
    expected = _reference(model, x)
    deployed = deploy(model, x, inplace=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(deployed(x), expected, atol=ATOL, rtol=0)


@pytest.mark.skipif("onnxruntime" not in available_backends(), reason="onnx/onnxruntime not installed")
def test_onnxruntime_backend(shvit_s1):
    deployed = deploy(shvit_s1, torch.randn(1, 3, 64, 64), backend="onnxruntime")
    for batch in (1, 3):  # dynamic batch
        x = torch.randn(batch, 3, 64, 64)
        torch.testing.assert_close(deployed(x), _reference(shvit_s1, x), atol=ATOL, rtol=0)


class _FixedSize(nn.Sequential):
    """Asserts its input size with ``torch._assert``, as timm's ViT patch embedding does."""

    def forward(self, x):
        torch._assert(x.shape[-1] == 32, f"Input width ({x.shape[-1]}) doesn't match model (32).")
        return super().forward(x)


@pytest.mark.slow
def test_compile_backend():
    # a small convolutional model keeps inductor's build short; the backend's code path is the same for any model
    torch.manual_seed(0)
    model = _randomize_bn(_FixedSize(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 32, 32)
    deployed = deploy(model, x, backend="compile")
    torch.testing.assert_close(deployed(x), _reference(model, x), atol=ATOL, rtol=0)
    # the model's own error for another size, not Dynamo's ~20-line report around it
    with pytest.raises(AssertionError, match=r"^Input width \(16\) doesn't match model \(32\)\.$"):
        deployed(torch.randn(2, 3, 32, 16))


@pytest.mark.skipif("torchscript" not in available_backends(), reason="no TorchScript in this torch")
def test_torchscript_backend(shvit_s1):
    from vitzoo.torchscript_backend import onednn_graph_available

    before = torch.jit.onednn_fusion_enabled() if onednn_graph_available() else None
    deployed = deploy(shvit_s1, torch.randn(2, 3, 96, 96), backend="torchscript")
    assert deployed.backend == "torchscript"
    assert "TorchScript trace + freeze, one trace per input shape" in deployed.optimizations
    if onednn_graph_available():  # SHViT's attn.mul_(scale) needs the in-place -> out-of-place pass to fuse
        assert any(o.startswith("oneDNN Graph fusion (") for o in deployed.optimizations), deployed.optimizations
    # the example's shape, other batches and another resolution: each shape gets its own trace
    for shape in [(2, 3, 96, 96), (3, 3, 96, 96), (1, 3, 128, 128)]:
        x = torch.randn(shape)
        torch.testing.assert_close(deployed(x), _reference(shvit_s1, x), atol=ATOL, rtol=0)
    assert len(deployed.model._traced) == 3
    if before is not None:  # the process-global switch is on only during the module's own calls
        assert torch.jit.onednn_fusion_enabled() == before
        # at 64x64 (1x1 maps in stage 3) oneDNN Graph fails in torch 2.14; re-specialising the 96x96 graph for it
        # crashed the process, so each shape has its own trace and this one falls back to an unfused trace
        x = torch.randn(2, 3, 64, 64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            torch.testing.assert_close(deployed(x), _reference(shvit_s1, x), atol=ATOL, rtol=0)


@pytest.mark.skipif("torchscript" not in available_backends(), reason="no TorchScript in this torch")
def test_torchscript_backend_bad_input_gets_a_clear_error(shvit_s1):
    deployed = deploy(shvit_s1, torch.randn(1, 3, 64, 64), backend="torchscript")
    with pytest.raises(ValueError, match="takes 3 input channels.*got 4 channels"):
        deployed(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="4-D"):
        deployed(torch.randn(3, 64, 64))
    assert len(deployed.model._traced) == 1  # nothing traced for the rejected inputs


@pytest.mark.parametrize("backend", [b for b in ("eager", "torchscript", "onnxruntime") if b in available_backends()])
def test_deployed_model_names_what_is_wrong_with_an_input(backend):
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                        nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    deployed = deploy(model, torch.randn(2, 3, 32, 32), backend=backend)
    with pytest.raises(ValueError, match=r"takes a 4-D .* got shape \[3, 32, 32\]\. For a single image .*unsqueeze"):
        deployed(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"takes 3 input channels .* got 1 channels .* in_chans=1"):
        deployed(torch.randn(2, 1, 32, 32))
    with pytest.raises(TypeError, match=r"takes torch.float32 input .* got torch.float64\. Convert with x.to"):
        deployed(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    x = torch.randn(5, 3, 24, 24)  # another batch and size
    if backend == "onnxruntime":  # the exported graph fixes H and W
        with pytest.raises(ValueError, match=r"'onnxruntime' was deployed for 32x32 inputs.*got 24x24"):
            deployed(x)
    else:
        torch.testing.assert_close(deployed(x), _reference(model, x), atol=1e-4, rtol=0)
    x = torch.randn(5, 3, 32, 32)  # another batch at the example's size: every backend
    torch.testing.assert_close(deployed(x), _reference(model, x), atol=1e-4, rtol=0)
    # inference-only: train() is refused (a fine-tuning script that calls it gets the reason), eval() is fine
    with pytest.raises(RuntimeError, match=r"inference-only; deploy\(\) a fresh copy of the original to train"):
        deployed.train()
    assert deployed.eval() is deployed and not deployed.training and not any(m.training for m in deployed.modules())


class _FixedSizeBias(nn.Module):
    """Two convs and a learned (1, 8, 8, 8) map: takes only 8x8 inputs, and fails in its own add otherwise."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.pos = nn.Parameter(torch.randn(1, 8, 8, 8))

    def forward(self, x):
        return self.conv2(self.conv1(x)) + self.pos


def test_eager_backend_raises_a_models_own_error_without_printing(capsys):
    """Found by an audit: the eager backend's torch.fx module printed ~24 lines of generated code to stderr before
    re-raising a model's own error (LeViT at another size), even when the caller caught it."""
    deployed = deploy(_FixedSizeBias().eval(), torch.randn(2, 3, 8, 8))
    assert isinstance(deployed.model, torch.fx.GraphModule)
    capsys.readouterr()
    with pytest.raises(RuntimeError, match=r"size of tensor a \(16\) must match the size of tensor b \(8\)"):
        deployed(torch.randn(2, 3, 16, 16))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("backend", [b for b in ("eager", "torchscript", "onnxruntime") if b in available_backends()])
def test_a_deployed_model_refuses_to_be_saved_or_copied_and_says_what_to_do(backend, tmp_path):
    """Found by an audit: torch.save / copy.deepcopy failed in the backends' own words ("Cannot access storage of
    OpaqueTensorImpl", "cannot pickle InferenceSession"); the original model is what to save."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    deployed = deploy(model, torch.randn(1, 3, 16, 16), backend=backend)
    copyable = backend == "torchscript"  # eager holds oneDNN-packed weights, onnxruntime a session
    what = "saved or pickled" if copyable else "saved, pickled or deep-copied"
    message = rf"deployed by vitzoo.deploy \(backend '{backend}'\) cannot be {what}: save"
    with pytest.raises(TypeError, match=message):
        torch.save(deployed, tmp_path / "deployed.pt")
    with pytest.raises(TypeError, match=message):
        pickle.dumps(deployed)
    if copyable:
        x = torch.randn(2, 3, 16, 16)
        torch.testing.assert_close(copy.deepcopy(deployed)(x), _reference(model, x), atol=1e-4, rtol=0)
    else:
        with pytest.raises(TypeError, match=message):
            copy.deepcopy(deployed)
    torch.save(model, tmp_path / "model.pt")  # the original still saves


def test_a_deployed_model_without_packed_weights_deep_copies():
    """Found by an audit: the refusal above also refused copy.deepcopy (and so timm's reparameterize_model, which
    deep-copies) on deployed models whose backend copies fine: eager on a model with no convolutions to pack."""
    from timm.utils import reparameterize_model
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    deployed = deploy(model, torch.randn(2, 3, 4, 4))
    x = torch.randn(3, 3, 4, 4)
    for copied in (copy.deepcopy(deployed), reparameterize_model(deployed)):
        assert copied is not deployed and copied.backend == "eager"
        torch.testing.assert_close(copied(x), _reference(model, x), atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match=r"cannot be saved or pickled: save or copy the original"):
        pickle.dumps(deployed)


def test_deployed_model_on_a_gpu_names_an_input_on_another_device():
    """An input on another device than the CUDA example's is named before the model runs (checked without a GPU:
    the example's device is what the check reads)."""
    from vitzoo.inference import DeployedModel

    deployed = DeployedModel(nn.Identity(), "eager", example_input=torch.randn(2, 3, 8, 8))
    deployed.example_device = torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"runs on cuda:1, got an input on cpu\. Move it with x.to\('cuda:1'\)"):
        deployed(torch.randn(2, 3, 8, 8))


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on cuda:0: what the device check reads, without a GPU."""
    @property
    def device(self):
        return torch.device("cuda", 0)


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_a_cpu_deployed_model_names_an_input_on_a_gpu(backend):
    """Found by an audit: a CUDA input to a CPU-deployed model got a CPU kernel's words (eager) or was moved to the
    CPU without a word (onnxruntime)."""
    if backend not in available_backends():
        pytest.skip(f"{backend} not available")
    deployed = deploy(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), torch.randn(1, 3, 8, 8), backend=backend)
    on_gpu = torch.Tensor._make_subclass(_OnCuda, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"runs on cpu, got an input on cuda:0\. Move it with x\.to\('cpu'\), or "
                                         r"deploy with an example input on cuda:0"):
        deployed(on_gpu)


@pytest.mark.skipif("onnxruntime" not in available_backends(), reason="onnxruntime not installed")
def test_onnxruntime_backend_takes_a_bf16_model():
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    x = torch.randn(2, 3, 16, 16)
    fp32 = _reference(model, x)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    deployed = deploy(bf16, x.to(torch.bfloat16), backend="onnxruntime", atol=0.05)  # bf16 rounding in the check
    assert "exported in float32 (the model was torch.bfloat16)" in deployed.optimizations
    y = deployed(x.to(torch.bfloat16))
    assert y.dtype == torch.float32  # ONNX Runtime's CPU kernels run fp32
    # the bf16 weights run exactly in fp32: the result differs from the fp32 model by the weights' rounding only
    torch.testing.assert_close(y, _reference(copy.deepcopy(bf16).float(), x.to(torch.bfloat16).float()),
                               atol=1e-5, rtol=0)
    assert (y - fp32).abs().max() < 0.05


@pytest.mark.skipif("onnxruntime" not in available_backends(), reason="onnxruntime not installed")
def test_onnxruntime_backend_inplace_keeps_the_callers_bf16_model_in_bf16():
    """Found by an audit: deploy(backend="onnxruntime", inplace=True) converted the caller's bf16 model to float32,
    which then failed on its own bf16 input; inplace only fuses the caller's model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval().to(torch.bfloat16)
    x = torch.randn(1, 3, 8, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = F.relu(F.conv2d(x, model[0].weight, model[0].bias))  # the caller's model, by hand
    deploy(model, x, backend="onnxruntime", inplace=True, atol=0.1)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(model(x), expected)


@pytest.mark.skipif("onnxruntime" not in available_backends(), reason="onnxruntime not installed")
def test_export_onnx_leaves_a_training_models_statistics_and_modes_alone():
    """Found by an audit: export_onnx ran a model in training mode three times in it (moving its BatchNorm running
    statistics) while the exporter wrote the eval graph; it now runs and exports in eval mode, modes put back."""
    from vitzoo.onnx_runtime import OnnxRuntimeModule, export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).train()
    model[2].eval()  # a mixed-mode model: each module gets its own mode back
    stats = {k: v.clone() for k, v in model[1].state_dict().items()}
    x = torch.randn(2, 3, 8, 8) * 3 + 1
    graph = OnnxRuntimeModule(export_onnx(model, x))
    assert all(torch.equal(v, stats[k]) for k, v in model[1].state_dict().items())
    assert [m.training for m in model.modules()] == [True, True, True, False]
    with torch.no_grad():  # the graph is the eval model: BatchNorm with the running statistics, no dropout
        expected = F.batch_norm(F.conv2d(x, model[0].weight, model[0].bias), stats["running_mean"],
                                stats["running_var"], model[1].weight, model[1].bias, eps=model[1].eps)
    torch.testing.assert_close(graph(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif("onnxruntime" not in available_backends(), reason="onnxruntime not installed")
def test_onnxruntime_backend_runs_a_float64_model_in_float32_and_says_so():
    """A float64 model is exported in float32 like a bf16 one (ONNX Runtime's CPU kernels), its output is float32
    and the deployed model's optimizations say so (docs/deploy.md, backend table)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    deployed = deploy(model, x, backend="onnxruntime")
    assert "exported in float32 (the model was torch.float64)" in deployed.optimizations
    y = deployed(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _reference(model, x), atol=1e-5, rtol=0)


def test_deployed_model_of_a_non_image_input_is_not_checked():
    torch.manual_seed(0)
    model = nn.Linear(16, 4)
    deployed = deploy(model, torch.randn(2, 16))
    for x in (torch.randn(16), torch.randn(3, 5, 16)):  # other ranks are the module's business
        torch.testing.assert_close(deployed(x), _reference(model, x))


def test_torchscript_fallback_note_is_the_errors_own_sentence():
    ts = importlib.import_module("vitzoo.torchscript_backend")
    error = RuntimeError("The following operation failed in the TorchScript interpreter.\n"
                         "Traceback of TorchScript (most recent call last):\n"
                         "RuntimeError: could not create a primitive descriptor for the reorder primitive. "
                         "Run workload with environment variable ONEDNN_VERBOSE=all to get additional diagnostic "
                         "information.\n")
    assert ts._first_sentence(error) == "could not create a primitive descriptor for the reorder primitive"
    assert ts._first_sentence(ValueError("x" * 300)) == "x" * 157 + "..."
    assert ts._first_sentence(RuntimeError("")) == ""


@pytest.mark.skipif("torchscript" not in available_backends(), reason="no TorchScript in this torch")
def test_torchscript_backend_falls_back_without_onednn_graph(monkeypatch):
    ts = importlib.import_module("vitzoo.torchscript_backend")
    if not ts.onednn_graph_available():
        pytest.skip("no oneDNN Graph in this build")
    real_warm_up = ts._warm_up

    def fails_when_fused(traced, x, fused):
        if fused:
            raise RuntimeError("some pattern oneDNN Graph rejects")
        real_warm_up(traced, x, fused)

    monkeypatch.setattr(ts, "_warm_up", fails_when_fused)
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(RuntimeWarning, match=r"failed for input shape \[2, 3, 16, 16\].*some pattern oneDNN Graph "
                                            r"rejects.*runs without it"):
        deployed = deploy(model, x, backend="torchscript")
    assert [fused for _, fused in deployed.model._traced.values()] == [False]
    assert any("runs without it" in o for o in deployed.optimizations)
    torch.testing.assert_close(deployed(x), _reference(model, x), atol=ATOL, rtol=0)


@pytest.mark.skipif("torchscript" not in available_backends(), reason="no TorchScript in this torch")
def test_torchscript_new_shapes_are_held_to_deploys_tolerance():
    """A fused graph for a new input shape is kept only within deploy's atol (was 1e-3 relative, 10x looser:
    timm's efficientvit_b0 at 64x64 came out 3.7e-4 off, found by an audit). The mechanism first: a fused graph
    2e-4 off (within the old 1e-3 relative) falls back to the unfused trace, with a note."""
    ts = importlib.import_module("vitzoo.torchscript_backend")
    if not ts.onednn_graph_available():
        pytest.skip("no oneDNN Graph in this build")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)).eval()
    x = torch.randn(2, 8, 12, 12).contiguous(memory_format=torch.channels_last)
    module = ts.TorchScriptModule(model, onednn_fusion=True, atol=1e-4)
    assert module._traced_for(x)[1] is True
    real_diff = ts.max_abs_diff_of
    ts.max_abs_diff_of = lambda out, ref: (2e-4, real_diff(out, ref)[1])
    try:
        strict = ts.TorchScriptModule(model, onednn_fusion=True, atol=1e-4)
        with pytest.warns(RuntimeWarning, match="differs from the eager model's by 0.0002, more than deploy's tol"):
            assert strict._traced_for(x)[1] is False
    finally:
        ts.max_abs_diff_of = real_diff
    with torch.no_grad():
        torch.testing.assert_close(strict(x), model(x), atol=0, rtol=0)
    # the audit's case, end to end: every shape within 1e-4 of the original model
    net = timm.create_model("efficientvit_b0").eval()
    deployed = deploy(net, backend="torchscript")
    for shape in [(1, 3, 64, 64), (2, 3, 96, 96)]:
        y = torch.randn(shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            torch.testing.assert_close(deployed(y), _reference(net, y), atol=ATOL, rtol=0)


@pytest.mark.skipif("torchscript" not in available_backends(), reason="no TorchScript in this torch")
def test_torchscript_backend_fuses_even_with_the_profiling_mode_off():
    # timm's own test file turns TorchScript's profiling mode off at import, which stops oneDNN Graph fusion
    # process-wide; the backend turns it on for its own calls and reports fusion only when the graph has it
    ts = importlib.import_module("vitzoo.torchscript_backend")
    if not ts.onednn_graph_available():
        pytest.skip("no oneDNN Graph in this build")
    model = nn.Sequential(nn.Conv2d(8, 24, 1), nn.ReLU()).eval()
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    previous = torch._C._jit_set_profiling_mode(False)
    try:
        deployed = deploy(model, x, backend="torchscript")
        assert [fused for _, fused in deployed.model._traced.values()] == [True]
        deployed(x)
        assert ts._has_onednn_fusion_group(torch.jit.last_executed_optimized_graph())
        assert torch._C._jit_set_profiling_mode(False) is False  # restored after the call
    finally:
        torch._C._jit_set_profiling_mode(previous)
    plain = nn.Sequential(nn.Flatten(), nn.Softmax(dim=1)).eval()  # nothing oneDNN Graph fuses
    deployed = deploy(plain, torch.randn(2, 8, 6, 6), backend="torchscript")
    assert [fused for _, fused in deployed.model._traced.values()] == [False]
    assert not any(o.startswith("oneDNN Graph fusion (") for o in deployed.optimizations)
    assert "oneDNN Graph found nothing to fuse for input shape [2, 8, 6, 6]" in deployed.optimizations


def test_torchscript_backend_fuses_nvit_with_token_mask():
    # NViT's per-token q/k/v scale ([N, 1]) broadcast against the qkv output made oneDNN Graph fail
    # ("vector::_M_range_check"), so every ReViT/NViT ran unfused; the scale is now broadcast explicitly
    ts = importlib.import_module("vitzoo.torchscript_backend")
    if not ts.onednn_graph_available():
        pytest.skip("no oneDNN Graph in this build")
    import nvit  # noqa: F401  (registers nvit_*)

    torch.manual_seed(0)
    dims = dict(embed_dim=32, heads=[2, 1], qk_dim=[8, 16], v_dim=[16, 8], mlp_dim=[48, 32])
    model = timm.create_model("nvit_b", dims=dims, img_size=64, num_classes=10, token_mask=True).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.token_mask.uniform_(0.5, 1.5)  # a non-trivial scale
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "fusion failed" fallback
        deployed = deploy(model, x, backend="torchscript")
    assert [fused for _, fused in deployed.model._traced.values()] == [True]
    torch.testing.assert_close(deployed(x), _reference(model, x), atol=1e-5, rtol=0)


class _LayerScaled(nn.Module):
    """A linear layer's output times a per-channel parameter, plus the input: timm's LayerScale (deit3, cait, xcit,
    edgenext...)."""

    def __init__(self, dim: int = 24):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        return x + self.fc(x) * self.gamma


@pytest.mark.parametrize("model, error", [
    (_LayerScaled(), "vector::_M_range_check"),
    (nn.Sequential(nn.Linear(24, 24), nn.LayerNorm(24, bias=False)), "could not add op to the graph"),
], ids=["layer-scale", "layernorm-without-bias"])
def test_torchscript_backend_falls_back_where_onednn_graph_fails(model, error):
    """The two oneDNN Graph failures (torch 2.14.1) behind timm models that run as an unfused trace (docs/deploy.md):
    a parameter that broadcasts against a linear layer's output (timm's layer scale; swin's relative position bias
    fails alike) and a LayerNorm without bias (poolformerv2). Each falls back with the warning, and computes what the
    model does. Should a torch release fuse them, this fails, and the docs' list is to be updated."""
    ts = importlib.import_module("vitzoo.torchscript_backend")
    if not ts.onednn_graph_available():
        pytest.skip("no oneDNN Graph in this build")
    x = torch.randn(2, 5, 24)
    with pytest.warns(RuntimeWarning, match=rf"fusion failed for input shape \[2, 5, 24\] \(RuntimeError: {error}"):
        deployed = deploy(model.eval(), x, backend="torchscript")
    assert [fused for _, fused in deployed.model._traced.values()] == [False]
    torch.testing.assert_close(deployed(x), _reference(model, x), atol=1e-6, rtol=0)


@pytest.mark.skipif("torchscript" not in available_backends(), reason="no TorchScript in this torch")
def test_torchscript_calls_from_several_threads_take_turns():
    """Found by an audit: SHViT-S1 deployed with backend='torchscript' and called from two threads at once failed in
    3 of 24 calls (oneDNN "could not create a primitive descriptor": one thread's unfused graph ran while another had
    oneDNN Graph's process-global switch on) and left the switch on. Calls now take turns: they never overlap, and
    the switch is back to what it was."""
    import threading
    import time

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    deployed = deploy(model, x, backend="torchscript")
    inside, seen = [0], []
    for key, (traced, fused) in list(deployed.model._traced.items()):
        def slow(inputs, _traced=traced):  # a call that takes a while, counting the calls running at once
            inside[0] += 1
            seen.append(inside[0])
            time.sleep(0.005)
            out = _traced(inputs)
            inside[0] -= 1
            return out
        deployed.model._traced[key] = (slow, fused)
    before = torch.jit.onednn_fusion_enabled()
    outputs = []
    threads = [threading.Thread(target=lambda: outputs.extend(deployed(x) for _ in range(5))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == len(outputs) == 15 and max(seen) == 1
    assert torch.jit.onednn_fusion_enabled() == before
    for out in outputs:
        torch.testing.assert_close(out, _reference(model, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["eager", "torchscript", "onnxruntime"])
def test_a_deployed_model_refuses_another_dtype_or_device_and_takes_a_no_op_move(backend):
    """Found by an audit: after .double(), .half() or .bfloat16() a torchscript deployed resnet18 returned numbers
    3.7e19 off or nan, without a word (eager failed in oneDNN's words; onnxruntime ignored it). Each now raises a
    TypeError naming the move; a move to where it already runs changes nothing."""
    if backend not in available_backends():
        pytest.skip(f"{backend} is not available here")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10)).eval()
    x = torch.randn(2, 3, 16, 16)
    deployed = deploy(model, x, backend=backend)
    for move, to in ((lambda d: d.double(), "torch.float64"), (lambda d: d.half(), "torch.float16"),
                     (lambda d: d.to(torch.bfloat16), "torch.bfloat16"), (lambda d: d.to("meta"), "meta")):
        with pytest.raises(TypeError, match=f"cannot be moved from torch.float32 on cpu to .*{to}"):
            move(deployed)
    assert deployed.to("cpu") is deployed and deployed.float() is deployed and deployed.cpu() is deployed
    assert deployed.to(torch.float32) is deployed
    torch.testing.assert_close(deployed(x), _reference(model, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["eager", "torchscript", "onnxruntime"])
def test_the_deployed_model_keeps_the_preprocessing_of_its_cfg(backend):
    """Found by an audit: the ONNX Runtime model had an empty pretrained_cfg, so timm's resolve_data_config took
    ImageNet's mean for a ViT normalised with 0.5. The reference is timm's resolution on the model itself."""
    if backend not in available_backends():
        pytest.skip(f"{backend} is not available here")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1).eval()
    expected = timm.data.resolve_data_config(model=model)
    assert expected["mean"] == (0.5, 0.5, 0.5)
    deployed = deploy(model, torch.randn(2, 3, 32, 32), backend=backend)
    if backend == "onnxruntime":  # its graph takes the example's size only, and the cfg says so
        expected = dict(expected, input_size=(3, 32, 32))
    assert timm.data.resolve_data_config(model=deployed) == expected


@pytest.mark.parametrize("backend", ["eager", "torchscript", "onnxruntime"])
def test_an_empty_batch_gives_an_empty_output_on_every_backend(backend):
    """Found by an audit: ONNX Runtime failed on a batch of 0 ("Non-zero status code ... Reshape node") where the
    other backends, like the model, return an empty (0, classes) output."""
    if backend not in available_backends():
        pytest.skip(f"{backend} is not available here")

    class Reshaping(nn.Module):  # flatten(2), which the ONNX graph computes with a Reshape node (as SHViT's)
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(self.conv(x).relu().flatten(2).mean(-1))

    class Tokens(nn.Module):  # 256 tokens of 64 features: a linear layer the AMX path takes (bf16x3 machines)
        def __init__(self):
            super().__init__()
            self.embed, self.mlp, self.head = nn.Conv2d(3, 64, 2, 2), nn.Linear(64, 64), nn.Linear(64, 10)

        def forward(self, x):
            return self.head(self.mlp(self.embed(x).flatten(2).transpose(1, 2)).mean(1))

    # found by an audit: with an AMX linear layer, a ZeroDivisionError (its rows per image, of 0 images)
    for model, size in ((Reshaping().eval(), 16), (Tokens().eval(), 32)):
        deployed = deploy(model, torch.randn(2, 3, size, size), backend=backend)
        empty = torch.randn(0, 3, size, size)
        out = deployed(empty)
        assert out.shape == _reference(model, empty).shape == (0, 10) and out.dtype == torch.float32


@pytest.mark.parametrize("kwargs, says", [
    (dict(atol="1e-4"), "atol must be a finite number >= 0 (e.g. atol=0.0001), got '1e-4'"),
    (dict(atol=-1), "atol must be a finite number >= 0 (e.g. atol=0.0001), got -1"),
    (dict(rtol=float("nan")), "rtol must be a finite number >= 0 (e.g. rtol=0), got nan"),
    (dict(backend="onnxruntime", opset="17"), "opset must be an int from 17 to "),
    (dict(backend="onnxruntime", opset=16), "opset must be an int from 17 to "),
])
def test_bad_tolerances_and_opsets_are_refused_before_any_work(kwargs, says, monkeypatch):
    """Found by an audit: atol="1e-4" failed after the model was copied, fused and built ("can only concatenate
    str (not "float") to str"), opset="17" in words about '<', and atol=-1 advised a larger atol."""
    import vitzoo.inference

    def no_copy(model):
        raise AssertionError("the model was copied: the arguments were not checked first")

    monkeypatch.setattr(vitzoo.inference.copy, "deepcopy", no_copy)
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    with pytest.raises(ValueError) as caught:
        deploy(model, torch.randn(1, 3, 8, 8), **kwargs)
    assert says in str(caught.value)


def test_torchscript_backend_unavailable_is_a_clear_error(monkeypatch, shvit_s1):
    monkeypatch.setattr(importlib.import_module("vitzoo.torchscript_backend"), "torchscript_available", lambda: False)
    with pytest.raises(RuntimeError, match="backend 'torchscript' is not available here"):
        deploy(shvit_s1, backend="torchscript")


def test_bad_backend_lists_valid_ones(shvit_s1):
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'.*eager, compile, onnxruntime, torchscript"):
        deploy(shvit_s1, backend="tensorrt")
    assert set(available_backends()) <= set(BACKENDS)


def test_no_example_input_and_no_cfg_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Sequential has no pretrained_cfg\['input_size'\]; pass "
                                         r"example_input=torch.randn\(1, 3, H, W\)\.$"):
        deploy(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    # the suggestion has the model's own channel count (found by an audit: it said 3 for a 1-channel model)
    with pytest.raises(ValueError, match=r"example_input=torch.randn\(1, 1, H, W\)"):
        deploy(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()))


def test_verification_failure_raises(monkeypatch, shvit_s1):
    deploy_module = importlib.import_module("vitzoo.inference")  # the module, even if vitzoo re-exports deploy()
    monkeypatch.setattr(deploy_module, "onednn_rewrite", lambda m, x, *rest: (_Offset(m), ["broken"]))
    with pytest.raises(RuntimeError, match="max abs diff"):
        deploy(shvit_s1, torch.randn(1, 3, 64, 64))


class _Offset(nn.Module):
    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x) + 1e-3


def test_verification_failure_from_rounding_at_a_huge_scale_says_so():
    # timm's randomly initialised MobileOne (no zero-init branches) has outputs of ~1e14: its re-parameterisation
    # changes the rounding by far more than 1e-4 in absolute terms, about 1e-6 relative
    torch.manual_seed(0)
    model, x = timm.create_model("mobileone_s0").eval(), torch.randn(1, 3, 64, 64)
    scale = _reference(model, x).abs().max().item()
    assert scale > 1e12
    with pytest.raises(RuntimeError, match=r"outputs reach .*float rounding at that scale.*pass a larger atol, e\.g\. "
                                           r"atol=") as info:
        deploy(model, x, backend="eager")
    suggested = float(str(info.value).split("atol=")[1].split(",")[0])
    deployed = deploy(model, x, backend="eager", atol=suggested)  # the suggested tolerance is accepted
    diff = (deployed(x) - _reference(model, x)).abs().max().item()
    assert 1e-4 < diff <= suggested and diff / scale < 1e-5


def test_verification_failure_of_a_wrong_result_names_no_rounding(monkeypatch):
    vi = importlib.import_module("vitzoo.inference")
    build_eager = vi._build_eager

    def wrong(model, example_input, rewrite, **kwargs):  # a rewrite that breaks the model: output off by 0.01
        deployed = build_eager(model, example_input, rewrite, **kwargs)
        deployed.model = nn.Sequential(deployed.model, Shift())
        return deployed

    class Shift(nn.Module):
        def forward(self, x):
            return x + 0.01

    monkeypatch.setattr(vi, "_build_eager", wrong)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(RuntimeError, match=r"max abs diff 0\.01 \(> tolerance 0\.0001\)\. Use another backend"):
        deploy(model, torch.randn(1, 3, 8, 8), backend="eager")


def test_residual_add_computed_after_the_conv():
    # CoAtNet / EfficientFormerV2 compute the residual operand after the conv it is added to; fusing the add into
    # the conv must not use that operand before it is defined
    class LateResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 1)
            self.other = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            r = torch.relu(self.other(x)) * 0.5
            return y + r

    torch.manual_seed(0)
    model, x = LateResidual().eval(), torch.randn(2, 8, 12, 12)
    deployed = deploy(model, x, backend="eager")
    assert any("fused residual add: 1" in o for o in deployed.optimizations), deployed.optimizations
    torch.testing.assert_close(deployed(x), _reference(model, x), atol=ATOL, rtol=0)


class _ReluOfCat(nn.Module):
    """``conv(relu(cat([a, b])))``, optionally with the cat result used again after the ReLU (SHSA's pattern)."""

    def __init__(self, reuse_cat: bool):
        super().__init__()
        self.reuse_cat = reuse_cat
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.proj = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        c = torch.cat([self.a(x), self.b(x)], dim=1)
        y = self.proj(self.act(c))
        return y + c if self.reuse_cat else y


@pytest.mark.parametrize("reuse_cat", [False, True])
def test_relu_of_cat_runs_in_place_only_when_nothing_else_uses_the_cat(reuse_cat):
    torch.manual_seed(0)
    model, x = _ReluOfCat(reuse_cat).eval(), torch.randn(2, 4, 10, 10)
    deployed = deploy(model, x, backend="eager")
    in_place = any("ReLUs run in place" in o for o in deployed.optimizations)
    assert in_place is not reuse_cat, deployed.optimizations
    torch.testing.assert_close(deployed(x), _reference(model, x), atol=ATOL, rtol=0)


class _ShortcutThenInPlace(nn.Module):
    """The shortcut conv's input is changed in place before the add (``act(x)`` with ``inplace=True``)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.short = nn.Conv2d(8, 8, 1)
        self.act = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        shortcut = self.short(x)
        x = self.conv(self.act(x))
        return shortcut + x


class _AliasedInPlaceAdd(nn.Module):
    """``y += conv(x)`` where ``y`` has another name: the add must stay in place."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        y = self.stem(x) * 1.0
        keep = y
        y += self.conv(x)
        return keep * 2 + y


@pytest.mark.parametrize("model_cls", [_ShortcutThenInPlace, _AliasedInPlaceAdd])
def test_residual_fusion_respects_in_place_ops(model_cls):
    """Found by an audit: fusing the add moved the shortcut conv after an in-place op on its input (wrong by 0.13),
    and turned ``y += conv(x)`` into a new tensor that ``y``'s other name did not see."""
    torch.manual_seed(0)
    model, x = model_cls().eval(), torch.randn(2, 3, 12, 12)
    deployed = deploy(model, x, backend="eager", verify=False)
    torch.testing.assert_close(deployed(x), _reference(model, x), atol=ATOL, rtol=0)
    if model_cls is _AliasedInPlaceAdd:  # torch.fx itself records ``y += t`` as ``y = y + t``: no rewrite at all
        assert any("does not reproduce the model's output" in o for o in deployed.optimizations)


class _ConvPlusPositionMap(nn.Module):
    """A conv output plus a learned ``(1, C, H, W)`` map: equal shapes at batch 1, a broadcast at any other."""

    def __init__(self, kernel):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, kernel, padding=kernel // 2)
        self.pos = nn.Parameter(torch.randn(1, 8, 12, 12))

    def forward(self, x):
        return self.conv(torch.relu(self.stem(x))) + self.pos


@pytest.mark.parametrize("kernel", [1, 3])
def test_residual_fusion_needs_equal_shapes_at_every_batch_size(kernel):
    """Found by an audit: deployed on a batch-1 example, the add was fused (shapes equal at batch 1), and at batch 3
    the 1x1 conv returned a wrong result, the 3x3 one an error."""
    torch.manual_seed(0)
    model = _ConvPlusPositionMap(kernel).eval()
    deployed = deploy(model, torch.randn(1, 3, 12, 12), backend="eager")
    assert any("fused residual add: 0" in o for o in deployed.optimizations), deployed.optimizations
    x = torch.randn(3, 3, 12, 12)
    torch.testing.assert_close(deployed(x), _reference(model, x), atol=ATOL, rtol=0)


class _GlobalContextAdd(nn.Module):
    """``conv(x) + context`` with a ``(B, C, 1, 1)`` context (GCNet's fuse_add): equal shapes where the map is 1x1."""

    def __init__(self, kernel):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv = nn.Conv2d(8, 8, kernel, padding=kernel // 2)
        self.context = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return torch.relu(self.conv(x) + self.context(x.mean((2, 3), keepdim=True)))


@pytest.mark.parametrize("kernel", [1, 3])
def test_residual_fused_at_a_1x1_map_broadcasts_at_other_sizes(kernel):
    """Found by an audit (timm gcresnet33ts deployed at 32x32, where its last map is 1x1): at another input size the
    fused add met a broadcast and failed or went wrong. It now runs unfused wherever the shapes differ."""
    torch.manual_seed(0)
    model = _GlobalContextAdd(kernel).eval()
    deployed = deploy(model, torch.randn(2, 3, 2, 2), backend="eager")
    assert any("fused residual add: 1" in o for o in deployed.optimizations), deployed.optimizations
    for size in (2, 8, 15):
        x = torch.randn(3, 3, size, size)
        torch.testing.assert_close(deployed(x), _reference(model, x), atol=ATOL, rtol=0)


def test_example_input_of_another_dtype_is_a_clear_type_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    with pytest.raises(TypeError, match=r"example_input is torch.bfloat16 but the model's weights are "
                                        r"torch.float32; pass example_input.to\(torch.float32\)"):
        deploy(model, torch.randn(1, 3, 8, 8, dtype=torch.bfloat16))


def test_bf16_model_rounding_names_the_precision():
    """A bf16 model misses the float32 default atol by its own rounding: the error says so and what to pass."""
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                        nn.Conv2d(64, 64, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                        nn.Linear(64, 10))).eval()
    with torch.no_grad():
        model[-1].weight.mul_(100.0)  # logits of order 10, as a trained model's
    bf16 = model.to(torch.bfloat16)
    x = torch.randn(2, 3, 16, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"runs in torch.bfloat16 .*default atol=1e-4 is meant for float32: "
                                           r"pass atol="):
        deploy(bf16, x, backend="onnxruntime")


class _TwoHeads(nn.Module):
    """A model returning a tuple (e.g. a distilled model's (cls, dist) in training, a detector's parts)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 2)

    def forward(self, x):
        f = self.body(x)
        return self.a(f), self.b(f)


class _DictOut(_TwoHeads):
    def forward(self, x):
        a, b = super().forward(x)
        return {"logits": a, "aux": b}


@pytest.mark.parametrize("backend", [b for b in ("eager", "torchscript", "onnxruntime") if b in available_backends()])
@pytest.mark.parametrize("model_cls", [_TwoHeads, _DictOut])
def test_tuple_and_dict_outputs(backend, model_cls):
    """Found by an audit: the check at deploy time crashed on a tuple/dict output ('tuple' object has no attribute
    'to'), ONNX Runtime returned only the first output, and the trace refused a dict."""
    torch.manual_seed(0)
    model = _randomize_bn(model_cls()).eval()
    deployed = deploy(model, torch.randn(2, 3, 16, 16), backend=backend)
    x = torch.randn(3, 3, 16, 16)
    out, ref = deployed(x), _reference(model, x)
    assert type(out) is type(ref)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


_Pair = collections.namedtuple("_Pair", "logits aux")


class _NamedTupleOut(_TwoHeads):
    def forward(self, x):
        return _Pair(*super().forward(x))


class _WithNones(_TwoHeads):
    def forward(self, x):
        a, b = super().forward(x)
        return a, None, {"aux": b, "mask": None}


@pytest.mark.parametrize("backend", [b for b in ("eager", "torchscript", "onnxruntime") if b in available_backends()])
@pytest.mark.parametrize("model_cls", [_NamedTupleOut, _WithNones])
def test_namedtuple_and_none_outputs_keep_their_structure_on_every_backend(backend, model_cls):
    """Found by an audit: backend 'torchscript' refused a namedtuple output (its trace returns a plain tuple) and
    both traced backends failed on a None in the output (ONNX Runtime: "number of output names provided (2)
    exceeded number of outputs (1)")."""
    torch.manual_seed(0)
    model = _randomize_bn(model_cls()).eval()
    deployed = deploy(model, torch.randn(2, 3, 16, 16), backend=backend)
    x = torch.randn(3, 3, 16, 16)
    out, ref = deployed(x), _reference(model, x)
    if model_cls is _NamedTupleOut:
        assert type(out) is _Pair and out.aux.shape == (3, 2)
    else:
        assert out[1] is None and out[2]["mask"] is None and list(out[2]) == ["aux", "mask"]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


class _WithACount(_TwoHeads):
    def forward(self, x):
        return {"logits": super().forward(x)[0], "n": 3}


@pytest.mark.parametrize("backend", [b for b in ("torchscript", "onnxruntime") if b in available_backends()])
def test_an_output_a_trace_cannot_return_is_named(backend):
    """Found by an audit: {"logits": t, "n": 3} failed in each traced backend's own words ("Tracer cannot infer type
    of ...", "output 1 (3) of traced region did not have observable data dependence"); the eager backend runs the
    model's own forward and returns it."""
    model = _randomize_bn(_WithACount()).eval()
    with pytest.raises(RuntimeError, match=rf"backend '{backend}': the model's output\['n'\] is 3 \(int\), not a "
                                           r"tensor: .*Return it as a tensor or leave it out, or use backend='eager'"):
        deploy(model, torch.randn(2, 3, 16, 16), backend=backend)
    assert deploy(model, torch.randn(2, 3, 16, 16))(torch.randn(1, 3, 16, 16))["n"] == 3


def test_a_model_with_a_5d_weight_deploys_in_its_own_format():
    """Found by an audit: channels-last refuses 5-D tensors, so an nn.Conv3d (timm's lambda layers) failed every
    PyTorch backend with 'required rank 4 tensor to use channels_last format'."""
    class WithConv3d(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.c = nn.Conv3d(1, 1, (1, 3, 3), padding=(0, 1, 1))

        def forward(self, x):
            x = self.b(torch.relu(self.a(x)))
            return self.c(x.unsqueeze(1)).squeeze(1)

    torch.manual_seed(0)
    model, x = WithConv3d().eval(), torch.randn(2, 3, 12, 12)
    for backend in [b for b in ("eager", "torchscript") if b in available_backends()]:
        deployed = deploy(model, x, backend=backend)
        assert "channels_last" not in deployed.optimizations
        y = torch.randn(3, 3, 12, 12)
        torch.testing.assert_close(deployed(y), _reference(model, y), atol=ATOL, rtol=0)


def test_float64_models_fold_in_float64():
    """Found by an audit: BatchNorm folding cast to float32, so a float64 model lost its precision (1e-6 off)."""
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                                        nn.BatchNorm2d(4))).double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    deployed = deploy(model, x, backend="eager")
    assert any("BatchNorm folded" in o for o in deployed.optimizations)
    assert (deployed(x) - _reference(model, x)).abs().max() < 1e-12


def test_integer_and_meta_examples_are_clear_errors(shvit_s1):
    with pytest.raises(TypeError, match=r"example_input is torch.uint8; image models take float input"):
        deploy(shvit_s1, torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"example_input is on the 'meta' device"):
        deploy(shvit_s1, torch.zeros(1, 3, 224, 224, device="meta"))
    deployed = deploy(shvit_s1, torch.randn(1, 3, 224, 224))
    with pytest.raises(ValueError, match=r"got an input on the 'meta' device"):
        deployed(torch.zeros(1, 3, 224, 224, device="meta"))


@pytest.mark.parametrize("backend", [b for b in ("eager", "torchscript", "onnxruntime") if b in available_backends()])
def test_a_model_on_the_meta_device_is_a_clear_error(backend):
    """Found by an audit: a model built under torch.device('meta') (no weights) failed inside the backends ("Tensor
    on device meta is not on the expected device cpu!"), and with backend 'onnxruntime' was told to call .cpu()."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    meta = r"deploy\(\): the model's parameter '0.weight' is on the 'meta' device: the model is not materialised"
    with pytest.raises(ValueError, match=meta + r".*model.to_empty\(device='cpu'\) then model.load_state_dict"):
        deploy(model, torch.randn(1, 3, 8, 8), backend=backend)
    with pytest.raises(ValueError, match=meta):  # without an example input: not "example_input is on 'meta'"
        deploy(model, backend=backend)
    partly = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    partly[1].running_var = torch.empty(4, device="meta")
    with pytest.raises(ValueError, match=r"the model's buffer '1.running_var' is on the 'meta' device"):
        deploy(partly, torch.randn(1, 3, 8, 8), backend=backend)


@pytest.mark.parametrize("backend", [b for b in ("eager", "torchscript", "onnxruntime") if b in available_backends()])
def test_an_example_that_is_not_one_nonempty_batch_is_a_clear_error(backend):
    """Found by an audit: a batch-0 example deployed (its empty output passed the check vacuously), and a numpy
    array or a list of tensors failed inside the model or deploy ("'list' object has no attribute 'device'")."""
    np = pytest.importorskip("numpy")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(ValueError, match=r"deploy\(\): example_input has batch size 0 \(shape \[0, 3, 8, 8\]\); it "
                                         r"must hold at least one image \(batch >= 1\): .* torch.randn\(1, 3, 8, 8\)"):
        deploy(model, torch.randn(0, 3, 8, 8), backend=backend)
    with pytest.raises(TypeError, match=r"deploy\(\): example_input must be a torch.Tensor, one \(B, C, H, W\) batch, "
                                        r"got ndarray: convert a numpy array with torch.from_numpy\(array\)\."):
        deploy(model, np.zeros((1, 3, 8, 8), np.float32), backend=backend)
    for images in ([torch.randn(3, 8, 8)], (torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8))):
        with pytest.raises(TypeError, match=rf"got {type(images).__name__}: stack a list of images into one batch "
                                            r"with torch.stack\(images\); a model taking several inputs cannot"):
            deploy(model, images, backend=backend)


def test_torchscript_shape_whose_fused_graph_is_wrong_runs_unfused(monkeypatch):
    """Found by an audit: oneDNN Graph computes timm's dla34 / hrnet_w18_small wrong (diff 507 at scale 158);
    only a fused trace that raised was replaced. Here the fused graph is made wrong on purpose."""
    if "torchscript" not in available_backends():
        pytest.skip("no TorchScript")
    import vitzoo.torchscript_backend as tb

    if not tb.onednn_graph_available():
        pytest.skip("no oneDNN Graph")
    real_trace = tb._trace

    def wrong_when_fused(model, x, layout):
        traced = real_trace(model, x, layout)

        class Wrong(nn.Module):
            def forward(self, inp):
                out = traced(inp)
                return out + 1.0 if torch.jit.onednn_fusion_enabled() else out
        return Wrong()

    monkeypatch.setattr(tb, "_trace", wrong_when_fused)
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))).eval()
    x = torch.randn(2, 3, 12, 12)
    with pytest.warns(RuntimeWarning, match="oneDNN Graph computed a different output"):
        deployed = deploy(model, x, backend="torchscript")
    assert any("computed a different output" in o for o in deployed.optimizations), deployed.optimizations
    torch.testing.assert_close(deployed(x), _reference(model, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("factor, relative", [(0.0, "1"), (1.01, r"0\.01")])
def test_a_wrong_result_on_tiny_outputs_is_not_passed_by_the_absolute_tolerance(monkeypatch, factor, relative):
    """Found by an audit: with outputs below 1e-4 (random-weight SHViT-S1: 7e-5) an all-zero result passed atol.
    A result 1% off is refused too (mutation testing: with only the all-zero case, a relative limit of 5% instead
    of 0.1% for float32 went unnoticed; float32 rounding is ~1e-7)."""
    import vitzoo.inference as vi

    real = vi._build_eager

    def scaled(model, example_input, rewrite, **kwargs):
        deployed = real(model, example_input, rewrite, **kwargs)
        deployed.model = _Scaled(deployed.model, factor)
        return deployed

    monkeypatch.setattr(vi, "_build_eager", scaled)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()).eval()
    with torch.no_grad():
        model[0].weight.mul_(1e-5)
        model[0].bias.zero_()
    with pytest.raises(RuntimeError,
                       match=rf"within the tolerance 0\.0001 but {relative} of the original's largest output"):
        deploy(model, torch.randn(1, 3, 8, 8), backend="eager")
    deploy(model, torch.randn(1, 3, 8, 8), backend="eager", atol=1e-3)  # a loosened tolerance is the caller's say


class _Scaled(nn.Module):
    def __init__(self, inner, factor):
        super().__init__()
        self.inner = inner
        self.factor = factor

    def forward(self, x):
        return self.inner(x) * self.factor


def test_onnxruntime_backend_refuses_gpu_tensors_before_touching_the_model(monkeypatch):
    """Found by an audit: on a GPU machine the CPU-only ONNX Runtime session was fed a cuda input (copied to the
    host on every call, returned on the CPU) and, with inplace=True, the caller's model was moved to the CPU.
    A model on 'meta' stands in for one on a GPU (a meta example input has its own error): any device other than
    the CPU is refused, by name, before the model is touched (the refusal of meta models is switched off here)."""
    monkeypatch.setattr("vitzoo.inference.check_materialised", lambda model, caller: None)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval().to("meta")
    with pytest.raises(ValueError, match=r"'onnxruntime' runs ONNX Runtime's CPU .* is on meta: deploy a CPU model"):
        deploy(model, torch.randn(1, 3, 8, 8), backend="onnxruntime", inplace=True)
    assert isinstance(model[1], nn.BatchNorm2d) and model[0].weight.is_meta  # refused before fusing or moving it


def test_full_fp32_precision_switches_tf32_off_on_cuda_only_and_restores():
    """cuDNN's default TF32 convolutions made deploy() on Ampere+ GPUs refuse correct fusions (~1e-3 relative
    rounding); the check now runs in IEEE fp32. The flags are plain settings, so this runs without a GPU."""
    from vitzoo.inference import full_fp32_precision

    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = (conv.fp32_precision, matmul.fp32_precision)
    assert before[0] == "tf32"  # torch's default: the case the audit found
    with full_fp32_precision(torch.device("cpu")):
        assert (conv.fp32_precision, matmul.fp32_precision) == before
    with pytest.raises(KeyError):
        with full_fp32_precision(torch.device("cuda", 0)):
            assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
            raise KeyError("restored on errors too")
    assert (conv.fp32_precision, matmul.fp32_precision) == before


def test_deploy_runs_reference_and_check_under_full_fp32_precision(monkeypatch):
    import contextlib

    import vitzoo.inference as inference

    entered, forwards = [], []
    state = {"inside": False}

    @contextlib.contextmanager
    def spy(device):
        entered.append(torch.device(device))
        state["inside"] = True
        try:
            yield
        finally:
            state["inside"] = False

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            forwards.append(state["inside"])
            return self.conv(x)

    monkeypatch.setattr(inference, "full_fp32_precision", spy)
    deploy(Probe(), torch.randn(1, 3, 8, 8))
    assert entered == [torch.device("cpu")] * 2  # the reference and the check
    assert forwards[0] and forwards[-1]  # the original's forward and the deployed model's forward in the check


class _InPlaceStatement(nn.Module):
    """``y.add_(...)`` as a statement (its return value unused), and an in-place ReLU likewise."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.a(x) * 1.0
        y.add_(self.b(x))
        self.act(y)
        return y


def test_eager_keeps_in_place_statements_whose_result_is_unused():
    """Found by mutation testing: torch.fx's dead-code elimination removed ``y.add_(z)`` and ``act(y)`` whose
    results were unused, so the eager backend's output lacked them (deploy's check then refused the model, and with
    verify=False it was silently wrong by ~3)."""
    torch.manual_seed(0)
    model, x = _InPlaceStatement().eval(), torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = F.relu(model.a(x) + model.b(x))
    deployed = deploy(model, x, backend="eager", verify=False)
    assert any("oneDNN pre-packed" in o for o in deployed.optimizations), deployed.optimizations
    torch.testing.assert_close(deployed(x), expected, atol=1e-5, rtol=0)


class _AliasedAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        keep = y
        out = y.add_(self.conv(x))  # writes into y, which `keep` also names
        return keep * 2 + out


def test_eager_in_place_add_into_an_aliased_tensor():
    """Mutation testing: fusing ``y.add_(conv(x))`` into the conv (whose output would then be a new tensor) went
    unnoticed; ``keep`` must see the addition."""
    torch.manual_seed(0)
    model, x = _AliasedAdd().eval(), torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        y = torch.relu(model.stem(x)) + model.conv(x)
    deployed = deploy(model, x, backend="eager", verify=False)
    torch.testing.assert_close(deployed(x), 3 * y, atol=1e-5, rtol=0)


@pytest.mark.skipif("onnxruntime" not in available_backends(), reason="onnxruntime not installed")
def test_onnxruntime_backend_refuses_another_height_at_the_same_width():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    deployed = deploy(model, torch.randn(1, 3, 32, 32), backend="onnxruntime")
    with pytest.raises(ValueError, match=r"'onnxruntime' was deployed for 32x32 inputs.*got 24x32"):
        deployed(torch.randn(1, 3, 24, 32))
    with pytest.raises(ValueError, match=r"'onnxruntime' was deployed for 32x32 inputs.*got 32x24"):
        deployed(torch.randn(1, 3, 32, 24))


def test_default_example_input_of_a_bf16_model_is_bf16():
    from vitzoo.inference import default_example_input

    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    model.pretrained_cfg = {"input_size": (3, 16, 16)}
    bf16 = model.to(torch.bfloat16)
    example = default_example_input(bf16, batch_size=2)
    assert example.dtype == torch.bfloat16 and tuple(example.shape) == (2, 3, 16, 16)
    deployed = deploy(bf16, atol=0.05)  # no example: the cfg's size in the model's own dtype
    x = torch.randn(2, 3, 16, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(deployed(x).float(), _reference(bf16, x).float(), atol=0.05, rtol=0)


@pytest.mark.skipif("torchscript" not in available_backends(), reason="no TorchScript in this torch")
def test_torchscript_shape_cache_keeps_the_last_four_shapes():
    from vitzoo.torchscript_backend import TorchScriptModule

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    deployed = deploy(model, torch.randn(1, 3, 8, 8), backend="torchscript")
    cache = deployed.model._traced
    assert TorchScriptModule.max_cached_shapes == 4
    sizes = [8, 10, 12, 14, 16]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for size in sizes:
            x = torch.randn(1, 3, size, size)
            torch.testing.assert_close(deployed(x), _reference(model, x), atol=ATOL, rtol=0)
    held = [key[0][2] for key in cache]
    assert len(cache) == 4
    assert held == sizes[1:]  # the oldest (8x8, the example's) was evicted, the newest kept


@pytest.mark.skipif("torchscript" not in available_backends(), reason="no TorchScript in this torch")
def test_torchscript_builds_a_bounded_number_of_traces_then_runs_new_shapes_eagerly(monkeypatch):
    """Found by an audit: a dropped trace does not give its memory back (torch.jit.freeze), so rotating six shapes
    grew a resnet18 by 3 GB over 120 calls; past max_traces a new shape runs the fused model eagerly, with one
    warning."""
    from vitzoo.torchscript_backend import TorchScriptModule

    monkeypatch.setattr(TorchScriptModule, "max_traces", 3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    deployed = deploy(model, torch.randn(1, 3, 8, 8), backend="torchscript")  # trace 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for size in (10, 12, 14, 16, 10, 18):  # traces 2 and 3, then 14, 16 and 18 run eagerly; 10 is traced
            x = torch.randn(1, 3, size, size)
            torch.testing.assert_close(deployed(x), _reference(model, x), atol=ATOL, rtol=0)
    assert deployed.model._built == 3 and [key[0][2] for key in deployed.model._traced] == [8, 12, 10]
    said = [str(w.message) for w in caught if "input shapes traced" in str(w.message)]
    assert said == ["deploy(backend='torchscript'): 3 input shapes traced: further new shapes run the fused model "
                    "eagerly (a dropped trace does not give back its memory)"]


class _StridedConstant(nn.Module):
    """Adds a strided slice of a constant: the ONNX exporter's constant folding warns that it folds only step-1
    slices (as for timm's efficientvit_b0)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.linspace(0.0, 1.0, 2000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table[::2]


@pytest.mark.parametrize("backend", ["torchscript", "onnxruntime"])
def test_traced_backends_do_not_pass_tracer_or_exporter_warnings_on(backend):
    """The tracer's "Converting a tensor to a Python boolean" (timm's shape asserts) and the ONNX exporter's notes are
    noise for a deployed model whose output is checked against the eager one (before 2026-11-25 they were printed at
    deploy time and again at every new input shape). Warnings deploy itself raises stay."""
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    model = timm.create_model("vit_tiny_patch16_224", depth=1, img_size=64).eval()
    if backend == "onnxruntime":
        model = nn.Sequential(model, _StridedConstant()).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", DeprecationWarning)  # torch's notice that the exporter is the legacy one
        deployed = deploy(model, torch.randn(2, 3, 64, 64), backend=backend)
        x = torch.randn(3, 3, 64, 64)
        out = deployed(x)
    assert [str(w.message)[:60] for w in caught] == []
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, expected", [("resnet18", True), ("tf_efficientnet_b0", True), ("nf_resnet26", False),
                                            ("resnetv2_50x1_bit", False), ("deit_tiny_patch16_224", False)])
def test_channels_last_only_where_most_convolutions_are_plain(name, expected):
    """Weight-standardised convolutions (the oneDNN rewrite leaves them alone) ran slower in channels-last: a sweep
    measured nf_resnet26 deployed at 0.86x of the fused eager model (benchmarks/bench_other_convs.py). tf_efficientnet
    has a few Conv2dSame among plain convolutions; DeiT one patch embedding."""
    from vitzoo.inference import is_convolutional

    assert is_convolutional(timm.create_model(name)) == expected


@pytest.mark.parametrize("name", ["resnet18", "deit_tiny_patch16_224"])
def test_an_example_of_other_channels_is_named_before_any_work(name):
    """Found by a sweep: a 1-channel example gave torch's conv message (resnet18) or the model's size assertion
    (DeiT at 224 with a 64x64 example: the channels were never named)."""
    model = timm.create_model(name).eval()
    with pytest.raises(ValueError, match=r"^deploy\(\): example_input has 1 channels \(shape \[2, 1, 224, 224\]\), "
                                         r"but the model takes 3 \(its in_chans\)\. Pass an example like the images "
                                         r"it will run on, e.g\. torch\.randn\(1, 3, 224, 224\), or create the model "
                                         r"for 1-channel images \(timm: in_chans=1\)\.$"):
        deploy(model, torch.randn(2, 1, 224, 224))
    model = timm.create_model(name, in_chans=1).eval()  # what the message says to do
    assert deploy(model, torch.randn(2, 1, 224, 224))(torch.randn(1, 1, 224, 224)).shape == (1, 1000)


class _Chaotic(nn.Module):
    """sin(1e6 * conv features): a one-step change of the input moves the output by ~4e-3."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3), nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.sin(1e6 * self.b(self.a(x))).mean((2, 3)))


class _Off(nn.Module):
    """Stand-ins for a rewrite: the model's output 1% off (a wrong result), or the model run on its input moved by
    one float32 step (a rounding difference of exactly the model's own sensitivity)."""

    def __init__(self, model, nudge=False):
        super().__init__()
        self.model, self.nudge = model, nudge

    def forward(self, x):
        if self.nudge:
            return self.model(torch.nextafter(x, torch.full_like(x, float("inf"))))
        return self.model(x) * 1.01


@pytest.mark.parametrize("kind", ["rounding", "wrong"])
def test_a_difference_the_model_itself_makes_from_rounding_is_named_so(monkeypatch, kind):
    """Found by a sweep: a random-init model that amplifies rounding (MobileNetV4-Hybrid with trained-size layer
    scales) failed the check with "report this". The model's own move under a one-step input change (computed here
    independently with nextafter) is now named, with the atol to pass; a wrong result still says "report this".
    The rewrite is stood in for, so that the test does not depend on which kernels this machine has."""
    import vitzoo.inference

    torch.manual_seed(0)
    model = (_Chaotic() if kind == "rounding" else nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)))
    model = model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        wobble = (model(torch.nextafter(x, torch.full_like(x, float("inf")))) - model(x)).abs().max().item()
    monkeypatch.setattr(vitzoo.inference, "_build_eager",
                        lambda m, *a, **k: DeployedModel(_Off(m, nudge=kind == "rounding"), "eager"))
    with pytest.raises(RuntimeError) as info:
        deploy(model, x)
    if kind == "rounding":
        assert wobble > 1e-3
        assert f"The model's own output moves by {wobble:.3g} when each input value moves by one float32 rounding " \
               "step: it amplifies rounding" in str(info.value)
    else:
        assert str(info.value).endswith(". Use another backend, or report this with the model name.")


def _randomised_eval_output(model, x):
    """Give ``model``'s norms random statistics, put it in eval mode, and return its output for (a copy of) ``x``."""
    randomize_norms(model)
    model.eval()
    with torch.no_grad():
        return model(x.clone())


class _SubmoduleNamedFuse(nn.Module):  # a feature-fusion conv called `fuse`, as in many segmentation heads
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fuse = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.fuse(torch.cat([self.a(x), self.b(x)], 1))


class _FuseWithArguments(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1)

    def fuse(self, x, y):
        return x + torch.sigmoid(y)

    def forward(self, x):
        return self.fuse(x, self.a(x))


class _FusesInPlace(nn.Module):  # fuse() folds the BatchNorm into the conv itself and returns None
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fused = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), False

    def fuse(self):
        with torch.no_grad():
            scale = self.bn.weight / (self.bn.running_var + self.bn.eps).sqrt()
            self.conv.weight.mul_(scale[:, None, None, None])
            self.conv.bias.copy_((self.conv.bias - self.bn.running_mean) * scale + self.bn.bias)
        self.fused = True

    def forward(self, x):
        return self.conv(x) if self.fused else self.bn(self.conv(x))


@pytest.mark.parametrize("block", [_SubmoduleNamedFuse, _FuseWithArguments, _FusesInPlace])
def test_only_a_fuse_method_without_arguments_is_the_fusion_step(block):
    """Found by an audit: every child with an attribute `fuse` had it called and replaced by its result, so a
    submodule named `fuse`, a `fuse(x, y)` method and an in-place `fuse()` returning None crashed deploy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), block(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    x = torch.randn(2, 3, 16, 16)
    expected = _randomised_eval_output(model, x)
    for backend in ("eager", "torchscript"):
        torch.testing.assert_close(deploy(model, x, backend=backend)(x), expected, atol=1e-5, rtol=0)


class _AddsItself(nn.Module):
    def __init__(self, in_place):
        super().__init__()
        self.c0, self.c1, self.in_place = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), in_place

    def forward(self, x):
        y = self.c1(self.c0(x))
        return y.add_(y) if self.in_place else y + y


@pytest.mark.parametrize("in_place", [False, True], ids=["y + y", "y.add_(y)"])
def test_a_conv_output_added_to_itself_is_no_residual_add(in_place):
    """Found by an audit: the residual-add fusion took the conv as its own residual, a node feeding itself (fx:
    "used before it has been defined")."""
    torch.manual_seed(0)
    model, x = _AddsItself(in_place).eval(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x.clone())
    deployed = deploy(model, x, fp32_precision="ieee")
    torch.testing.assert_close(deployed(x), expected, atol=1e-5, rtol=0)
    assert any("oneDNN pre-packed convolutions: 2" in o for o in deployed.optimizations), deployed.optimizations


def _rewritten(model, x, packed=None):
    """``model``'s output for ``x`` and ``deploy(model, x)`` in IEEE fp32, which must have the oneDNN rewrite (with
    ``packed`` convolutions, if given)."""
    with torch.no_grad():
        expected = model(x)
    deployed = deploy(model, x, fp32_precision="ieee")
    prefix = "oneDNN pre-packed convolutions:" + ("" if packed is None else f" {packed} ")
    assert any(o.startswith(prefix) for o in deployed.optimizations), deployed.optimizations
    return deployed, expected


def test_a_model_returning_a_list_is_rewritten():
    """Found by an audit: torch.fx's interpreter gives a list output as its immutable_list, which did not compare
    equal to the model's list, so every features_only model lost the oneDNN rewrite ("does not reproduce")."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", features_only=True, out_indices=(1, 2)).eval()
    randomize_norms(model)
    x = torch.randn(2, 3, 64, 64)
    deployed, expected = _rewritten(model, x)
    out = deployed(x)
    assert isinstance(out, list) and len(out) == 2
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


class _OrderedMaps(nn.Module):
    """Two conv maps in an OrderedDict (torchvision's backbones' output), or that dict in a list."""

    def __init__(self, in_list: bool = False):
        super().__init__()
        self.in_list = in_list
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x):
        a = self.conv1(x)
        maps = collections.OrderedDict(a=a, b=self.conv2(a).relu())
        return [maps] if self.in_list else maps


def test_a_model_returning_an_ordered_dict_is_rewritten():
    """Found by a review: torch.fx writes an OrderedDict output as a dict, so models returning one (torchvision's
    IntermediateLayerGetter, BackboneWithFPN) were skipped as "in-place updates that torch.fx cannot record". The
    rewritten model returns the OrderedDict; one nested in a list is still skipped, the reason now naming it."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    deployed, expected = _rewritten(_OrderedMaps().eval(), x, packed=2)
    out = deployed(x)
    assert type(out) is collections.OrderedDict and list(out) == ["a", "b"]
    for key in out:
        torch.testing.assert_close(out[key], expected[key], atol=1e-5, rtol=0)
    nested = deploy(_OrderedMaps(in_list=True).eval(), x, fp32_precision="ieee")
    assert "oneDNN rewrite skipped: the torch.fx trace returns list(dict(Tensor, Tensor)) where the model returns " \
           "list(OrderedDict(Tensor, Tensor))" in nested.optimizations, nested.optimizations


def test_a_compiled_model_is_deployed_from_the_module_it_wraps():
    """Found by a review: deploy(torch.compile(model)) traced the wrapper, so torch.fx failed and the oneDNN rewrite
    was skipped (and the reference output compiled the model first)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(2, 3, 16, 16)
    expected = _randomised_eval_output(model, x)
    deployed = deploy(torch.compile(model), x, fp32_precision="ieee")
    assert deployed.optimizations[0] == "torch.compile wrapper taken off (backend='compile' compiles the deployed " \
                                        "model)"
    assert any(o.startswith("oneDNN pre-packed convolutions: 2") for o in deployed.optimizations), \
        deployed.optimizations
    torch.testing.assert_close(deployed(x), expected, atol=1e-5, rtol=0)


def test_hooks_on_the_compile_wrapper_itself_are_refused_not_dropped():
    """Found by an audit: a hook on the torch.compile wrapper (it runs on the compiled model's calls) was dropped
    with the wrapper; hooks on the wrapped module's parts are kept as before."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    compiled = torch.compile(model)
    handle = compiled.register_forward_hook(lambda module, args, output: None)
    with pytest.raises(ValueError, match=r"the torch.compile wrapper itself has 1 forward \(pre-\)hook\(s\), which "
                                         r"the deployed model would not run .* register them on model._orig_mod"):
        deploy(compiled, torch.randn(1, 3, 8, 8))
    handle.remove()
    seen = []
    model[0].register_forward_hook(lambda module, args, output: seen.append(tuple(output.shape)))
    deployed = deploy(compiled, torch.randn(1, 3, 8, 8))
    seen.clear()
    deployed(torch.randn(2, 3, 8, 8))
    assert seen == [(2, 4, 6, 6)]


class _Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


def test_a_model_holding_a_scripted_part_deploys():
    """Found by an audit: BatchNorm folding registered a hook on every module, which a ScriptModule refuses, so a
    model holding a torch.jit.script-ed part and a BatchNorm failed on every backend."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), torch.jit.script(_Swish()),
                          nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x = torch.randn(2, 3, 16, 16)
    expected = _randomised_eval_output(model, x)
    for backend in ("eager", "torchscript"):
        deployed = deploy(model, x, backend=backend)
        torch.testing.assert_close(deployed(x), expected, atol=1e-5, rtol=0)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())  # the norm is folded


class _NormalisesInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        return self.net(x.sub_(self.mean).div_(self.std))  # saves a copy of the batch


@pytest.mark.parametrize("backend", [b for b in ("eager", "torchscript", "onnxruntime") if b in available_backends()])
def test_a_model_that_changes_its_input_in_place_deploys_and_leaves_the_example_alone(backend):
    """Found by an audit: every run inside deploy got the same example, normalised again each time (to ~1e16), so
    the check compared outputs of different inputs and refused the model, and the caller's example was changed."""
    torch.manual_seed(0)
    model = _NormalisesInPlace()
    randomize_norms(model)
    model.eval()
    x = torch.rand(2, 3, 16, 16)
    given = x.clone()
    with torch.no_grad():
        expected = model(x.clone())
    deployed = deploy(model, x, backend=backend)
    assert torch.equal(x, given)
    torch.testing.assert_close(deployed(x.clone()), expected, atol=1e-5, rtol=0)
    other = torch.rand(3, 3, 16, 16)  # a new batch size: torchscript traces it then (a review: wrong by 2.15)
    with torch.no_grad():
        torch.testing.assert_close(deployed(other.clone()), model(other.clone()), atol=1e-5, rtol=0)


class _TopK(nn.Module):  # returns torch.return_types.topk
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 10, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x))).mean((2, 3)).topk(3, dim=1)


def test_a_model_returning_a_torch_return_type_keeps_the_rewrite():
    """Found by a review of the list-output fix: topk's result was made a plain tuple, so the trace's output no
    longer matched the model's and the rewrite was skipped."""
    torch.manual_seed(0)
    model, x = _TopK().eval(), torch.randn(2, 3, 16, 16)
    deployed = deploy(model, x, fp32_precision="ieee")
    assert any(o.startswith("oneDNN pre-packed convolutions: 2") for o in deployed.optimizations), \
        deployed.optimizations
    with torch.no_grad():
        expected = model(x)
    out = deployed(x)
    assert type(out) is type(expected)
    torch.testing.assert_close(out.values, expected.values, atol=1e-5, rtol=0)
    assert torch.equal(out.indices, expected.indices)


# --- found by an audit (2026-11-26) ------------------------------------------------------------------------------


class _Wrapped(nn.Module):
    """A conv inside a Sequential of its own, its BatchNorm inside one with an in-place ReLU."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
        self.norm = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.norm(self.proj(x)))


def test_a_hook_on_a_module_around_the_conv_or_the_norm_sees_what_it_saw():
    """A hook keeping a reference to the conv's output (timm's FeatureHooks, `feats[name] = out`) on a module
    around the conv, or a pre-hook on one around the BatchNorm, got the folded BatchNorm's output, overwritten by
    the in-place ReLU (1.8 off). The original model's own hook values are the reference."""
    from vitzoo.batchnorm_folding import fold_batchnorms_detailed

    torch.manual_seed(0)
    model = randomize_norms(_Wrapped()).eval()
    seen = {}
    model.proj.register_forward_hook(lambda m, args, out: seen.__setitem__("proj", out))
    model.norm.register_forward_pre_hook(lambda m, args: seen.__setitem__("norm", args[0]))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
    expected = {name: value.clone() for name, value in seen.items()}
    assert (expected["proj"] < 0).any()  # an in-place ReLU over it would show
    for backend in ("eager", "compile"):
        deployed = deploy(model, x, backend=backend)
        with torch.no_grad():
            deployed(x)
        for name in ("proj", "norm"):
            torch.testing.assert_close(seen[name], expected[name], atol=1e-6, rtol=0)
    result = fold_batchnorms_detailed(model, x)
    assert result.unfolded == {"norm.0": "a forward hook on proj is given the output of proj.0, which folding would "
                                         "change"}


def test_folding_a_training_mode_model_is_refused_and_leaves_its_statistics():
    """It ran the caller's model in training mode: the running statistics moved (by 0.03) and the norm was
    reported as changing the output."""
    from vitzoo.batchnorm_folding import fold_batchnorms_detailed

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"needs an eval-mode model \(BatchNorm 1 is in training mode\): call "
                                         r"model\.eval\(\) first"):
        fold_batchnorms_detailed(model, torch.randn(2, 3, 8, 8))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_an_output_object_the_check_cannot_look_into():
    """A SimpleNamespace (or dataclass) output failed with torch's "Boolean value of Tensor with more than one
    value is ambiguous". With verify it is refused by name; without, it is deployed, its BatchNorm unfolded."""
    import types

    class Namespaced(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return types.SimpleNamespace(logits=self.bn(self.conv(x)))

    model = Namespaced().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"^deploy\(\): the model's output is a SimpleNamespace holding tensors, "
                                         r"which cannot be compared .* or pass verify=False"):
        deploy(model, x)
    deployed = deploy(model, x, verify=False)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x).logits, model(x).logits, atol=1e-5, rtol=0)


def test_a_pre_hook_taking_keyword_arguments_around_the_norm_is_seen():
    """Found in review: the marker for hooks around a BatchNorm took only positional arguments, so a pre-hook
    registered with_kwargs=True on a module called as norm(x=conv(x)) got the folded output (2.6 off)."""
    from vitzoo.batchnorm_folding import fold_batchnorms_detailed

    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.act = nn.BatchNorm2d(8), nn.ReLU(inplace=True)

        def forward(self, x):
            return self.act(self.bn(x))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 8, 3, padding=1), Norm()

        def forward(self, x):
            return self.norm(x=self.conv(x))

    torch.manual_seed(0)
    model = randomize_norms(Model()).eval()
    seen = {}
    model.norm.register_forward_pre_hook(lambda m, args, kwargs: seen.__setitem__("x", kwargs["x"]), with_kwargs=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
        expected = seen["x"].clone()
        assert (expected < 0).any()
        deploy(model, x)(x)
    torch.testing.assert_close(seen["x"], expected, atol=1e-6, rtol=0)
    assert fold_batchnorms_detailed(model, x).unfolded == {
        "norm.bn": "a forward hook on norm is given the output of conv, which folding would change"}


def test_a_replaced_first_conv_deploys_with_an_example_of_its_channels():
    """Found in review: deploy refused a 4-channel example for a model whose first conv was replaced by a 4-channel
    one ("the model takes 3 (its in_chans)"), though the model runs it. The model's own output is the reference."""
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("shvit_s1")).eval()
    model.patch_embed[0].c = nn.Conv2d(4, 16, 3, 2, 1, bias=False)
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(deploy(model, x)(x), model(x), atol=1e-4, rtol=0)


def test_a_deployed_model_refuses_new_weights():
    """Found by an audit: load_state_dict said "All keys matched successfully" and the outputs kept the old weights
    (eager: the packed convs; torchscript: the traced constants). The original's outputs are the reference."""
    torch.manual_seed(0)
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))).eval()
    x = torch.randn(2, 3, 8, 8)
    for backend in ("eager", "torchscript"):
        deployed = deploy(model, x, backend=backend)
        with pytest.raises(TypeError, match=rf"backend '{backend}'\) cannot load new weights: .* Load them into "
                                            r"the original model and deploy\(\) it again"):
            deployed.load_state_dict(deployed.state_dict())
        holder = nn.Sequential(deployed)  # a module holding it loads through it (found in review)
        with pytest.raises(TypeError, match="cannot load new weights"):
            holder.load_state_dict(holder.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(deployed(x), model(x), atol=1e-5, rtol=0)


def test_per_shape_caches_keep_the_shapes_last_used():
    """Found by an audit: both caches evicted the shape inserted first, so one-off shapes pushed out the hot one
    (cycling batch sizes 1-8 ran 53% slower than grouped). PackedConv2d's and the torchscript backend's."""
    conv = nn.Conv2d(16, 16, 3, padding=1).eval()
    packed = PackedConv2d(conv, (1, 16, 8, 8), fp32_precision="ieee")  # batch 1 packed when built
    assert packed.max_cached_shapes == 4
    for batch in (2, 3, 1, 4, 5):  # 1 used after 2 and 3: 2 is the least recently used (found in review)
        packed._packed_for((batch, 16, 8, 8))
    assert [shape[0] for shape in packed._packed] == [3, 1, 4, 5]
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    deployed = deploy(model, torch.randn(1, 3, 8, 8), backend="torchscript")  # batch 1 traced while deploying
    (scripted,) = [m for m in deployed.modules() if hasattr(m, "_traced")]
    with torch.no_grad():
        for batch in (2, 3, 1, 4, 5):
            deployed(torch.randn(batch, 3, 8, 8))
    assert [key[0][0] for key in scripted._traced] == [3, 1, 4, 5]


def test_torchscript_notes_are_not_repeated_and_stay_bounded():
    """Found by an audit: a shape traced again after its eviction added its note (and its warning) once more."""
    from vitzoo.torchscript_backend import TorchScriptModule

    module = TorchScriptModule(nn.Identity(), onednn_fusion=False)
    assert module._note("fusion failed for [1, 3, 8, 8]") and not module._note("fusion failed for [1, 3, 8, 8]")
    for i in range(100):
        module._note(f"note {i}")
    assert len(module.notes) == TorchScriptModule.MAX_NOTES and module.notes[-1] == "note 99"


def test_a_data_parallel_model_is_deployed_from_the_module_it_wraps():
    """Found by an audit: deploy(nn.DataParallel(model)) traced the wrapper, so the oneDNN rewrite was skipped (an fx
    note), where count_flops takes the wrapper off. Wrappers in wrappers are taken off in turn; a hook on one is
    refused, as on the compile wrapper."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(2, 3, 16, 16)
    expected = _randomised_eval_output(model, x)
    deployed = deploy(nn.DataParallel(torch.compile(model)), x, fp32_precision="ieee")
    assert deployed.optimizations[:2] == [
        "DataParallel wrapper taken off (the deployed model runs the module it holds, on one device)",
        "torch.compile wrapper taken off (backend='compile' compiles the deployed model)"]
    assert any(o.startswith("oneDNN pre-packed convolutions: 2") for o in deployed.optimizations), \
        deployed.optimizations
    torch.testing.assert_close(deployed(x), expected, atol=1e-5, rtol=0)
    wrapper = nn.DataParallel(model)
    wrapper.register_forward_pre_hook(lambda module, args: None)
    with pytest.raises(ValueError, match=r"the DataParallel wrapper itself has 1 forward \(pre-\)hook\(s\).* "
                                         r"register them on model.module"):
        deploy(wrapper, x)


def test_a_distributed_data_parallel_model_is_deployed_from_the_module_it_wraps(tmp_path):
    """The same for DistributedDataParallel (a one-process gloo group on a file store: no network)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
        x = torch.randn(2, 3, 16, 16)
        expected = _randomised_eval_output(model, x)
        deployed = deploy(nn.parallel.DistributedDataParallel(model), x, fp32_precision="ieee")
    finally:
        dist.destroy_process_group()
    assert deployed.optimizations[0] == "DistributedDataParallel wrapper taken off (the deployed model runs the " \
                                        "module it holds, on one device)"
    assert any(o.startswith("oneDNN pre-packed convolutions: 2") for o in deployed.optimizations), \
        deployed.optimizations
    torch.testing.assert_close(deployed(x), expected, atol=1e-5, rtol=0)


def test_nan_in_the_example_or_in_the_original_output_is_named():
    """Found by a review: torch.empty's uninitialised example (NaN) gave "output differs from the original model by
    max abs diff nan ... report this with the model name"."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    example = torch.randn(2, 3, 8, 8)
    example[1, 0, 2, 2] = float("nan")
    for backend in ("eager", "torchscript"):
        with pytest.raises(ValueError, match=r"example_input holds 1 NaN value\(s\) of 384 \(uninitialised memory, "
                                             r"such as torch\.empty's\?\).*e\.g\. torch\.randn\(2, 3, 8, 8\)"):
            deploy(model, example, backend=backend)
    broken = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    with torch.no_grad():
        broken[0].weight[1, 0, 0, 0] = float("nan")  # output channel 1 is NaN everywhere: 6 x 6 values
    with pytest.raises(ValueError, match=r"the original model's output on example_input holds 36 NaN value\(s\).*"
                                         r"or pass verify=False"):
        deploy(broken, torch.randn(1, 3, 8, 8))
    deployed = deploy(broken, torch.randn(1, 3, 8, 8), verify=False)  # asked for: deployed without the check
    assert torch.isnan(deployed(torch.randn(1, 3, 8, 8))[0, 1]).all()


@pytest.mark.parametrize("backend", ["eager", "torchscript"])
def test_a_deployed_model_is_in_eval_mode_throughout(backend):
    """Found by a review: ``deployed.training`` was True (the wrapper and the packed convolutions, built after the
    model's eval(), kept nn.Module's default), misleading code that checks ``model.training``."""
    model = timm.create_model("mobilenetv3_small_100").eval()
    deployed = deploy(model, torch.randn(1, 3, 64, 64), backend=backend)
    assert [name for name, m in deployed.named_modules() if m.training] == []


# ---- found by a second review (session 39) ----------------------------------------------------------------------

class _Attention(nn.Module):
    """Patches through nn.MultiheadAttention: its fused no-grad fast path has no ONNX form."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, 4)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.fc(self.mha(tokens, tokens, tokens)[0].mean(1))


@pytest.mark.skipif("onnxruntime" not in available_backends(), reason="onnx/onnxruntime not installed")
def test_multihead_attention_goes_to_onnx(tmp_path):
    """Was "torch.onnx.export cannot export this model (aten::_native_multi_head_attention)" for every model holding
    an nn.MultiheadAttention, from deploy(backend="onnxruntime") and export alike."""
    from vitzoo.export import export_verified_onnx

    torch.manual_seed(0)
    model = _Attention().eval()
    deployed = deploy(model, torch.randn(2, 3, 16, 16), backend="onnxruntime")
    for batch in (1, 3):
        x = torch.randn(batch, 3, 16, 16)
        torch.testing.assert_close(deployed(x), _reference(model, x), rtol=0, atol=1e-5)
    export_verified_onnx(model, tmp_path / "attention.onnx", img_size=16)
    assert torch.backends.mha.get_fastpath_enabled()  # the setting is put back


@pytest.mark.parametrize("precision", ["bf16x3", "ieee"])
def test_an_empty_batch_through_shvits_own_kernels(precision):
    """SHViT-S1's stem pair (image kernel) divided by the batch size, and its attention kernel read sample 0."""
    model = timm.create_model("shvit_s1").eval()
    deployed = deploy(model, torch.randn(2, 3, 64, 64), fp32_precision=precision)
    empty = torch.randn(0, 3, 64, 64)
    assert deployed(empty).shape == _reference(model, empty).shape == (0, 1000)


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("average", torch.zeros(4))

    def forward(self, x):
        self.calls += 1
        y = self.conv(x)
        self.average.mul_(0.5).add_(y.mean((0, 2, 3)))
        return y


@pytest.mark.parametrize("backend", ["eager", "torchscript", "onnxruntime"])
def test_deploy_leaves_the_callers_buffers_as_they_were(backend):
    """The reference run on the caller's model updated a buffer its forward updates (a counter, a running average),
    though deploy.md says the original stays as it was."""
    if backend not in available_backends():
        pytest.skip(f"{backend} is not available here")
    model = _Counting().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deploy(model, torch.randn(1, 3, 8, 8), backend=backend)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.skipif("onnxruntime" not in available_backends(), reason="onnx/onnxruntime not installed")
def test_onnxruntime_details_found_by_review(tmp_path):
    """An input-independent output kept the exporter's name ("8", not "output_1"); the deployed model's cfg gave
    224 where the session takes only the example's size; a (B, N, C) example was refused late in export's terms;
    copy.copy said the model "cannot be saved or pickled"."""
    import onnx

    from vitzoo.export import export_verified_onnx

    class WithTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.register_buffer("table", torch.randn(5, 4))

        def forward(self, x):
            return {"y": self.conv(x).mean((2, 3)), "table": self.table * 2}

    export_verified_onnx(WithTable().eval(), tmp_path / "table.onnx", img_size=16)
    assert [o.name for o in onnx.load(str(tmp_path / "table.onnx")).graph.output] == ["output_0", "output_1"]

    model = timm.create_model("resnet18").eval()
    deployed = deploy(model, torch.randn(1, 3, 64, 64), backend="onnxruntime")
    assert timm.data.resolve_data_config(model=deployed)["input_size"] == (3, 64, 64)
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)  # the caller's model keeps its own
    tokens = nn.Sequential(nn.Linear(8, 8)).eval()
    with pytest.raises(ValueError, match=r"backend='onnxruntime'\) exports image models, which take \(B, C, H, W\); "
                                         r"example_input has shape \[2, 5, 8\]\. Deploy this model with "
                                         r"backend='eager' or 'torchscript'"):
        deploy(tokens, torch.randn(2, 5, 8), backend="onnxruntime")
    shallow = copy.copy(deploy(model, torch.randn(1, 3, 32, 32)))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(shallow(x), _reference(model, x), rtol=0, atol=1e-4)
