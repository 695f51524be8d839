"""Every command line the README and docs show parses with the real argument parsers.

Commands are taken from fenced code blocks and inline code in README.md, docs/ and weights/: ``vitzoo ...``
(also ``python -m vitzoo`` and ``torchrun ... -m vitzoo``), ``python -m vitzoo.detection.synthetic`` and
``python benchmarks/<script>.py`` (also ``python tests/upstream/<script>.py``). Each is parsed, not run: a flag
that was renamed, a value the parser
rejects or an argument it does not take fails here. Synopsis lines (``[--force]``, ``...``) are skipped.
"""
import argparse
import glob
import importlib.util
import os
import re
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))) + sorted(
    glob.glob(os.path.join(ROOT, "weights", "*.md")))

_ENV = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+")
_PYTHON = r"(?:\S*/)?python3?"
_INLINE = re.compile(
    r"`([^`]*(?:vitzoo |benchmarks/\w+\.py|tests/upstream/\w+\.py|\bbench_\w+\.py|\bprofile_\w+\.py)[^`]*)`")
# the scripts a command line may name: every benchmark script and the upstream-tests fetcher (a bare
# ``bench_x.py`` / ``profile_x.py`` is a benchmark script)
_SCRIPTS = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "benchmarks", "[!_]*.py"))
            + glob.glob(os.path.join(ROOT, "tests", "upstream", "[!_]*.py"))}


def _commands_in(text: str):
    """``(line, inline)`` candidates: code-block lines (with ``\\`` continuations joined) and inline code spans."""
    in_block = False
    pending = ""
    for line in text.splitlines():
        if line.startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if in_block:
            line = pending + line.strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            yield line, False
        else:
            for span in _INLINE.findall(line):
                yield span, True


def _normalise(line: str, inline: bool):
    """``(kind, argv)`` for a command this test can parse, else None. kind: 'vitzoo', 'synthetic' or a script.

    Inline, ``vitzoo compare`` or ``vitzoo compare --img-size`` names a command or a flag in prose; it is a
    command line only with more than that.
    """
    line = re.sub(r"\s+#.*$", "", line).strip()
    if "[" in line or "..." in line or line.startswith(("import ", "from ", ">>>", "pip ")):
        return None  # a synopsis, or Python
    line = _ENV.sub("", line)
    line = re.sub(r"^(?:/usr/bin/)?time(?: -v)? ", "", line)
    line = re.sub(r"^torchrun(?: --\S+(?: \d+)?)* -m vitzoo ", "vitzoo ", line)
    line = re.sub(rf"^{_PYTHON} -m vitzoo ", "vitzoo ", line)
    line = re.sub(rf"^{_PYTHON} -m vitzoo\.detection\.synthetic ", "synthetic ", line)
    run_by_python = re.match(rf"^{_PYTHON} ", line) is not None
    line = re.sub(rf"^{_PYTHON} ", "", line)
    try:
        argv = shlex.split(line)
    except ValueError:
        return None
    if not argv:
        return None
    head = argv[0]
    if head == "vitzoo" and len(argv) > 1:
        if inline and (len(argv) == 2 and argv[1] != "--version" or len(argv) == 3 and argv[2].startswith("-")):
            return None
        return "vitzoo", argv[1:]
    if head == "synthetic":
        return "synthetic", argv[1:]
    if re.fullmatch(r"(?:bench|profile)_\w+\.py", head):
        head = "benchmarks/" + head
    if inline and not run_by_python and len(argv) == 1:
        return None  # a file named in prose (`benchmarks/_isolated.py`), not a command line
    if head.startswith(("benchmarks/", "tests/upstream/")) and head.endswith(".py"):
        return head, argv[1:]  # a script that does not exist fails in the test, named
    return None


def _documented_commands():
    found = []
    for path in DOCS:
        with open(path, encoding="utf-8") as f:
            for line, inline in _commands_in(f.read()):
                parsed = _normalise(line, inline)
                if parsed is not None:
                    found.append((os.path.relpath(path, ROOT), line, *parsed))
    return found


