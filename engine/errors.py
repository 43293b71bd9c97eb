"""Exceptions raised at Tandem's boundaries.

Every error a user can provoke with bad input is one of these (or a plain
``ValueError`` / ``KeyError`` subclass of them), so callers — the CLI and the gRPC
servicer — can turn them into clear messages and status codes.
"""

from __future__ import annotations

import os


class TandemError(Exception):
    """Base class of every error Tandem raises on purpose."""


class DataFormatError(TandemError, ValueError):
    """A data file is malformed. The message names the file and, when known, the line.

    Attributes:
        path: the file that could not be read.
        line: 1-based line number of the offending record, or ``None`` when the
            problem is not tied to one line (a missing column, an empty file).
    """

    def __init__(self, path: str | os.PathLike, line: int | None, problem: str):
        self.path = os.fspath(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


class UnknownIdError(TandemError, KeyError):
    """An external user or item id is not in the dataset's id map."""

    def __str__(self) -> str:  # KeyError would repr() the message, adding quotes
        return str(self.args[0]) if self.args else ""


class ConfigError(TandemError, ValueError):
    """A configuration file or override is invalid."""


class InvalidRequest(TandemError, ValueError):
    """A request the engine refuses: a bad argument, a value out of range, an unknown
    feature, filter or source. The gRPC service answers it ``INVALID_ARGUMENT`` (and only
    it: any other exception inside a request is a bug, answered ``INTERNAL``)."""


def shorten(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages: a message must
    not echo a huge value back (gRPC caps the size of a status message's metadata)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


class ServeError(TandemError, OSError):
    """A server cannot start: its address cannot be bound (the port is in use, ...)."""
