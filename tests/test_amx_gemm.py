"""The bf16x3 AMX kernel (``vitzoo.amx_gemm``) and ``deploy(fp32_precision=...)``.

Products are checked against float64 torch ops. The kernel tests need a CPU with AMX (they skip elsewhere, saying
why); the packing, fallback and build tests run everywhere.
"""
import os
import re
import subprocess

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import vitzoo
import vitzoo.amx_linear
from kernels import needs_kernel
from norms import randomize_norms
from vitzoo import amx_gemm, native_build
from vitzoo.onednn_rewrite import PackedConv2d


def _needs_amx():
    needs_kernel(amx_gemm, "AMX bf16x3 kernel")


def _bf16(t: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even to bfloat16, done on the bits (independent of torch's conversion)."""
    bits = t.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return (rounded << 16).to(torch.int64).to(torch.int32).view(torch.float32)  # NaN/Inf do not occur here


def _split_error_bound(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per output, a bound on bf16x3's error: each operand carries ~2^-16 relative error after hi + lo; x3 slack."""
    return 3 * 2.0 ** -15 * (a.abs().double() @ w.abs().double().T) + 1e-6


def test_pack_weight_layout_against_index_formula():
    w = torch.randn(19, 45)
    hi, lo = amx_gemm.pack_weight(w)
    assert hi.shape == lo.shape == (2, 2, 16, 16, 2)  # 19 -> 32 columns in 16-wide strips, 45 -> 64 deep
    assert hi.dtype == lo.dtype == torch.bfloat16
    for n in (0, 7, 15, 16, 18):
        for k in (0, 1, 30, 31, 32, 44):
            value = hi[n // 16, k // 32, (k % 32) // 2, n % 16, k % 2].float()
            assert value == _bf16(w[n, k]), (n, k)
            rest = lo[n // 16, k // 32, (k % 32) // 2, n % 16, k % 2].float()
            assert rest == _bf16(w[n, k] - value), (n, k)
            assert abs((value + rest) - w[n, k]) <= 2.0 ** -16 * abs(w[n, k])
    assert hi[1, :, :, 3:].abs().sum() == 0 and hi[:, 1, 7:].abs().sum() == 0  # zero padding (n >= 19, k >= 46)


@pytest.mark.parametrize("m,k,n", [(37, 45, 19), (64, 128, 64), (1, 33, 200), (96, 448, 224)])
@pytest.mark.parametrize("bias,residual,relu", [(True, False, False), (False, True, True), (True, True, False)])
def test_linear_against_float64(m, k, n, bias, residual, relu):
    _needs_amx()
    source = torch.randn(m, k + 5)
    a = source[:, 3:3 + k]  # a row stride larger than k
    w = torch.randn(n, k)
    b = torch.randn(n) if bias else None
    r = torch.randn(n, m).T if residual else None  # a transposed (non-row-major) residual
    expected = a.double() @ w.double().T
    if bias:
        expected = expected + b.double()
    if residual:
        expected = expected + r.double()
    if relu:
        expected = expected.relu()
    got = amx_gemm.amx_linear(a, amx_gemm.pack_weight(w), n, b, r, relu=relu)
    assert got.shape == (m, n) and got.dtype == torch.float32
    error = (got.double() - expected).abs()
    assert (error <= _split_error_bound(a, w)).all(), error.max()
    # and it is not plain bf16 (whose error would be ~2^-8)
    assert error.max() < 2.0 ** -12 * (a.abs().double() @ w.abs().double().T).max()


@pytest.mark.parametrize("cin,kernel,stride,padding,dilation", [
    (16, 3, 2, 1, 1),   # whole 16-lane channel vectors: split straight from the input
    (32, 3, 1, 1, 1),
    (5, 3, 1, 1, 1),    # other channel counts: gathered into a row first
    (8, 5, 2, 2, 1),
    (16, 3, 1, 2, 2),   # dilation
    (16, (1, 3), 1, (0, 1), 1),
])
def test_conv2d_against_float64(cin, kernel, stride, padding, dilation):
    _needs_amx()
    conv = nn.Conv2d(cin, 40, kernel, stride, padding, dilation)
    x = torch.randn(3, cin, 11, 10).contiguous(memory_format=torch.channels_last)
    expected = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride, padding, dilation)
    r = torch.randn_like(expected).float()
    got = amx_gemm.amx_conv2d(x, amx_gemm.pack_conv_weight(conv.weight.detach()), 40, conv.kernel_size,
                              conv.stride, conv.padding, conv.dilation, conv.bias, r, relu=True)
    assert got.shape == expected.shape and got.is_contiguous(memory_format=torch.channels_last)
    error = (got.double() - (expected + r.double()).relu()).abs().max().item()
    scale = F.conv2d(x.double().abs(), conv.weight.double().abs(), None, stride, padding, dilation).max().item()
    assert error <= 3 * 2.0 ** -15 * scale, (error, scale)


def test_packed_conv_uses_amx_by_rule_and_matches_conv():
    _needs_amx()
    cases = [  # (conv, uses AMX)
        (nn.Conv2d(64, 48, 1), True), (nn.Conv2d(32, 48, 1), False),            # pointwise: from 64 channels
        (nn.Conv2d(32, 64, 3, 2, 1), True), (nn.Conv2d(16, 32, 3, 2, 1), False),  # 288 vs 144 products
        (nn.Conv2d(40, 48, 3, 1, 1), False),                                      # not a multiple of 16
        (nn.Conv2d(64, 64, 3, 1, 1, groups=64), False),                           # depthwise
    ]
    for conv, uses in cases:
        conv.eval()
        x = torch.randn(2, conv.in_channels, 9, 9).contiguous(memory_format=torch.channels_last)
        packed = PackedConv2d(conv, tuple(x.shape), fp32_precision="bf16x3")
        assert packed.amx == uses, conv
        assert ("AMX bf16x3" in repr(packed)) == uses
        residual = torch.randn_like(conv(x))
        packed.unary = "relu"
        with torch.no_grad():
            torch.testing.assert_close(packed(x, residual), (conv(x) + residual).relu(), atol=2e-4, rtol=0)
            # ieee keeps oneDNN
        assert not PackedConv2d(conv, tuple(x.shape)).amx


def test_a_same_padded_conv_runs_on_amx_and_pads_as_timm():
    """timm's Conv2dSame (TF "SAME", padded per input size) packed under bf16x3: on AMX where the rule says so, and
    within bf16x3's error of Conv2dSame itself at even and odd sizes, with a fused residual and ReLU."""
    from timm.layers import Conv2dSame

    _needs_amx()
    torch.manual_seed(0)
    conv = Conv2dSame(32, 64, 3, stride=2).eval()
    packed = PackedConv2d(conv, (2, 32, 16, 16), fp32_precision="bf16x3")
    assert packed.amx and packed.same
    packed.unary = "relu"
    for shape in [(2, 32, 16, 16), (1, 32, 15, 9)]:
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            expected = conv(x)
            residual = torch.randn_like(expected)
            torch.testing.assert_close(packed(x, residual), (expected + residual).relu(), atol=2e-4, rtol=0)


def test_deploy_shvit_bf16x3_within_contract_and_ieee_opt_out():
    """Relative errors against the float64 model, on an input deploy did not check itself on, with the norms
    randomised (an audit: at default init the logits are ~1e-4, so the old absolute bounds of 1e-4 / 1e-5 could not
    tell bf16x3 from plain bf16). Measured: bf16x3 2.5e-6, IEEE 2.2e-7, plain bf16 (autocast) 4.4e-3."""
    _needs_amx()
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("shvit_s1")).eval()
    fast = vitzoo.deploy(model, torch.randn(2, 3, 224, 224))
    exact = vitzoo.deploy(model, torch.randn(2, 3, 224, 224), fp32_precision="ieee")
    assert fast.fp32_precision == "bf16x3" and exact.fp32_precision == "ieee"
    assert any("split bf16 (bf16x3) on AMX" in note for note in fast.optimizations), fast.optimizations
    assert sum(isinstance(m, PackedConv2d) and m.amx for m in fast.modules()) >= 50
    assert not any(isinstance(m, PackedConv2d) and m.amx for m in exact.modules())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model.double()(x.double())
        model.float()
        scale = expected.abs().max().item()
        fast_error = (fast(x).double() - expected).abs().max().item() / scale
        exact_error = (exact(x).double() - expected).abs().max().item() / scale
    assert scale > 0.5
    assert fast_error < 2e-5 and exact_error < 1e-6, (fast_error, exact_error)
    assert fast_error > exact_error  # the split really ran


def test_deploy_falls_back_to_ieee_when_bf16x3_misses_the_tolerance():
    _needs_amx()
    model = nn.Sequential(nn.Conv2d(64, 64, 1), nn.ReLU(), nn.Conv2d(64, 64, 1)).eval()
    x = torch.randn(4, 64, 8, 8)
    deployed = vitzoo.deploy(model, x, atol=1e-6)  # bf16x3 errs by ~1e-5 here, IEEE by ~1e-7
    assert deployed.fp32_precision == "ieee"
    note, = [note for note in deployed.optimizations if note.startswith("IEEE fp32: ")]
    # each try says by how much it missed, without the advice of a failed deploy (which was repeated per try)
    tries = note[len("IEEE fp32: "):].split("; ")
    assert tries[0].startswith("bf16x3 in 100% of the eligible layers missed the tolerance")
    assert all(re.fullmatch(r"bf16x3 in \d+% of the eligible layers missed the tolerance \(max abs diff "
                            r"[0-9.e-]+ > 1e-06\)", t) for t in tries), tries


def test_deploy_rejects_unknown_precision():
    with pytest.raises(ValueError, match=r"fp32_precision='tf32'.*ieee, bf16x3"):
        vitzoo.deploy(nn.Conv2d(3, 3, 1), torch.randn(1, 3, 4, 4), fp32_precision="tf32")


@pytest.fixture(scope="session")
def kernel_available() -> bool:
    """Whether the kernel builds and runs here (asked before a test swaps in a fresh state)."""
    return amx_gemm.load() is not None


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """An unloaded kernel module state and an empty cache directory (restored afterwards)."""
    monkeypatch.setattr(amx_gemm, "_state", {})
    monkeypatch.setenv("VITZOO_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_cpu_without_amx_falls_back_with_reason(fresh_state, monkeypatch):
    monkeypatch.setattr(native_build, "cpu_flags", lambda: {"avx512f", "avx2"})
    assert amx_gemm.load() is None
    assert "the CPU lacks" in amx_gemm.unavailable_reason() and "amx_bf16" in amx_gemm.unavailable_reason()
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    deployed = vitzoo.deploy(model, x)
    assert deployed.fp32_precision == "ieee"
    assert any("bf16x3 AMX kernel unavailable: the CPU lacks" in n for n in deployed.optimizations)
    # also said for a model without pointwise convolutions (3x3 only) and for one without convolutions
    for other in (nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3)),
                  nn.Sequential(nn.Flatten(), nn.Linear(192, 64))):
        deployed = vitzoo.deploy(other.eval(), x)
        assert any("bf16x3 AMX kernel unavailable: the CPU lacks" in n for n in deployed.optimizations)
    with pytest.raises(RuntimeError, match="AMX bf16x3 kernel is not available here: the CPU lacks"):
        amx_gemm.amx_linear(torch.randn(2, 64), amx_gemm.pack_weight(torch.randn(8, 64)), 8)


def test_failing_compiler_is_reported_not_raised(fresh_state, monkeypatch):
    monkeypatch.setattr(native_build, "cpu_flags", lambda: set(amx_gemm.REQUIRED_CPU_FLAGS))
    monkeypatch.setenv("CC", "false")  # runs, prints nothing, fails
    assert amx_gemm.load() is None
    assert "failed" in amx_gemm.unavailable_reason()
    assert not list(fresh_state.rglob("*.so")) and not list(fresh_state.rglob(".amx_gemm-*"))  # nothing half-written


def test_compiler_given_as_a_command_line(fresh_state, monkeypatch, tmp_path):
    # $CC may carry a wrapper or flags ("ccache gcc"): split like a shell would, not run as one file name
    calls = tmp_path / "calls"
    wrapper = tmp_path / "wrap"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setattr(native_build, "cpu_flags", lambda: set(amx_gemm.REQUIRED_CPU_FLAGS))
    monkeypatch.setenv("CC", f"{wrapper} cc")
    amx_gemm.load()
    assert "does not run" not in amx_gemm.unavailable_reason()
    assert "cc --version" in calls.read_text() and "amx_gemm.c" in calls.read_text()


def test_built_library_is_cached_and_reused(fresh_state, monkeypatch):
    _needs_amx()  # (loads it once in the shared state, then builds again in the empty cache below)
    monkeypatch.setattr(amx_gemm, "_state", {})
    assert amx_gemm.load() is not None
    built = list(fresh_state.rglob("amx_gemm-*.so"))
    assert len(built) == 1
    monkeypatch.setattr(amx_gemm, "_state", {})
    compiles = []
    real_run = subprocess.run

    def run(cmd, *args, **kwargs):
        if "-shared" in cmd:
            compiles.append(cmd)
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(native_build.subprocess, "run", run)
    assert amx_gemm.load() is not None and not compiles


# --- nn.Linear layers (vitzoo.amx_linear) ----------------------------------------------------------------------


def test_amx_linear_layer_against_float64_and_other_inputs_fall_back():
    _needs_amx()
    from vitzoo.amx_linear import AmxLinear

    for bias in (True, False):
        linear = nn.Linear(96, 70, bias=bias)
        layer = AmxLinear(linear)
        assert layer.weight is linear.weight and layer.bias is linear.bias  # shared, not copied
        x = torch.randn(3, 130, 96)  # leading dimensions of a token sequence, 128 tokens or more
        expected = F.linear(x.double(), linear.weight.double(), None if not bias else linear.bias.double())
        with torch.no_grad():
            got = layer(x)
        assert got.shape == (3, 130, 70)
        error = (got.double() - expected).abs()
        assert error.max() <= 3 * 2.0 ** -15 * (x.abs().double() @ linear.weight.abs().double().T).max()
        assert error.max() > 0  # it ran the split, not IEEE fp32 in float64
        # a head on pooled features (2-D, whatever the batch), and fewer than 128 tokens per sample (whatever the
        # batch: a sample's output does not depend on its batch): IEEE fp32, exactly F.linear
        for few in (torch.randn(8, 96), torch.randn(300, 96), torch.randn(16, 100, 96)):
            with torch.no_grad():
                assert torch.equal(layer(few), F.linear(few, linear.weight, linear.bias))
        with torch.no_grad():
            assert torch.equal(layer(x)[:1], layer(x[:1]))  # bf16x3 per sample too: the same with or without the batch
        for bad in (x.double(), torch.randn(2, 95)):  # other inputs: nn.Linear's own error, word for word
            with pytest.raises(RuntimeError) as ours, torch.no_grad():
                layer(bad)
            with pytest.raises(RuntimeError) as theirs, torch.no_grad():
                linear(bad)
            assert str(ours.value) == str(theirs.value)


class _SequenceFirst(nn.Module):
    """A linear layer on a sequence-first ``(tokens, batch, features)`` input, as nn.TransformerEncoderLayer's
    default (batch_first=False): 8 tokens per image."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 256)

    def forward(self, x):  # (B, 64, 1, 8)
        return self.fc(x.flatten(2).permute(2, 0, 1)).mean(0)


def test_a_sequence_first_linear_takes_one_path_at_every_batch(monkeypatch):
    """Found by an audit: the rows per sample were counted along the layer input's first dimension, here the 8
    tokens, so a deployed model checked at batch 2 (2 rows per "sample": IEEE fp32) ran bf16x3 unchecked at batch
    256. Rows are now counted per image of the model's input: 8 at every batch, IEEE fp32 throughout (since
    2026-11-26 the layer is not even swapped, 8 being below MIN_TOKENS on the example); with the threshold at 8,
    the layer is swapped and takes AMX at every batch."""
    _needs_amx()
    torch.manual_seed(0)
    model = _SequenceFirst().eval()
    calls = []
    real = amx_gemm.amx_linear
    monkeypatch.setattr(amx_gemm, "amx_linear", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    deployed = vitzoo.deploy(model, torch.randn(2, 64, 1, 8))
    # 8 tokens per image, below MIN_TOKENS on the example: the layer stays nn.Linear (since 2026-11-26)
    assert deployed.fp32_precision == "ieee"
    with torch.no_grad():
        for batch in (1, 2, 256):
            assert deployed(torch.randn(batch, 64, 1, 8)).shape == (batch, 256)
    assert calls == []  # IEEE fp32 at every batch (before: bf16x3 at batch 256)
    monkeypatch.setattr(vitzoo.amx_linear, "MIN_TOKENS", 8)  # and at 8 tokens as the threshold, AMX at every batch
    deployed = vitzoo.deploy(model, torch.randn(2, 64, 1, 8), atol=1e-3)
    assert deployed.fp32_precision == "bf16x3"
    calls.clear()
    with torch.no_grad():
        for batch in (1, 2, 256):
            deployed(torch.randn(batch, 64, 1, 8))
    assert len(calls) == 3


class _SharedTable(nn.Module):
    """Per-image tokens through ``tokens``, a table of 225 rows the whole batch shares through ``table`` (as SwinV2's
    position-bias MLP), and ``both`` called on each."""

    def __init__(self):
        super().__init__()
        self.register_buffer("coords", torch.randn(1, 15, 15, 64))
        self.tokens, self.table, self.both = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):  # (B, 64, 16, 16)
        t = x.flatten(2).transpose(1, 2)  # 256 tokens per image
        bias = self.table(self.coords).mean()
        return (self.tokens(t) + bias).mean(1) + self.both(t).mean(1) + self.both(self.coords).mean()


def test_each_linear_layers_rows_are_classified_at_deploy_and_fix_its_path(monkeypatch):
    """Found by a review: with the rows' kind guessed from one call (a row count the batch does not divide is a
    shared table), the 225-row table read as 75 rows per image at batch 3 (IEEE fp32, what deploy checked) and as
    225 at batch 2 (bf16x3, unchecked). deploy now runs the model at batch 1 and 2 and fixes each layer's kind."""
    _needs_amx()
    from vitzoo.amx_linear import IMAGE, MIXED, SHARED, AmxLinear

    deployed = vitzoo.deploy(_SharedTable().eval(), torch.randn(3, 64, 16, 16))
    kinds = {name: m.rows_kind for name, m in deployed.model.named_modules() if isinstance(m, AmxLinear)}
    assert kinds == {"tokens": IMAGE, "table": SHARED, "both": MIXED}
    calls = []
    real = amx_gemm.amx_linear
    monkeypatch.setattr(amx_gemm, "amx_linear", lambda a, *args, **kw: calls.append(a.shape[0]) or real(a, *args, **kw))
    with torch.no_grad():
        for batch in range(1, 7):
            calls.clear()
            deployed(torch.randn(batch, 64, 16, 16))
            assert sorted(calls) == sorted([225, 256 * batch]), (batch, calls)  # table and tokens; `both` IEEE