COMMANDS = _documented_commands()


class _Parsed(Exception):
    pass


def _parse_only(monkeypatch, main, argv):
    """Run ``main()`` only up to its ``parse_args()``, with ``argv`` as the command line."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", list(argv))
    with pytest.raises(_Parsed):
        main()


def _script_main(monkeypatch, script: str):
    """``main`` of ``script`` (a path relative to the repository, e.g. ``benchmarks/bench_x.py``)."""
    assert script in _SCRIPTS, f"the docs name {script}, which does not exist"
    path = os.path.join(ROOT, script)
    monkeypatch.syspath_prepend(os.path.dirname(path))
    spec = importlib.util.spec_from_file_location(f"_doc_cmd_{os.path.basename(script)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_the_docs_show_commands_of_every_kind():
    kinds = {kind for *_, kind, _ in COMMANDS}
    assert {"vitzoo", "synthetic", "benchmarks/bench_shvit_vs_timm.py", "benchmarks/bench_cpu_vs_onnxruntime.py",
            "benchmarks/probe_kernels.py", "tests/upstream/fetch_timm_tests.py"} <= kinds, kinds
    subcommands = {argv[0] for *_, kind, argv in COMMANDS if kind == "vitzoo"}
    assert {"compare", "export", "convert", "finetune-det", "evaluate-det"} <= subcommands, subcommands


@pytest.mark.parametrize("where, line, kind, argv", COMMANDS, ids=[f"{c[0]}: {c[1][:60]}" for c in COMMANDS])
def test_documented_command_parses(where, line, kind, argv, monkeypatch, capsys):
    try:
        if kind == "vitzoo":
            from vitzoo.cli import build_parser

            try:
                build_parser(argv).parse_args(argv)
            except SystemExit as e:
                if not (e.code == 0 and argv == ["--version"]):
                    raise
        elif kind == "synthetic":
            from vitzoo.detection import synthetic

            _parse_only(monkeypatch, synthetic.main, ["synthetic"] + argv)
        else:
            _parse_only(monkeypatch, _script_main(monkeypatch, kind), [kind] + argv)
    except SystemExit:
        pytest.fail(f"{where}: `{line}` does not parse: {capsys.readouterr().err}")


def test_benchmark_scripts_named_in_prose_exist():
    """A benchmark script the docs name without running it (`benchmarks/bench_deploy_ablation.py`) exists."""
    named = set()
    for path in DOCS:
        with open(path, encoding="utf-8") as f:
            for span, inline in _commands_in(f.read()):
                if inline:
                    named.update(re.findall(r"(?:benchmarks/)?\b((?:bench|profile|probe)_\w+\.py)", span))
    assert {"bench_deploy_ablation.py", "profile_torchscript_vs_onnxruntime.py"} <= named, named
    missing = sorted(n for n in named if f"benchmarks/{n}" not in _SCRIPTS)
    assert not missing, f"the docs name benchmark scripts that do not exist: {missing}"


def test_documented_finetune_defaults_are_the_parsers():
    """docs/detection.md lists finetune-det's defaults (`--lr 1e-4 --weight-decay 0.05`, ...): each is the value the
    parser gives when the option is left out."""
    from vitzoo.cli import build_parser

    with open(os.path.join(ROOT, "docs", "detection.md"), encoding="utf-8") as f:
        text = f.read()
    paragraph = text[text.index("Defaults (`vitzoo finetune-det --help`"):].split("\n\n")[0]
    documented = {}
    for span in re.findall(r"`([^`]*)`", paragraph):
        tokens = span.split()
        for option, value in zip(tokens, tokens[1:]):
            if option.startswith("--") and not value.startswith("--"):
                documented[option] = value
    assert len(documented) >= 14, documented
    argv = ["finetune-det", "--data", "D"]
    defaults = vars(build_parser(argv).parse_args(argv))
    for option, value in documented.items():
        default = defaults[option[2:].replace("-", "_")]
        assert default == type(default)(value), (option, value, default)
