"""The kinds of failure a user can fix: bad data, bad settings, bad files. Each is one line naming the file, the
line or the setting, and what was expected; the command-line drivers (common/cli.py) print that line and exit 2,
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os


class UserError(ValueError):
    """A mistake in the user's input (a ValueError, so older callers that catch ValueError still do)."""


class ConfigError(UserError):
    """A setting out of range or inconsistent with another one; the message names the setting."""


class FileProblem(UserError):
    """A file (adapter, checkpoint, exported model, run folder) that cannot be used; the message names it."""

    def __init__(self, path: object, problem: str):
        super().__init__(f"{printable_path(path)}: {problem}")
        self.path, self.problem = path, problem


class NodeFailed(RuntimeError):
    """A federation stopped because a node failed; the message names the node's platform and its error."""

    def __init__(self, message: str, user_error: bool = False):
        super().__init__(message)
        self.user_error = user_error


def printable_path(path: object) -> str:
    """A path as text that can always be printed, even when its bytes are not UTF-8 (shown as \\xNN)."""
    text = str(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (continuation lines joined with ' | ')."""
    text = str(error).strip() or type(error).__name__
    return " | ".join(part.strip() for part in text.splitlines() if part.strip())
