"""The kinds of failure a user can fix: bad data, bad settings, bad files. Each is one line naming the file, the
line or the setting, and what was expected; the command-line drivers (common/cli.py) print that line and exit 2,
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re


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


# A node's error reply, as the ClientApp words it and the server reads it (client/ and server/ never import each
# other): "platform 'video' (data/settings error): <one line>", or "(<ExceptionType>, a bug: ...)".
NODE_USER_ERROR = "data/settings error"
_NODE_REASON = re.compile(r"platform '([^']*)' \(([^)]*)\): ")


def node_error_reason(platform: str, error: BaseException) -> str:
    kind = NODE_USER_ERROR if isinstance(error, UserError) else \
        f"{type(error).__name__}, a bug: traceback in the node's log"
    return f"platform '{platform}' ({kind}): {one_line(error)}"


def parse_node_error(reason: str) -> tuple[str, bool, str] | None:
    """(platform, whether a user error, message) of a reason worded by ``node_error_reason``, else None."""
    found = _NODE_REASON.match(reason)
    return (found.group(1), found.group(2) == NODE_USER_ERROR, reason[found.end():]) if found else None
