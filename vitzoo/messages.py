"""Text for the command line: one-line error messages, and help texts from docstrings."""
from __future__ import annotations

__all__ = ["first_line", "help_description"]


def first_line(error: BaseException) -> str:
    """The first non-empty line of ``str(error)``, stripped ("" when there is none).

    Library errors put their cause first and details (alternatives, tracebacks of workers, IR dumps) after it.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else ""


def help_description(doc: str) -> str:
    """A module docstring's first paragraph as ``--help`` shows it: without reStructuredText's double backquotes."""
    return " ".join(doc.split("\n\n")[0].replace("``", "").split())
