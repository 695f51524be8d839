"""The `vitzoo` command line itself: version, sub-command listing."""
import json
import re
import subprocess
import sys

import pytest
import timm
import torch

import vitzoo
from vitzoo.cli import COMMANDS, main


def test_version_names_the_package_and_its_torch_and_timm(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"vitzoo {vitzoo.__version__} (torch {torch.__version__}, timm {timm.__version__})"
    assert re.fullmatch(r"\d+\.\d+\.\d+", vitzoo.__version__)


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_python_dash_m_vitzoo_runs_the_cli_and_passes_its_exit_code():
    """`python -m vitzoo compare` is documented beside `vitzoo compare`: same output, and the command's exit code
    (2 for a usage error) reaches the shell."""
    run = [sys.executable, "-m", "vitzoo", "compare", "shvit_s1", "--no-speed", "--format", "json", "--img-size",
           "64"]
    done = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)
    assert row["model"] == "shvit_s1" and row["input_size"] == [3, 64, 64] and row["throughput"] is None
    bad = subprocess.run([sys.executable, "-m", "vitzoo", "compare", "--batch", "0"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "--batch" in bad.stderr and bad.stdout == ""


def test_sigterm_unwinds_the_command_so_its_temporary_files_go(monkeypatch, capsys, tmp_path):
    """Found by an audit: `kill` / `timeout` / `docker stop` (SIGTERM) during `vitzoo convert` left its hidden staging
    folders behind (Ctrl-C cleaned up). SIGTERM now unwinds the command like Ctrl-C; exit code 143."""
    import os
    import signal
    import tempfile

    seen = []

    def run_then_killed(args):
        with tempfile.TemporaryDirectory(dir=tmp_path, prefix=".partial-") as staging:
            seen.append(staging)
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not stop the command")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr("vitzoo.export.run", run_then_killed)
    assert main(["export", "shvit_s1"]) == 143
    assert capsys.readouterr().err == "vitzoo export: terminated (SIGTERM)\n"
    assert len(seen) == 1 and list(tmp_path.iterdir()) == []  # the staging folder was removed on the way out
    assert signal.getsignal(signal.SIGTERM) == before  # the caller's handler is back


@pytest.mark.parametrize("env", [{}, {"WORLD_SIZE": "2"}, {"TORCHELASTIC_RUN_ID": "abc"}, {"WORLD_SIZE": "1"}])
def test_sigterm_is_left_to_a_distributed_launcher(monkeypatch, env):
    """Found by an audit: under torchrun a worker blocked in a collective runs no Python handler, so the SIGTERM
    handler above would keep it alive until the launcher's SIGKILL; there SIGTERM keeps its default."""
    import signal

    for name in ("WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    during = []
    monkeypatch.setattr("vitzoo.export.run", lambda args: during.append(signal.getsignal(signal.SIGTERM)))
    before = signal.getsignal(signal.SIGTERM)
    assert main(["export", "shvit_s1"]) == 0
    launched = env.get("WORLD_SIZE", "1") != "1" or "TORCHELASTIC_RUN_ID" in env
    assert (during == [before]) == launched and signal.getsignal(signal.SIGTERM) == before


def test_package_version_matches_the_installed_metadata():
    from importlib.metadata import version

    assert version("vitzoo") == vitzoo.__version__  # pyproject.toml and vitzoo/__init__.py agree


@pytest.mark.parametrize("error, code, message", [
    (PermissionError(13, "Permission denied", "/ro/x.onnx"), 1, "vitzoo export: error: [Errno 13] Permission denied"),
    (KeyboardInterrupt(), 130, "vitzoo export: interrupted"),
])
def test_os_errors_and_ctrl_c_are_one_line(monkeypatch, capsys, error, code, message):
    def failing_run(args):
        raise error

    monkeypatch.setattr("vitzoo.export.run", failing_run)
    assert main(["export", "shvit_s1"]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_hub_retry_chatter_is_kept_out_of_the_commands(monkeypatch, capsys, caplog):
    """Offline, huggingface_hub logs every retry (two lines each, five times); the command says it in one line."""
    import logging

    def run_with_retry_log(args):
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        return 0

    monkeypatch.setattr("vitzoo.export.run", run_with_retry_log)
    before = logging.getLogger("huggingface_hub").level
    with caplog.at_level(logging.WARNING):
        assert main(["export", "shvit_s1"]) == 0
    assert "Retrying" not in caplog.text + capsys.readouterr().err
    assert logging.getLogger("huggingface_hub").level == before  # restored for library use


@pytest.mark.parametrize("command", ["compare", "convert", "push", "finetune-det"])  # finetune-det: audit
def test_help_descriptions_are_plain_text(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert f"vitzoo {command}: " in out and "``" not in out


def test_first_line_is_the_first_non_empty_stripped_line():
    from vitzoo.messages import first_line

    assert first_line(RuntimeError("\n   cause of the error  \n\ndetails\nmore details\n")) == "cause of the error"
    assert first_line(ValueError("")) == first_line(ValueError(" \n \n")) == ""


# found by an audit: the commands printed only the first line of a library error, so the advice on the later lines
# ("To fix: ...", the alternatives after "with one of:") was lost


def test_error_message_summarises_a_load_state_dict_report():
    """torch lists every mismatched tensor on its own line (a ViT-S model given ViT-Ti weights: 150 lines); the
    one-line message gives counts and the first of each kind instead."""
    import torch.nn as nn

    from vitzoo.messages import error_message

    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4), nn.Linear(4, 5))
    state = {"0.weight": torch.zeros(3, 2), "0.bias": torch.zeros(3), "1.weight": torch.zeros(6, 3),
             "1.bias": torch.zeros(6), "x": torch.zeros(1), "y": torch.zeros(1), "z": torch.zeros(1),
             "w": torch.zeros(1)}
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict(state)
    assert error_message(info.value) == (
        "Error(s) in loading state_dict for Sequential: missing keys: 2 (2.weight, 2.bias); unexpected keys: 4 "
        "(x, y, z, ...); 2 tensors differ in shape (first: 1.weight, checkpoint [6, 3], model [4, 3])")


def test_error_message_keeps_the_advice_on_later_lines():
    from vitzoo.messages import error_message

    error = RuntimeError("Could not load weights for m: LocalEntryNotFoundError: not cached.\n"
                         "To fix: run `hf download org/m`; or use pretrained=False.")
    assert error_message(error) == ("Could not load weights for m: LocalEntryNotFoundError: not cached. To fix: run "
                                    "`hf download org/m`; or use pretrained=False.")
    listing = ValueError("m: dims unknown; pass dims=..., with one of:\n"
                         "  create('m', pretrained=True)  # reads them\n"
                         "  create('m', dims=d)  # random init\n"
                         "or record them once.")
    assert error_message(listing) == ("m: dims unknown; pass dims=..., with one of: create('m', pretrained=True)  # "
                                      "reads them; create('m', dims=d)  # random init; or record them once.")
    # a line that starts a sentence after one without a full stop
    assert error_message(OSError("no network\nSet HF_HUB_OFFLINE=1")) == "no network. Set HF_HUB_OFFLINE=1"
    assert error_message(ValueError("\n \n")) == ""


def test_error_message_drops_tracebacks_and_graph_dumps():
    from vitzoo.messages import error_message

    worker = RuntimeError('boom\nTraceback (most recent call last):\n  File "x.py", line 3, in f\n    g()\nKeyError: 1')
    assert error_message(worker) == "boom"
    graph = RuntimeError("cannot export the model:\ngraph(%x : Float(1, 3),\n      %w : Float(3)):\n  %y = mul(%x)")
    assert error_message(graph) == "cannot export the model:"
    # c10's C++ backtrace after a torch error's text (found by an audit: a compare note carried 20 frames of it)
    overflow = RuntimeError('randn(): failed to unpack the object at pos 3 with error "Overflow when unpacking long '
                            'long\nException raised from THPUtils_unpackLong at python_numbers.h:79 (most recent call '
                            'first):\nframe #0: c10::Error::Error(c10::SourceLocation) + 0x9d (0x7f in libc10.so)')
    assert error_message(overflow) == ('randn(): failed to unpack the object at pos 3 with error "Overflow when '
                                       'unpacking long long')
    # a message line that merely starts with "File" is text, not a traceback frame
    assert error_message(OSError('cannot read\nFile "w.pth" is empty.')) == 'cannot read. File "w.pth" is empty.'


def test_error_message_length_cap_keeps_the_cause_and_the_closing_advice():
    from vitzoo.messages import LINE_LIMIT, MESSAGE_LIMIT, error_message

    rows = [f"row {i:02d} " + "x" * 90 for i in range(40)]  # 100 characters each
    text = error_message(RuntimeError("\n".join(["the cause", *rows, "To fix: do this."])))
    assert text.startswith("the cause; row 00 ") and text.endswith("more lines]. To fix: do this.")
    kept = [r for r in rows if r in text]
    assert kept == rows[:len(kept)] and 0 < len(kept) < len(rows)  # the first rows, in order
    assert f"[{len(rows) - len(kept)} more lines]" in text
    assert len(text) <= MESSAGE_LIMIT
    # a line too long loses its middle: its start (the cause) and end (often advice) stay
    long_line = "cause: " + "y" * (LINE_LIMIT + 100) + " To fix: z."
    cut = error_message(RuntimeError(long_line))
    assert len(cut) == LINE_LIMIT and cut.startswith("cause: yyy") and cut.endswith("yyy To fix: z.")
    assert cut.count(" ... ") == 1 and set(cut.replace(" ... ", "")[7:-11]) == {"y"}


def test_error_message_adds_the_advice_of_a_cause_summarised_by_its_first_line():
    from vitzoo.messages import error_message

    cause = RuntimeError("Could not load weights for m from file w.pth: EOFError: truncated.\n"
                         "To fix: download it again.")
    try:
        try:
            raise cause
        except RuntimeError as e:  # a summary by the cause's first line, less its file name and full stop
            raise ValueError("could not load w.pth into backbone 'm': EOFError: truncated") from e
    except ValueError as e:
        summary = e
    assert error_message(summary) == ("could not load w.pth into backbone 'm': EOFError: truncated. To fix: download "
                                      "it again.")
    # a message that quotes the whole cause, or another summary of it, gets nothing added
    whole = ValueError(f"could not load: {cause}")
    whole.__cause__ = cause
    assert error_message(whole) == ("could not load: Could not load weights for m from file w.pth: EOFError: "
                                    "truncated. To fix: download it again.")
    other = ValueError("the file pickles Python objects")
    other.__cause__ = cause
    assert error_message(other) == "the file pickles Python objects"
    # advice of the message's own after the quote replaces the cause's (the command's, not Python's)
    own = ValueError("could not load w.pth into backbone 'm': EOFError: truncated; the file must hold m weights.")
    own.__cause__ = cause
    assert error_message(own) == str(own)


def test_cli_errors_name_the_option_not_the_python_argument(monkeypatch, capsys):
    """The shared output checks say ``force=True (--force)``; a command's error line says ``--force``."""
    def failing_run(args):
        raise FileExistsError("x.onnx already exists; refusing to overwrite it. Pass force=True (--force) to replace "
                              "it.")

    monkeypatch.setattr("vitzoo.export.run", failing_run)
    assert main(["export", "shvit_s1"]) == 1
    assert capsys.readouterr().err == ("vitzoo export: error: x.onnx already exists; refusing to overwrite it. Pass "
                                       "--force to replace it.\n")


def test_an_opset_the_exporter_does_not_write_is_a_usage_error_before_the_model_is_built(monkeypatch, capsys):
    """Found by an audit: `vitzoo export shvit_s1 --opset 16` built the model first and then exited with code 1 (a
    failure); an opset outside what torch's TorchScript-based exporter writes (17 to its newest) is a usage error."""
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as newest

    ran = []
    monkeypatch.setattr("vitzoo.export.run", lambda args: ran.append(args.opset) or 0)
    for opset, message in ((16, "opset 16 is too old: use --opset 17 or newer"),
                           (newest + 1, f"opset {newest + 1} is newer than this torch's ONNX exporter supports: use "
                                        f"--opset 17 to {newest}")):
        with pytest.raises(SystemExit) as info:
            main(["export", "shvit_s1", "--opset", str(opset)])
        out, err = capsys.readouterr()
        assert info.value.code == 2 and out == "" and ran == []
        assert err.startswith("usage: vitzoo export") and err.endswith(f"vitzoo export: error: argument --opset: "
                                                                       f"{message}\n")
    for opset in (17, newest):  # the ends of the range reach the command
        assert main(["export", "shvit_s1", "--opset", str(opset)]) == 0
    assert ran == [17, newest]


@pytest.mark.parametrize("argv", [
    ["export", "shvit_s1", "--bogus"], ["convert", "x.pth", "--model", "shvit_s1", "--out", "y", "--bogus"],
    ["compare", "--no-speed", "--bogus", "shvit_s1"], ["push", "w", "--repo", "org/name", "--bogus"],
    ["finetune-det", "--data", "d", "--bogus"], ["export", "shvit_s1", "extra"],
])
def test_an_unknown_argument_after_a_command_gets_that_commands_usage(monkeypatch, capsys, argv):
    """Found by an audit: argparse's top-level parser reported `vitzoo export shvit_s1 --bogus` with the top-level
    usage and "vitzoo: error:", not the command's."""
    monkeypatch.setattr(f"vitzoo.{'detection.finetune' if argv[0] == 'finetune-det' else argv[0]}.run",
                        lambda args: pytest.fail("the command ran"))
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    assert err.startswith(f"usage: vitzoo {argv[0]} ") and err.endswith(
        f"vitzoo {argv[0]}: error: unrecognized arguments: {'extra' if 'extra' in argv else '--bogus'}\n"), err


def test_an_unknown_option_before_the_command_gets_the_top_level_usage(capsys):
    """Found by a review: `vitzoo --bogus export m` was reported as an export argument, with export's usage."""
    with pytest.raises(SystemExit) as info:
        main(["--bogus", "export", "shvit_s1"])
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    assert err.startswith("usage: vitzoo [-h]") and err.endswith("vitzoo: error: unrecognized arguments: --bogus\n")
    with pytest.raises(SystemExit):  # the same unknown option before and after the command: the first is the top's
        main(["--bogus", "export", "shvit_s1", "--bogus"])
    assert capsys.readouterr().err.endswith("vitzoo: error: unrecognized arguments: --bogus\n")


@pytest.mark.parametrize("argv, says", [
    (["export", "shvit_s1", "--out", ""], "argument --out: needs a file name, e.g. --out shvit_s1.onnx"),
    (["export", "shvit_s1", "--out", " "], "argument --out: needs a file name"),
    (["export", "local-dir:w", "--out", "w/model.safetensors", "--force"],
     "argument --out: the output is an ONNX file, named *.onnx; got 'w/model.safetensors'"),
    (["export", "shvit_s1", "--out", "s1"], "argument --out: the output is an ONNX file, named *.onnx; got 's1'"),
    (["convert", "x.pth", "--model", "shvit_s1", "--out", ""], "argument --out: needs a name"),
    (["finetune-det", "--data", "d", "--out", ""], "argument --out: needs a name, e.g. --out runs/finetune-det"),
    (["push", "", "--repo", "org/name"], "argument folder: needs a name"),  # checked the current folder before
])
def test_an_empty_or_misnamed_output_is_a_usage_error(monkeypatch, capsys, tmp_path, argv, says):
    """Found by an audit: `finetune-det --out ""` trained into the current folder, `convert --out ""` asked for
    --force and then refused the current folder after reading the checkpoint, and `export --force --out` replaced a
    local-dir: folder's model.safetensors, its input, by an ONNX graph. Each is refused as the options are parsed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert says in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["model.safetensors", "w"]
    assert (tmp_path / "w" / "model.safetensors").read_bytes() == b"weights"


@pytest.mark.parametrize("args,code", [
    (["compare", "shvit_s9", "--no-speed"], 2),  # an unknown name: a usage error in every command
    (["export", "shvit_s9"], 2),
    (["convert", "{junk}", "--model", "shvit_s9", "--out", "{tmp}/o"], 2),
    (["export", "shvit_s1", "--out", "{tmp}/missing/s1.onnx"], 1),  # a refused output: a reported error
    (["convert", "{junk}", "--model", "shvit_s1", "--out", "{tmp}/o"], 1),  # a file that is no checkpoint
    (["finetune-det", "--data", "{tmp}/no-data", "--out", "{tmp}/o"], 1),  # before 2026-11-26: 2
    (["finetune-det", "--data", "{tmp}/no-data", "--out", "{tmp}/o", "--lr", "0"], 2),
    (["evaluate-det", "--data", "{tmp}/no-data", "--weights", "{junk}"], 1),
    (["evaluate-det", "--data", "{tmp}/no-data", "--weights", "{junk}", "--workers", "-1"], 2),
])
def test_exit_codes_are_one_rule_for_every_command(tmp_path, capsys, args, code):
    """docs/cli.md: 1 for a reported error, 2 for a usage error (argparse's, a value out of range, an unknown name),
    in every command (found by an audit: finetune-det gave 2 for every error)."""
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint\n")
    assert main([a.format(junk=junk, tmp=tmp_path) for a in args]) == code
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err, err


def test_a_reader_that_goes_away_is_no_error():
    """Found by an audit: `vitzoo compare ... | head` (the reader closes the pipe) printed "error: [Errno 32] Broken
    pipe" and exited 1. Now nothing is printed, and the exit code is a shell's for SIGPIPE, 141."""
    run = [sys.executable, "-m", "vitzoo", "compare", "shvit_s1", "--no-speed", "--format", "csv", "--img-size", "64"]
    proc = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the command writes anything (its imports alone take seconds)
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141 and "error" not in err and "Traceback" not in err, err
