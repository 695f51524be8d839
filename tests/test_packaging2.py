"""Packaging: the metadata's bounds, and what the built wheel and sdist carry (built offline, from a copy of the tree).

The builds use the setuptools of the running environment (``--no-build-isolation``, ``--no-index``): no network. A
test that cannot build here (no setuptools new enough, no pip) is skipped, saying why.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("shvit", "nvit", "vitzoo")

tomllib = pytest.importorskip("tomllib", reason="tomllib is Python >= 3.11")
requirements = pytest.importorskip("packaging.requirements")
version_mod = pytest.importorskip("packaging.version")


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _lower_bound(requirement: str):
    """The ``>=`` bound of a requirement string (None without one)."""
    req = requirements.Requirement(requirement)
    bounds = [version_mod.Version(s.version) for s in req.specifier if s.operator == ">="]
    return max(bounds) if bounds else None


def _requirement(reqs, name: str) -> str:
    found = [r for r in reqs if requirements.Requirement(r).name.lower() == name]
    assert len(found) == 1, f"{name} is required {len(found)} times in {reqs}"
    return found[0]


def test_version_is_the_same_in_pyproject_and_the_package():
    """``vitzoo --version`` (vitzoo.__version__) and the installed metadata (pyproject) name one version."""
    init = (REPO / "vitzoo" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"$', init, re.M)
    assert match, "vitzoo/__init__.py has no __version__ line"
    assert _pyproject()["project"]["version"] == match.group(1)


def test_setuptools_lower_bound_reads_the_licence_expression():
    """A string ``license`` (an SPDX expression, PEP 639) is a configuration error before setuptools 77: a build
    with an older one (``--no-build-isolation``, or an index holding only older ones) failed with "`project.license`
    must be valid exactly by one definition"."""
    data = _pyproject()
    if not isinstance(data["project"].get("license"), str):
        pytest.skip("license is not an SPDX expression string")
    bound = _lower_bound(_requirement(data["build-system"]["requires"], "setuptools"))
    assert bound is not None and bound >= version_mod.Version("77.0.3"), bound


def test_torch_bounds_cover_the_apis_used():
    """torch is capped at 2.14.1; its floor is at least 2.5 where the code uses torch.serialization.safe_globals (a
    context manager torch 2.4 does not have: loading a checkpoint there was an AttributeError)."""
    torch_req = _requirement(_pyproject()["project"]["dependencies"], "torch")
    spec = requirements.Requirement(torch_req).specifier
    assert not spec.contains("2.14.2") and not spec.contains("2.15.0"), torch_req
    assert spec.contains("2.14.1"), torch_req
    uses_safe_globals = any("serialization.safe_globals(" in path.read_text(encoding="utf-8")
                            for package in PACKAGES for path in (REPO / package).rglob("*.py"))
    if uses_safe_globals:
        assert _lower_bound(torch_req) >= version_mod.Version("2.5"), torch_req


def test_filelock_floor_has_the_mode_argument_the_hub_cache_uses():
    """vitzoo.hub takes the Hub client's lock files with ``FileLock(..., mode=...)``; filelock added ``mode`` in
    3.10.0 (its changelog), and huggingface-hub declares filelock without a version, so an older one was a
    ``TypeError`` while cleaning a failed download."""
    uses_mode = "FileLock(" in (REPO / "vitzoo" / "hub.py").read_text(encoding="utf-8") and \
        "mode=" in (REPO / "vitzoo" / "hub.py").read_text(encoding="utf-8")
    if not uses_mode:
        pytest.skip("vitzoo.hub does not pass mode= to FileLock")
    bound = _lower_bound(_requirement(_pyproject()["project"]["dependencies"], "filelock"))
    assert bound is not None and bound >= version_mod.Version("3.10"), bound
    import inspect

    import filelock
    assert "mode" in inspect.signature(filelock.FileLock.__init__).parameters or \
        "mode" in inspect.signature(filelock.FileLock).parameters


