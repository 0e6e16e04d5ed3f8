"""`emsynth data fetch`: download public EM datasets, verified, resumable and atomic.

Every file is streamed to `FILE.part` beside its final name, checked (SHA-256 where a published
checksum exists, otherwise a structure check of the TIFF), and only then renamed onto `FILE`, so
a file under its final name is always complete and verified. A dropped connection keeps the
`.part`; the next run continues it with an HTTP Range request (or restarts it when the server
ignores ranges). Only the standard library talks to the network.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import BinaryIO

import imageio.v3 as iio
import numpy as np
import tifffile
from rich.console import Console
from rich.filesize import decimal
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from emsynth import __version__
from emsynth.errors import input_error
from emsynth.io import atomic_path

CHUNK_BYTES = 1 << 16
TIMEOUT_S = 60.0
RETRY_BACKOFF_S = 1.0  # doubled after each dropped connection, at most 10 s

#: Package data: SHA-256 per dataset and relative path (see its "_comment" for provenance).
CHECKSUMS_FILE = "checksums.json"


class CheckFailed(Exception):
    """A downloaded file is not what the dataset promises (wrong checksum or structure)."""


@dataclass(frozen=True)
class StructureCheck:
    """What a file without a published checksum must hold: a multipage greyscale TIFF.

    `values`, when set, lists the only pixel values allowed (binary ground truth).
    """

    pages: int
    height: int
    width: int
    dtype: str = "uint8"
    values: tuple[int, ...] | None = None

    def describe(self) -> str:
        text = f"{self.pages} pages of {self.height}x{self.width} {self.dtype}"
        if self.values is not None:
            text += ", values {" + ",".join(str(v) for v in self.values) + "}"
        return text

    def verify(self, path: Path) -> None:
        """Raise CheckFailed unless `path` is a TIFF holding exactly this structure."""
        try:
            data = tifffile.imread(path)
        except Exception as err:  # tifffile raises several types for non-TIFF bytes
            raise CheckFailed(f"not a readable TIFF ({type(err).__name__}: {err})") from err
        if data.ndim == 2:
            data = data[None]
        expected = (self.pages, self.height, self.width)
        if data.shape != expected or data.dtype != np.dtype(self.dtype):
            got = "x".join(str(s) for s in data.shape[1:])
            raise CheckFailed(
                f"holds {data.shape[0]} page(s) of {got} {data.dtype}, expected {self.describe()}"
            )
        if self.values is not None:
            present = _values_present(data)
            extra = sorted(set(present) - set(self.values))
            if extra:
                raise CheckFailed(
                    f"holds pixel values {extra[:8]} outside the allowed {list(self.values)}"
                )


def _values_present(data: np.ndarray) -> list[int]:
    if data.dtype == np.uint8:  # bincount is far faster than unique on 100+ MB of uint8
        return [int(v) for v in np.flatnonzero(np.bincount(data.ravel(), minlength=256))]
    return [int(v) for v in np.unique(data)]


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: its path under the base URL (and under --dest), and its check."""

    relpath: str
    sha256: str | None = None
    structure: StructureCheck | None = None

    def check_name(self) -> str:
        if self.sha256 is not None:
            return "sha256"
        assert self.structure is not None
        return f"structure check ({self.structure.describe()}; no published checksum)"

    def verify(self, path: Path) -> None:
        """Raise CheckFailed unless `path` passes this file's checksum or structure check."""
        if self.sha256 is not None:
            got = sha256_file(path)
            if got != self.sha256:
                raise CheckFailed(f"sha256 is {got}, expected {self.sha256}")
        if self.structure is not None:
            self.structure.verify(path)


@dataclass(frozen=True)
class Dataset:
    name: str
    description: str
    base_url: str
    files: tuple[RemoteFile, ...]
    layout: str  # what emsynth.data.readers.read_volume(dest / read_path, layout) reads after
    read_path: str = ""  # under dest; EPFL names one TIFF (two volumes sit side by side)
    finish: Callable[[Path, Console], None] | None = None  # turns the files into that layout


