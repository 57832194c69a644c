"""How every command-line driver ends: a user's mistake is one line on stderr and exit status 2; a bug keeps its
traceback (exit 1). ``--debug`` (or POLLEN_DEBUG=1) shows the traceback of a user's mistake too.

    if __name__ == "__main__":
        cli.run(main)          # main(argv) or main(); returns an exit status or None
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from typing import Callable

from common.errors import NodeFailed, UserError, one_line

DEBUG_HELP = "show the traceback of an error (by default a mistake in data, settings or files is one line)"


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)


def debugging(argv: list[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get("POLLEN_DEBUG", "") not in ("", "0")


def user_error(error: BaseException) -> bool:
    """Whether ``error`` is the user's to fix (one line, exit 2) rather than a bug."""
    if isinstance(error, NodeFailed):
        return error.user_error
    return isinstance(error, UserError)


def run(main: Callable[..., int | None], argv: list[str] | None = None) -> None:
    """Call ``main`` (with ``argv`` if it takes one) and exit with its status; errors as the module says."""
    takes_argv = bool(inspect.signature(main).parameters)
    try:
        code = main(argv) if takes_argv else main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (UserError, NodeFailed) as error:
        if debugging(argv):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        sys.exit(2 if user_error(error) else 1)
    sys.exit(code or 0)
