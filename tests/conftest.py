"""Shared test configuration: no network, no GPU, deterministic, small thread counts."""
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# the AMX kernel (vitzoo.amx_gemm) is compiled once into this directory and reused by later runs and xdist workers,
# instead of into the user's ~/.cache
os.environ.setdefault("VITZOO_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"vitzoo-tests-{os.getuid()}"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

import nvit  # noqa: E402,F401  registers nvit_* / revit_*
import shvit  # noqa: E402,F401  registers shvit_s*


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


_UPSTREAM = Path(__file__).parent / "upstream" / "test_timm_models.py"
_UPSTREAM_MISSING = ("timm's own tests (tests/upstream/test_timm_models.py, 69 tests on shvit_* / revit_*) are not "
                     "fetched, so they did not run: `make upstream-tests` fetches them (`make test` does it first)")


def pytest_report_header(config):
    return f"upstream timm tests: {'fetched' if _UPSTREAM.is_file() else 'NOT fetched'} ({_UPSTREAM})"


def _runs_upstream_folder(config) -> bool:
    """Whether the run was asked for a folder holding tests/upstream (the whole suite), not single files."""
    for arg in config.args:
        path = Path(arg.split("::")[0]).resolve()
        if path.is_dir() and (path == _UPSTREAM.parent or path in _UPSTREAM.parent.parents):
            return True
    return False


def pytest_terminal_summary(terminalreporter, config):
    """Running the suite without timm's upstream tests is said at the end, not left to a lower test count."""
    if not _UPSTREAM.is_file() and _runs_upstream_folder(config):
        terminalreporter.write_sep("=", "upstream tests missing", yellow=True)
        terminalreporter.write_line(_UPSTREAM_MISSING)