def _source_copy(tmp_path: Path) -> Path:
    """A copy of the source tree without environments, caches and build output (so the build leaves the checkout
    alone and sees no stale egg-info)."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".cache", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "out", ".whl",
        ".gl"))
    return src


def _setuptools_or_skip():
    setuptools = pytest.importorskip("setuptools")
    if version_mod.Version(setuptools.__version__).major < 77:
        pytest.skip(f"setuptools {setuptools.__version__} here is older than the build needs (77)")


def _build(cmd, cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    _setuptools_or_skip()
    tmp = tmp_path_factory.mktemp("wheel")
    src = _source_copy(tmp)
    _build([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
            str(src), "-w", str(tmp / "dist")], cwd=tmp)
    (found,) = (tmp / "dist").glob("vitzoo-*.whl")
    return found


def test_wheel_carries_what_runs(wheel):
    """The packages, their py.typed markers, the C kernels' sources (compiled on first use next to their modules),
    the weights record (found by vitzoo.hub.resource_path) and the ``vitzoo`` command."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in PACKAGES:
        assert f"{package}/__init__.py" in names
        assert f"{package}/py.typed" in names
    assert "vitzoo/detection/__init__.py" in names
    kernels = {f"vitzoo/{p.name}" for p in (REPO / "vitzoo").glob("*.c")}
    assert {"vitzoo/amx_gemm.c", "vitzoo/image_conv.c", "vitzoo/shsa_kernel.c"} <= kernels <= names
    data = f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.data/data/share/vitzoo/weights"
    for name in ("manifest.json", "card_template.md", "README.md"):
        assert f"{data}/{name}" in names
    assert not any(n.startswith(("tests/", "benchmarks/", "docs/")) for n in names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert re.search(r"^\[console_scripts\]\s*\nvitzoo = vitzoo\.cli:main$", text, re.M), text
    # the Apache-2.0 the metadata names travels with the code, as the licence asks (there was no LICENSE file)
    (license_file,) = [n for n in names if re.search(r"\.dist-info/licen[cs]es/LICENSE$", n)]
    text = zipfile.ZipFile(wheel).read(license_file).decode()
    assert "Apache License\n                           Version 2.0, January 2004" in text


def test_installed_wheel_finds_its_resources(wheel, tmp_path):
    """A non-editable install (a venv of its own, the running environment's site-packages only for the dependencies)
    finds the weights record, the card template and the kernel sources, and ``vitzoo --version`` runs."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    _build([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
            str(wheel)], cwd=tmp_path)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.check_output([str(python), "-c", purelib], text=True).strip())
    # the dependencies from this environment, after the venv's own site-packages (a path line: the editable
    # install's finder in there is not run, so the checkout stays out of reach)
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    code = ("import sys, vitzoo, vitzoo.hub as h, vitzoo.manifest as m, vitzoo.amx_gemm as a, vitzoo.image_conv as c\n"
            "import vitzoo.shsa_kernel as k\n"
            f"assert not any(p and {str(REPO)!r} == p.rstrip('/') for p in sys.path), sys.path\n"
            f"assert vitzoo.__file__.startswith({str(site)!r}), vitzoo.__file__\n"
            "print(h.resource_path('manifest.json'))\nprint(h.resource_path('card_template.md'))\n"
            "m.load_manifest()\nassert a.SOURCE.is_file() and c.SOURCE.is_file() and k.SOURCE.is_file()\n")
    result = subprocess.run([str(python), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for line in result.stdout.split():
        assert Path(line).is_relative_to(venv / "share" / "vitzoo" / "weights"), line
    result = subprocess.run([str(venv / "bin" / "vitzoo"), "--version"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("vitzoo "), result.stdout


def test_sdist_carries_the_test_suite_and_set_up(tmp_path):
    """An unpacked sdist runs README's commands: the tests' conftest.py and helpers, the docs and benchmarks the
    tests read, the Makefile and constraints.txt (setuptools alone ships tests/test_*.py and none of those), but not
    timm's fetched test file."""
    _setuptools_or_skip()
    src = _source_copy(tmp_path)
    (src / "tests" / "upstream" / "test_timm_models.py").write_text("# fetched at test time\n")
    _build([sys.executable, "-c", "import sys; from setuptools import build_meta as b; b.build_sdist(sys.argv[1])",
            str(tmp_path / "dist")], cwd=src)
    (archive,) = (tmp_path / "dist").glob("vitzoo-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {"pyproject.toml", "setup.cfg", "README.md", "Makefile", "constraints.txt", ".ci/run",
              "weights/manifest.json", "weights/card_template.md", "vitzoo/amx_gemm.c", "vitzoo/image_conv.c",
              "vitzoo/py.typed", "tests/conftest.py", "tests/files.py", "tests/hub_server.py",
              "tests/upstream/conftest.py", "tests/upstream/fetch_timm_tests.py"}
    wanted |= {str(p.relative_to(REPO)) for p in (REPO / "vitzoo").glob("*.c")}
    wanted |= {str(p.relative_to(REPO)) for p in (REPO / "tests").glob("*.py")}
    wanted |= {str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")}
    wanted |= {str(p.relative_to(REPO)) for p in (REPO / "benchmarks").glob("*.py")}
    assert not wanted - names, sorted(wanted - names)
    assert "tests/upstream/test_timm_models.py" not in names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
