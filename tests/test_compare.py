"""`vitzoo compare` and vitzoo.compare.compare: output formats, speed, plot, name resolution."""
import csv
import io
import json
import os
import re
import sys
import time
import types

import pytest
import timm
import torch

from vitzoo import cli
from vitzoo.compare import compare, format_rows
from vitzoo.models import DEFAULT_MODELS, PAPER_NUMBERS, resolve_name
from vitzoo.plot import pareto_front

from formulas import REVIT, layer_norm_flops, vit_macs  # tests/formulas.py

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JSON_KEYS = {"model", "input_size", "params", "params_fused", "flops", "throughput"}


def _cli(capsys, *argv):
    code = cli.main(["compare", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def fake_deploy(monkeypatch):
    """A stand-in vitzoo.deploy: 'eager' returns the model in eval mode, 'onnxruntime' fails."""
    calls = []

    def deploy(model, example_input=None, backend="eager", rtol=0.0):
        calls.append(backend)
        if backend != "eager":
            raise RuntimeError(f"backend {backend!r} is not available here")
        return model.eval()

    _stand_in_for_deploy(monkeypatch, deploy)
    return calls


def _stand_in_for_deploy(monkeypatch, deploy):
    """Replace vitzoo.inference (imported by compare at call time) by ``deploy`` with every backend available."""
    backends = ("eager", "compile", "onnxruntime", "torchscript")
    monkeypatch.setitem(sys.modules, "vitzoo.inference", types.SimpleNamespace(
        deploy=deploy, ROUNDING_RTOL=1e-5, BACKENDS=backends, available_backends=lambda: list(backends),
        missing_backend_hint=lambda backend: "not here"))


def test_json_schema_counts_only(capsys):
    code, out, err = _cli(capsys, "shvit_s1", "deit_tiny_patch16_224", "--no-speed", "--format", "json")
    assert code == 0
    rows = json.loads(out)  # stdout holds only the JSON array
    assert [r["model"] for r in rows] == ["shvit_s1", "deit_tiny_patch16_224"]
    for r in rows:
        assert JSON_KEYS <= set(r)
        assert isinstance(r["flops"], int) and r["throughput"] is None
        assert r["input_size"] == [3, 224, 224]
    assert rows[0]["flops"] == 241_400_128  # fused S1 at 224 (paper 241M)
    assert (rows[0]["params"], rows[0]["params_fused"]) == (6_330_808, 6_308_660)
    assert rows[0]["paper_top1"] == 72.8
    # what fvcore ran without counting is listed, not hidden: SHViT's softmax in 9 SHSA blocks (S1: depths 2/4/5,
    # attention in stages 2 and 3 only), DeiT's GELU in 12 blocks
    assert rows[0]["uncounted"]["aten::softmax"] == 9 and rows[1]["uncounted"]["aten::gelu"] == 12
    assert "machine:" in err and "torch" in err


def test_tiny_speed_run_with_deploy_stand_in(fake_deploy):
    rows = compare(["shvit_s1"], img_size=64, batch_size=2, rounds=1, threads=1, devices=["cpu"],
                   backends=["eager", "onnxruntime"])
    (row,) = rows
    assert row["device"] == "cpu" and row["batch_size"] == 2 and row["input_size"] == [3, 64, 64]
    assert row["throughput"] > 0 and row["latency_ms"] > 0
    assert row["throughput_fastest"] > 0 and row["fastest_backend"] == "eager"
    assert set(row["throughput_by_path"]) == {"default", "eager"}
    assert "onnxruntime failed" in row["note"]
    assert fake_deploy == ["eager", "onnxruntime"]
    # throughput and latency describe the same timings: img/s = batch / (ms / 1000) for one round
    assert row["throughput"] == pytest.approx(2 / (row["latency_ms"] / 1e3), rel=1e-3)


def test_each_models_deployed_paths_are_released_before_the_next_model(monkeypatch):
    """Peak memory is one model's paths: a model's deployed copies are gone before the next model is deployed."""
    import weakref

    live = weakref.WeakSet()
    alive_at_deploy = []

    def deploy(model, example_input=None, backend="eager", rtol=0.0):
        alive_at_deploy.append(sorted(m.deployed_as for m in live))
        model.deployed_as = (example_input.shape[-1], backend)
        live.add(model)
        return model.eval()

    _stand_in_for_deploy(monkeypatch, deploy)
    rows = compare(["shvit_s1", "shvit_s2"], img_size=64, batch_size=1, rounds=1, threads=1, devices=["cpu"],
                   backends=["eager", "torchscript"])
    assert [r["fastest_backend"] is not None for r in rows] == [True, True]
    # both paths of a model coexist while it is deployed; none of the first model's when the second is deployed
    assert alive_at_deploy == [[], [(64, "eager")], [], [(64, "eager")]]


def test_random_weights_with_huge_outputs_keep_their_deployed_path():
    # randomly initialised MobileOne outputs ~1e14; its re-parameterised copy differs by float rounding at that
    # scale (~1e8), which an absolute 1e-4 check would reject, leaving the model without a fastest path
    rows = compare(["mobileone_s0"], img_size=64, batch_size=1, rounds=1, threads=1, devices=["cpu"],
                   backends=["eager"])
    (row,) = rows
    assert row["fastest_backend"] == "eager", row["note"]
    assert not row["note"] or row["note"].startswith("fastest path eager runs convolutions and linear layers in "
                                                     "split bf16")


def test_a_fastest_path_in_bf16x3_is_noted():
    from vitzoo import amx_gemm

    rows = compare(["shvit_s1"], img_size=64, batch_size=2, rounds=1, threads=1, devices=["cpu"], backends=["eager"])
    (row,) = rows
    assert row["fastest_backend"] == "eager"
    noted = "fastest path eager runs convolutions and linear layers in split bf16 (bf16x3 on AMX" in row["note"]
    assert noted == (amx_gemm.load() is not None), row["note"]


def test_plot_writes_png_and_refuses_overwrite(capsys, tmp_path, fake_deploy):
    target = tmp_path / "pareto.png"
    args = ["shvit_s1", "efficientvit_m2", "--img-size", "64", "--batch", "1", "--rounds", "1", "--threads", "1",
            "--device", "cpu", "--backends", "eager", "--plot", str(target)]
    code, out, err = _cli(capsys, *args)
    assert code == 0, err
    data = target.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert list(tmp_path.iterdir()) == [target]  # no temp file left behind

    code, out, err = _cli(capsys, *args)
    assert code == 1 and "already exists" in err and "--force" in err
    assert target.read_bytes() == data  # untouched
    assert out == ""  # refused before measuring anything

    code, _, err = _cli(capsys, *args, "--force")
    assert code == 0, err


def test_plot_format_follows_the_suffix(capsys, tmp_path, fake_deploy):
    args = ["shvit_s1", "--img-size", "64", "--batch", "1", "--rounds", "1", "--threads", "1", "--device", "cpu",
            "--backends", "eager", "--plot"]
    code, _, err = _cli(capsys, *args, str(tmp_path / "pareto.pdf"))
    assert code == 0, err
    assert (tmp_path / "pareto.pdf").read_bytes().startswith(b"%PDF")
    code, _, err = _cli(capsys, *args, str(tmp_path / "pareto.svg"))
    assert code == 0, err
    assert b"<svg" in (tmp_path / "pareto.svg").read_bytes()[:2000]


def test_a_plot_file_it_cannot_write_is_a_usage_error_before_anything_is_built(capsys, tmp_path, monkeypatch):
    """Found by an audit: `--plot x.jpg` exited with code 1 (a failure), not 2 (a usage error), and `--plot ""` was
    ignored (exit code 0, no plot). Both are refused as the arguments are parsed, with the usage."""
    monkeypatch.setattr("vitzoo.compare._build", lambda *a, **k: pytest.fail("built before checking --plot"))
    for name, message in ((str(tmp_path / "pareto.jpg"), f"{tmp_path / 'pareto.jpg'}: the plot is written as PNG, "
                                                         "PDF or SVG, chosen by the file's suffix (.png, .pdf, .svg); "
                                                         "got '.jpg'"),
                          ("", "needs a file name, e.g. --plot pareto.png")):
        with pytest.raises(SystemExit) as info:
            cli.main(["compare", "shvit_s1", "--plot", name])
        out, err = capsys.readouterr()
        assert info.value.code == 2 and out == ""
        assert err.startswith("usage: vitzoo compare") and f"vitzoo compare: error: argument --plot: {message}\n" in err
    assert list(tmp_path.iterdir()) == []


def test_plot_with_no_speed_is_refused_before_anything_is_built(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("vitzoo.compare._build", lambda *a, **k: pytest.fail("built before checking --plot"))
    code, out, err = _cli(capsys, "shvit_s1", "--no-speed", "--plot", str(tmp_path / "p.png"))
    assert (code, out, err) == (2, "", "vitzoo compare: error: --plot needs measured throughput; drop --no-speed\n")
    assert list(tmp_path.iterdir()) == []


def test_plot_without_matplotlib_fails_before_measuring(capsys, tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    monkeypatch.setattr("vitzoo.compare._build", lambda *a, **k: pytest.fail("measured before checking matplotlib"))
    code, out, err = _cli(capsys, "shvit_s1", "--plot", str(tmp_path / "p.png"))
    assert code == 1 and "needs matplotlib, which is not installed: pip install matplotlib" in err
    assert list(tmp_path.iterdir()) == []


def test_pareto_front_by_hand():
    pts = [("a", 1, 100), ("b", 2, 50), ("c", 2, 40), ("d", 4, 60), ("e", 8, 10)]
    # c is dominated by b (same FLOPs, faster) and by d; b is dominated by d (more FLOPs, faster)
    assert [p[0] for p in pareto_front(pts)] == ["a", "d", "e"]


def test_pareto_front_ties():
    # mutation testing: the hand test's tied point was also dominated by another point, so "or" vs "and" in the
    # strictness condition went unnoticed. A tie in one axis is dominated by being better in the other.
    assert [p[0] for p in pareto_front([("b", 2, 50), ("c", 2, 40)])] == ["b"]  # same FLOPs: the faster one
    assert [p[0] for p in pareto_front([("x", 1, 10), ("y", 3, 10)])] == ["y"]  # same speed: more FLOPs
    assert [p[0] for p in pareto_front([("p", 2, 10), ("q", 2, 10)])] == ["p", "q"]  # equal: neither dominates


def test_timing_throughputs_from_round_times():
    from vitzoo.speed import Timing

    t = Timing(8, 1, [0.1, 0.2, 0.4, 0.8])  # batch 8, one call per round, four rounds
    assert t.latency_ms == pytest.approx(300.0)  # median of 0.2 and 0.4 s
    assert t.throughput == pytest.approx(8 / 0.3)
    assert t.best_throughput == pytest.approx(80.0)  # the fastest round


def test_fastest_path_is_the_fastest_deployed_backend(monkeypatch):
    """Mutation testing: picking the slowest backend went unnoticed (the stand-in had one working backend)."""
    import time as _time

    def deploy(model, example_input=None, backend="eager", rtol=0.0):
        model = model.eval()
        if backend == "eager":
            return model

        def slow(x):
            _time.sleep(0.01)
            return model(x)
        return slow

    _stand_in_for_deploy(monkeypatch, deploy)
    (row,) = compare(["shvit_s1"], img_size=32, batch_size=1, rounds=3, threads=1, devices=["cpu"],
                     backends=["eager", "torchscript"], progress=False)
    by_path = row["throughput_by_path"]
    assert set(by_path) == {"default", "eager", "torchscript"}, by_path
    assert by_path["eager"] > by_path["torchscript"]  # 10 ms of sleep per call
    assert row["fastest_backend"] == "eager" and row["throughput_fastest"] == by_path["eager"]


def test_unknown_name_lists_closest_matches(capsys):
    code, out, err = _cli(capsys, "shvit_s9", "--no-speed")
    assert code == 2
    assert "unknown model 'shvit_s9'; closest matches:" in err and "shvit_s1" in err
    assert out == ""
    code, out, err = _cli(capsys, "shvit_s1", "--batch", "0")
    assert code == 2 and "batch_size (--batch) must be >= 1" in err and out == ""


def test_backend_names_are_checked_before_anything_is_built(capsys, monkeypatch):
    def must_not_build(*a, **k):
        raise AssertionError("models must not be built for a bad --backends")

    monkeypatch.setattr("vitzoo.compare._build", must_not_build)
    code, out, err = _cli(capsys, "shvit_s1", "--backends", "eager,onnxrt")
    assert code == 2 and out == ""  # a usage error, as an unknown model name or --batch 0
    assert "unknown backend 'onnxrt'; valid backends: eager, compile, onnxruntime, torchscript" in err
    code, out, err = _cli(capsys, "shvit_s1", "--no-speed", "--backends", "foo")  # a typo is an error even so
    assert code == 2 and "unknown backend 'foo'" in err


def test_backends_may_be_given_space_or_comma_separated(capsys, monkeypatch):
    seen = []

    def fake_compare(models, img_size, batch, threads, speed, devices, backends, rounds, progress):
        seen.append((list(models), backends))
        raise ValueError("stop here")

    monkeypatch.setattr("vitzoo.compare._compare", fake_compare)
    _cli(capsys, "shvit_s1", "--backends", "eager", "torchscript,onnxruntime")
    _cli(capsys, "shvit_s1", "deit_tiny_patch16_224", "--backends", "eager,compile")
    _cli(capsys, "shvit_s1")
    assert seen == [(["shvit_s1"], ["eager", "torchscript", "onnxruntime"]),
                    (["shvit_s1", "deit_tiny_patch16_224"], ["eager", "compile"]), (["shvit_s1"], None)]


def test_a_model_name_after_backends_is_pointed_out(capsys):
    code, out, err = _cli(capsys, "--backends", "eager", "shvit_s1")
    assert code == 2 and out == ""
    assert "unknown backend 'shvit_s1'" in err and "is a model: put model names before --backends" in err
    code, out, err = _cli(capsys, "shvit_s1", "--backends", "eagr")  # a plain typo gets no such hint
    assert code == 2 and "unknown backend 'eagr'" in err and "is a model" not in err
    code, out, err = _cli(capsys, "shvit_s1", "--no-speed", "--backends", ",")  # not silently the defaults
    assert code == 2 and "--backends names no backend; valid backends: eager" in err


def test_a_weights_folder_is_compared_with_its_own_config(tmp_path, capsys):
    folder = tmp_path / "my_s1"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architecture": "shvit_s1", "num_classes": 10, "pretrained_cfg": {"input_size": [3, 160, 160]}}))
    code, out, _ = _cli(capsys, f"local-dir:{folder}", "--no-speed", "--format", "json")
    assert code == 0
    (row,) = json.loads(out)
    # the folder spelled three ways is one model (found by an audit: a trailing slash gave a second row)
    code, twice, _ = _cli(capsys, f"local-dir:{folder}", f"local-dir:{folder}/", f"local-dir:{folder}/../my_s1",
                          f"LOCAL-DIR:{folder}", "--no-speed", "--format", "json")
    assert code == 0 and [r["model"] for r in json.loads(twice)] == [f"local-dir:{folder}"]
    reference = timm.models.shvit.shvit_s1(num_classes=10)  # timm's own SHViT, built independently
    assert row["params"] == sum(p.numel() for p in reference.parameters())
    assert row["input_size"] == [3, 160, 160]  # the folder's input size, not shvit_s1's 224
    # timm's fused SHViT at 160x160 counted by fvcore itself (its attention is plain matmuls, which fvcore counts)
    from fvcore.nn import FlopCountAnalysis

    fused = timm.utils.reparameterize_model(reference.eval())
    counter = FlopCountAnalysis(fused, torch.randn(1, 3, 160, 160))
    counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert row["flops"] == counter.total()


def test_a_folder_name_without_a_usable_config_is_named(capsys, tmp_path):
    code, out, err = _cli(capsys, f"local-dir:{tmp_path}", "--no-speed")
    assert code == 2 and f"local-dir:{tmp_path}: no config.json there" in err
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "shvit_s9"}))
    code, out, err = _cli(capsys, f"local-dir:{tmp_path}", "--no-speed")
    assert code == 2 and "names architecture 'shvit_s9', which is not a registered timm model" in err


def test_a_backend_missing_here_is_named_with_what_to_install(capsys, monkeypatch):
    monkeypatch.setattr("vitzoo.inference.available_backends", lambda: ["eager", "compile", "torchscript"])
    code, out, err = _cli(capsys, "shvit_s1", "--backends", "eager,onnxruntime")
    assert code == 1 and out == ""
    assert "backend 'onnxruntime' not available in this environment (onnxruntime: install onnx and onnxruntime " \
           "(`pip install onnx onnxruntime`)); available here: eager, compile, torchscript" in err
    code, out, _ = _cli(capsys, "shvit_s1", "--no-speed", "--backends", "onnxruntime", "--format", "json")
    assert code == 0 and json.loads(out)[0]["flops"] == 241_400_128  # counts need no backend


def test_cuda_asked_for_without_cuda_is_a_usage_error_even_for_counts(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for extra in ((), ("--no-speed",)):
        code, out, err = _cli(capsys, "shvit_s1", "--device", "cuda", *extra)
        assert code == 2 and out == "" and "--device cuda was asked for" in err


def test_a_device_torch_does_not_know_is_a_usage_error_before_anything_is_built(monkeypatch):
    """Found by an audit: compare(devices=["gpu"]) built and counted every model, then gave each row the note
    "not measured ... Expected one of cpu, cuda, ..."; and "cuda:1" without CUDA was not refused as "cuda" is."""
    monkeypatch.setattr("vitzoo.compare._build", lambda *a, **k: pytest.fail("built before checking the devices"))
    for devices in (["gpu"], ["cpu", "CUDA"], [None]):
        for speed in (True, False):
            with pytest.raises(ValueError, match=rf"^unknown device {devices[-1]!r}; valid devices: cpu, cuda$"):
                compare(["shvit_s1"], devices=devices, speed=speed)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda:1 was asked for but torch.cuda.is_available"):
        compare(["shvit_s1"], devices=["cuda:1"], speed=False)


def test_threads_apply_to_the_measurement_only(fake_deploy, monkeypatch):
    """compare(threads=1) used to leave the whole process at 1 thread (also with speed=False, and after a failed
    call): the caller's setting is restored, and the measurement itself ran at the given count."""
    from vitzoo import compare as compare_module

    before = torch.get_num_threads()
    seen = []
    real_measure = compare_module.measure
    monkeypatch.setattr(compare_module, "measure",
                        lambda *a, **k: (seen.append(torch.get_num_threads()), real_measure(*a, **k))[1])
    other = 1 if before != 1 else 2
    compare(["shvit_s1"], img_size=32, batch_size=1, rounds=1, threads=other, devices=["cpu"],
            backends=["eager"], progress=False)
    assert seen == [other] and torch.get_num_threads() == before
    compare(["shvit_s1"], img_size=32, threads=other, speed=False)
    with pytest.raises(Exception):
        compare(["not_a_model_xyz"], threads=other, speed=False)
    assert torch.get_num_threads() == before


def test_a_model_that_fails_while_measured_keeps_the_other_rows(fake_deploy, monkeypatch, capsys, tmp_path):
    """A model whose timing fails (e.g. out of memory at the full batch) gets a row without speed and a note; the
    rows measured before and after it are kept, and the plot leaves it out."""
    from vitzoo import compare as compare_module

    real_measure = compare_module.measure

    def measure(runners, batch, **kwargs):
        if kwargs.get("desc") == "measuring shvit_s2":
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 GB\nmore detail")
        return real_measure(runners, batch, **kwargs)

    monkeypatch.setattr(compare_module, "measure", measure)
    rows = compare(["shvit_s1", "shvit_s2", "shvit_s3"], img_size=32, batch_size=1, rounds=1, threads=1,
                   devices=["cpu"], backends=["eager"], progress=False)
    assert [r["model"] for r in rows] == ["shvit_s1", "shvit_s2", "shvit_s3"]
    assert rows[0]["throughput"] > 0 and rows[2]["throughput"] > 0 and rows[1]["throughput"] is None
    assert rows[1]["flops"] > 0 and rows[1]["note"].endswith(
        "; not measured at batch 1: RuntimeError: DefaultCPUAllocator: not enough memory: you tried to allocate 1 GB")
    plotted = []
    monkeypatch.setattr("vitzoo.plot.write_pareto_plot", lambda points, path, **k: plotted.extend(points) or path)
    code, out, err = _cli(capsys, "shvit_s1", "shvit_s2", "--img-size", "32", "--batch", "1", "--rounds", "1",
                          "--backends", "eager", "--plot", str(tmp_path / "p.png"))
    assert code == 0 and "note: shvit_s2 (cpu):" in err and "not measured at batch 1" in err
    assert [p[0] for p in plotted] == ["shvit_s1"]


def test_a_batch_too_large_to_allocate_keeps_the_rows(fake_deploy, monkeypatch):
    """The timing input itself failing to allocate (--batch 100000: 60 GB at 224 px) lost every row with one raw
    line (found by an audit); each model now keeps its counts and gets the note."""
    from vitzoo import compare as compare_module

    real_randn = torch.randn

    def randn(*size, **kwargs):
        if size and size[0] == 7:  # only the timing batch
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory")
        return real_randn(*size, **kwargs)

    monkeypatch.setattr(compare_module.torch, "randn", randn)
    rows = compare(["shvit_s1", "shvit_s2"], img_size=32, batch_size=7, rounds=1, threads=1, devices=["cpu"],
                   backends=["eager"], progress=False)
    assert [r["model"] for r in rows] == ["shvit_s1", "shvit_s2"]
    assert all(r["throughput"] is None and r["flops"] > 0 for r in rows)
    assert all("not measured at batch 7: RuntimeError: [enforce fail" in r["note"] for r in rows)


def test_repeated_backends_are_deployed_once(fake_deploy):
    compare(["shvit_s1"], img_size=64, batch_size=2, rounds=1, threads=1, devices=["cpu"],
            backends=["eager", "eager"], progress=False)
    assert fake_deploy == ["eager"]


def test_one_name_given_as_a_str_is_one_name_not_its_letters(fake_deploy):
    """Found by an audit: compare("shvit_s1") failed with "unknown model 's'", backends="eager" with "unknown backend
    'e', 'a', 'g', 'e', 'r'", and devices="cpu" measured on devices 'c', 'p' and 'u'."""
    (row,) = compare("shvit_s1", speed=False)
    assert row["model"] == "shvit_s1" and row["flops"] == 241_400_128  # fused S1 at 224 (paper 241M)
    (row,) = compare("shvit_s1", img_size=64, batch_size=1, rounds=1, threads=1, devices="cpu", backends="eager")
    assert row["model"] == "shvit_s1" and row["device"] == "cpu" and row["fastest_backend"] == "eager"
    assert fake_deploy == ["eager"]


COUNT_ARGUMENTS = ("img_size", "batch_size", "threads", "rounds")


@pytest.mark.parametrize("argument, value", [(a, v) for a in COUNT_ARGUMENTS for v in (224.0, 2.5, True, "8")]
                         + [("rounds", None)])
def test_sizes_and_counts_must_be_ints_and_are_checked_before_anything_is_built(monkeypatch, argument, value):
    """Found by an audit: compare(img_size=224.0) skipped every model ("'float' object is not iterable") and
    batch_size=2.0, threads=True or rounds=1.5 went through unchecked; the command line takes ints only (None is
    the default of the other three)."""
    monkeypatch.setattr("vitzoo.compare._build", lambda *a, **k: pytest.fail("built before checking the arguments"))
    flag = {"img_size": "--img-size", "batch_size": "--batch", "threads": "--threads", "rounds": "--rounds"}[argument]
    with pytest.raises(TypeError) as info:
        compare(["shvit_s1"], speed=False, **{argument: value})
    assert str(info.value) == f"{argument} ({flag}) must be an int >= 1, got {value!r} ({type(value).__name__})"
    with pytest.raises(ValueError, match=rf"^{argument} \({flag}\) must be >= 1, got 0$"):
        compare(["shvit_s1"], speed=False, **{argument: 0})


def test_nothing_to_compare_prints_no_empty_table(capsys, monkeypatch):
    monkeypatch.setattr("vitzoo.compare._build", lambda names, **k: ([], {n: "cannot be built" for n in names}))
    code, out, err = _cli(capsys, "nvit_b", "--no-speed")
    assert code == 1 and out.strip().startswith("machine:") and "model" not in out
    assert "note: skipped nvit_b: cannot be built" in err and "error: no model could be compared" in err


def test_a_skip_note_of_a_multi_line_error_ends_with_the_commands_advice(capsys):
    """nvit_b without dims: the note used to stop at "... or pass dims=..., with one of:"; then it listed the
    error's later lines, Python calls (timm.create_model(..., dims=...), KNOWN_DIMS); now the way the command
    compares it (since 2026-11-25, found by an audit)."""
    code, out, err = _cli(capsys, "nvit_b", "--no-speed")
    note = next(line for line in err.splitlines() if line.startswith("note: skipped nvit_b"))
    assert code == 1 and "with one of:" not in note and "timm.create_model" not in note
    assert note.endswith("`vitzoo convert CHECKPOINT --model nvit_b --out DIR`, then compare local-dir:DIR"), note


def test_a_model_that_asserts_without_a_message_is_skipped_naming_the_line(capsys):
    """Found by an audit: halonet26t at 96 px (its halo blocks need a multiple of 8 at stride 32) was skipped with
    "AssertionError: " and nothing after it."""
    code, out, err = _cli(capsys, "halonet26t", "--img-size", "96", "--no-speed")
    note = next(line for line in err.splitlines() if line.startswith("note: skipped halonet26t"))
    assert code == 1 and re.fullmatch(r"note: skipped halonet26t: cannot run at this input size: AssertionError: "
                                      r"raised without a message at timm/layers/halo_attn\.py:\d+: "
                                      r"_assert\(H % self\.block_size == 0, ''\)", note), note


def test_params_at_another_size_are_the_rebuilt_models_beside_the_papers():
    """docs/flops-and-compare.md: a model rebuilt for another size may have other params (a ViT's position
    embedding), while the paper's params are still shown. Hand count: DeiT-T at 224 has 5,717,416 params; at 64 its
    position embedding holds 16 instead of 196 patch positions of 192 channels."""
    row, = compare(["deit_tiny_patch16_224"], img_size=64, speed=False)
    assert row["params"] == 5_717_416 - (196 - 16) * 192 == 5_682_856
    assert row["paper_params"] == PAPER_NUMBERS["deit_tiny_patch16_224"].params and row["paper_flops"] is None


def test_an_empty_list_of_models_is_an_error_not_the_default_set():
    """Found by an audit: compare([]) (a filter that matched nothing) ran the 15 default models."""
    with pytest.raises(ValueError, match=r"^compare\(\) got an empty list of models; pass models=None"):
        compare([], speed=False)
    # any iterable of names, a generator too (found by a review: "object of type 'generator' has no len()")
    assert [row["model"] for row in compare((m for m in ["resnet18"]), img_size=32, speed=False)] == ["resnet18"]


def test_tagged_name_builds_without_download(capsys, monkeypatch):
    def no_download(*a, **k):
        raise AssertionError("compare must not download weights")

    monkeypatch.setattr("timm.models._builder.load_pretrained", no_download)
    code, out, err = _cli(capsys, "deit_tiny_patch16_224.fb_in1k", "--no-speed", "--format", "json")
    assert code == 0, err
    (row,) = json.loads(out)
    assert row["model"] == "deit_tiny_patch16_224.fb_in1k" and row["paper_flops"] == 1.3e9
    code, _, err = _cli(capsys, "deit_tiny_patch16_224.no_such_tag", "--no-speed")
    assert code == 2 and "unknown pretrained tag 'no_such_tag'" in err and "fb_in1k" in err


def test_csv_and_markdown_parse(capsys):
    rows = compare(["shvit_s1", "efficientvit_m2"], speed=False)
    parsed = list(csv.DictReader(io.StringIO(format_rows(rows, "csv"))))
    assert [r["model"] for r in parsed] == ["shvit_s1", "efficientvit_m2"]
    assert int(parsed[0]["flops"]) == 241_400_128 and parsed[0]["input_size"] == "3x224x224"

    lines = format_rows(rows, "md").splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert lines[1].replace("|", "").replace("-", "") == ""
    body = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    assert len(body) == 2 and all(len(r) == len(header) for r in body)
    assert body[0][header.index("FLOPs (M)")] == "241.40"

    code, out, _ = _cli(capsys, "shvit_s1", "--no-speed", "--format", "csv")  # the CLI path of the same formatter
    assert code == 0 and list(csv.DictReader(io.StringIO(out)))[0]["flops"] == "241400128"
    code, out, _ = _cli(capsys, "shvit_s1", "--no-speed")  # rich table
    assert code == 0 and "shvit_s1" in out and "241.40" in out and "machine:" in out


def test_img_size_and_default_set():
    (row,) = compare(["deit_tiny_patch16_224"], img_size=160, speed=False)
    assert row["input_size"] == [3, 160, 160]
    # DeiT-T at 160: 100 patches + cls = 101 tokens (600,517,824 by hand; 1,258,411,200 at 224)
    tokens = 101
    expected = vit_macs(192, [3] * 12, [64] * 12, [768] * 12, tokens, classifiers=1, patches=100)
    assert row["flops"] == expected + layer_norm_flops(12, tokens, 192) == 600_517_824
    assert set(DEFAULT_MODELS) >= {"shvit_s1", "shvit_s4", "revit_t", "revit_s", "deit_base_patch16_224"}
    assert all(name in PAPER_NUMBERS for name in DEFAULT_MODELS)
    assert resolve_name("shvit_s4") == ("shvit_s4", None)


def test_img_size_rebuilds_the_zoo_vits():
    # ReViT, like DeiT, has a position embedding for one input size: compare must build it for --img-size
    (row,) = compare(["revit_t"], img_size=160, speed=False)
    assert row["input_size"] == [3, 160, 160]
    # 100 patches + cls + distillation token = 102 tokens; two classifier heads
    emb, heads, qk, mlp, _ = REVIT["revit_t"]
    expected = vit_macs(emb, heads, qk, mlp, tokens=102, classifiers=2, patches=100)
    assert row["flops"] == expected + layer_norm_flops(len(heads), 102, emb)


def test_non_square_img_size_from_the_command_line_and_the_api(capsys, monkeypatch):
    """--img-size HxW (before: square only; an H x W comparison needed the Python API or a local-dir: config)."""
    code, out, err = _cli(capsys, "deit_tiny_patch16_224", "--img-size", "96x160", "--no-speed", "--format", "json")
    (row,) = json.loads(out)
    tokens = 6 * 10 + 1  # 6 x 10 patches + cls
    expected = vit_macs(192, [3] * 12, [64] * 12, [768] * 12, tokens, classifiers=1, patches=60)
    assert code == 0 and row["input_size"] == [3, 96, 160]
    assert row["flops"] == expected + layer_norm_flops(12, tokens, 192)
    assert row["params"] == 5_717_416 - (196 - 60) * 192  # the 224 model's, less the position embeddings' rows
    (same,) = compare(["deit_tiny_patch16_224"], img_size=(96, 160), speed=False)
    assert same["flops"] == row["flops"]
    code, out, _ = _cli(capsys, "shvit_s1", "--img-size", "64X64", "--no-speed", "--format", "csv")
    assert code == 0 and list(csv.DictReader(io.StringIO(out)))[0]["input_size"] == "3x64x64"

    monkeypatch.setattr("vitzoo.compare._build", lambda *a, **k: pytest.fail("built before checking the arguments"))
    for value, message in (("0x64", "sides must be >= 1, got '0x64'"), ("-8", "sides must be >= 1, got '-8'"),
                           ("64x", "expects N (for N x N) or HxW, e.g. 224 or 96x160; got '64x'"),
                           ("3x64x64", "expects N (for N x N) or HxW, e.g. 224 or 96x160; got '3x64x64'")):
        with pytest.raises(SystemExit) as info:  # argparse's exit, with the usage
            cli.main(["compare", "shvit_s1", "--img-size", value, "--no-speed"])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.rstrip().endswith(f"error: argument --img-size: {message}"), err
    with pytest.raises(TypeError, match=r"must be an int or a pair \(H, W\), got 3 values: \(3, 64, 64\)"):
        compare(["shvit_s1"], img_size=(3, 64, 64), speed=False)
    with pytest.raises(ValueError, match=r"^img_size \(--img-size\) must be >= 1, got 0$"):
        compare(["shvit_s1"], img_size=(64, 0), speed=False)


def test_paper_cells_only_at_the_papers_input_size(capsys):
    s4_at_256, s4_at_224 = compare(["shvit_s4"], speed=False) + compare(["shvit_s4"], img_size=224, speed=False)
    assert s4_at_256["input_size"] == [3, 256, 256] and s4_at_256["paper_img_size"] == 256
    assert (s4_at_256["paper_flops"], s4_at_256["paper_top1"], s4_at_256["note"]) == (986e6, 79.4, "")
    assert s4_at_224["paper_flops"] is None and s4_at_224["paper_top1"] is None
    assert s4_at_224["paper_params"] == 16.5e6 and "paper FLOPs and top-1 are at 256x256" in s4_at_224["note"]
    code, out, err = _cli(capsys, "shvit_s1", "--img-size", "160", "--no-speed", "--format", "json")
    (row,) = json.loads(out)
    assert code == 0 and row["paper_flops"] is None and row["paper_params"] == 6.3e6
    assert "note: shvit_s1: paper FLOPs and top-1 are at 224x224, not shown" in err


def test_paper_cells_only_for_the_papers_1000_classes(capsys):
    """Found by an audit: an ImageNet-21k head (11,221 classes, 18.6 M params) was shown beside the paper's 5.4 M /
    217 M / 75.2 % of the ImageNet-1k MobileNetV3-Large."""
    code, out, err = _cli(capsys, "mobilenetv3_large_100.miil_in21k", "mobilenetv3_large_100", "--no-speed",
                          "--format", "json")
    in21k, in1k = json.loads(out)
    assert code == 0 and in21k["params"] - in1k["params"] == 1280 * (11221 - 1000) + (11221 - 1000)  # the head
    assert in21k["paper_flops"] is None and in21k["paper_params"] is None and in21k["paper_top1"] is None
    assert in1k["paper_params"] is not None and in1k["paper_flops"] is not None
    assert ("note: mobilenetv3_large_100.miil_in21k: paper numbers are for the 1000-class ImageNet-1k model; this "
            "one has 11221 classes, not shown") in err


def test_header_names_the_threads_the_timing_ran_with(fake_deploy, capsys):
    """Found by an audit: `--threads 1` on a 2-thread process printed "2 threads" (the count after the caller's
    setting was restored); each measured row now records its count too."""
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    code, out, err = _cli(capsys, "shvit_s1", "--img-size", "32", "--batch", "1", "--rounds", "1", "--threads",
                          str(other), "--backends", "eager", "--format", "json", "--device", "cpu", "--device", "cpu")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 1  # a device given twice is measured once
    assert rows[0]["threads"] == other
    plural = "" if other == 1 else "s"
    header = next(line for line in err.splitlines() if line.startswith("machine: "))
    assert f", {other} thread{plural};" in header and torch.get_num_threads() == before


def test_skipped_models_are_reported(monkeypatch):
    import vitzoo.compare as mod

    monkeypatch.setattr(mod, "DEFAULT_MODELS", ("shvit_s1", "not_a_registered_model"))
    with pytest.warns(UserWarning, match="skipped not_a_registered_model"):
        rows = compare(speed=False)
    assert [r["model"] for r in rows] == ["shvit_s1"]


def test_names_with_markup_and_pipes_render_verbatim():
    """A weights folder may be called 'a[/b]' or 'p|q': rich must not read it as markup, markdown not as a cell."""
    import re

    rows = compare(["shvit_s1"], speed=False)
    for name in ("local-dir:/w/a[/b]", "local-dir:/w/c[bold]", "local-dir:/w/p|q"):
        renamed = [dict(rows[0], model=name)]
        assert name in format_rows(renamed, "table")
        lines = format_rows(renamed, "md").splitlines()
        cells = re.split(r"(?<!\\)\|", lines[2].strip().strip("|"))
        assert len(cells) == len(lines[0].strip("|").split("|"))
        assert cells[0].strip() == name.replace("|", "\\|")


def test_ops_without_a_flop_formula_are_a_note_in_every_format():
    """Found by an audit: only --format json carried ``uncounted``, so a count missing real work looked complete."""
    from vitzoo.compare import _row
    from vitzoo.flops import FlopReport

    report = FlopReport(total=10, params=1, params_fused=1, input_size=(3, 8, 8),
                        uncounted={"aten::topk": 2, "aten::add": 3})
    row = _row("mymodel", report, None, None)
    assert row["note"] == "FLOPs leave out ops with no formula here: aten::topk x2"  # aten::add: by convention
    report.uncounted = {"aten::add": 3, "aten::softmax": 1}
    assert _row("mymodel", report, None, None)["note"] == ""


def test_batchnorm_layers_the_fused_count_keeps_are_a_note_and_a_json_key(capsys):
    """resnetv2_50 is pre-activation: each block's first BatchNorm follows an addition, so 17 of them cannot fold
    (hand count: 16 blocks' norm1, and the final norm after the last addition; its stem conv's output goes to a max
    pool first). Before 2026-11-25 the fused count had their work with no word on it."""
    assert cli.main(["compare", "resnetv2_50", "--no-speed", "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert len(row["unfolded_norms"]) == 17 and "norm" in row["unfolded_norms"]
    assert all(f"stages.{s}.blocks.{b}.norm1" in row["unfolded_norms"]
               for s, blocks in enumerate((3, 4, 6, 3)) for b in range(blocks))
    assert row["note"].startswith("17 BatchNorm layers not folded in the fused count (first: "
                                  "stages.0.blocks.0.norm1, its input is the output of stem.pool (MaxPool2d), not "
                                  "of a Conv2d / Linear")
    shvit_row = compare(["shvit_s1"], speed=False)[0]
    assert shvit_row["unfolded_norms"] == {} and shvit_row["note"] == ""
    assert "unfolded_norms" not in format_rows([shvit_row], "csv").splitlines()[0]


def test_throughput_is_batch_over_the_median_latency_also_for_an_even_number_of_rounds():
    from vitzoo.speed import Timing
    timing = Timing(batch_size=8, calls=1, seconds_per_call=[0.1, 0.2, 0.4, 0.8])
    assert timing.latency_ms == pytest.approx(300.0)  # median of the two middle rounds
    assert timing.throughput == pytest.approx(8 / 0.3)  # not the median of 80, 40, 20, 10 img/s (30)


def test_names_are_all_checked_before_building_and_duplicates_compared_once(monkeypatch, capsys):
    import vitzoo.compare as compare_module

    built = []
    real_create = compare_module.create
    monkeypatch.setattr(compare_module, "create", lambda name, **kw: built.append(name) or real_create(name, **kw))
    assert cli.main(["compare", "resnet18", "SHVIT_S1X", "--no-speed"]) == 2
    assert built == [] and "closest matches: shvit_s1" in capsys.readouterr().err
    assert cli.main(["compare", "shvit_s1", "shvit_s1", "--no-speed", "--img-size", "64", "--format", "json"]) == 0
    assert [r["model"] for r in json.loads(capsys.readouterr().out)] == ["shvit_s1"] and built == ["shvit_s1"]
    assert cli.main(["compare", "shvit_s1", "--batch", "0"]) == 2
    assert "batch_size (--batch) must be >= 1, got 0" in capsys.readouterr().err


def test_markdown_has_the_fastest_paths_latency(fake_deploy):
    rows = compare(["shvit_s1"], img_size=64, batch_size=2, rounds=1, threads=1, devices=["cpu"], backends=["eager"])
    header = format_rows(rows, "md").splitlines()[0]
    assert "| ms/batch fastest |" in header


def test_paper_params_have_one_decimal_in_md_and_table():
    # hand values: params 6,330,808 / fused 6,308,660 (shvit/variants.py), SHViT paper Table 2: 241 M, 6.3 M, 72.8
    rows = compare(["shvit_s1"], speed=False)
    md = format_rows(rows, "md").splitlines()
    assert md[2] == "| shvit_s1 | 224x224 | 6.33 | 6.31 | 241.40 | 241 | 6.3 | 72.80 |"
    table = format_rows(rows, "table").splitlines()
    header = [c.strip() for c in next(ln for ln in table if "paper params (M)" in ln).strip("┃").split("┃")]
    (line,) = [ln for ln in table if "shvit_s1" in ln]
    cells = [c.strip() for c in line.strip("│").split("│")]
    assert cells[header.index("paper params (M)")] == "6.3"
    assert cells[header.index("paper FLOPs (M)")] == "241"


def test_unknown_ops_in_the_note_and_uncounted_are_sorted():
    from vitzoo.compare import _row
    from vitzoo.flops import FlopReport

    report = FlopReport(total=10, params=1, params_fused=1, input_size=(3, 8, 8),
                        uncounted={"aten::topk": 2, "aten::add": 3, "aten::fft_rfft2": 1})
    row = _row("mymodel", report, None, None)
    assert row["note"] == "FLOPs leave out ops with no formula here: aten::fft_rfft2 x1, aten::topk x2"
    assert list(row["uncounted"]) == ["aten::add", "aten::fft_rfft2", "aten::topk"]


def _expand_doc_names(token):
    """`shvit_s1..s4` -> s1, s2, s3, s4; `deit_tiny/small/base_patch16_224` -> the three DeiTs."""
    if ".." in token:
        first, last = token.split("..")
        prefix = first.rstrip("0123456789")
        start, stop = int(first[len(prefix):]), int(last.lstrip("abcdefghijklmnopqrstuvwxyz_"))
        return [f"{prefix}{i}" for i in range(start, stop + 1)]
    parts = token.split("/")
    if len(parts) == 1:
        return parts
    prefix, first = parts[0].rsplit("_", 1)
    last, suffix = (parts[-1].split("_", 1) + [""])[:2]
    suffix = "_" + suffix if suffix else ""
    return [f"{prefix}_{alt}{suffix}" for alt in [first, *parts[1:-1], last]]


def test_default_models_are_the_documented_default_set():
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "flops-and-compare.md").read_text()
    bullet = doc.split("* **Default set**:", 1)[1]
    sentence = bullet.split(".\n", 1)[0]  # "with no names, the zoo (...) is compared with ... and `fastvit_t8/t12`"
    names = [n for token in re.findall(r"`([^`]+)`", sentence) for n in _expand_doc_names(token)]
    assert names[:4] == ["shvit_s1", "shvit_s2", "shvit_s3", "shvit_s4"]
    assert len(names) == 15  # "the 15 default models" (make compare)
    assert list(DEFAULT_MODELS) == names


def test_closest_models_ignores_case():
    from vitzoo.models import closest_models

    assert closest_models("SHVIT_S1")[0] == "shvit_s1"
    assert closest_models("Efficientvit_M2.some_tag")[0] == "efficientvit_m2"


def test_closest_models_puts_names_that_share_the_start_first():
    """Similarity alone offered revit_t / nvit_t for `deit_t`, and PiT models for `shvit_s1_distilled`."""
    from vitzoo.models import closest_models

    assert closest_models("deit_t")[:2] == ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"]
    assert closest_models("shvit_s1_distilled")[0] == "shvit_s1"
    assert closest_models("SHViT-S4")[0] == "shvit_s4"
    assert closest_models("resnet")[:3] == ["resnet18", "resnet26", "resnet34"]
    assert closest_models("qqqqzz") == []
    assert closest_models("vit")[0] != "vit_base_mci_224" and closest_models("") == []  # too short to extend


def test_a_model_with_and_without_its_default_tag_is_one_row(capsys):
    """Found by an audit: `compare shvit_s1 shvit_s1.in1k` gave two rows of one model (in1k is its default tag);
    another tag of it is another row."""
    code, out, _ = _cli(capsys, "shvit_s1", "shvit_s1.in1k", "shvit_s1.in1k_official", "--no-speed", "--format",
                        "json", "--img-size", "64")
    assert code == 0 and [r["model"] for r in json.loads(out)] == ["shvit_s1", "shvit_s1.in1k_official"]


def test_a_plot_name_that_is_a_folder_is_a_usage_error(capsys, tmp_path, monkeypatch):
    """Found by an audit: `--plot pdir/` (a folder that does not exist) measured every model, then wrote a PNG file
    named pdir."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(["compare", "shvit_s1", "--plot", "pdir/"])
    assert info.value.code == 2
    assert "pdir/ names a folder; give a file name, e.g. --plot pdir/pareto.png" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_skip_notes_give_the_commands_advice(capsys, monkeypatch, tmp_path):
    """Found by an audit: a skipped nvit_t's note gave Python calls (dims=..., pretrained=True, KNOWN_DIMS), and an
    hf-hub: name offline huggingface_hub's bare "check your connection"."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, _, err = _cli(capsys, "shvit_s1", "nvit_t", "hf-hub:org/repo", "--no-speed", "--img-size", "64")
    assert code == 0
    nvit_note = next(line for line in err.splitlines() if "skipped nvit_t" in line)
    assert nvit_note.endswith("compare a folder converted from its checkpoint: `vitzoo convert CHECKPOINT --model "
                              "nvit_t --out DIR`, then compare local-dir:DIR"), nvit_note
    assert "dims=" not in nvit_note and "pretrained=True" not in nvit_note and "KNOWN_DIMS" not in nvit_note
    hub_note = next(line for line in err.splitlines() if "skipped hf-hub:org/repo" in line)
    assert "config.json of 'org/repo', which timm reads first for an hf-hub: name, is not in the Hub cache" \
        in hub_note and "HF_HUB_OFFLINE=1" in hub_note and "hf download org/repo config.json" in hub_note, hub_note


# ----------------------------------------------------------------------------------- found by the session-30 audit

def test_a_timing_lasts_min_time_even_when_the_first_call_is_slow(monkeypatch):
    """Found by an audit: the only warm-up call also chose how many calls a timing makes, and a path's first call is
    its slowest (the default path's is its first ever), so timings lasted 0.1 s, not the documented 0.15 s."""
    from vitzoo import compare as compare_module

    calls = []  # (start, end) of each call

    def slow_first():
        start = time.perf_counter()
        time.sleep(0.3 if not calls else 0.002)
        calls.append((start, time.perf_counter()))

    monkeypatch.setattr(compare_module, "_runners", lambda *a, **k: {compare_module.DEFAULT_PATH: slow_first})
    (row,) = compare(["shvit_s1"], img_size=32, batch_size=1, rounds=1, threads=1, devices="cpu", backends="eager")
    timed = calls[2:]  # after one untimed call and one that calibrates
    # as many calls as 0.15 s takes at the calibrating call's duration (a 2 ms sleep, longer on a loaded host); the old
    # code calibrated on the 0.3 s first call and timed one call
    calibrating = calls[1][1] - calls[1][0]
    assert len(timed) >= 0.9 * min(500, 0.15 / calibrating), f"{len(timed)} calls after a {calibrating:.4f} s call"
    assert 1 / row["throughput"] == pytest.approx(sum(e - s for s, e in timed) / len(timed), rel=0.2)


def test_compare_leaves_the_callers_random_stream_as_it_was(fake_deploy):
    """Found by an audit: compare() drew the models' random weights and inputs from the caller's seeded stream (a
    seeded run changed by comparing first), as count_flops once did."""
    for kwargs in (dict(speed=False), dict(batch_size=1, rounds=1, threads=1, devices="cpu", backends="eager")):
        torch.manual_seed(0)
        compare(["shvit_s1"], img_size=32, **kwargs)
        after = torch.rand(3)
        torch.manual_seed(0)
        assert torch.equal(after, torch.rand(3)), kwargs


def test_long_names_are_never_cut_in_the_table(capsys):
    """Found by an audit: the table was drawn 220 columns wide, so a long hf-hub: / local-dir: name ended in "…"
    and two tags of one architecture could look the same."""
    (row,) = compare(["shvit_s1"], img_size=32, speed=False)
    names = ["hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k_" + "x" * 150 + tag for tag in ("a", "b")]
    table = format_rows([{**row, "model": name} for name in names], "table")
    assert all(name in table for name in names) and "…" not in table


def test_the_speed_columns_stay_when_every_timing_failed(fake_deploy, monkeypatch):
    """Found by an audit: when no model could be timed (out of memory at the batch), the table dropped the device,
    batch and speed columns and looked like --no-speed output."""
    from vitzoo import compare as compare_module

    def measure(runners, batch, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(compare_module, "measure", measure)
    rows = compare(["shvit_s1"], img_size=32, batch_size=1, rounds=1, threads=1, devices="cpu", backends="eager")
    assert rows[0]["throughput"] is None
    header = format_rows(rows, "md").splitlines()[0]
    assert "| device |" in header and "| img/s |" in header
    no_speed = format_rows(compare(["shvit_s1"], img_size=32, speed=False), "md").splitlines()[0]
    assert "device" not in no_speed and "img/s" not in no_speed


def test_a_plot_of_two_devices_has_a_front_per_device_and_marks_default_path_points(capsys, monkeypatch, tmp_path):
    """Found by an audit: with cpu and cuda rows one Pareto front was drawn, on which no CPU row could be (each is
    beaten by its own GPU row); and a model whose deployed paths all failed was plotted at its default path's
    speed under the "fastest path" label, unmarked."""
    rows = []
    for device, speed in (("cpu", 1.0), ("cuda", 50.0)):
        for name, flops, tput, fastest in (("a", 1e9, 100.0, 150.0), ("b", 2e9, 80.0, None)):
            (row,) = compare(["shvit_s1"], img_size=32, speed=False)
            rows.append({**row, "model": name, "flops": flops, "device": device, "batch_size": 1, "threads": 1,
                         "throughput": tput * speed, "throughput_fastest": fastest and fastest * speed})
    monkeypatch.setattr("vitzoo.compare._compare", lambda *a, **k: (rows, {}))
    plotted = {}
    monkeypatch.setattr("vitzoo.plot.write_pareto_plot",
                        lambda points, path, **k: plotted.update(points=points, **k) or path)
    code, out, err = _cli(capsys, "shvit_s1", "--plot", str(tmp_path / "p.png"))
    assert code == 0, err
    assert [p[0] for p in plotted["points"]] == ["a", "b (default path)", "a (cuda)", "b (cuda) (default path)"]
    assert [p[2] for p in plotted["points"]] == [150.0, 80.0, 7500.0, 4000.0]
    assert plotted["groups"] == ["cpu", "cpu", "cuda", "cuda"]

    from vitzoo.plot import pareto_figure
    fig, _ = pareto_figure(plotted["points"], groups=plotted["groups"])
    lines = {line.get_label(): list(line.get_xdata()) for line in fig.axes[0].get_lines()}
    assert lines == {"Pareto front (cpu)": [1.0, 2.0], "Pareto front (cuda)": [1.0, 2.0]}
    fig, _ = pareto_figure(plotted["points"])  # without groups: the GPU rows dominate
    assert {line.get_label(): list(line.get_xdata()) for line in fig.axes[0].get_lines()} == {
        "Pareto front": [1.0, 2.0]} and len(pareto_front(plotted["points"])) == 2
    with pytest.raises(ValueError, match="groups must name one group per point: 1 groups for 4 points"):
        pareto_figure(plotted["points"], groups=["cpu"])


def test_paper_numbers_are_ints_as_flops_is(capsys):
    """Found by an audit: "paper_flops": 241000000.0 beside "flops": 241400128 in JSON and CSV."""
    code, out, _ = _cli(capsys, "shvit_s1", "mobilenetv3_large_100", "--no-speed", "--format", "json")
    rows = json.loads(out)
    pairs = [(r["paper_flops"], r["paper_params"]) for r in rows]
    assert code == 0 and pairs == [(241_000_000, 6_300_000), (217_000_000, 5_400_000)]
    assert all(type(r["paper_flops"]) is int and type(r["paper_params"]) is int for r in rows)
    code, out, _ = _cli(capsys, "shvit_s1", "--no-speed", "--format", "csv")
    assert list(csv.DictReader(io.StringIO(out)))[0]["paper_flops"] == "241000000"


def test_cuda_and_cuda_0_are_one_device_timed_at_the_gpu_batch(monkeypatch):
    """Found by an audit: compare(devices="cuda:0") timed at the CPU's batch 16 (the default batch was looked up
    by the device's spelling), and devices=["cuda", "cuda:0"] measured one GPU twice."""
    import contextlib

    from vitzoo import compare as compare_module

    measured = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    forked = []
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices: forked.append(devices) or contextlib.nullcontext())
    monkeypatch.setattr(compare_module, "_measure_on",
                        lambda device, built, batch, *a: measured.append((device, batch)) or [])
    compare(["shvit_s1"], img_size=32, devices=["cuda:0", "cuda", "cpu", "cpu"], backends="eager")
    assert measured == [("cuda:0", 256), ("cpu", 16)] and forked[0] == [0]  # (count_flops forks the CPU's too)
    forked.clear()
    compare(["shvit_s1"], img_size=32, devices=["cuda"], speed=False)
    assert forked and [0] not in forked  # counts only: the GPU's generator is not touched (nor CUDA started)
    # found by the review: a GPU index beyond the machine's was a raw IndexError from fork_rng
    with pytest.raises(ValueError, match=r"^device .cuda:1.: this machine has 1 CUDA device\(s\) "
                                         r"\(cuda:0 .. cuda:0\)$"):
        compare(["shvit_s1"], img_size=32, devices=["cuda:1"], speed=False)


# --- found by an audit (2026-11-26) ------------------------------------------------------------------------------


def test_counts_beyond_what_can_run_are_usage_errors(capsys, monkeypatch):
    """--batch / --img-size 10**20 ended in torch's overflow traceback (or a note carrying c10's C++ backtrace), and
    --threads 10**5 was taken (libgomp ran out of memory starting them): each is refused before anything is built."""
    monkeypatch.setattr("vitzoo.compare._build", lambda *a, **k: pytest.fail("built before checking the arguments"))
    huge = str(10 ** 20)
    for flag, argument in (("--batch", "batch_size"), ("--img-size", "img_size")):
        code, out, err = _cli(capsys, "shvit_s1", flag, huge)
        assert code == 2 and out == ""
        assert f"{argument} ({flag}) must be at most 2147483647, got {huge}" in err, err
    cpus = len(os.sched_getaffinity(0))
    code, out, err = _cli(capsys, "shvit_s1", "--threads", str(cpus + 1))
    expected = f"threads (--threads) must be at most {cpus} (this process may use {cpus} logical CPUs), got {cpus + 1}"
    assert code == 2 and expected in err, err


def test_a_numpy_int_size_and_a_name_that_is_no_string():
    """img_size=np.int64(64) skipped every model ("'numpy.int64' object is not iterable"); compare([None]) failed
    with an AttributeError. resnet18 at 64x64 counts as at 224x224 scaled by the pixels, (64/224)**2 of 1,819,066,368
    MACs, less what the 7x7 stem's padding loses: count_flops is the reference."""
    import numpy as np
    from vitzoo.flops import count_flops

    (row,) = compare(["resnet18"], img_size=np.int64(64), speed=False, progress=False)
    assert row["flops"] == count_flops("resnet18", 64).total and row["input_size"] == [3, 64, 64]
    with pytest.raises(TypeError, match=r"^model names must be strings, got None \(NoneType\)$"):
        compare([None], speed=False)


@pytest.mark.parametrize("prefix", ["hf_hub:", "HF-HUB:"])
def test_every_spelling_of_the_hub_prefix_has_its_config_checked(monkeypatch, prefix):
    """timm reads hf_hub: and any case of hf-hub:; only the literal 'hf-hub:' got the config check (offline, the
    others gave huggingface_hub's raw LocalEntryNotFoundError after 31 s of retries)."""
    from vitzoo import hub, models

    class Checked(Exception):
        pass

    def hub_config(repo, weights=True):
        raise Checked(repo, weights)

    monkeypatch.setattr(hub, "hub_config", hub_config)
    with pytest.raises(Checked) as info:
        models.create(f"{prefix}timm/resnet18.a1_in1k")
    assert info.value.args == ("timm/resnet18.a1_in1k", False)


def test_the_threads_bound_is_the_cpus_this_process_may_use(capsys, monkeypatch):
    """Found in review: the machine's CPU count was the bound, so a process limited to one CPU (taskset, a cgroup
    cpuset) could ask for two threads."""
    monkeypatch.setattr("vitzoo.compare._build", lambda *a, **k: pytest.fail("built before checking the arguments"))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    code, out, err = _cli(capsys, "shvit_s1", "--threads", "2")
    assert code == 2 and "threads (--threads) must be at most 1 (this process may use 1 logical CPUs), got 2" in err
