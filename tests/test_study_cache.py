"""Cell keys (same config -> same hash, any change -> another, input hashes propagate) and the
cell life cycle (results first, done marker last)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emsynth.study.cache import (
    Cell,
    CellSpec,
    canonical_json,
    hash_arrays,
    hash_files,
    sha256_text,
)
from emsynth.study.layout import DONE, RESULT


def _spec(**changes) -> CellSpec:
    base = {"kind": "segment", "version": 1,
            "settings": {"engine": {"steps": 100, "seed": 0}, "condition": "real"},
            "inputs": {"real": "aa", "val": "bb"}, "labels": {"regime": "1slice", "seed": 0}}
    base.update(changes)
    return CellSpec(**base)


def test_canonical_json_ignores_key_order_and_tuples():
    assert canonical_json({"b": 1, "a": [1, 2]}) == canonical_json({"a": (1, 2), "b": 1})
    assert canonical_json({"x": np.float32(0.5)}) == '{"x":0.5}'
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_same_spec_same_key_and_labels_do_not_count():
    assert _spec().key == _spec().key
    assert _spec().key == _spec(labels={"regime": "renamed"}).key
    assert len(_spec().key) == 64 and _spec().name == f"segment-{_spec().key[:16]}"
    assert _spec().key == sha256_text(canonical_json(_spec().identity()))


@pytest.mark.parametrize("changes", [
    {"kind": "eval"},
    {"version": 2},
    {"settings": {"engine": {"steps": 101, "seed": 0}, "condition": "real"}},
    {"settings": {"engine": {"steps": 100, "seed": 1}, "condition": "real"}},
    {"settings": {"engine": {"steps": 100, "seed": 0}, "condition": "synthetic"}},
    {"settings": {"engine": {"steps": 100, "seed": 0, "max_time": 5.0}, "condition": "real"}},
    {"inputs": {"real": "ab", "val": "bb"}},
    {"inputs": {"real": "aa", "val": "bb", "gan": "cc"}},
])
def test_any_change_changes_the_key(changes):
    assert _spec(**changes).key != _spec().key


def test_input_hashes_propagate_down_a_chain():
    def chain(gan_steps: int, data: np.ndarray) -> tuple[str, str, str]:
        gan = CellSpec("gan", 1, {"steps": gan_steps}, {"real": hash_arrays(data)})
        seg = CellSpec("segment", 1, {"steps": 10}, {"gan": gan.key})
        evaluation = CellSpec("eval", 1, {}, {"segmenter": seg.key, "test": "t"})
        return gan.key, seg.key, evaluation.key

    data = np.zeros((2, 8, 8), np.uint8)
    reference = chain(5, data)
    assert chain(5, data.copy()) == reference
    changed = data.copy()
    changed[1, 3, 3] = 1  # one pixel of the real data
    for other in (chain(6, data), chain(5, changed)):
        assert all(a != b for a, b in zip(other, reference))


def test_content_hashes():
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert hash_arrays(a) == hash_arrays(a.copy())
    assert hash_arrays(a) != hash_arrays(a.reshape(4, 3))  # shape counts
    assert hash_arrays(a) != hash_arrays(a.astype(np.uint16))  # dtype counts
    assert hash_arrays(a, a) != hash_arrays(a)
    assert hash_arrays(a[:, ::2]) == hash_arrays(np.ascontiguousarray(a[:, ::2]))


def test_hash_files(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"weights")
    (tmp_path / "m.json").write_text("{}")
    first = hash_files([tmp_path / "w.bin", tmp_path / "m.json"])
    assert first == hash_files([tmp_path / "m.json", tmp_path / "w.bin"])
    (tmp_path / "w.bin").write_bytes(b"weightz")
    assert hash_files([tmp_path / "w.bin", tmp_path / "m.json"]) != first


def test_cell_life_cycle(tmp_path):
    cell = Cell(tmp_path, _spec())
    assert not cell.done
    record = cell.start()
    assert cell.record()["status"] == "running" and cell.record()["attempts"] == 1
    assert not cell.done
    cell.fail(record, RuntimeError("boom"))
    assert cell.record()["status"] == "failed" and "boom" in cell.record()["error"]
    assert not cell.done

    record = cell.start()
    assert cell.record()["attempts"] == 2
    duration = cell.finish(record, {"iou": np.float64(0.5)})
    assert cell.done and duration >= 0
    assert cell.result() == {"iou": 0.5}
    saved = cell.record()
    assert saved["status"] == "done" and saved["key"] == cell.spec.key
    assert {"versions", "git", "started_at", "ended_at", "duration_s"} <= set(saved)

    # A result without the marker (a crash between the two writes) is not finished ...
    (cell.dir / DONE).unlink()
    assert (cell.dir / RESULT).is_file() and not cell.done
    # ... and a marker for another key (a hash-prefix clash) is not this cell's.
    (cell.dir / DONE).write_text(json.dumps({"key": "0" * 64}))
    assert not cell.done
    cell.clear()
    assert not cell.dir.exists()


def test_cell_lock_is_exclusive_and_taken_over_from_a_gone_process(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time

    from emsynth.study.cache import LOCK_STALE_S

    cell, same = Cell(tmp_path, _spec()), Cell(tmp_path, _spec())
    assert cell.try_lock()
    assert not same.try_lock()          # held by a live process (this one)
    assert not same.held_elsewhere()    # ... which is not "elsewhere" for this process
    cell.unlock()
    assert same.try_lock()
    same.unlock()

    # A lock of another live process on this host is honoured ...
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cell.lock_path.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        assert cell.held_elsewhere() and not cell.try_lock()
        # ... until it is not refreshed for LOCK_STALE_S (the holder's machine died) ...
        old = time.time() - LOCK_STALE_S - 1
        os.utime(cell.lock_path, (old, old))
        assert not cell.held_elsewhere() and cell.try_lock()
        assert json.loads(cell.lock_path.read_text())["pid"] == os.getpid()
        cell.unlock()
        # ... or its process is gone.
        cell.lock_path.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        assert cell.held_elsewhere()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not cell.held_elsewhere() and cell.try_lock()
    cell.unlock()
    assert not cell.lock_path.exists()