def load_checksums(dataset: str) -> dict[str, str]:
    """{relative path: SHA-256} of `dataset` from the package's checksums.json."""
    table = json.loads(resources.files("emsynth.data").joinpath(CHECKSUMS_FILE).read_text())
    return dict(table[dataset])


VNC_SHA256 = load_checksums("drosophila-vnc")

EPFL_VOLUME = StructureCheck(pages=165, height=768, width=1024)
EPFL_TRUTH = StructureCheck(pages=165, height=768, width=1024, values=(0, 255))
ISBI_VOLUME = StructureCheck(pages=30, height=512, width=512)
ISBI_LABELS = StructureCheck(pages=30, height=512, width=512, values=(0, 255))


def unpack_isbi(dest: Path, console: Console) -> None:
    """Split train-volume.tif / train-labels.tif into images/NN.png and masks/NN.png.

    That is the "isbi" slice layout (masks keep the ISBI convention, 0 = membrane) which
    read_volume(layout="isbi") reads. Slices already written are left alone.
    """
    volume = tifffile.imread(dest / "train-volume.tif")
    labels = tifffile.imread(dest / "train-labels.tif")
    written = 0
    for folder, stack in (("images", volume), ("masks", labels)):
        for index, plane in enumerate(stack):
            target = dest / folder / f"{index:02d}.png"
            if target.exists():
                continue
            with atomic_path(target) as tmp:
                iio.imwrite(tmp, plane, extension=".png")
            written += 1
    console.print(f"isbi2012: {written} slice PNGs written to images/ and masks/ (0 = membrane)")


DATASETS: dict[str, Dataset] = {
    "drosophila-vnc": Dataset(
        name="drosophila-vnc",
        description="ssTEM Drosophila larva VNC stack1 (Gerhard et al. 2013), 20 slices "
        "with membranes, mitochondria and synapses; CC BY-NC-SA 3.0",
        base_url="https://raw.githubusercontent.com/unidesigner/groundtruth-drosophila-vnc/"
        "master/stack1",
        files=tuple(RemoteFile(relpath, sha256=digest) for relpath, digest in VNC_SHA256.items()),
        layout="vnc",
    ),
    "epfl-ca1": Dataset(
        name="epfl-ca1",
        description="FIB-SEM mouse CA1 hippocampus (Lucchi et al. 2012), EPFL CVLab training "
        "and testing volumes with mitochondria ground truth",
        base_url="https://documents.epfl.ch/groups/c/cv/cvlab-unit/www/data/"
        "%20ElectronMicroscopy_Hippocampus",
        files=(
            RemoteFile("training.tif", structure=EPFL_VOLUME),
            RemoteFile("training_groundtruth.tif", structure=EPFL_TRUTH),
            RemoteFile("testing.tif", structure=EPFL_VOLUME),
            RemoteFile("testing_groundtruth.tif", structure=EPFL_TRUTH),
        ),
        layout="epfl-tiff",
        read_path="training.tif",
    ),
    "isbi2012": Dataset(
        name="isbi2012",
        description="ISBI 2012 EM segmentation challenge training set (Cardona et al. 2010), "
        "30 ssTEM slices with membrane labels",
        base_url="https://raw.githubusercontent.com/alexklibisz/isbi-2012/master/data",
        files=(
            RemoteFile("train-volume.tif", structure=ISBI_VOLUME),
            RemoteFile("train-labels.tif", structure=ISBI_LABELS),
        ),
        layout="isbi",
        finish=unpack_isbi,
    ),
}


def mirror_contents(name: str) -> str:
    """One-line summary of the relative paths a mirror of dataset `name` must hold."""
    if name == "drosophila-vnc":
        return "raw/NN.tif, membranes/NN.png, mitochondria/NN.png, synapses/NN.png (NN=00..19)"
    return ", ".join(f.relpath for f in DATASETS[name].files)


@dataclass(frozen=True)
class FetchResult:
    relpath: str
    path: Path
    action: str  # "downloaded", "resumed" (continued a .part) or "present" (already verified)
    check: str  # which check the file passed
    size: int


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def get_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise input_error(
            None, f"unknown dataset {name!r}", f"use one of: {', '.join(sorted(DATASETS))}"
        )
    return DATASETS[name]


