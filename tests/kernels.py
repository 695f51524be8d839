"""Skip or fail a test by whether one of vitzoo's C kernels can run here."""
import pytest


def needs_kernel(module, what: str) -> None:
    """Skip the test where ``module.load()`` (a vitzoo kernel module) gives no library, saying why; fail it where the
    kernel was built and ran on a CPU with the instructions but its self-check against float64 failed (a wrong
    kernel, not a missing one)."""
    if module.load() is None:
        reason = module.unavailable_reason()
        if reason.startswith("self-check"):
            pytest.fail(f"{what} built but wrong: {reason}")
        pytest.skip(f"{what} unavailable here: {reason}")
