"""Append-only JSON-lines journals shared by the processes of one bundle root: the items
added live (``added_items.jsonl``) and the live feedback log (``feedback.jsonl``).

Writers append whole lines under an exclusive ``flock`` (the server processes of one root
append to one file) and fsync before they acknowledge. Readers take no lock: they read
from a byte offset and stop at the last newline, so a line being written, or one cut short
by a crash (never acknowledged), is left for the next read; the next append cuts such a
torn tail off first, so that every record starts on a line of its own. A line that is not
valid JSON is logged, naming the file and line, and skipped: one bad line never stops a
server from starting.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger("tandem.journal")
T = TypeVar("T")


def append(
    path: str | Path,
    payload: bytes,
    fsync: bool = True,
    before: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Append ``payload`` (whole lines) to the journal at ``path``, durably with ``fsync``.
    Under the lock, ``before(fd, size)`` runs first (size: the journal's length without a
    torn tail), so a writer can read what others appended before its own lines land.
    Returns ``(start, end)``: the byte range the payload now occupies."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            whole = _whole_lines_length(fd, size)
            log.warning(json.dumps({"event": "journal_torn_tail_cut", "file": str(path), "bytes": size - whole}))
            os.ftruncate(fd, whole)
            size = whole
        if before is not None:
            before(fd, size)
        written = 0
        while written < len(payload):  # (pwrite may write less than asked)
            written += os.pwrite(fd, payload[written:], size + written)
        if fsync:
            os.fsync(fd)
        return size, size + len(payload)
    finally:
        os.close(fd)  # (releases the lock)


def _whole_lines_length(fd: int, size: int, chunk: int = 1 << 16) -> int:
    """Bytes of a file up to and including its last newline (0 without one)."""
    end = size
    while end > 0:
        start = max(0, end - chunk)
        at = os.pread(fd, end - start, start).rfind(b"\n")
        if at >= 0:
            return start + at + 1
        end = start
    return 0


def read_bytes(path: str | Path, offset: int = 0, end: int | None = None) -> tuple[bytes, int]:
    """The whole lines of a journal from byte ``offset`` (to ``end`` at most), and the
    offset after the last one; ``(b"", offset)`` when the file does not exist."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read() if end is None else f.read(max(0, end - offset))
    except FileNotFoundError:
        return b"", offset
    whole = data[: data.rfind(b"\n") + 1]
    return whole, offset + len(whole)


def records(path: str | Path, data: bytes, offset: int, check: Callable[[dict], T]) -> list[T]:
    """The records of ``data`` (whole lines read from byte ``offset`` of ``path``), each
    passed through ``check`` (which returns the record to keep or raises ``ValueError``);
    a line that is not a JSON object, or that ``check`` refuses, is logged and skipped."""
    out = []
    for n, line in enumerate(data.split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError("expected a JSON object")
            out.append(check(record))
        except ValueError as e:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
            skipped(path, offset, n, e)
    return out


def skipped(path: str | Path, offset: int, line: int, error: Exception) -> None:
    """Log a journal line that cannot be used (``line``: 1-based, counted from ``offset``)."""
    where = f"line {line}" if offset == 0 else f"line {line} after byte {offset}"
    log.warning(
        json.dumps({"event": "journal_line_skipped", "file": str(path), "where": where, "error": str(error)[:200]})
    )
