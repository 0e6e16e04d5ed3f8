"""Content-addressed cells: each unit of study work lives in a folder named by the hash of
everything that determines it, so a re-run finds finished work and skips it.

A cell's key is the sha256 of the canonical JSON (sorted keys, no whitespace) of its kind, a
format version, its settings and the keys (or content hashes) of its inputs; a change anywhere
upstream therefore changes every key downstream. A cell is finished when its `done.json`
exists: results are written atomically first and the marker last, so a crash leaves at most
the cell in flight unfinished (and its engine checkpoints let the re-run continue it).

A cell being run holds `lock.json` (created exclusively, its mtime refreshed while the work
runs), so several `study run` processes can share one study folder: each takes the next cell
nobody holds. A lock whose process is gone (same host) or that has not been refreshed for
LOCK_STALE_S (a crashed machine) is taken over.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emsynth.engine import runinfo
from emsynth.engine.checkpoint import CHECKPOINT_DIR
from emsynth.io import atomic_write_text, plain
from emsynth.study.layout import (
    ARTIFACTS,
    CELLS_DIR,
    DONE,
    LOCK,
    RECORD,
    RESULT,
)

#: A lock not refreshed for this long belongs to a process that is gone (refreshed every
#: LOCK_REFRESH_S while its cell runs).
LOCK_STALE_S = 300.0
LOCK_REFRESH_S = 30.0


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace; tuples become lists, paths strings."""
    return json.dumps(plain(value), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_arrays(*arrays: np.ndarray) -> str:
    """sha256 over the shapes, dtypes and bytes of arrays (the content of a dataset)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def hash_files(paths: list[Path]) -> str:
    """sha256 over the names and bytes of files (a trained model given by path)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass
class CellSpec:
    """What defines a cell (hashed) plus labels for progress and the report (not hashed)."""

    kind: str
    version: int
    settings: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": self.version, "settings": self.settings,
                "inputs": self.inputs}

    @property
    def key(self) -> str:
        return sha256_text(canonical_json(self.identity()))

    @property
    def name(self) -> str:
        """Folder name: kind plus the first 16 hex digits of the key."""
        return f"{self.kind}-{self.key[:16]}"


class Cell:
    """The folder of one cell inside a study folder."""

    def __init__(self, study_dir: Path, spec: CellSpec):
        self.spec = spec
        self.dir = Path(study_dir) / CELLS_DIR / spec.name

    @property
    def done(self) -> bool:
        marker = self.dir / DONE
        if not marker.is_file():
            return False
        try:
            return json.loads(marker.read_text()).get("key") == self.spec.key
        except (OSError, ValueError):
            return False

    def result(self) -> dict[str, Any]:
        return json.loads((self.dir / RESULT).read_text())

    def record(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.dir / RECORD).read_text())
        except (OSError, ValueError):
            return None

    # --- who runs the cell ---------------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        return self.dir / LOCK

    def try_lock(self) -> bool:
        """Take the cell for this process; False when another live process holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._lock_is_stale():
                    return False
                self.lock_path.unlink(missing_ok=True)  # its holder is gone: take it over
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": runinfo.now_iso()}, handle)
            return True
        return False

    def held_elsewhere(self) -> bool:
        """Whether another live process runs this cell now."""
        if not self.lock_path.exists():
            return False
        holder = self._lock_holder()
        if holder is not None and holder.get("pid") == os.getpid() \
                and holder.get("host") == socket.gethostname():
            return False
        return not self._lock_is_stale()

    def refresh_lock(self) -> None:
        try:
            os.utime(self.lock_path)
        except OSError:
            pass

    def unlock(self) -> None:
        self.lock_path.unlink(missing_ok=True)

    def _lock_holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.lock_path.read_text())
        except (OSError, ValueError):
            return None

    def _lock_is_stale(self) -> bool:
        try:
            age = time.time() - self.lock_path.stat().st_mtime
        except OSError:
            return True  # gone meanwhile
        if age > LOCK_STALE_S:
            return True
        holder = self._lock_holder()
        if holder is None or holder.get("host") != socket.gethostname():
            return False  # being written, or held on another machine that refreshes it
        return not _pid_alive(int(holder.get("pid", -1)))

    @property
    def has_artifacts(self) -> bool:
        """Whether the cell's folder holds what later cells read (models, images), not only
        its result: False for a cell taken from an exported study (`emsynth study export`)."""
        return (self.record() or {}).get(ARTIFACTS, True) is not False

    def finished_in(self, study_dirs: list[Path], artifacts: bool = False) -> Cell | None:
        """This cell, finished, in the first other study folder (or export) that has it, with
        its artifacts if `artifacts` (a cell still to run reads them)."""
        for study_dir in study_dirs:
            other = Cell(study_dir, self.spec)
            if other.dir.resolve() != self.dir.resolve() and other.done \
                    and (other.has_artifacts or not artifacts):
                return other
        return None

    def adopt(self, study_dirs: list[Path], artifacts: bool = False) -> Path | None:
        """Copy this cell, finished, from another study folder that has it (same key: same
        settings and inputs, so the same result; with its artifacts if `artifacts`); the done
        marker is copied last. Returns the folder it came from, or None. The record keeps its
        provenance plus `adopted_from`."""
        other = self.finished_in(study_dirs, artifacts)
        if other is None:
            return None
        shutil.copytree(other.dir, self.dir, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(LOCK, DONE))
        record = self.record() or {}
        record["adopted_from"] = str(other.dir)
        self._write_record(record)
        shutil.copy2(other.dir / DONE, self.dir / DONE)
        return other.dir

    def drop_checkpoints(self) -> None:
        """Delete the training checkpoints of a finished cell: its exported model is what later
        cells use, and a GPU-sized study would otherwise keep tens of GB of optimiser state."""
        for folder in self.dir.glob(f"*/{CHECKPOINT_DIR}"):
            shutil.rmtree(folder, ignore_errors=True)

    def clear(self) -> None:
        """Forget the cell (--no-resume): its folder goes, checkpoints included."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def start(self) -> dict[str, Any]:
        """Create the folder and write the opening record (status running)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / DONE).unlink(missing_ok=True)
        previous = self.record() or {}
        record = {
            **self.spec.identity(),
            "key": self.spec.key,
            "labels": self.spec.labels,
            "status": "running",
            "attempts": int(previous.get("attempts", 0)) + 1,
            "started_at": runinfo.now_iso(),
            "versions": runinfo.versions(),
            "git": runinfo.git_state(),
            "command": runinfo.command_line(),
        }
        self._write_record(record)
        record["_t0"] = time.monotonic()
        return record

    def fail(self, record: dict[str, Any], error: BaseException) -> None:
        record = {k: v for k, v in record.items() if k != "_t0"}
        record.update(status="failed", error=f"{type(error).__name__}: {error}"[:2000],
                      ended_at=runinfo.now_iso())
        self._write_record(record)

    def finish(self, record: dict[str, Any], result: dict[str, Any]) -> float:
        """Write the result, the closing record, then the done marker; returns the duration."""
        duration = time.monotonic() - record.pop("_t0")
        atomic_write_text(self.dir / RESULT, json.dumps(plain(result), indent=2) + "\n")
        record.update(status="done", ended_at=runinfo.now_iso(), duration_s=duration)
        self._write_record(record)
        atomic_write_text(self.dir / DONE, json.dumps({"key": self.spec.key}) + "\n")
        return duration

    def _write_record(self, record: dict[str, Any]) -> None:
        atomic_write_text(self.dir / RECORD, json.dumps(plain(record), indent=2) + "\n")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True
