"""The benchmark scripts' variants are what their tables say they are (the timing itself is not tested)."""
import os
import sys

import pytest
import timm
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_deploy_ablation as ablation  # noqa: E402
from _common import base_parser, randomize_norm_stats  # noqa: E402
import vitzoo  # noqa: E402
from vitzoo import amx_gemm, image_conv, shsa_kernel  # noqa: E402
from vitzoo.onednn_rewrite import PackedConv2d, PackedConvPair  # noqa: E402
from vitzoo.torchscript_backend import onednn_graph_available  # noqa: E402


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
    reads_image = level >= 5 and image_conv.load() is not None  # the first conv takes the NCHW image itself
    assert (deployed.memory_format == torch.channels_last) == (level >= 1 and not reads_image)
    assert any(m.image for m in packed) == reads_image
    assert bool(packed) == (level >= 2)
    assert any(m.pointwise for m in packed) == (level >= 3)
    # SHSA modules are traced away by the oneDNN rewrite, so their switches are read from the report; blocks on
    # vitzoo's kernel no longer need the token view
    on_kernel = level >= 7 and shsa_kernel.load() is not None
    assert any("AVX-512 kernel: 9 blocks" in o for o in deployed.optimizations) == on_kernel
    assert any("token view" in o for o in deployed.optimizations) == (level >= 4 and not on_kernel)
    # AMX only in the last step, and there wherever this CPU has the kernel
    assert any(m.amx for m in packed) == (level >= 8 and amx_gemm.load() is not None)
    assert any(isinstance(m, PackedConvPair) for m in deployed.modules()) == (level >= 6 and reads_image)
    if level < 2:
        assert any(isinstance(m, nn.Conv2d) for m in deployed.modules())
    with torch.no_grad():
        expected = model.eval()(x)
    torch.testing.assert_close(deployed(x), expected, atol=1e-4, rtol=0)  # same model, whatever the step


# --- profile_torchscript_vs_onnxruntime: oneDNN's verbose log, parsed into the same keys as ONNX Runtime's ----------

def test_onednn_conv_descriptors_map_to_input_and_weight_shapes():
    import profile_torchscript_vs_onnxruntime as prof

    # descriptors as oneDNN 3.x prints them (copied from its verbose log); keys written out by hand
    dense = "mb16_ic16oc32_ih112oh56kh3sh2dh0ph1_iw112ow56kw3sw2dw0pw1"
    depthwise = "g128mb16_ic128oc128_ih14oh14kh3sh1dh0ph1_iw14ow14kw3sw1dw0pw1"
    pointwise = "mb16_ic448oc224_ih7oh7kh1sh1dh0ph0_iw7ow7kw1sw1dw0pw0"
    assert prof.conv_key(dense) == "[16, 16, 112, 112] w[32, 16, 3, 3]"
    assert prof.conv_key(depthwise) == "[16, 128, 14, 14] w[128, 1, 3, 3]"
    assert prof.conv_key(pointwise) == "[16, 448, 7, 7] w[224, 448, 1, 1]"
    assert [prof.conv_kind(prof.conv_key(d)) for d in (dense, depthwise, pointwise)] == [
        "stem 3x3 convs", "1x1 + depthwise convs", "1x1 + depthwise convs"]
    assert prof.conv_kind("[16, 3, 224, 224] w[16, 3, 3, 3]") == "stem 3x3 convs"  # 3 input channels is dense
    with pytest.raises(ValueError, match="not a oneDNN convolution descriptor"):
        prof.conv_key("mb16_ic3oc16")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_onednn_verbose_log_is_captured_per_call():
    import profile_torchscript_vs_onnxruntime as prof

    conv = nn.Conv2d(8, 24, 3, stride=2, padding=1).eval()
    x = torch.randn(2, 8, 20, 20).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        per_shape, total_ms, partitions_ms, partitions = prof.torchscript_conv_times(lambda t: conv(t), x, iters=3)
    assert list(per_shape) == ["[2, 8, 20, 20] w[24, 8, 3, 3]"]
    ms, calls, impl = per_shape["[2, 8, 20, 20] w[24, 8, 3, 3]"]
    assert calls == 1 and 0 < ms <= total_ms and impl
    assert (partitions_ms, partitions) == (0.0, 0)  # eager: no oneDNN Graph partitions


