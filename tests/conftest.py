"""Shared test configuration: no network, no GPU, deterministic, small thread counts."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

import nvit  # noqa: E402,F401  registers nvit_* / revit_*
import shvit  # noqa: E402,F401  registers shvit_s*


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
