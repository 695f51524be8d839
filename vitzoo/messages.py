"""One-line error messages for the command line: the first line of what a library raised."""
from __future__ import annotations

__all__ = ["first_line"]


def first_line(error: BaseException) -> str:
    """The first non-empty line of ``str(error)``, stripped ("" when there is none).

    Library errors put their cause first and details (alternatives, tracebacks of workers, IR dumps) after it.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else ""
