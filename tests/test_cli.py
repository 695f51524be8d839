"""The `vitzoo` command line itself: version, sub-command listing."""
import re

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


@pytest.mark.parametrize("command", ["compare", "convert", "push"])
def test_help_descriptions_are_plain_text(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert f"vitzoo {command}: " in out and "``" not in out


def test_first_line_is_the_first_non_empty_stripped_line():
    from vitzoo.messages import first_line

    assert first_line(RuntimeError("\n   cause of the error  \n\ndetails\nmore details\n")) == "cause of the error"
    assert first_line(ValueError("")) == first_line(ValueError(" \n \n")) == ""
