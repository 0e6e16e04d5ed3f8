"""Atomic file writing: write to a temporary file beside the target, then rename.

A crash or a kill never leaves a half-written output under the final name. Also `plain`, the
one converter of values to what JSON (and safe checkpoint loading) accepts, and
`resolve_path`, which finds a config-relative path from the working directory or the checkout.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from emsynth.errors import input_error


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `target` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the usual permissions (umask applied).
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | Path, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def plain(value: Any) -> Any:
    """A JSON-plain copy: dict keys as strings, tuples as lists, numpy arrays and scalars as
    Python lists and numbers, anything else (paths, enums) as its string."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def repo_root() -> Path | None:
    """The source checkout holding this package (None for an installed package)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def resolve_path(path: str | Path, what: str, fix: str) -> Path:
    """A relative path from the working directory, else from the repository root."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        found = path
    else:
        root = repo_root()
        found = root / path if root is not None and (root / path).exists() else path
    if not found.exists():
        raise input_error(path, f"{what} not found (looked in the working directory and the "
                          "repository root)", fix)
    return found