def test_rows_per_image_inside_and_outside_a_deployed_call():
    from vitzoo.amx_linear import images_in_call, rows_per_image

    assert rows_per_image(torch.empty(4, 197, 64), 64) == 197  # outside: along the first dimension
    assert rows_per_image(torch.empty(4, 64), 64) == 1  # a 2-D input: a head
    with images_in_call(4):
        assert rows_per_image(torch.empty(4, 197, 64), 64) == 197
        assert rows_per_image(torch.empty(197, 4, 64), 64) == 197  # sequence-first
        assert rows_per_image(torch.empty(4 * 64, 49, 64), 64) == 64 * 49  # windows folded into the batch (Swin)
        assert rows_per_image(torch.empty(4 * 17, 64), 64) == 17  # tokens flattened to 2-D
        assert rows_per_image(torch.empty(1, 169, 64), 64) == 169  # not divided by 4: taken for a shared table
        assert rows_per_image(torch.empty(1, 16, 64), 64, "shared") == 16  # classified at deploy (classify_rows)
        assert rows_per_image(torch.empty(4, 16, 64), 64, "image") == 16
        assert rows_per_image(torch.empty(4, 197, 64), 64, "mixed") == 0  # such a layer stays IEEE fp32
    assert rows_per_image(torch.empty(197, 4, 64), 64) == 4  # outside again: the first dimension taken for the batch


