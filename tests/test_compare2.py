"""`vitzoo compare`: defects found by an audit (2026-11-26), each checked against an independent reference."""
import threading
import time

import torch

from test_compare import _stand_in_for_deploy  # tests/test_compare.py
from vitzoo.compare import compare


def test_a_backend_failing_without_a_message_is_a_note_not_the_end_of_the_comparison(monkeypatch):
    """An exporter's bare ``assert`` (an error whose message is empty) took the first of no lines: an IndexError
    that ended the whole comparison, every other row and backend with it."""
    def deploy(model, example_input=None, backend="eager", rtol=0.0):
        if backend == "torchscript":
            raise AssertionError()  # as `assert cond` raises it
        return model.eval()

    _stand_in_for_deploy(monkeypatch, deploy)
    (row,) = compare(["resnet18"], img_size=32, batch_size=1, rounds=1, threads=1, devices=["cpu"],
                     backends=["torchscript", "eager"])
    assert set(row["throughput_by_path"]) == {"default", "eager"} and row["fastest_backend"] == "eager"
    assert "torchscript failed on cpu: AssertionError: raised without a message at " in row["note"]
    assert "test_compare2.py" in row["note"]  # where it was raised: the stand-in's line


def _spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_the_calibrating_call_also_starts_once_the_process_is_idle(tmp_path):
    """The call that sets the calls per timing is timed: with settling it waits, like every round's window, for the
    spin the call before it left behind (an ONNX Runtime pool's). It ran at once after the warm-up call (or another
    path's calibration), inside that spin, and so chose too few calls for ``min_time``."""
    from vitzoo.speed import measure, wait_until_idle

    starts = []

    def spinner():  # returns at once, leaving 0.4 s of CPU spinning behind (as a runtime's thread pool does)
        starts.append(time.perf_counter())
        threading.Thread(target=_spin, args=(0.4,), daemon=True).start()

    wait_until_idle()
    measure({"spinner": spinner}, batch_size=1, rounds=1, warmup=2, min_time=0.0, max_calls=1, progress=False)
    wait_until_idle()  # leave no spinning thread to the next test
    assert len(starts) == 3  # warm-up, calibration, one round
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert min(gaps) >= 0.4, gaps  # the calibration came 0 s after the warm-up call


class _Norms(torch.nn.Module):
    """LayerNorm over a 6-D tensor (windows of windows) and over a 1-D one, GroupNorm and BatchNorm over 6-D:
    all run in torch."""

    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(5)
        self.ln_plain = torch.nn.LayerNorm(5, elementwise_affine=False)
        self.gn = torch.nn.GroupNorm(2, 4)

    def forward(self, x):  # x: [2, 4, 3, 5]
        six = x.reshape(2, 1, 4, 1, 3, 5)
        a = self.ln(six)
        b = self.ln_plain(x[0, 0, 0])
        c = self.gn(six.reshape(2, 4, 1, 1, 3, 5))
        d = torch.nn.functional.batch_norm(six, torch.zeros(1), torch.ones(1), torch.ones(1), torch.zeros(1))
        return a, b, c, d


def test_norms_over_any_rank_are_counted_as_fvcore_counts_them():
    """fvcore's norm handle asserts 2 to 5 dims: a model with a LayerNorm over a 6-D or a 1-D tensor could not be
    counted at all (`vitzoo compare` skipped it as one that "cannot run at this input size")."""
    from vitzoo.flops import count_flops

    model = _Norms()
    with torch.no_grad():
        model(torch.randn(2, 4, 3, 5))  # torch runs every one of them
    report = count_flops(model, (4, 3, 5), batch_size=2, fused=False)
    n = 2 * 4 * 3 * 5  # elements of the input
    # fvcore's convention: LayerNorm / GroupNorm 5 per element with the affine weight, 4 without; an eval-mode
    # BatchNorm 2 per element with its weight
    assert report.by_operator == {"layer_norm": 5 * n + 4 * 5, "group_norm": 5 * n, "batch_norm": 2 * n}
    assert report.total == 5 * n + 4 * 5 + 5 * n + 2 * n


def test_the_table_prints_to_an_output_that_cannot_encode_box_drawing(monkeypatch, capsys):
    """Found by a review: with a Latin-1 or ASCII stdout (PYTHONIOENCODING, Windows' cp1252 redirected to a file)
    the table's box drawing ended in a UnicodeEncodeError traceback after all the work."""
    import io

    from vitzoo import cli

    for encoding in ("latin-1", "ascii"):
        raw = io.BytesIO()
        stdout = io.TextIOWrapper(raw, encoding=encoding)
        monkeypatch.setattr("sys.stdout", stdout)
        assert cli.main(["compare", "shvit_s1", "--no-speed"]) == 0
        stdout.flush()
        text = raw.getvalue().decode(encoding)
        assert "| shvit_s1 " in text and "241.40" in text and text.isascii()
    monkeypatch.undo()
    assert cli.main(["compare", "shvit_s1", "--no-speed"]) == 0  # a UTF-8 output keeps rich's box drawing
    assert "┃ model" in capsys.readouterr().out


def test_arguments_found_by_a_review(tmp_path, capsys):
    """A torch.device as compare()'s device; a folder as --plot names a file in it; --no-progress writes no bar."""
    from vitzoo import cli
    from vitzoo.compare import compare

    rows = compare(["resnet18"], img_size=32, batch_size=1, rounds=1, devices=torch.device("cpu"),
                   backends=["eager"])  # was "'torch.device' object is not iterable"
    assert [r["device"] for r in rows] == ["cpu"] and rows[0]["throughput"] > 0
    fast = ["--img-size", "32", "--batch", "1", "--rounds", "1", "--backends", "eager"]
    assert cli.main(["compare", "resnet18", *fast, "--plot", str(tmp_path)]) == 1
    assert f"{tmp_path} is a folder; give a file path for the output, e.g. {tmp_path / 'pareto.png'}." \
        in capsys.readouterr().err  # was "(e.g. DIR/out...)"
    assert cli.main(["compare", "resnet18", *fast, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "measuring" not in err