@pytest.mark.skipif(not onednn_graph_available(), reason="needs oneDNN Graph")
def test_onednn_graph_partitions_are_counted_and_separated_from_aten_ops():
    import profile_torchscript_vs_onnxruntime as prof

    model = nn.Sequential(nn.Conv2d(8, 24, 1), nn.ReLU(), nn.Flatten(), nn.Softmax(dim=1)).eval()
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    deployed = vitzoo.deploy(model, x, backend="torchscript")
    per_shape, total_ms, partitions_ms, partitions = prof.torchscript_conv_times(deployed, x, iters=3)
    assert partitions == 1  # conv + ReLU in one partition; flatten / softmax run in ATen
    assert 0 < total_ms <= partitions_ms
    outside = prof.ops_outside_partitions(deployed, x, iters=3)
    names = [name for name, _, _ in outside]
    assert "aten::_softmax" in names and not any(name.startswith("LlgaPartition") for name in names)
    assert all(calls >= 1 for _, _, calls in outside)


# --- bench_other_convs: "deploy() before" is deploy() without the weight standardisation and the new tracing ------

@pytest.mark.parametrize("name, new_note", [("nf_resnet26", "weight-standardised convolutions made plain"),
                                            ("tf_efficientnet_b0", "oneDNN pre-packed convolutions"),
                                            ("efficientvit_m0", "untraceable kept whole")])
