"""One exception type for bad benchmark input.

The CLI catches `BenchInputError` and prints its message (which names the file, line or URL at
fault) followed by a non-zero exit status; it never shows a traceback for bad input.
"""
from __future__ import annotations


class BenchInputError(ValueError):
    """Bad user input: a malformed trace row, a missing column, an unreachable server, ..."""


def at(path: object, line: int | None = None) -> str:
    """`path:line` prefix used by every message about a file."""
    return f"{path}:{line}" if line is not None else f"{path}"
