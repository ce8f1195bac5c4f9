"""The one error exit of every command line (render, serve, checkpoint, export, training, the LiveKit
worker, the GPU check and the barge-in benchmark).

    @cli_main
    def main(argv: list[str] | None = None) -> int: ...

An :class:`~rt_engine.errors.RtEngineError` (bad input, config, checkpoint, export) prints one line
``error: <message>`` on stderr and returns 2; Ctrl-C prints ``error: interrupted`` and returns 130.
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

from rt_engine.errors import RtEngineError

EXIT_INPUT = 2  # bad input: the conventional usage-error status (argparse uses it too)
EXIT_INTERRUPTED = 130  # 128 + SIGINT


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` keeps the description's line breaks (usage examples) and shows every default."""


def cli_main(fn: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command line's ``main``: one-line errors with exit status 2 instead of tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            return fn(*args, **kwargs)
        except RtEngineError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_INPUT
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED

    return wrapper