def test_other_convs_before_switches_off_what_it_says(name, new_note):
    import bench_other_convs as bench

    torch.manual_seed(0)
    model = randomize_norm_stats(timm.create_model(name, num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    with bench._as_before():
        before = vitzoo.deploy(model, x)
    after = vitzoo.deploy(model, x)
    assert any(new_note in o for o in after.optimizations), after.optimizations
    assert not any(new_note in o for o in before.optimizations), before.optimizations
    torch.testing.assert_close(before(x), after(x), atol=1e-4, rtol=0)


# --- bench_stem_chunking: "unsliced" really switches the slicing off -------------------------------------------------

@pytest.mark.skipif("torchscript" not in __import__("vitzoo.inference").inference.available_backends(),
                    reason="no TorchScript in this torch")
def test_stem_chunking_variants():
    import bench_stem_chunking as bench
    from vitzoo.stem_chunking import BatchChunked

    torch.manual_seed(0)
    model = randomize_norm_stats(timm.create_model("shvit_s1"))
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
    assert bench.slice_size("shvit_s1") == 2  # 2 MiB // (16 x 112 x 112 x 4 B)
    # the table's column for --budgets: 4 MiB // 0.77 MiB = 5 images; a budget of 0 bytes was shown as the default
    assert bench.slice_size("shvit_s1", 4 * 2 ** 20) == 5 and bench.slice_size("shvit_s1", 0) == 1
    for variant in bench.VARIANTS:
        deployed = bench.build_deployed(variant, model, x)
        sliced = any(isinstance(m, BatchChunked) for m in deployed.model.model.modules())
        assert sliced == (variant == "sliced"), variant
        assert any("stem run on slices" in o for o in deployed.optimizations) == sliced
        torch.testing.assert_close(deployed(x), expected, atol=1e-4, rtol=0)


def test_fma_peak_that_prints_nothing_is_skipped_with_the_reason(tmp_path, monkeypatch, capsys):
    """A peak binary that fails (no FMA, killed) used to end the script in a bare IndexError."""
    import bench_peak_fraction as bench

    compiler = tmp_path / "fake-cc"  # "compiles" to a program that prints nothing and exits 1
    compiler.write_text('#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\nprintf \'#!/bin/sh\\nexit 1\\n\' > "$2"\n'
                        'chmod +x "$2"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    assert bench.measured_fma_peak(1, iters=10) is None
    assert "measured FMA peak: skipped (fma_peak exited with code 1 and printed ''" in capsys.readouterr().out


def test_fma_peak_takes_cc_as_a_command_line_and_skips_a_missing_one(tmp_path, monkeypatch, capsys):
    """Found by an audit: CC="ccache gcc" or a CC naming no program ended both peak scripts in a FileNotFoundError,
    where the function promises "skipped" and None."""
    import bench_peak_fraction as bench

    monkeypatch.setenv("CC", f"{tmp_path / 'no-such-cc'} -O2")
    assert bench.measured_fma_peak(1, iters=10) is None
    assert f"measured FMA peak: skipped (cannot run {tmp_path / 'no-such-cc'} -O2: " in capsys.readouterr().out
    compiler = tmp_path / "fake-cc"  # run through sh: CC is a command line, split as a shell would
    compiler.write_text('while [ "$1" != "-o" ]; do shift; done\nprintf \'#!/bin/sh\\necho 7.5\\n\' > "$2"\n'
                        'chmod +x "$2"\n')
    monkeypatch.setenv("CC", f"sh {compiler}")
    assert bench.measured_fma_peak(2, iters=10) == 15e9  # two concurrent runs of 7.5 GMAC/s, best of three


def test_fma_peak_skips_a_cc_with_unbalanced_quotes(monkeypatch, capsys):
    """CC="gcc -DX='1" ended the script in shlex's uncaught ValueError ("No closing quotation")."""
    import bench_peak_fraction as bench
    monkeypatch.setenv("CC", "gcc -DX='1")
    assert bench.measured_fma_peak(1, iters=10) is None
    assert "measured FMA peak: skipped ($CC=\"gcc -DX='1\" is not a valid command line: No closing quotation)" \
        in capsys.readouterr().out


CPUINFO = "vendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\nflags\t\t: fpu sse {flags}\n"


@pytest.mark.parametrize("vendor, family, model, flags, units, lanes", [
    ("AuthenticAMD", 23, 1, "avx2 fma", 2, 4),          # Zen (EPYC 7001): 2 x 128-bit FMA pipes
    ("AuthenticAMD", 23, 49, "avx2 fma", 2, 8),         # Zen 2 (EPYC 7002, model 0x31): 2 x 256-bit
    ("AuthenticAMD", 25, 1, "avx2 fma", 2, 8),          # Zen 3 (EPYC 7003)
    ("AuthenticAMD", 25, 17, "avx2 fma avx512f", 2, 8),  # Zen 4 (EPYC 9004): 512-bit ops on 256-bit pipes
    ("AuthenticAMD", 26, 2, "avx2 fma avx512f", 2, 16),  # Zen 5 (EPYC 9005): 512-bit pipes
    ("GenuineIntel", 6, 143, "avx2 fma avx512f", 2, 16),  # Sapphire Rapids: 2 x 512-bit FMA units
    ("GenuineIntel", 6, 85, "avx2 fma", 2, 8),
])
def test_fma_config_follows_the_cpu_generation(vendor, family, model, flags, units, lanes):
    """Found by an audit: every AMD CPU with AVX-512 got Zen 4's 2 x 8 (Zen 5 has 512-bit pipes: its peak was
    half the real one), and Zen/Zen+ got 2 x 8 (their pipes are 128 bit: twice the real peak). The references are
    AMD's and Intel's published FMA pipe widths."""
    import bench_peak_fraction as bench

    text = CPUINFO.format(vendor=vendor, family=family, model=model, flags=flags)
    assert bench.fma_config(text)[:2] == (units, lanes)


def test_cpu_info_counts_the_physical_cores_this_process_may_use(monkeypatch):
    """The nominal peak counts one core per thread, at most the physical cores usable here (SMT siblings share a
    core's FMA units); the reference is lscpu's own topology."""
    import shutil
    import subprocess

    from _common import cpu_info

    if shutil.which("lscpu") is None or not hasattr(os, "sched_getaffinity"):
        pytest.skip("needs lscpu and os.sched_getaffinity (Linux)")
    rows = subprocess.run(["lscpu", "-p=cpu,core,socket"], capture_output=True, text=True, check=True).stdout
    allowed = os.sched_getaffinity(0)
    cores = {tuple(row.split(",")[1:]) for row in rows.splitlines()
             if not row.startswith("#") and int(row.split(",")[0]) in allowed}
    assert cpu_info()["cores"] == len(cores)

    def no_cpuinfo(*args, **kwargs):
        raise FileNotFoundError("/proc/cpuinfo")

    import _common
    monkeypatch.setattr(_common, "open", no_cpuinfo, raising=False)  # a machine without it (found by an audit:
    assert cpu_info()["fma"] is False                                 # KeyError 'fma' in bench_peak_fraction)


def test_bench_shvit_runs_without_onnxruntime(monkeypatch):
    """Found by an audit: without onnxruntime (an optional extra) the script failed after building five runners."""
    import bench_shvit_vs_timm as bench

    assert bench.runners_here() == list(bench.RUNNERS) or "onnxruntime" not in vitzoo.inference.available_backends()
    monkeypatch.setattr(bench, "available_backends", lambda: ("eager", "compile", "torchscript"))
    assert bench.runners_here() == [k for k in bench.RUNNERS if k != "ONNX Runtime"]


def test_bench_shvit_logits_option_scales_both_models_alike():
    import bench_shvit_vs_timm as bench

    ours, theirs, _ = bench.build_models("shvit_s1", logits=13.0)
    x = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(2))  # the batch it scales on
    with torch.no_grad():
        logits = ours.eval()(x)
        assert logits.abs().max().item() == pytest.approx(13.0, rel=1e-4)
        torch.testing.assert_close(theirs(x), logits, atol=1e-4, rtol=1e-5)  # timm's copy got the same weights


def test_bench_shvit_builds_the_same_weights_in_every_process():
    """The parent reports what the worker processes deploy ("precision", "max |diff|"): both must build the same
    model, whatever random numbers were drawn before (the parent builds S1 first, then S4)."""
    import bench_shvit_vs_timm as bench

    first = bench.build_models("shvit_s1")[0].state_dict()
    torch.randn(1000)  # what building and timing another model draws
    again = bench.build_models("shvit_s1")[0].state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize("switch", ["image kernel", "direct AMX 1x1", "AMX rows shared out", "stem pair"])
def test_paired_switch_variants_compute_the_same_model(switch):
    """Both variants of a switch run the same model (the switch changes how, not what), and the paired ratio is a
    positive number."""
    import bench_paired_switches as bench

    torch.manual_seed(0)
    model = randomize_norm_stats(timm.create_model("shvit_s1"))
    x = torch.randn(2, 3, 64, 64)
    runs = bench.variants(switch, model, x, "bf16x3")
    with torch.inference_mode():
        torch.testing.assert_close(runs["on"](), runs["off"](), atol=1e-4, rtol=0)
        with torch.no_grad():
            expected = model.eval()(x)
        torch.testing.assert_close(runs["on"](), expected, atol=1e-4, rtol=0)
    assert bench.paired_ratio(runs, rounds=2, calls=1, desc=switch) > 0


def test_the_stem_pair_switch_deploys_with_and_without_the_pair():
    """The "stem pair" variants differ in what the switch names (else the benchmark would time one model twice)."""
    import bench_paired_switches as bench
    if image_conv.load() is None:
        pytest.skip(f"image kernel unavailable here: {image_conv.unavailable_reason()}")
    model = timm.create_model("shvit_s1")
    x = torch.randn(1, 3, 64, 64)
    on = vitzoo.deploy(model, x)
    with bench._without("stem pair"):
        off = vitzoo.deploy(model, x)
    pairs = [sum(isinstance(m, PackedConvPair) for m in d.modules()) for d in (on, off)]
    assert pairs == [1, 0]


@pytest.mark.parametrize("case", ["S1 first conv", "S1 stem pair", "S4 first conv"])
def test_stem_kernel_variants_compute_the_same_convolutions(case):
    """Both variants of a case compute the same convolutions (vitzoo's kernels against oneDNN's, an independent
    implementation; random weights, a small image), and the paired timing returns positive times and one ratio per
    round."""
    import bench_stem_kernels as bench

    if image_conv.load() is None:
        pytest.skip(f"image kernel unavailable here: {image_conv.unavailable_reason()}")
    torch.manual_seed(0)
    runs = bench.variants(case, batch=2, size=20)
    with torch.no_grad():
        torch.testing.assert_close(runs["vitzoo"](), runs["replaced"](), atol=1e-4, rtol=0)
    ours, replaced, ratios = bench.paired_times(runs, rounds=3, calls=1, desc=case)
    assert ours > 0 and replaced > 0 and len(ratios) == 3 and all(r > 0 for r in ratios)


def test_stem_kernel_benchmark_prints_one_row_per_case_and_thread_count(monkeypatch, capsys):
    import bench_stem_kernels as bench

    if image_conv.load() is None:
        pytest.skip(f"image kernel unavailable here: {image_conv.unavailable_reason()}")
    monkeypatch.setattr(sys, "argv", ["bench_stem_kernels.py", "--threads", "1", "--batch", "1", "--rounds", "2",
                                      "--calls", "1"])
    assert bench.main() == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| S")]
    assert [row.split(" | ")[0] for row in rows] == [f"| {case}" for case in bench.CASES]


def test_paired_switch_spread_reads_quartiles_and_counts_rounds_past_ten_percent():
    """The table's spread columns, on ratios worked out by hand: quartiles by statistics' default (exclusive)
    method, 1.11 counts as >10% faster, 0.90 as >10% slower (1 / 1.1 = 0.909), 1.10 as neither."""
    import bench_paired_switches as bench

    ratios = sorted([0.90, 0.99, 1.0, 1.01, 1.10, 1.11, 1.4])
    # 7 rounds: the quartiles sit at positions (7 + 1) / 4 = 2 and 6, the median at 4
    assert bench.spread(ratios) == ["1.010x", "0.990x / 1.110x", "2 / 1 of 7"]
    assert bench.spread([1.2]) == ["1.200x", "1.200x / 1.200x", "1 / 0 of 1"]


@pytest.mark.parametrize("source, flags", [
    ("amx_peak.c", ["-mamx-tile", "-mamx-bf16"]),
    ("amx_block_variants.c", ["-mavx512f", "-mamx-tile", "-mamx-bf16"]),
    ("fma_peak.c", ["-mavx512f", "-mfma"]),
])
def test_c_benchmarks_compile_with_the_flags_their_headers_give(source, flags, tmp_path):
    """The C loops that docs/benchmarks.md cites build as their headers say (they run only on a CPU with the
    features; compiling needs a compiler that knows the flags, which the AMX kernel needs too)."""
    import shutil
    import subprocess

    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        pytest.skip("no C compiler")
    probe = tmp_path / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    if subprocess.run([compiler, str(probe), "-o", str(tmp_path / "probe")], capture_output=True).returncode != 0:
        pytest.skip(f"{compiler} builds nothing (e.g. CC=false)")
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", source)
    if source != "fma_peak.c":
        with open(path) as f:
            assert " ".join(["cc", "-O2", *flags]) in f.read()  # the command in the header is the one checked here
    done = subprocess.run([compiler, "-O2", "-Wall", "-Werror", *flags, path, "-o", str(tmp_path / "bench")],
                          capture_output=True, text=True)
    if done.returncode != 0 and "unrecognized" in done.stderr + done.stdout:
        pytest.skip(f"{compiler} does not know {flags}")
    assert done.returncode == 0, done.stderr


def test_half_batches_variants_compute_the_batch_and_the_slices_run_on_one_thread_each(model_and_input):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import bench_half_batches as half

    model, x = model_and_input
    seen = []
    real_deploy = half.deploy

    def recording_deploy(m, example):
        deployed = real_deploy(m, example)

        def run(batch):
            seen.append((threading.get_ident(), torch.get_num_threads(), batch.shape[0]))
            return deployed(batch)
        return run

    caller = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(max_workers=2) as pool, torch.no_grad():
            half.deploy = recording_deploy
            runs = half.variants(model, x, 2, pool)
            expected = model.eval()(x)
            seen.clear()
            for run in runs.values():
                torch.testing.assert_close(run(), expected, atol=1e-4, rtol=0)
            with pytest.raises(ValueError, match="batch 2 does not split into 3 equal slices"):
                half.variants(model, x, 3, pool)
    finally:
        half.deploy = real_deploy
        torch.set_num_threads(caller)
    whole, *slices = seen
    assert whole[1:] == (2, 2) and whole[0] == threading.get_ident()
    assert sorted(s[1:] for s in slices) == [(1, 1), (1, 1)] and threading.get_ident() not in {s[0] for s in slices}


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "argument --threads: expects an int >= 1, got '0'"),
    (["--batch", "-2"], "argument --batch: expects an int >= 1, got '-2'"),
    (["--rounds", "x"], "argument --rounds: expects an int >= 1, got 'x'"),
    (["--min-time", "0"], "argument --min-time: expects seconds > 0, got '0'"),
])
def test_benchmark_counts_are_checked_as_the_arguments_are_read(argv, message, capsys):
    """Found by an audit: `--threads 0` or `--batch 0` ended in torch's traceback after the models were built."""
    with pytest.raises(SystemExit) as info:
        base_parser("x").parse_args(argv)
    assert info.value.code == 2 and capsys.readouterr().err.rstrip().endswith(message)
    assert base_parser("x").parse_args(["--threads", "1", "2", "--batch", "4"]).threads == [1, 2]


