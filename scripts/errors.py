"""Errors a user can act on: bad input files or settings are reported as one line, without a traceback.

``monai.bundle run`` evaluates the bundle's expressions inside MONAI's config parser, which wraps whatever they raise
in a ``RuntimeError`` that ends with the whole expression; the reason sits in the middle of a long traceback. The
project raises ``UserError`` (and its subclasses) for what the user can fix: a missing, unreadable or malformed
input, a missing weights file, a bad option value. ``install`` (done when ``scripts`` is imported) makes such an
error, found anywhere in the exception chain, print ``error: <file or option>: <what is wrong>`` as the last line
and exit with status 2. Anything else is a bug of ours and keeps its traceback, as does every error when
``--debug`` is on the command line or ``ENHANCE_DEBUG=1`` is set.
"""

from __future__ import annotations

import logging
import os
import sys
from types import TracebackType

__all__ = [
    "UserError",
    "InputError",
    "MissingFileError",
    "OutputExistsError",
    "user_error",
    "install",
    "EXIT_USER_ERROR",
]

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Something the user can fix (an input file or a setting); reported as one line, exit status 2."""


class InputError(UserError, ValueError):
    """A bad option value or a malformed input file."""


class MissingFileError(UserError, FileNotFoundError):
    """An input, datalist entry or weights file that does not exist."""


class OutputExistsError(UserError, FileExistsError):
    """An output that would overwrite existing files."""


def user_error(exc: BaseException | None) -> UserError | None:
    """The first ``UserError`` in ``exc``'s chain of causes and contexts, or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def debugging() -> bool:
    """Whether tracebacks are wanted for user errors too (``--debug`` on the command line, or ENHANCE_DEBUG=1)."""
    return "--debug" in sys.argv or os.environ.get("ENHANCE_DEBUG", "") not in ("", "0")


def _hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    err = user_error(exc)
    if err is None or debugging():
        _previous(kind, exc, tb)
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.write(f"error: {err}\n")
    sys.stderr.flush()
    os._exit(EXIT_USER_ERROR)  # the interpreter would exit with 1 after an excepthook


_previous = sys.excepthook


def install() -> None:
    """Report user errors as one line (``sys.excepthook``); idempotent."""
    sys.excepthook = _hook