def _select(dataset: Dataset, only: Sequence[str] | None) -> tuple[RemoteFile, ...]:
    if not only:
        return dataset.files
    chosen = tuple(f for f in dataset.files if any(fnmatch.fnmatch(f.relpath, p) for p in only))
    if not chosen:
        raise input_error(
            None,
            f"no file of {dataset.name} matches {list(only)}",
            f"patterns match relative paths such as {dataset.files[0].relpath}",
        )
    return chosen


def _local_mirror(mirror: str) -> Path | None:
    """The mirror as a local folder, or None when it is a URL."""
    parsed = urllib.parse.urlparse(mirror)
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme == "file":
        folder = Path(urllib.request.url2pathname(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise input_error(
            mirror,
            f"unsupported mirror scheme {parsed.scheme!r}",
            "give an http(s) URL or a folder",
        )
    else:
        folder = Path(mirror).expanduser()
    if not folder.is_dir():
        raise input_error(
            folder, "mirror folder not found", "give an existing folder or an http(s) base URL"
        )
    return folder


class _Dropped(Exception):
    """The transfer stopped before the expected size; the .part holds what arrived."""

    def __init__(self, received: int, total: int | None, reason: str) -> None:
        super().__init__(reason)
        self.received = received
        self.total = total
        self.reason = reason


@dataclass
class _Source:
    stream: BinaryIO
    start: int  # byte offset the stream begins at (0 = from scratch)
    total: int | None  # full file size when known


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    """Parse `bytes START-END/TOTAL` into (START, TOTAL or None)."""
    if not value or not value.startswith("bytes "):
        return None
    span, _, total = value[6:].partition("/")
    start, _, _end = span.partition("-")
    try:
        return int(start), (None if total in ("", "*") else int(total))
    except ValueError:
        return None


def _open_http(url: str, offset: int, *, fix: str) -> _Source:
    headers = {"User-Agent": f"emsynth/{__version__} (python urllib)"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S
        )
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and offset:  # the .part is no prefix of this file: start over
            return _open_http(url, 0, fix=fix)
        raise input_error(url, f"HTTP {err.code} {err.reason}", fix) from err
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        raise input_error(url, f"cannot download ({reason})", fix) from err
    length = response.headers.get("Content-Length")
    if offset and response.status == 206:
        span = _content_range(response.headers.get("Content-Range"))
        if span is not None and span[0] == offset:
            return _Source(response, offset, span[1])
        response.close()  # a range other than the one asked for: start over
        return _open_http(url, 0, fix=fix)
    return _Source(response, 0, int(length) if length and length.isdigit() else None)


def _open_local(path: Path, offset: int, *, fix: str) -> _Source:
    if not path.is_file():
        raise input_error(path, "missing from the mirror folder", fix)
    size = path.stat().st_size
    start = offset if offset <= size else 0
    stream = open(path, "rb")  # noqa: SIM115 - _transfer closes it
    stream.seek(start)
    return _Source(stream, start, size)


def _transfer(
    open_source: Callable[[int], _Source], part: Path, progress: Progress, task: TaskID
) -> bool:
    """Stream into `part`, continuing it where the source allows. Returns whether it resumed."""
    offset = part.stat().st_size if part.exists() else 0
    source = open_source(offset)
    progress.reset(task, total=source.total, completed=source.start)
    received = source.start
    failure: str | None = None
    with open(part, "ab" if source.start else "wb") as out:
        try:
            while block := source.stream.read(CHUNK_BYTES):
                out.write(block)
                received += len(block)
                progress.update(task, completed=received)
        except (OSError, http.client.HTTPException) as err:
            failure = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        finally:
            source.stream.close()
            out.flush()
            os.fsync(out.fileno())
    if failure is None and source.total is not None and received < source.total:
        failure = "the server closed the connection early"
    if failure is not None:
        raise _Dropped(received, source.total, failure)
    return source.start > 0


def _fetch_one(
    remote: RemoteFile,
    origin: str,
    open_source: Callable[[int], _Source],
    target: Path,
    progress: Progress,
    task: TaskID,
    console: Console,
    retries: int,
) -> FetchResult:
    """Make `target` a verified copy of `remote`: keep it if it passes, else download it."""
    if target.exists():
        try:
            remote.verify(target)
            return FetchResult(
                remote.relpath, target, "present", remote.check_name(), target.stat().st_size
            )
        except CheckFailed as err:
            target.unlink()
            console.print(f"{target}: present but fails its check ({err}); deleted, downloading")
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    retries = max(retries, 0)
    for attempt in range(retries + 1):
        try:
            resumed = _transfer(open_source, part, progress, task)
            break
        except _Dropped as drop:
            of_total = f" of {drop.total}" if drop.total is not None else ""
            what = f"transfer stopped after {drop.received}{of_total} bytes ({drop.reason})"
            if attempt == retries:
                raise input_error(
                    origin,
                    f"{what}; nothing was written under {target.name}, the partial download "
                    f"is kept as {part}",
                    "run the same command again to resume from it",
                ) from None
            console.print(f"{origin}: {what}; resuming (try {attempt + 2} of {retries + 1})")
            time.sleep(min(RETRY_BACKOFF_S * 2**attempt, 10.0))
    try:
        remote.verify(part)
    except CheckFailed as err:
        part.unlink()
        kind = "sha256 checksum" if remote.sha256 is not None else "structure check"
        raise input_error(
            origin,
            f"{remote.relpath} failed its {kind}: {err}; the download was deleted and nothing "
            f"was written under {target.name}",
            "run again; if it fails again the source serves a different file than emsynth "
            "expects (use another --mirror)",
        ) from None
    os.replace(part, target)
    action = "resumed" if resumed else "downloaded"
    return FetchResult(remote.relpath, target, action, remote.check_name(), target.stat().st_size)


@contextlib.contextmanager
def _progress_bar(console: Console, show: bool) -> Iterator[tuple[Progress, TaskID]]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not show, transient=True) as progress:
        yield progress, progress.add_task("", total=None)


def fetch_dataset(
    name: str,
    dest: str | Path,
    *,
    mirror: str | None = None,
    only: Sequence[str] | None = None,
    retries: int = 2,
    console: Console | None = None,
    progress: bool = True,
) -> list[FetchResult]:
    """Download dataset `name` into `dest`, verifying every file; return what happened per file.

    `mirror` replaces the upstream base URL: an http(s) URL or a local folder holding the same
    relative paths. `only` restricts to files whose relative path matches a glob pattern.
    `retries` automatic resumes after a dropped connection (0: fail at once, keep the .part).
    """
    dataset = get_dataset(name)
    chosen = _select(dataset, only)
    dest = Path(dest)
    console = console or Console(stderr=True)
    local = _local_mirror(mirror) if mirror else None
    base = (mirror or dataset.base_url).rstrip("/")
    contents = f"the {name} mirror must hold {mirror_contents(name)}"
    console.print(
        f"{name}: {dataset.description}; from {base} into {dest}", highlight=False, soft_wrap=True
    )
    results = []
    with _progress_bar(console, progress) as (bar, task):
        for number, remote in enumerate(chosen, start=1):
            if local is not None:
                origin = str(local / remote.relpath)
                opener = functools.partial(_open_local, local / remote.relpath, fix=contents)
            else:
                origin = f"{base}/{urllib.parse.quote(remote.relpath)}"
                fix = (
                    f"check the URL and your network; {contents}"
                    if mirror
                    else "check your network, or download the file by hand into a folder (same "
                    "relative path) and pass that folder as --mirror"
                )
                opener = functools.partial(_open_http, origin, fix=fix)
            bar.update(task, description=f"[{number}/{len(chosen)}] {remote.relpath}")
            result = _fetch_one(
                remote, origin, opener, dest / remote.relpath, bar, task, console, retries
            )
            results.append(result)
            console.print(
                f"{result.relpath}: {result.action}, {decimal(result.size)}, {result.check} ok",
                highlight=False,
            )
    if dataset.finish is not None and len(chosen) == len(dataset.files):
        dataset.finish(dest, console)
    return results