def test_swap_and_restore_linears():
    _needs_amx()
    from vitzoo.amx_linear import AmxLinear, restore_linears, swap_linears

    class Sub(nn.Linear):  # a subclass may override forward: left alone
        pass

    model = nn.Sequential(nn.Linear(64, 80), nn.GELU(), nn.Sequential(nn.Linear(80, 8), nn.Linear(8, 64)),
                          Sub(64, 64))
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    assert swap_linears(model) == 2  # 64 and 80 inputs; 8 inputs and the subclass stay
    assert [type(m) for m in (model[0], model[2][0], model[2][1], model[3])] == [AmxLinear, AmxLinear, nn.Linear, Sub]
    assert restore_linears(model) == 2
    assert [type(m) for m in (model[0], model[2][0])] == [nn.Linear, nn.Linear]
    assert [m.weight for m in model.modules() if isinstance(m, nn.Linear)] == weights  # the same tensors


def test_deploy_vit_runs_linears_in_bf16x3():
    _needs_amx()
    from vitzoo.amx_linear import AmxLinear

    model = timm.create_model("deit_tiny_patch16_224", img_size=192).eval()
    x = torch.randn(2, 3, 192, 192)  # 145 tokens: enough for AMX (the head on pooled features runs IEEE fp32)
    with torch.no_grad():
        expected = model(x).double()
    fast, exact = vitzoo.deploy(model, x), vitzoo.deploy(model, x, fp32_precision="ieee")
    assert fast.fp32_precision == "bf16x3" and exact.fp32_precision == "ieee"
    # qkv, proj, fc1, fc2; the head, on one pooled row per image, runs IEEE fp32 and stays nn.Linear (since
    # 2026-11-26: a layer the example runs in IEEE fp32 is not swapped)
    assert sum(isinstance(m, AmxLinear) for m in fast.modules()) == 12 * 4
    assert "linear layers in split bf16 (bf16x3) on AMX: 48" in fast.optimizations
    assert not any(isinstance(m, AmxLinear) for m in exact.modules())
    assert not any(isinstance(m, AmxLinear) for m in model.modules())  # the caller's model is untouched
    fast_error = (fast(x).double() - expected).abs().max().item()
    assert 0 < fast_error < 1e-4


