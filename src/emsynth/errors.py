"""User-facing errors: one line that names the file and the fix.

Anything a user can cause (bad input files, bad config keys) raises `EmsynthError`; the CLI
prints its message on one line and exits with code 2, without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class EmsynthError(Exception):
    """A problem the user can fix. `str(err)` is the whole one-line message."""

    exit_code = 2


def input_error(path: str | Path | None, problem: str, fix: str | None = None) -> EmsynthError:
    """Build the standard message: `<path>: <problem>. Fix: <fix>`."""
    where = f"{path}: " if path is not None else ""
    msg = f"{where}{problem}"
    if fix:
        msg += f". Fix: {fix}"
    return EmsynthError(msg.replace("\n", " "))
