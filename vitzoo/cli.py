"""The ``vitzoo`` command line: one sub-command per tool module.

Each tool module exposes ``register(subparsers)``, which adds its sub-parser and sets
``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit code).
Modules are imported lazily so ``vitzoo --help`` stays fast.

A sub-command reports the errors it expects itself. What reaches :func:`main` from the operating system (a folder
that is not writable, a full disk, a network error: ``OSError``) or from Ctrl-C is reported in one line here too,
with exit code 1 / 130, instead of a traceback. ``SIGTERM`` (``kill``, ``timeout``, ``docker stop``, SLURM) is
handled like Ctrl-C, exit code 143: the command unwinds, so its temporary files and partial outputs are removed.
Error lines come from :func:`vitzoo.messages.cli_message`: the library's message on one line, advice on its later
lines included.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import signal
import sys
from typing import List, Optional, Tuple, Union

# sub-command name -> module that registers it
COMMANDS = {
    "compare": "vitzoo.compare",
    "export": "vitzoo.export",
    "convert": "vitzoo.convert",
    "push": "vitzoo.push",
    "finetune-det": "vitzoo.detection.finetune",
    "evaluate-det": "vitzoo.detection.evaluate_det",
}


def _version() -> str:
    import timm
    import torch

    import vitzoo

    return f"vitzoo {vitzoo.__version__} (torch {torch.__version__}, timm {timm.__version__})"


def build_parser(argv: Optional[List[str]] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitzoo",
        description="Efficient vision transformers for timm: compare, export, convert, publish; fine-tune and "
                    "evaluate detectors.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # main() reports a sub-command's unknown arguments with its usage; kept off the parsed arguments, which
    # finetune-det saves in its checkpoints (found by an audit: a parser there made every save fail)
    parser.commands = sub.choices
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, module_name in COMMANDS.items():
        if wanted in COMMANDS and name != wanted:
            # only the requested command's module is imported; the others get a stub entry for --help
            sub.add_parser(name, help=f"see `vitzoo {name} --help`")
            continue
        module = importlib.import_module(module_name)
        module.register(sub)
    return parser


def named_output(example: str):
    """An argparse type for an output path option: the value as given, refusing an empty one (``--out ""``, or an
    unset shell variable), which would otherwise mean the current folder (exit code 2 and the usage)."""
    def check(value: str) -> str:
        if not value.strip():
            raise argparse.ArgumentTypeError(f"needs a name, e.g. {example}")
        return value
    return check


def image_size(value: str) -> Union[int, Tuple[int, int]]:
    """An argparse type for ``--img-size``: ``N`` for N x N (an int), or ``HxW`` (``96x160``, also ``96,160``) for
    another shape (a pair ``(H, W)``; a square one as its int), each side >= 1: the spelling of ``vitzoo compare``'s
    ``input`` column and of ``vitzoo export``'s default file name."""
    parts = re.split(r"[xX,]", value.strip())
    if len(parts) not in (1, 2) or not all(re.fullmatch(r"[+-]?\d+", p.strip()) for p in parts):
        raise argparse.ArgumentTypeError(f"expects N (for N x N) or HxW, e.g. 224 or 96x160; got {value!r}")
    sides = [int(p) for p in parts]
    if min(sides) < 1:
        raise argparse.ArgumentTypeError(f"sides must be >= 1, got {value!r}")
    if len(sides) == 1 or sides[0] == sides[1]:
        return sides[0]
    return sides[0], sides[1]


class Terminated(BaseException):
    """SIGTERM arrived: raised in the main thread so that ``finally`` blocks and context managers clean up."""


@contextlib.contextmanager
def _sigterm_unwinds():
    """While the command runs, SIGTERM raises :class:`Terminated` in this process (not in forked workers, which
    keep the default: they die at once, as their parent expects).

    Not under a distributed launcher (torchrun sets ``TORCHELASTIC_RUN_ID``; any launcher ``WORLD_SIZE`` > 1): a
    worker blocked in a collective would run no Python handler until the call returns, so the launcher's SIGTERM
    must end it at once, as it does without this package.
    """
    import threading

    distributed = bool(os.environ.get("TORCHELASTIC_RUN_ID")) or os.environ.get("WORLD_SIZE", "1").strip() not in (
        "", "0", "1")
    if threading.current_thread() is not threading.main_thread() or distributed:
        yield
        return
    pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != pid:  # a forked child inherited this handler: die as the default handler would
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse's top-level parser would print its own usage, not the sub-command's
        # argparse collects them in order: those before the command word are the top level's (found by a review)
        top = unknown[:sum(a in unknown for a in argv[:argv.index(args.command)])] if args.command in argv else []
        if top:
            parser.error(f"unrecognized arguments: {' '.join(top)}")
        unknown = unknown[len(top):]
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    hub_logger = logging.getLogger("huggingface_hub")
    hub_level = hub_logger.level
    # offline, huggingface_hub logs each of its five retries per file (two lines each, 46 s or more for timm's two
    # file names); the command's own error line says what failed
    hub_logger.setLevel(logging.ERROR)
    try:
        with _sigterm_unwinds():
            return int(args.func(args) or 0)
    except BrokenPipeError:  # the reader went away (`vitzoo compare --format csv | head -3`): not an error
        with contextlib.suppress(OSError, ValueError):  # Python's own flush of stdout at exit would fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a command ended by SIGPIPE
    except OSError as e:
        from vitzoo.messages import cli_message

        print(f"vitzoo {args.command}: error: {cli_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vitzoo {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"vitzoo {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    finally:
        hub_logger.setLevel(hub_level)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