@pytest.mark.parametrize("img_size", [64, 224])
def test_deployed_vit_gives_a_sample_the_same_output_in_any_batch(img_size):
    """Found by an audit: a ReViT-T at 64x64 deployed with a batch-1 example (17 rows: IEEE fp32, so the check saw
    no bf16x3) ran its linear layers in bf16x3 at batch 16 (272 rows), 1.3e-4 off the model with trained-size
    logits, past deploy's 1e-4. The path is now chosen per sample (tokens), so every batch runs what was checked:
    at 64x64 IEEE fp32; at 224x224 bf16x3 where the check finds it close enough. A sample's output alone and in a
    batch of 16 then differs by rounding only, as the model's own does (4.8e-6 here; 9.9e-5 before)."""
    _needs_amx()
    torch.manual_seed(0)
    model = timm.create_model("revit_t", img_size=img_size).eval()
    batch = torch.randn(16, 3, img_size, img_size)
    with torch.no_grad():  # logits of trained size, ~12
        model.head.weight.mul_(12 / model(batch).abs().max())
        model.head_dist.weight.mul_(12 / model(batch).abs().max())
        expected = model(batch)
    deployed = vitzoo.deploy(model, batch[:1])
    with torch.no_grad():
        got = deployed(batch)
        assert (got[:2] - deployed(batch[:2])).abs().max().item() <= 2e-5
    assert (got - expected).abs().max().item() <= 1e-4


