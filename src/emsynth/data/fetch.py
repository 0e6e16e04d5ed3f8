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
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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

# SHA-256 of the drosophila-vnc stack1 files: the same bytes as the public copy at
# github.com/unidesigner/groundtruth-drosophila-vnc (taken from the project's verified copy).
_VNC_SHA256SUMS = """\
69b32be7703e1d857ed6286cb10d14324ffd75e26a80c9b5be86fdde8ce869dd  membranes/00.png
237c0c6c58f0b213d5319415b4a794e3703ffeff70b4af77c023f2c7e566359f  membranes/01.png
d7a5e1351d99d250bda5765b5573b2b66aa3bad39d518a62173301b532e1b1a3  membranes/02.png
48b145fb2dc5e5c01a44ab97c8deb0371ad549d8abba36e9e26bec5c0c3d935b  membranes/03.png
fabd6ed75c1ab1129d25b82d7b05b6e3e47ecd4fded5e8c50bebc79e52d338a2  membranes/04.png
cf2a0cf4d359511eec00465c79320081202e1a9e0ef7acf646ac868ef01f864e  membranes/05.png
f7671946c367eb6da32eeb8dc3650736fc3a5bc598e03867195b28d5ba04e169  membranes/06.png
12651668648abda93acfc7b1d9163f42de0db24dfaf0081cb2bc145c303b8859  membranes/07.png
0917cdaa7e0b657d6e4897bb0268d8a1019bad56d55488559c6b7476a81fc660  membranes/08.png
1719691ffd18184091d32d993547e90787fea106a4d13049458f318c01369177  membranes/09.png
abefd5269b3e432d043015e9e635e37cd210f63e036a115f325c38f29f70e7d3  membranes/10.png
ab3751ea05eecd5dfb0d8a538807fcdd384bf7b657be1ade9cfc1fbb0567a5d3  membranes/11.png
de74415ed1d0a0c1f3f7e4321674fddde55afaf112abf56b16d4289f4516cb42  membranes/12.png
404138498926cfb45c756d4c693cb9e6b088afbd0237f48422253c9a89608458  membranes/13.png
22534cbddc8ab0c0ddbc88803a20c4982804d6e931af83ce92bce28e20edecb0  membranes/14.png
4ab2d40bc25422d835952807270c03cacae3ac698f8b9785437cc97f4f89aef3  membranes/15.png
0a4565fb902354aa98e03eb8c4ccdae5784fbf8aa82cc1e84dad15226853cca3  membranes/16.png
4b70f3bef110f6276fc8de6da43d4b7726e00d068ffa5b70107d08748adb07f8  membranes/17.png
1561c68934295328aab90477e5067bb033ec5ffd0c4a854e90facdabf5baf448  membranes/18.png
c13f72d5c4734750312469bd45f6a1c3191143faec96903623f9c725713a922a  membranes/19.png
511bbbe9ce687a0422728fcc5921f5e5cb553aa9601518bf193325df19a0841f  mitochondria/00.png
2e8a00b9d45eb0731cea31d0bdb3f001591c3a7bd4c29566437a65add85dfa90  mitochondria/01.png
73d3fefd0be7846ff27debbae41c52630913aa79233151b19f7cb6b4cf69e48f  mitochondria/02.png
e0377cb8e617ff8dda0dfcc920eb4d513d7809bfd7ccc13f059c651afe224f93  mitochondria/03.png
766dba641e9f15443e154b1c58f12e1a63aa526102329b42f2934430e0195919  mitochondria/04.png
3afce96c2e5586153f3f3f94916688ee049c1dea8af42d5b66f72a19612be91d  mitochondria/05.png
b9522d90da07f087418af695ab557cc5691548edcff8ca71143a6a0dd1694230  mitochondria/06.png
475b66b3a96970d17f2e8bfe466a61232582640fb91e62ba1643250451ce701b  mitochondria/07.png
7327b9c3627d6a57afecd95884b51160ae42823240e8a71c29d3d4c7c47f63e2  mitochondria/08.png
d276b2913dbf0505e59a01e4c7616a8ab66c2fd87431af5fa32800990f02c377  mitochondria/09.png
ad41c7ce9e4b44dacb509c861ab263f783fdd4624518dbdc5731a5dea171b973  mitochondria/10.png
c02adc9a9a9df771d7e798ad01f1048b46d404cbea9c5e7705d26b80a8edf180  mitochondria/11.png
66f7035ea748ebb96a73ce1b710fe129b2332b31106cb94615627e93c50e747f  mitochondria/12.png
0bc359db0dc5ddc31e735136695ea88015bdeb37ddfc3e6e89f604918e4765c5  mitochondria/13.png
44c833e85d8240e3e8bbc34d9fba07d29be9d9cdd71c18b12a4c70e597502c72  mitochondria/14.png
6823e4900e1457c7249b87876298f3cba5339d1a8e34c83f5a2766d024f7b54a  mitochondria/15.png
5ffe5edaa15ad53dee648736aeffc76fd1e256e13b40b7b34cb65e3a38fdaeef  mitochondria/16.png
b812bb16171af4ea1bfde98401f0a7de6a4481cc475d9856affc2fbe7aad4e73  mitochondria/17.png
d0eddd9355e95cb3aa0c438f831fcd8e884627e96beac4ae723d2e9c68f41176  mitochondria/18.png
92d28e2c28b9068c3efae4e26dd9a31b64efb8082813097d097a4b3f9ad2001f  mitochondria/19.png
b76df299a184d9a8616aa7867a1b0f577313e97cc9fef826a0f76f65f9676383  raw/00.tif
718808c0149d6e24ee7b12085695c1ff8e3afb8e5dd13e18ca291fc9b60fcd09  raw/01.tif
0e2480e0164bcbc2704d76232919f5fcc0540988c6f91a8a78b8f514718717a4  raw/02.tif
1d6ca42fad097c8647b5e077ade1e7cb124d09aa11ef51b22c74367a44b04af6  raw/03.tif
6be1ca5151edf4ffbe79745ce3a1cad784a83fc5843120820ba4133474c41bab  raw/04.tif
5c208cd81d2bebe969e07f5c6717514e8c5c2e9967bac3685ddb71add9142b94  raw/05.tif
db5ad4774950f7b0656853328bd8ef1e43f7b0790bf417c760a0cf1a1ac9999e  raw/06.tif
5a0611902a45f3bf368ffc3312c74b0f2a8f923bba6f73d9041c727d3060bfbf  raw/07.tif
9cff4e390c3604152a2b7a70d99e96edc45d1e50b48ae64b042ed2220fbdfbb9  raw/08.tif
eeb17b2971d467a96525d879037d69d5973c998f5e4bcafe6d9adec08b4457a5  raw/09.tif
6a9debebb6e78e0789b732d16ef4755011b5047299f9f1c22edb28a06c106a16  raw/10.tif
318f17e45754e890ab7df384a1f3941bebeea4864fe4b49a34758a858de56bbe  raw/11.tif
6e1a8b23083641cb4a066d281ff4c5149056a0f17b32e68d04c57948ef6f5547  raw/12.tif
564970a899a67aab0ad899d22d19c43b68f6eeb01d893f5770ebc114cb4bd12c  raw/13.tif
7a3bfd5951dbe637c764e51835a3d59c63de33b2dbcc9b0d70a0302a30dde904  raw/14.tif
80ab55b19d877d791f2e008343ea1eb2315bd9dfe53bec141ea99c05a66b20c0  raw/15.tif
ea86c994d2b9a2fe0764fcdbafd8b1fa21c091cb8ebac333e3c64ed6aa645647  raw/16.tif
5cb536a565b57e6ccd47ef619d1f4e7cd4eae8d11eb5a1c7ea8bf6ac50d51eca  raw/17.tif
bbe3f7b85d499899e7dec31ec9be1f75cd82fad710dc8a68bd24531fecf3e584  raw/18.tif
a9c2710133d4791cad456db91fdf03d2cf44f3c517514f55efda596f4a4cd642  raw/19.tif
53ed0b7d4e149caa8ede4bfa652389fbbccf3c6c0d238d8bf09cea9d2e8a6221  synapses/00.png
961c7b37dd7abc80e43b916683b5ca72ecd2646e5966d737051134f730b622bf  synapses/01.png
5615a9b85646fd6af4925ec10f234a2185df0ce44d3aed4a88a867a0b0ee2792  synapses/02.png
8fff021eb41ab2a1f360e5ca635fd1000392fccfbd31923ce0201140d58948d5  synapses/03.png
05b4419acd1d06db7f689914fefaaa5778bde355fba94b77cd4fb62c84599aa6  synapses/04.png
8ab560b613eac7927fb4fd685ee257ca8f030d2d3e82422557e8ee0e5daf2859  synapses/05.png
866a9ad726f90602a36fc79249240bbd9610b872a351413b09bec771d86229f0  synapses/06.png
43021b322c5e04eea79edbea94c329a7ca3fb413da445c827f63e1969464ca2c  synapses/07.png
8c7096612c2b40d709ea3163da12fecc4208affcc5b55b9a2160d46b6215187d  synapses/08.png
12794fe7af38c1c2c5fd53905210de69b9f2ce8e366cbab2db7991bd608b046c  synapses/09.png
2ea9bf4a80b348c4ddfdf3d2a3b42118c31ef6a8daed0de46d0087d7e4004dea  synapses/10.png
fd84efadd225f58b650ab8514dc074dc015f1a00da4441f36ad5a955a1816452  synapses/11.png
5f847f545de6aa60e3c82ec71f2de092647481b530858ed568305b12a08c2dc5  synapses/12.png
2a7bff90297c753dd6374eb8b318b36eeabb8c83acde48a924914ba768e8118a  synapses/13.png
8ed0fb8c57339372e4d62614561804c752a0f0fee9a45ac085bf052671366435  synapses/14.png
d858cf9906a68e7d4fe8214147c0608f2f175e17a556e97548eecc6e6e044549  synapses/15.png
cc4c36c1130a59f491aab3f3a5c8d7b46553d9bbe79022cc0ea1e540f44f4466  synapses/16.png
7a9126cb7a977c246bbe310cccbad78f089290701eb55c08ae1844afbd6e7c72  synapses/17.png
5ef199271f5c3da60da71aca1476c4820ec5af4d90e4afe174e0bfe40621091a  synapses/18.png
4efd22ff114cb74b005d82b0482f18da0ab6927c30ee29f2fec27ffc94fa34b0  synapses/19.png
"""


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


def _parse_sums(text: str) -> dict[str, str]:
    sums = {}
    for line in text.strip().splitlines():
        digest, relpath = line.split()
        sums[relpath] = digest
    return sums


VNC_SHA256 = _parse_sums(_VNC_SHA256SUMS)

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
