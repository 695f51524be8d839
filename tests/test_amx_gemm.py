"""The bf16x3 AMX kernel (``vitzoo.amx_gemm``) and ``deploy(fp32_precision=...)``.

Products are checked against float64 torch ops. The kernel tests need a CPU with AMX (they skip elsewhere, saying
why); the packing, fallback and build tests run everywhere.
"""
import subprocess

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import vitzoo
from vitzoo import amx_gemm
from vitzoo.onednn_rewrite import PackedConv2d


def _needs_amx():
    if amx_gemm.load() is None:
        pytest.skip(f"AMX bf16x3 kernel unavailable here: {amx_gemm.unavailable_reason()}")


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


def test_deploy_shvit_bf16x3_within_contract_and_ieee_opt_out():
    _needs_amx()
    model = timm.create_model("shvit_s1").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(x).double()
    fast = vitzoo.deploy(model, x)
    exact = vitzoo.deploy(model, x, fp32_precision="ieee")
    assert fast.fp32_precision == "bf16x3" and exact.fp32_precision == "ieee"
    assert any("split bf16 (bf16x3) on AMX" in note for note in fast.optimizations), fast.optimizations
    assert sum(isinstance(m, PackedConv2d) and m.amx for m in fast.modules()) >= 50
    assert not any(isinstance(m, PackedConv2d) and m.amx for m in exact.modules())
    fast_error = (fast(x).double() - expected).abs().max().item()
    exact_error = (exact(x).double() - expected).abs().max().item()
    assert fast_error < 1e-4 and exact_error < 1e-5
    assert fast_error > exact_error  # the split really ran


def test_deploy_falls_back_to_ieee_when_bf16x3_misses_the_tolerance():
    _needs_amx()
    model = nn.Sequential(nn.Conv2d(64, 64, 1), nn.ReLU(), nn.Conv2d(64, 64, 1)).eval()
    x = torch.randn(4, 64, 8, 8)
    deployed = vitzoo.deploy(model, x, atol=1e-6)  # bf16x3 errs by ~1e-5 here, IEEE by ~1e-7
    assert deployed.fp32_precision == "ieee"
    assert any("bf16x3 missed the tolerance" in note for note in deployed.optimizations), deployed.optimizations


def test_deploy_rejects_unknown_precision():
    with pytest.raises(ValueError, match=r"fp32_precision='tf32'.*ieee, bf16x3"):
        vitzoo.deploy(nn.Conv2d(3, 3, 1), torch.randn(1, 3, 4, 4), fp32_precision="tf32")


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """An unloaded kernel module state and an empty cache directory (restored afterwards)."""
    monkeypatch.setattr(amx_gemm, "_state", {})
    monkeypatch.setenv("VITZOO_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_cpu_without_amx_falls_back_with_reason(fresh_state, monkeypatch):
    monkeypatch.setattr(amx_gemm, "cpu_flags", lambda: {"avx512f", "avx2"})
    assert amx_gemm.load() is None
    assert "the CPU lacks" in amx_gemm.unavailable_reason() and "amx_bf16" in amx_gemm.unavailable_reason()
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    deployed = vitzoo.deploy(model, x)
    assert deployed.fp32_precision == "ieee"
    assert any("bf16x3 AMX kernel unavailable: the CPU lacks" in n for n in deployed.optimizations)
    with pytest.raises(RuntimeError, match="AMX bf16x3 kernel is not available here: the CPU lacks"):
        amx_gemm.amx_linear(torch.randn(2, 64), amx_gemm.pack_weight(torch.randn(8, 64)), 8)


def test_failing_compiler_is_reported_not_raised(fresh_state, monkeypatch):
    monkeypatch.setattr(amx_gemm, "cpu_flags", lambda: set(amx_gemm.REQUIRED_CPU_FLAGS))
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
    monkeypatch.setattr(amx_gemm, "cpu_flags", lambda: set(amx_gemm.REQUIRED_CPU_FLAGS))
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

    monkeypatch.setattr(amx_gemm.subprocess, "run", run)
    assert amx_gemm.load() is not None and not compiles