def test_fallback_to_ieee_restores_the_linear_layers():
    _needs_amx()
    from vitzoo.amx_linear import AmxLinear

    model = nn.Sequential(nn.Linear(192, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    deployed = vitzoo.deploy(model, torch.randn(2, 160, 192), atol=1e-7)  # bf16x3: ~1e-6 off here
    assert deployed.fp32_precision == "ieee"
    assert not any(isinstance(m, AmxLinear) for m in deployed.modules())
    assert any(note.startswith("IEEE fp32: bf16x3 in 100% of the eligible layers missed the tolerance")
               for note in deployed.optimizations), deployed.optimizations


# --- found by an audit (2026-11-25) ------------------------------------------------------------------------------


def test_infinite_and_huge_inputs_give_what_fp32_gives_not_nan():
    _needs_amx()
    a = torch.randn(40, 64)
    a[3, 5] = float("inf")
    a[7, 9] = -float("inf")
    a[11, 2] = 3.4e38  # finite, but rounds past the bf16 maximum
    w = (torch.rand(48, 64) + 0.5) / 64  # positive: each infinity reaches its row's outputs with one sign
    small = torch.randn(40, 64) * 1e-3
    huge_w = w.clone()
    huge_w[17, 30] = 3.39e38
    for x, weight in ((a, w), (small, huge_w)):
        expected = (x.double() @ weight.double().T).float().double()  # fp32's own overflow, none here
        got = amx_gemm.amx_linear(x, amx_gemm.pack_weight(weight), 48).double()
        assert not got.isnan().any() and not expected.isnan().any()
        assert torch.equal(got.isinf(), expected.isinf()) and torch.equal(got.sign(), expected.sign())
        finite = expected.isfinite()
        scale = (x.abs().double() @ weight.abs().double().T)[finite]
        assert ((got - expected).abs()[finite] <= 3 * 2.0 ** -15 * scale + 1e-30).all()
    assert amx_gemm.amx_linear(a, amx_gemm.pack_weight(w), 48)[3].isinf().all()


def test_a_layer_with_an_infinite_weight_stays_ieee():
    """Found by an audit: an infinite weight was packed with lo = 0, and a_lo * w_hi = inf * 0 gave NaN for every
    input exact in bf16 ([1, 2] . [inf, 1] gave NaN, IEEE fp32 inf). It cannot be split: pack_weight refuses it,
    and deploy's AMX layers leave it to IEEE fp32, whose results are the reference."""
    _needs_amx()
    from vitzoo.amx_linear import AmxLinear

    w = torch.randn(48, 64) / 8
    w[5, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite values"):
        amx_gemm.pack_weight(w)
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(w)
    model = nn.Sequential(linear, nn.ReLU(), nn.Linear(48, 8)).eval()
    x = torch.randint(1, 4, (2, 160, 64)).float()  # exact in bf16, positive: inf * x stays inf
    deployed = vitzoo.deploy(model, x, verify=False, fp32_precision="bf16x3")
    assert not any(isinstance(m, AmxLinear) for m in deployed.modules())
    with torch.no_grad():
        assert torch.equal(deployed(x).isnan(), model(x).isnan())
    conv = nn.Conv2d(64, 48, 1).eval()
    with torch.no_grad():
        conv.weight.copy_(w[:, :, None, None])
    packed = PackedConv2d(conv, (2, 64, 8, 8), fp32_precision="bf16x3")
    assert not packed.amx
    image = torch.randint(1, 4, (2, 64, 8, 8)).float()
    with torch.no_grad():
        got, expected = packed(image), conv(image)
    assert torch.equal(got.isinf(), expected.isinf()) and not got.isnan().any()


def test_the_kernels_refuse_arguments_they_would_read_past_or_count_wrong():
    """Found by an audit: a bias shorter than the outputs, or more outputs than the packed weight holds, were read
    past their end; an input with fewer features that pads to the same size was taken; 2**31 rows wrapped around
    in the kernel's C int and left the output unwritten."""
    _needs_amx()
    packed = amx_gemm.pack_weight(torch.randn(19, 7))
    with pytest.raises(ValueError, match=r"bias of shape \(5,\), expected \(19,\)"):
        amx_gemm.amx_linear(torch.randn(2, 7), packed, 19, bias=torch.ones(5))
    with pytest.raises(ValueError, match="40 outputs do not fit a weight packed for 32"):
        amx_gemm.amx_linear(torch.randn(2, 7), packed, 40)
    with pytest.raises(ValueError, match="expected an input of 7 features, got 5"):
        amx_gemm.amx_linear(torch.randn(2, 5), packed, 19, in_features=7)
    rows = torch.zeros(1, 1).expand(2 ** 31, 1)  # no memory behind the 2**31 rows but one float
    with pytest.raises(ValueError, match="2147483648 input rows"):
        amx_gemm.amx_linear(rows, amx_gemm.pack_weight(torch.ones(1, 1)), 1)
    conv = amx_gemm.pack_conv_weight(torch.randn(64, 32, 3, 3))
    x = torch.randn(1, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"bias of shape \(63,\), expected \(64,\)"):
        amx_gemm.amx_conv2d(x, conv, 64, (3, 3), (1, 1), (1, 1), (1, 1), bias=torch.ones(63))
    with pytest.raises(ValueError, match="80 outputs do not fit a weight packed for 64"):
        amx_gemm.amx_conv2d(x, conv, 80, (3, 3), (1, 1), (1, 1), (1, 1))
    pointwise = amx_gemm.pack_weight(torch.randn(64, 32))
    with pytest.raises(ValueError, match=r"bias of shape \(8,\), expected \(64,\)"):
        amx_gemm.amx_pointwise(x, pointwise, 64, bias=torch.ones(8))


def test_nan_goes_through_the_fused_relu():
    """Found by an audit: the fused ReLU was max(x, 0), which AVX-512 gives as 0 for a NaN x, so an image with a NaN
    pixel got finite logits from the deployed model and NaN ones from the original. torch's relu is the reference."""
    _needs_amx()
    x = torch.randn(40, 64)
    x[3, 5] = float("nan")
    x[7, 5], x[7, 6] = float("nan"), float("inf")  # a row with an infinity takes the kernel's plain fp32 path
    w = torch.randn(48, 64) / 8
    got = amx_gemm.amx_linear(x, amx_gemm.pack_weight(w), 48, relu=True)
    expected = (x @ w.T).relu()
    assert expected.isnan().sum() == 2 * 48 and torch.equal(got.isnan(), expected.isnan())


def test_inputs_the_convolution_cannot_take_raise_as_nn_conv2d_does():
    _needs_amx()
    conv = nn.Conv2d(32, 64, 3).eval()  # no padding: a 2x2 input is smaller than the kernel
    packed = PackedConv2d(conv, (2, 32, 8, 8), fp32_precision="bf16x3")
    assert packed.amx
    for bad in (torch.randn(2, 32, 2, 2), torch.randn(2, 31, 8, 8)):  # 31 channels fit the padded weight
        with pytest.raises(RuntimeError) as ours, torch.no_grad():
            packed(bad)
        with pytest.raises(RuntimeError) as theirs, torch.no_grad():
            conv(bad)
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match="expected an input of 32 channels, got 31"):
        amx_gemm.amx_conv2d(torch.randn(1, 31, 8, 8), amx_gemm.pack_conv_weight(conv.weight.detach()), 64, (3, 3),
                            (1, 1), (0, 0), (1, 1), in_channels=32)
    with pytest.raises(ValueError, match="smaller than the 3x3 kernel"):
        amx_gemm.amx_conv2d(torch.randn(1, 32, 2, 2), amx_gemm.pack_conv_weight(conv.weight.detach()), 64, (3, 3),
                            (1, 1), (0, 0), (1, 1))


def test_bf16x3_needs_a_margin_below_the_tolerance():
    _needs_amx()
    model = nn.Sequential(nn.Linear(192, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    x = torch.randn(2, 160, 192)  # 160 tokens per sample: AMX
    with torch.no_grad():
        diff = (vitzoo.deploy(model, x, verify=False)(x) - model(x)).abs().max().item()
    assert diff > 0
    tight = vitzoo.deploy(model, x, atol=1.5 * diff)  # within the tolerance, but using two thirds of it
    assert any("bf16x3 in 100% of the eligible layers left too little margin" in note
               for note in tight.optimizations), tight.optimizations
    # two eligible layers: 90% and 75% of them are both layers again, so those shares are skipped, not re-checked
    assert not any(f"in {share} of the eligible layers" in note for note in tight.optimizations
                   for share in ("90%", "75%")), tight.optimizations
    with torch.no_grad():  # what was kept (the first layer in bf16x3, or none) is within half the tolerance
        assert (tight(x) - model(x)).abs().max().item() <= 0.75 * diff
    roomy = vitzoo.deploy(model, x, atol=3 * diff)
    assert roomy.fp32_precision == "bf16x3"


def _load_in_a_new_process(cache, env_extra=None):
    import os
    import sys

    env = dict(os.environ, VITZOO_CACHE_DIR=str(cache), **(env_extra or {}))
    code = "from vitzoo import amx_gemm as a; print(a.load() is not None, '|', a.unavailable_reason())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_a_damaged_cached_library_is_rebuilt_not_opened(tmp_path):
    _needs_amx()
    first = _load_in_a_new_process(tmp_path)
    assert first.returncode == 0 and first.stdout.startswith("True"), first
    (library,) = tmp_path.rglob("amx_gemm-*.so")
    data = library.read_bytes()
    library.write_bytes(data[:1000])  # cut short, as by a crash while copying the cache: opening it is SIGBUS
    second = _load_in_a_new_process(tmp_path)
    assert second.returncode == 0 and second.stdout.startswith("True"), second
    assert library.read_bytes() == data  # rebuilt
    library.write_bytes(b"")  # empty: rebuilt too, not left off for good
    assert _load_in_a_new_process(tmp_path).stdout.startswith("True")


def test_compilers_that_build_nothing_or_do_not_parse_are_reasons(fresh_state, monkeypatch):
    monkeypatch.setattr(native_build, "cpu_flags", lambda: set(amx_gemm.REQUIRED_CPU_FLAGS))
    monkeypatch.setenv("CC", "true")  # exits 0 and writes nothing
    assert amx_gemm.load() is None
    assert "produced no shared library" in amx_gemm.unavailable_reason()
    assert not list(fresh_state.rglob("*.so"))
    monkeypatch.setattr(amx_gemm, "_state", {})
    monkeypatch.setenv("CC", "gcc '")
    assert amx_gemm.load() is None
    assert "is not a valid command line" in amx_gemm.unavailable_reason()
    monkeypatch.setattr(amx_gemm, "_state", {})
    monkeypatch.setenv("CC", "false")
    assert amx_gemm.load() is None
    assert "failed (exit status 1)" in amx_gemm.unavailable_reason()


def test_a_read_only_cache_folder_falls_back_to_a_private_temporary_one(
        kernel_available, fresh_state, monkeypatch, tmp_path_factory):
    if not kernel_available:
        pytest.skip(f"AMX bf16x3 kernel unavailable here: {amx_gemm.unavailable_reason()}")
    import tempfile

    (fresh_state / "native").mkdir()
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # the cache folder refuses new files (root ignores chmod)
        if dir is not None and str(dir).startswith(str(fresh_state)):
            raise OSError(30, "Read-only file system", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(native_build.tempfile, "mkstemp", mkstemp)
    temporary = tmp_path_factory.mktemp("tmp")
    monkeypatch.setattr(native_build.tempfile, "gettempdir", lambda: str(temporary))
    assert amx_gemm.load() is not None, amx_gemm.unavailable_reason()
    assert list(temporary.glob("vitzoo-native-*/amx_gemm-*.so"))


def test_a_user_without_a_home_folder_builds_in_a_private_temporary_one(
        kernel_available, fresh_state, monkeypatch, tmp_path_factory):
    """Found by an audit: in a container run under a UID with neither $HOME nor a passwd entry, Path.home() raised
    and the kernels were disabled with "Could not determine home directory"."""
    if not kernel_available:
        pytest.skip(f"AMX bf16x3 kernel unavailable here: {amx_gemm.unavailable_reason()}")
    monkeypatch.delenv("VITZOO_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(native_build.Path, "home", staticmethod(no_home))
    temporary = tmp_path_factory.mktemp("tmp")
    monkeypatch.setattr(native_build.tempfile, "gettempdir", lambda: str(temporary))
    assert amx_gemm.load() is not None, amx_gemm.unavailable_reason()
    assert list(temporary.glob("vitzoo-native-*/amx_gemm-*.so"))


def test_no_writable_build_folder_names_why_for_each(monkeypatch, tmp_path):
    """The error said "<cache> is read-only" whatever the reason, e.g. for a cache path under a file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(native_build.tempfile, "gettempdir", lambda: str(blocker))
    with pytest.raises(RuntimeError) as info:
        native_build._writable_directory(blocker / "cache")
    assert str(info.value) == (
        f"no writable folder to build the kernel in ({blocker / 'cache'}: Not a directory; "
        f"{blocker / f'vitzoo-native-{os.getuid()}'}: Not a directory); set VITZOO_CACHE_DIR to a folder this user "
        "can write")


def test_linear_layers_the_example_runs_in_ieee_stay_ieee_at_any_size():
    """Found by an audit: a ViT deployed with a 64x64 example (17 tokens, below MIN_TOKENS) had its linear layers
    swapped for AMX ones that ran IEEE fp32 on the example, passed the check, and switched to bf16x3 at 224x224,
    unchecked (past the 1e-4 check with trained-size logits). Such layers now stay nn.Linear; the outputs at 224 are
    then the original's exactly; deployed at 224 (197 tokens), they are swapped."""
    _needs_amx()
    from vitzoo.amx_linear import AmxLinear

    model = timm.create_model("vit_tiny_patch16_224", depth=1, dynamic_img_size=True).eval()
    small = vitzoo.deploy(model, torch.randn(2, 3, 64, 64))
    assert not any(isinstance(m, AmxLinear) for m in small.modules()) and small.fp32_precision == "ieee"
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=0)
    large = vitzoo.deploy(model, torch.randn(2, 3, 224, 224), atol=1e-3)
    assert any(isinstance(m, AmxLinear) for m in large.modules()) and large.fp32_precision == "bf16x3"


@pytest.mark.parametrize("writable", ["folder", "library"])
def test_a_library_others_may_write_in_the_temporary_folder_is_not_loaded(monkeypatch, tmp_path, writable):
    """Found by an audit: the per-user folder in /tmp was trusted by its name, so another user could create it first
    and plant a library under the predictable name, which was loaded. Only a folder and a library this user owns,
    writable by nobody else, are used; otherwise the library is built in the cache folder."""
    compiler = native_build.find_compiler()
    if compiler is None:
        pytest.skip("no C compiler here")
    source = tmp_path / "tiny.c"
    source.write_text("int tiny(void) { return 1; }\n")
    flags = ["-shared", "-fPIC", "-O0"]
    monkeypatch.setattr(native_build.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setenv("VITZOO_CACHE_DIR", str(tmp_path / "first"))
    built = native_build.build_library(source, flags, compiler)
    planted_dir = tmp_path / "tmp" / f"vitzoo-native-{os.getuid()}"
    planted_dir.mkdir(parents=True, mode=0o700)
    planted = planted_dir / built.name
    planted.write_bytes(built.read_bytes())
    planted.chmod(0o700)  # whatever the umask
    planted.with_name(built.name + ".sha256").write_text(native_build._digest(planted))
    monkeypatch.setenv("VITZOO_CACHE_DIR", str(tmp_path / "second"))
    (planted_dir if writable == "folder" else planted).chmod(0o777)
    assert native_build.build_library(source, flags, compiler) == tmp_path / "second" / "native" / built.name
    (planted_dir if writable == "folder" else planted).chmod(0o700)  # private: the one in the temporary folder
    (tmp_path / "second" / "native" / built.name).unlink()
    assert native_build.build_library(source, flags, compiler) == planted


def test_layers_nearest_the_output_go_ieee_first():
    """SHViT-S1 with its classifier scaled to trained-size logits (~20): all-bf16x3 uses more than half the 1e-4
    tolerance; deploy keeps bf16x3 in the earlier layers and runs those nearest the output in IEEE fp32."""
    _needs_amx()
    model = randomize_norms(timm.create_model("shvit_s1")).eval()  # outputs of order 1, every branch active
    x = torch.randn(8, 3, 224, 224)
    with torch.no_grad():
        scale = model(x).abs().max().item()
        model.head.l.weight.mul_(20 / scale)
        model.head.l.bias.mul_(20 / scale)
        expected = model(x).double()
    full = vitzoo.deploy(model, x, verify=False)
    with torch.no_grad():
        full_diff = (full(x).double() - expected).abs().max().item()
    assert full_diff > 0.5e-4, full_diff  # the case this is about
    deployed = vitzoo.deploy(model, x)
    on_amx = [m for m in deployed.modules() if isinstance(m, PackedConv2d) and m.amx]
    eligible = [m for m in full.modules() if isinstance(m, PackedConv2d) and m.amx]
    assert 0 < len(on_amx) < len(eligible)
    assert any(note.startswith("bf16x3 in the first") for note in deployed.optimizations), deployed.optimizations
    packed = [m for m in deployed.modules() if isinstance(m, PackedConv2d)]
    last_amx = max(i for i, m in enumerate(packed) if m.amx)
    assert not any(m.amx for m in packed[last_amx + 1:]) and any(m._amx_pays_off() for m in packed[last_amx + 1:])
    with torch.no_grad():
        assert (deployed(x).double() - expected).abs().max().item() <= 0.5e-4


def test_pointwise_fast_path_on_channels_last_views_against_float64():
    """``amx_pointwise`` reads channels-last tensors and channel slices of them in place (SHSA's partial channels),
    also where PyTorch normalised the strides of size-1 dims, and declines other layouts (``None``)."""
    _needs_amx()
    w, b = torch.randn(80, 68), torch.randn(80)
    packed = amx_gemm.pack_weight(w)
    wide = torch.randn(3, 100, 5, 6).contiguous(memory_format=torch.channels_last)
    cases = [wide[:, :68], wide[:, 10:78], torch.randn(3, 68, 1, 1).contiguous(memory_format=torch.channels_last),
             torch.randn(1, 68, 4, 1).contiguous(memory_format=torch.channels_last)]
    for x in cases:
        residual = torch.randn(x.shape[0], 90, *x.shape[2:]).contiguous(memory_format=torch.channels_last)[:, 5:85]
        got = amx_gemm.amx_pointwise(x, packed, 80, b, residual, relu=True)
        assert got is not None and got.shape == (x.shape[0], 80, *x.shape[2:])
        expected = (torch.einsum("bchw,nc->bnhw", x.double(), w.double()) + b.double()[:, None, None]
                    + residual.double()).relu()
        rows_a = x.permute(0, 2, 3, 1).reshape(-1, 68)
        bound = _split_error_bound(rows_a, w).view(x.shape[0], *x.shape[2:], 80).permute(0, 3, 1, 2)
        assert ((got.double() - expected).abs() <= bound + 1e-6).all()
    assert amx_gemm.amx_pointwise(torch.randn(3, 68, 5, 6), packed, 80, b) is None  # NCHW: not pixel rows
    conv = nn.Conv2d(68, 80, 1).eval()
    layer = PackedConv2d(conv, (3, 68, 5, 6), "bf16x3")
    assert layer.amx
    with torch.no_grad():  # the NCHW input goes the view path; both agree with the convolution
        for x in (wide[:, :68], wide[:, :68].contiguous()):
            torch.testing.assert_close(layer(x), conv(x), atol=1e-3, rtol=0)


def test_row_counts_just_below_2_to_the_31_are_refused_too():
    """Found in review: the kernel rounds rows up to blocks of 32 in a C int, so 2**31 - 31 .. 2**31 - 1 rows
    wrapped around as well (the output left unwritten); the limit is 2**31 - 32."""
    _needs_amx()
    packed = amx_gemm.pack_weight(torch.ones(1, 1))
    with pytest.raises(ValueError, match=f"{2 ** 31 - 31} input rows"):
        amx_gemm.amx_linear(torch.zeros(1, 1).expand(2 ** 31 - 31, 1), packed, 1)
    assert amx_gemm.MAX_ROWS == 2 ** 31 - 32


@pytest.mark.parametrize("m,threads", [(1000, 7), (1000, 2), (37, 5), (3136, 3)])
def test_rows_shared_out_between_more_threads_than_cores(m, threads):
    """The threads share the 32-row blocks out at run time (each takes its own share first, then what is left of
    the others'); oversubscribing the cores makes some threads start late, so others take their blocks. Every row
    must be computed once, as float64 gives it, and as the fixed shares compute it (the same block products)."""
    _needs_amx()
    import ctypes

    fixed = ctypes.c_int.in_dll(amx_gemm.load(), "vitzoo_amx_fixed_shares")
    a, w, b, r = torch.randn(m, 96), torch.randn(72, 96), torch.randn(72), torch.randn(m, 72)
    packed = amx_gemm.pack_weight(w)
    expected = (a.double() @ w.double().T + b.double() + r.double()).relu()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fixed.value = 1
        reference = amx_gemm.amx_linear(a, packed, 72, b, r, relu=True)
        fixed.value = 0
        for _ in range(20):
            got = amx_gemm.amx_linear(a, packed, 72, b, r, relu=True)
            assert torch.equal(got, reference)
    finally:
        fixed.value = 0
        torch.set_num_threads(before)
    assert ((reference.double() - expected).abs() <= _split_error_bound(a, w)).all()


# --- found by an audit (2026-11-26) ------------------------------------------------------------------------------


@pytest.mark.parametrize("relu", [False, True])
def test_products_near_the_fp32_maximum_give_what_fp32_gives_not_inf_or_nan(relu):
    """hi(a) hi(w) can round past the fp32 maximum where a w does not (|a w| within ~2^-8 of it): the split gave inf
    where fp32 gives 3.4025e38, and NaN where two such products cancel (fp32: ~0). Such rows are computed in fp32."""
    _needs_amx()
    torch.manual_seed(0)
    big = 1.8446e19  # bf16(big) = 2**64: bf16(big) ** 2 = 2**128 is past the fp32 maximum, big ** 2 is not
    a = torch.randn(40, 64) * 1e-3
    a[3, 5] = a[3, 6] = a[30, 5] = big
    w = torch.randn(48, 64) / 8
    w[:, 5] = big
    w[0::2, 6] = -big  # even outputs of row 3: big * big - big * big, ~0 in fp32
    w[1::2, 6] = 0.0  # odd outputs of row 3 and every output of row 30: big * big = 3.4025e38 in fp32
    expected = a.double() @ w.double().T
    if relu:
        expected = expected.relu()
    assert expected.float().isfinite().all()
    got = amx_gemm.amx_linear(a, amx_gemm.pack_weight(w), 48, relu=relu).double()
    assert got.isfinite().all(), got[[3, 30]]
    assert ((got - expected).abs() <= _split_error_bound(a, w)).all()


def test_the_convolution_refuses_inputs_whose_coordinates_a_c_int_cannot_count():
    """An input higher or wider than 2**31 - 1 (padded) was passed to the kernel's C ints wrapped around: 2**31 + 5
    rows read as all padding, and the output was the bias alone. Such inputs are refused; just below, the kernel
    computes them (inputs of one pixel repeated, strides of 0: no memory behind them)."""
    _needs_amx()
    torch.manual_seed(0)
    pixel, w, b = torch.randn(16), torch.randn(8, 16, 1, 1), torch.randn(8)
    packed = amx_gemm.pack_conv_weight(w)
    expected = (w[:, :, 0, 0].double() @ pixel.double() + b.double())[None, :, None, None]
    for height, padding in ((2 ** 31 + 5, 0), (2 ** 31 - 1, 1)):
        x = pixel.as_strided((1, 16, height, 1), (0, 1, 0, 0))
        with pytest.raises(ValueError, match="padded height and width of at most 2147483647"):
            amx_gemm.amx_conv2d(x, packed, 8, (1, 1), (2 ** 20, 1), (padding, 0), (1, 1), b)
    x = pixel.as_strided((1, 16, 1, 2 ** 31 - 1), (0, 1, 0, 0))
    got = amx_gemm.amx_conv2d(x, packed, 8, (1, 1), (1, 2 ** 20), (0, 0), (1, 1), b)
    assert got.shape == (1, 8, 1, 2048)
    bound = 3 * 2.0 ** -15 * (w[:, :, 0, 0].double().abs() @ pixel.double().abs())[None, :, None, None] + 1e-6
    assert ((got.double() - expected).abs() <= bound).all()


def test_a_bias_outside_cpu_memory_is_refused():
    """The bias's data pointer went to the kernel whatever its device: a meta bias (a null pointer) was taken for no
    bias, and a CUDA one would be read as host memory. Every entry point refuses it, as F.linear does."""
    _needs_amx()
    bias = torch.ones(8, device="meta")
    x = torch.randn(1, 64, 2, 2).contiguous(memory_format=torch.channels_last)
    calls = [lambda: amx_gemm.amx_linear(torch.randn(2, 64), amx_gemm.pack_weight(torch.zeros(8, 64)), 8, bias),
             lambda: amx_gemm.amx_pointwise(x, amx_gemm.pack_weight(torch.zeros(8, 64)), 8, bias),
             lambda: amx_gemm.amx_conv2d(x, amx_gemm.pack_conv_weight(torch.zeros(8, 64, 1, 1)), 8, (1, 1), (1, 1),
                                         (0, 0), (1, 1), bias)]
    for call in calls:
        with pytest.raises(TypeError, match="takes a CPU bias, got one on meta"):
            call()
