"""Text for the command line: one-line error messages, and help texts from docstrings."""
from __future__ import annotations

import re
from typing import List, Optional, Union

__all__ = ["cli_message", "command_line_advice", "error_message", "first_line", "help_description"]

#: A line from which on a message is a dump for debugging (a traceback, a traced graph), not text for a person.
#: The last two: c10's C++ backtrace, after a torch error's own text.
_DUMP = re.compile(r"(Traceback \(most recent call last\)|Original Traceback|The above exception was|"
                   r"During handling of the above exception|from user code:|File \".*\", line \d+|graph\(|"
                   r"%[\w.]+ :|Exception raised from .* \(most recent call first\)|frame #\d+: )")
#: Longest line kept whole (a line of a message, or the message itself); a longer one loses its middle (its end
#: may be the advice), which becomes " ... ".
LINE_LIMIT = 800
#: Longest message :func:`error_message` returns, about (lines left out in the middle are counted instead).
MESSAGE_LIMIT = 1600


def first_line(error: BaseException) -> str:
    """The first non-empty line of ``str(error)``, stripped ("" when there is none).

    Library errors put their cause first and details (alternatives, tracebacks of workers, IR dumps) after it.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _lines(text: str) -> List[str]:
    """The non-empty stripped lines of ``text`` before any dump (:data:`_DUMP`)."""
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if _DUMP.match(line):
            break
        if line:
            lines.append(line)
    return lines


_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^]]*\])\) from "
                       r"checkpoint, the shape in current model is torch\.Size\((\[[^]]*\])\)")
_KEYS = re.compile(r"(Missing|Unexpected) key\(s\) in state_dict: (.*)")


def _summarise_state_dict(lines: List[str]) -> List[str]:
    """torch's ``load_state_dict`` report (one line per mismatched tensor, every key listed) as at most three
    lines: how many tensors differ in shape (with the first), and how many keys are missing / unexpected (with
    the first three). Other lines are kept as they are."""
    out: List[str] = []
    mismatches = [m for m in map(_MISMATCH.search, lines) if m]
    for line in lines:
        found = _MISMATCH.search(line)
        keys = _KEYS.match(line)
        if found:
            if found.group(0) == mismatches[0].group(0):
                name, ckpt, model = found.groups()
                many = f"{len(mismatches)} tensors differ" if len(mismatches) > 1 else "1 tensor differs"
                out.append(f"{many} in shape (first: {name}, checkpoint {ckpt}, model {model})")
        elif keys:
            names = re.findall(r'"([^"]+)"', keys.group(2))
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            out.append(f"{keys.group(1).lower()} keys: {len(names)} ({shown})")
        else:
            out.append(line)
    return out


def _cut(line: str, limit: int) -> str:
    """``line`` if it is at most ``limit`` long, else its first two thirds and last third around " ... "."""
    if len(line) <= limit:
        return line
    tail = limit // 3
    return line[:limit - tail - 5] + " ... " + line[-tail:]


def _cause_lines(error: BaseException, text: str) -> List[str]:
    """The lines after the first of ``error.__cause__`` when ``text`` ends by quoting only that first line.

    A library error often summarises its cause by the cause's first line (``could not load the weights: <first
    line>``); the cause's later lines hold its advice (``To fix: ...``), which the summary would otherwise lose.
    A message that adds its own advice after the quote (``...: <first line>; the file must hold ...``) keeps that
    instead.
    """
    cause = error.__cause__
    if cause is None:
        return []
    lines = _lines(str(cause))
    if len(lines) < 2:
        return []
    head = lines[0].rstrip(".")
    # the message ends with the cause's first line, or with its end after a ": " (a summary may drop its start:
    # "... from file FILE: "), long enough not to match by chance; a message that goes on after it has advice of
    # its own, which replaces the cause's
    ends = [head] + [head[i + 2:] for i in range(len(head)) if head.startswith(": ", i)]
    closing = text.rstrip().rstrip(".")
    if not any(len(end) >= 12 and closing.endswith(end) for end in ends):
        return []
    return [line for line in lines[1:] if line not in text]


def _join(lines: List[str]) -> str:
    """``lines`` as one line: after a line that ends a sentence or clause (``.:;,!?``) a space; before a line that
    starts a sentence (a capital letter) ``. ``; else (items of a list) ``; ``."""
    text = ""
    for line in lines:
        if text:
            text += " " if text[-1] in ".:;,!?" else ". " if line[0].isupper() else "; "
        text += line
    return text


def error_message(error: Union[BaseException, str], text: Optional[str] = None,
                  limit: int = MESSAGE_LIMIT) -> str:
    """``error``'s message as one line, with the advice on its later lines kept.

    The non-empty lines are joined (:func:`_join`): a list of alternatives after ``with one of:`` stays readable
    as ``with one of: a; b; c``. What follows a traceback or a traced graph is dropped (those are for debugging),
    a line longer than :data:`LINE_LIMIT` loses its middle, and when the lines are longer than ``limit`` together,
    lines in the middle are left out (and counted), never the first (the cause) or the last (usually the advice:
    ``To fix: ...``, ``or ...``). torch's ``load_state_dict`` report is summarised by counts
    (:func:`_summarise_state_dict`). Where ``error`` ends by quoting its ``__cause__``'s first line, the cause's later
    lines (its advice) are added (:func:`_cause_lines`).

    Args:
        error: The exception (or a message).
        text: The message to use instead of ``str(error)`` (e.g. the original message of a worker's error).
        limit: About the longest result.

    Returns:
        The message on one line; "" for an empty message.
    """
    text = str(error) if text is None else text
    lines = _lines(text)
    if isinstance(error, BaseException):
        lines += _cause_lines(error, text)
    lines = _summarise_state_dict(lines)
    lines = [_cut(line, LINE_LIMIT) for line in lines]
    if len(_join(lines)) <= limit or len(lines) <= 2:
        return _join(lines)
    head, last, middle = [lines[0]], lines[-1], lines[1:-1]
    budget = limit - len(lines[0]) - len(last) - 30  # 30: the "(N more lines)" note and separators
    kept = 0
    for line in middle:
        if len(line) + 2 > budget:
            break
        head.append(line)
        budget -= len(line) + 2
        kept += 1
    left = len(middle) - kept
    return _join(head + [f"[{left} more line{'s' if left > 1 else ''}]", last])


def cli_message(error: Union[BaseException, str], text: Optional[str] = None) -> str:
    """:func:`error_message` for a command's error line, naming the command's options: the shared output checks
    (:mod:`vitzoo.atomic`) say ``force=True (--force)`` for Python and command line callers alike; here only
    ``--force`` applies."""
    return error_message(error, text).replace("force=True (--force)", "--force")


#: Advice in the model packages' and the weight loader's messages that only a Python caller can follow
_LOCAL_FILE = re.compile(r"(?:to use a local file pass|load a local file with|pass it with|pass) "
                         r"pretrained_cfg_overlay=dict\(file=[^)]*\)")
_NO_WEIGHTS = re.compile(r"\buse pretrained=False\b")
_VARIANT = re.compile(r"\b[Uu]se the entrypoint of the (?:checkpoint's variant|variant the checkpoint holds)")
_STRICT_OPT_OUT = re.compile(r" ?To load on purpose only the tensors the two have in common .*?with a warning "
                             r"naming them\.?")
#: An NViT without its dims record: the ways to build it, as Python calls (nvit.nvit's message, on one line)
_DIMS = re.compile(r": load its checkpoint \(pretrained=True, .*?KNOWN_DIMS\['[^']*'\]\.?")


def command_line_advice(text: str, local_file: str, no_weights: str, variant: str, dims: str) -> str:
    """``text``, a loader's message, with the advice that only a Python caller can follow put in a command's terms:
    passing a local weight file (``pretrained_cfg_overlay=dict(file=...)``) becomes ``local_file``, ``use
    pretrained=False`` becomes ``no_weights``, using the entrypoint of the checkpoint's variant becomes ``variant``,
    the ways to build an NViT whose dims the package does not know (``pretrained=True``, ``dims=``, ...) become
    ``dims``; the opt-out of a strict load (``pretrained_strict=False``) is left out, since no command loads part of
    a checkpoint."""
    text = _DIMS.sub(lambda _: f": {dims}", text)
    text = _LOCAL_FILE.sub(local_file, text)
    text = _NO_WEIGHTS.sub(no_weights, text)
    text = _VARIANT.sub(lambda found: variant[:1].upper() + variant[1:] if found.group(0)[0] == "U" else variant, text)
    return _STRICT_OPT_OUT.sub("", text).replace(".; ", "; ")  # "... checkpoint. To load ...; the file ..."


def help_description(doc: str) -> str:
    """A module docstring's first paragraph as ``--help`` shows it: without reStructuredText's double backquotes."""
    return " ".join(doc.split("\n\n")[0].replace("``", "").split())
