"""`emsynth data fetch`, offline: a local HTTP server (127.0.0.1, port 0) stands in for upstream."""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import tifffile
from rich.console import Console

from emsynth.data import fetch as fetch_module
from emsynth.data.fetch import (
    CHECKSUMS_FILE,
    DATASETS,
    EPFL_TRUTH,
    EPFL_VOLUME,
    CheckFailed,
    StructureCheck,
    fetch_dataset,
    load_checksums,
)
from emsynth.errors import EmsynthError

VNC_RAW_00 = "raw/00.tif"  # 1 048 734 bytes: the real-size file the resume tests move


class _Handler(BaseHTTPRequestHandler):
    """GET with optional Range support, per-file overrides and a one-shot early close."""

    server: _MirrorServer

    def do_GET(self) -> None:
        relpath = urllib.parse.unquote(self.path.lstrip("/"))
        range_header = self.headers.get("Range")
        self.server.seen.append((relpath, range_header))
        data = self.server.body(relpath)
        if data is None:
            self.send_error(404, "File not found")
            return
        start = 0
        if range_header and self.server.ranges:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = self.server.drop_after.pop(relpath, None)
        if cut is not None:  # promise the whole length, send part of it, hang up
            self.wfile.write(body[:cut])
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _MirrorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.roots: dict[str, Path] = {}  # URL prefix -> folder served under it
        self.files: dict[str, bytes] = {}  # exact relpath -> bytes (wins over roots)
        self.drop_after: dict[str, int] = {}
        self.ranges = True
        self.seen: list[tuple[str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def body(self, relpath: str) -> bytes | None:
        if relpath in self.files:
            return self.files[relpath]
        for prefix, folder in self.roots.items():
            if relpath.startswith(prefix + "/") and (folder / relpath[len(prefix) + 1 :]).is_file():
                return (folder / relpath[len(prefix) + 1 :]).read_bytes()
        return None


@pytest.fixture
def server() -> Iterator[_MirrorServer]:
    srv = _MirrorServer()
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def vnc_server(server: _MirrorServer, shared_data: Path) -> _MirrorServer:
    server.roots["vnc"] = shared_data / "drosophila_vnc"
    return server


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _shared_sums(shared_data: Path) -> dict[str, str]:
    lines = (shared_data / "drosophila_vnc" / "SHA256SUMS").read_text().splitlines()
    return {rel.removeprefix("./"): digest for digest, rel in (line.split() for line in lines)}


def test_checksums_are_package_data_registered_for_installs() -> None:
    """The table ships as emsynth/data/checksums.json (listed in pyproject's package-data,
    so wheels carry it) and holds one SHA-256 per drosophila-vnc file, in file order."""
    import importlib.resources

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    text = importlib.resources.files("emsynth.data").joinpath(CHECKSUMS_FILE).read_text()
    table = json.loads(text)["drosophila-vnc"]
    assert load_checksums("drosophila-vnc") == table
    assert len(table) == 80 and all(re.fullmatch(r"[0-9a-f]{64}", d) for d in table.values())
    assert [f.relpath for f in DATASETS["drosophila-vnc"].files] == list(table)
    assert all(f.sha256 == table[f.relpath] for f in DATASETS["drosophila-vnc"].files)
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    package_data = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]
    assert f"data/{CHECKSUMS_FILE}" in package_data["emsynth"]


def test_vnc_table_matches_the_shared_checksums_and_upstream_urls(shared_data: Path) -> None:
    vnc = DATASETS["drosophila-vnc"]
    assert {f.relpath: f.sha256 for f in vnc.files} == _shared_sums(shared_data)
    assert len(vnc.files) == 80
    assert vnc.base_url + "/" + VNC_RAW_00 == (
        "https://raw.githubusercontent.com/unidesigner/groundtruth-drosophila-vnc/master/stack1/"
        "raw/00.tif"
    )


def test_vnc_fetch_from_http_mirror_verifies_and_reads_back(
    vnc_server: _MirrorServer, shared_data: Path, tmp_path: Path
) -> None:
    from emsynth.data.readers import read_volume

    dest = tmp_path / "vnc"
    results = fetch_dataset(
        "drosophila-vnc", dest, mirror=f"{vnc_server.url}/vnc", console=_quiet(), progress=False
    )
    assert len(results) == 80
    assert {r.action for r in results} == {"downloaded"}
    assert {r.check for r in results} == {"sha256"}
    sums = _shared_sums(shared_data)
    assert {r.relpath: _sha256(r.path) for r in results} == sums
    assert not list(dest.rglob("*.part"))

    fetched = read_volume(dest, layout="vnc")
    original = read_volume(shared_data / "drosophila_vnc", layout="vnc")
    assert fetched.shape == (20, 1024, 1024)
    np.testing.assert_array_equal(fetched.image, original.image)
    assert fetched.labels.keys() == original.labels.keys()
    for name, mask in original.labels.items():
        np.testing.assert_array_equal(fetched.labels[name], mask)

    requests_before = len(vnc_server.seen)
    again = fetch_dataset(
        "drosophila-vnc", dest, mirror=f"{vnc_server.url}/vnc", console=_quiet(), progress=False
    )
    assert {r.action for r in again} == {"present"}
    assert len(vnc_server.seen) == requests_before  # verified locally, nothing downloaded


def test_local_directory_mirror_via_cli(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from emsynth.cli import main

    mirror = shared_data / "drosophila_vnc"
    dest = tmp_path / "vnc"
    argv = ["emsynth", "data", "fetch", "drosophila-vnc", "--dest", str(dest)]
    argv += ["--mirror", str(mirror), "--only", "raw/00.tif", "--only", "*/01.png"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    fetched = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert fetched == [
        "membranes/01.png",
        "mitochondria/01.png",
        VNC_RAW_00,
        "synapses/01.png",
    ]
    for relpath in fetched:
        assert (dest / relpath).read_bytes() == (mirror / relpath).read_bytes()
    assert "4 files verified" in capsys.readouterr().out


def test_present_file_that_fails_its_check_is_replaced(shared_data: Path, tmp_path: Path) -> None:
    dest = tmp_path / "vnc"
    (dest / "raw").mkdir(parents=True)
    (dest / VNC_RAW_00).write_bytes(b"not the image")
    [result] = fetch_dataset(
        "drosophila-vnc",
        dest,
        mirror=str(shared_data / "drosophila_vnc"),
        only=[VNC_RAW_00],
        console=_quiet(),
        progress=False,
    )
    assert result.action == "downloaded"
    assert _sha256(dest / VNC_RAW_00) == _shared_sums(shared_data)[VNC_RAW_00]


def test_checksum_mismatch_leaves_no_file(
    vnc_server: _MirrorServer, shared_data: Path, tmp_path: Path
) -> None:
    corrupted = bytearray((shared_data / "drosophila_vnc" / VNC_RAW_00).read_bytes())
    corrupted[5000] ^= 0xFF
    vnc_server.files[f"vnc/{VNC_RAW_00}"] = bytes(corrupted)
    dest = tmp_path / "vnc"
    with pytest.raises(EmsynthError) as err:
        fetch_dataset(
            "drosophila-vnc",
            dest,
            mirror=f"{vnc_server.url}/vnc",
            only=[VNC_RAW_00],
            console=_quiet(),
            progress=False,
        )
    message = str(err.value)
    assert f"{vnc_server.url}/vnc/{VNC_RAW_00}" in message
    assert "failed its sha256 checksum" in message
    assert _shared_sums(shared_data)[VNC_RAW_00] in message
    assert "\n" not in message
    assert not (dest / VNC_RAW_00).exists()
    assert not (dest / (VNC_RAW_00 + ".part")).exists()


def test_dropped_connection_keeps_part_and_next_run_resumes_with_range(
    vnc_server: _MirrorServer, shared_data: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "vnc"
    relpath = f"vnc/{VNC_RAW_00}"
    size = (shared_data / "drosophila_vnc" / VNC_RAW_00).stat().st_size
    vnc_server.drop_after[relpath] = 300_000
    kwargs = {"mirror": f"{vnc_server.url}/vnc", "only": [VNC_RAW_00], "console": _quiet()}
    with pytest.raises(EmsynthError) as err:
        fetch_dataset("drosophila-vnc", dest, retries=0, progress=False, **kwargs)
    assert f"transfer stopped after 300000 of {size} bytes" in str(err.value)
    assert "run the same command again to resume" in str(err.value)
    assert not (dest / VNC_RAW_00).exists()
    part = dest / (VNC_RAW_00 + ".part")
    assert part.stat().st_size == 300_000

    [result] = fetch_dataset("drosophila-vnc", dest, retries=0, progress=False, **kwargs)
    assert result.action == "resumed"
    assert vnc_server.seen[-1] == (relpath, "bytes=300000-")
    assert _sha256(dest / VNC_RAW_00) == _shared_sums(shared_data)[VNC_RAW_00]
    assert not part.exists()


def test_server_without_ranges_restarts_the_part_cleanly(
    vnc_server: _MirrorServer, shared_data: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "vnc"
    relpath = f"vnc/{VNC_RAW_00}"
    vnc_server.ranges = False
    vnc_server.drop_after[relpath] = 200_000
    kwargs = {"mirror": f"{vnc_server.url}/vnc", "only": [VNC_RAW_00], "console": _quiet()}
    with pytest.raises(EmsynthError, match="transfer stopped after 200000"):
        fetch_dataset("drosophila-vnc", dest, retries=0, progress=False, **kwargs)
    [result] = fetch_dataset("drosophila-vnc", dest, retries=0, progress=False, **kwargs)
    assert vnc_server.seen[-1] == (relpath, "bytes=200000-")  # asked, but got the whole file
    assert result.action == "downloaded"
    assert _sha256(dest / VNC_RAW_00) == _shared_sums(shared_data)[VNC_RAW_00]


def test_automatic_retry_resumes_within_one_run(
    vnc_server: _MirrorServer, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch_module, "RETRY_BACKOFF_S", 0.0)
    vnc_server.drop_after[f"vnc/{VNC_RAW_00}"] = 123_456
    dest = tmp_path / "vnc"
    [result] = fetch_dataset(
        "drosophila-vnc",
        dest,
        mirror=f"{vnc_server.url}/vnc",
        only=[VNC_RAW_00],
        retries=1,
        console=_quiet(),
        progress=False,
    )
    assert result.action == "resumed"
    assert [rng for _, rng in vnc_server.seen] == [None, "bytes=123456-"]
    assert _sha256(dest / VNC_RAW_00) == _shared_sums(shared_data)[VNC_RAW_00]


def _write_stack(path: Path, stack: np.ndarray) -> Path:
    tifffile.imwrite(path, stack, photometric="minisblack")
    return path


def test_structure_check_accepts_the_expected_stack_and_names_each_mismatch(
    tmp_path: Path,
) -> None:
    check = StructureCheck(pages=3, height=16, width=24, values=(0, 255))
    labels = np.zeros((3, 16, 24), np.uint8)
    labels[:, 4:8, 4:12] = 255
    check.verify(_write_stack(tmp_path / "ok.tif", labels))

    cases = {
        "pages.tif": (labels[:2], "holds 2 page(s) of 16x24 uint8, expected 3 pages of 16x24"),
        "size.tif": (labels[:, :8], "holds 3 page(s) of 8x24 uint8"),
        "dtype.tif": (labels.astype(np.uint16), "holds 3 page(s) of 16x24 uint16"),
        "values.tif": (labels // 255, "pixel values [1] outside the allowed [0, 255]"),
    }
    for name, (stack, expected) in cases.items():
        with pytest.raises(CheckFailed, match=re.escape(expected)):
            check.verify(_write_stack(tmp_path / name, stack))
    (tmp_path / "html.tif").write_text("<html>moved</html>")
    with pytest.raises(CheckFailed, match="not a readable TIFF"):
        check.verify(tmp_path / "html.tif")


def test_epfl_expectation_rejects_a_small_stack(tmp_path: Path) -> None:
    stack = _write_stack(tmp_path / "training.tif", np.zeros((3, 16, 24), np.uint8))
    assert EPFL_VOLUME.describe() == "165 pages of 768x1024 uint8"
    with pytest.raises(CheckFailed, match="expected 165 pages of 768x1024 uint8, values {0,255}"):
        EPFL_TRUTH.verify(stack)
    assert DATASETS["epfl-ca1"].base_url.startswith(
        "https://documents.epfl.ch/groups/c/cv/cvlab-unit/www/data/%20ElectronMicroscopy_Hippocampus"
    )


def _isbi_like(tmp_path: Path, labels_values: tuple[int, int] = (0, 255)) -> Path:
    """A full-size ISBI-like pair (30 x 512 x 512 uint8) with smooth content."""
    folder = tmp_path / "isbi_src"
    folder.mkdir()
    yy, xx = np.mgrid[0:512, 0:512]
    volume = np.stack([((xx + yy + 7 * z) % 256).astype(np.uint8) for z in range(30)])
    membrane = ((xx + 3 * np.arange(30)[:, None, None]) % 32) < 6
    labels = np.where(membrane, labels_values[0], labels_values[1]).astype(np.uint8)
    _write_stack(folder / "train-volume.tif", volume)
    _write_stack(folder / "train-labels.tif", labels)
    return folder


def test_isbi_fetch_applies_structure_check_and_unpacks_slices(
    server: _MirrorServer, tmp_path: Path
) -> None:
    source = _isbi_like(tmp_path)
    server.roots["isbi"] = source
    dest = tmp_path / "isbi"
    console = _quiet()
    results = fetch_dataset(
        "isbi2012", dest, mirror=f"{server.url}/isbi", console=console, progress=False
    )
    assert [r.relpath for r in results] == ["train-volume.tif", "train-labels.tif"]
    assert results[1].check == (
        "structure check (30 pages of 512x512 uint8, values {0,255}; no published checksum)"
    )
    assert "structure check (30 pages of 512x512 uint8; no published checksum) ok" in (
        console.file.getvalue()
    )
    for relpath in ("train-volume.tif", "train-labels.tif"):
        assert (dest / relpath).read_bytes() == (source / relpath).read_bytes()
    assert len(list((dest / "images").glob("*.png"))) == 30
    assert len(list((dest / "masks").glob("*.png"))) == 30
    from emsynth.data.readers import read_volume

    volume = read_volume(dest, layout="isbi")
    np.testing.assert_array_equal(volume.image, tifffile.imread(source / "train-volume.tif"))
    membrane = tifffile.imread(source / "train-labels.tif") == 0
    np.testing.assert_array_equal(volume.labels["membrane"], membrane)


def test_isbi_labels_with_wrong_values_fail_the_structure_check(
    server: _MirrorServer, tmp_path: Path
) -> None:
    server.roots["isbi"] = _isbi_like(tmp_path, labels_values=(0, 1))
    dest = tmp_path / "isbi"
    with pytest.raises(EmsynthError, match="train-labels.tif failed its structure check"):
        fetch_dataset(
            "isbi2012", dest, mirror=f"{server.url}/isbi", console=_quiet(), progress=False
        )
    assert (dest / "train-volume.tif").exists()
    assert not (dest / "train-labels.tif").exists()
    assert not (dest / "train-labels.tif.part").exists()
    assert not (dest / "masks").exists()


def test_missing_mirror_file_names_what_the_mirror_must_hold(
    server: _MirrorServer, tmp_path: Path
) -> None:
    with pytest.raises(EmsynthError) as err:
        fetch_dataset(
            "epfl-ca1", tmp_path / "e", mirror=f"{server.url}/x", console=_quiet(), progress=False
        )
    assert str(err.value) == (
        f"{server.url}/x/training.tif: HTTP 404 File not found. Fix: check the URL and your "
        "network; the epfl-ca1 mirror must hold training.tif, training_groundtruth.tif, "
        "testing.tif, testing_groundtruth.tif"
    )
    with pytest.raises(EmsynthError, match="mirror folder not found"):
        fetch_dataset("isbi2012", tmp_path / "e", mirror=str(tmp_path / "nowhere"))


def test_unknown_dataset_is_a_one_line_error_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    with pytest.raises(EmsynthError, match="unknown dataset 'lucchi'.*drosophila-vnc, epfl-ca1"):
        fetch_dataset("lucchi", tmp_path)
    from emsynth.cli import main

    monkeypatch.setattr(sys, "argv", ["emsynth", "data", "fetch", "cremi", "--dest", "x"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "unknown dataset 'cremi'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