def test_revit_bench_deploys_both_models_on_the_timed_batch():
    """Found by an audit: the script deployed on one image and timed batch 8, against docs/benchmarks.md section 5's
    advice (which the docs said these benchmarks follow)."""
    import bench_revit_vs_deit as bench

    threads = torch.get_num_threads()
    try:
        deployed, x = bench.deployed("deit_tiny_patch16_224", 3, threads=1)
    finally:
        torch.set_num_threads(threads)
    assert tuple(x.shape) == (3, 3, 224, 224) and deployed.example_shape == tuple(x.shape)


def _fake_program(path, text, code=0):
    path.write_text(f"#!/bin/sh\nprintf '{text}'\nexit {code}\n")
    path.chmod(0o755)
    return str(path)


def test_unit_steadiness_reads_both_programs_rates_and_counts_slowed_samples(tmp_path, capsys):
    """The two peak programs print their rate in different places; a sample below 75% of its unit's median is
    counted as slowed (the docs' "7 of 30" is this count)."""
    import bench_unit_steadiness as steadiness

    fma = _fake_program(tmp_path / "fma", "80.646 16 2.06767e+11\\n")
    amx = _fake_program(tmp_path / "amx", "7.29 ns per tile product, 1124.3 GMAC/s bf16 (374.8 GMAC/s of fp32 ...)\\n")
    assert steadiness.rate(fma, "10") == 80.646
    assert steadiness.rate(amx) == 1124.3
    broken = _fake_program(tmp_path / "broken", "the kernel did not grant the AMX tile state\\n", code=1)
    assert steadiness.rate(broken) is None
    assert "broken exited with code 1 and printed 'the kernel did not grant" in capsys.readouterr().out
    row = steadiness.summary("AMX", [1100.0, 1150.0, 1120.0, 520.0, 830.0])
    # median 1100; 520 < 825 is slowed, 830 is not
    assert row == ["AMX", 5, "1100.0", "520.0", "1150.0", "1 (20%)"]
    # per core: 500 < 0.75 * 1140 is uneven, 860 against 1140 is not (0.754), a failed sample is not counted
    assert steadiness.uneven([[1140.0, 500.0], [1140.0, 860.0], [None, 400.0], [480.0, 1150.0]]) == 2


def test_unit_steadiness_runs_end_to_end_where_it_can_build(tmp_path, monkeypatch, capsys):
    import bench_unit_steadiness as steadiness
    from vitzoo.native_build import cpu_flags

    if "fma" not in cpu_flags():
        pytest.skip("needs an x86 CPU with FMA")
    monkeypatch.setattr(sys, "argv", ["bench_unit_steadiness.py", "--samples", "2", "--pause", "0",
                                      "--fma-iters", "1000000", "--per-core"])
    try:
        steadiness.main()
    except SystemExit as e:  # no compiler builds either program here
        pytest.skip(str(e))
    out = capsys.readouterr().out
    if "FMA samples: skipped" in out:
        pytest.skip("no C compiler")
    assert "| 2 |" in out and "### summary" in out and "| FMA | 2 |" in out
    if "AMX samples: skipped" not in out and len(os.sched_getaffinity(0)) > 1:
        assert "| AMX cpu " in out and "samples with one core's AMX rate below 75% of another's" in out
