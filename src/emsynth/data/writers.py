"""Write a `Volume` as an emsynth slice folder (read back by `read_volume(layout="slices")`).

Layout: images/NNNN.png (uint8), masks/NNNN.png (255 = mitochondrion), membranes/NNNN.png
(255 = membrane) and synapses/NNNN.png when those labels exist, and meta.json (pixel_size_nm,
source, slice_names). Files are numbered by z; the original slice names live in meta.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from emsynth.data.volume import MEMBRANE, MITO, SYNAPSE, Volume
from emsynth.errors import input_error
from emsynth.io import atomic_path, atomic_write_text

#: Label name -> sub-folder of the slice layout.
LABEL_FOLDERS = {MITO: "masks", MEMBRANE: "membranes", SYNAPSE: "synapses"}
IMAGE_FOLDER = "images"
META_NAME = "meta.json"
FORMAT = "emsynth-slices"


def is_slice_folder(path: Path) -> bool:
    """True when `path` holds a meta.json written by `write_slice_folder`."""
    meta = path / META_NAME
    if not meta.is_file():
        return False
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def _write_png(target: Path, array: np.ndarray) -> None:
    with atomic_path(target) as tmp:
        iio.imwrite(tmp, array, extension=".png")


def write_slice_folder(volume: Volume, out_dir: str | Path) -> Path:
    """Write `volume` into `out_dir` (created if needed) and return its path.

    An existing emsynth slice folder is overwritten (stale slices and label folders of the old
    volume are removed); any other non-empty folder is refused, so user data is never mixed
    with or deleted by an output.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise input_error(out, "exists and is not a folder", "choose another --out path")
    if out.is_dir() and any(out.iterdir()) and not is_slice_folder(out):
        raise input_error(
            out,
            "folder is not empty and is not an emsynth slice folder (no emsynth meta.json)",
            "choose a new or empty --out folder",
        )
    unknown = sorted(set(volume.labels) - set(LABEL_FOLDERS))
    if unknown:
        raise input_error(
            out,
            f"cannot write label(s) {', '.join(unknown)}: the slice layout holds only "
            f"{', '.join(LABEL_FOLDERS)}",
            "drop or rename those labels before writing",
        )
    out.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(len(volume) - 1)))
    stems = [f"{z:0{width}d}" for z in range(len(volume))]

    # meta.json goes first, marked incomplete, so that an interrupted write can be rerun into
    # the same folder, and last with the full record once every slice is in place.
    meta = {
        "format": FORMAT,
        "pixel_size_nm": list(volume.pixel_size_nm) if volume.pixel_size_nm else None,
        "source": volume.source,
        "slice_names": list(volume.slice_names),
        "labels": sorted(volume.labels),
        "shape": list(volume.shape),
    }
    atomic_write_text(out / META_NAME, json.dumps({**meta, "complete": False}, indent=2))
    folders = {IMAGE_FOLDER: volume.image}
    for name, label in volume.labels.items():
        folders[LABEL_FOLDERS[name]] = label.astype(np.uint8) * 255
    for folder, stack in folders.items():
        for stem, plane in zip(stems, stack, strict=True):
            _write_png(out / folder / f"{stem}.png", plane)
    _remove_stale(out, set(folders), set(stems))
    atomic_write_text(out / META_NAME, json.dumps({**meta, "complete": True}, indent=2))
    return out


def _remove_stale(out: Path, folders: set[str], stems: set[str]) -> None:
    """Delete slices left over from an earlier, different volume written to the same folder."""
    for folder in [IMAGE_FOLDER, *LABEL_FOLDERS.values()]:
        path = out / folder
        if not path.is_dir():
            continue
        for file in path.glob("*.png"):
            if folder not in folders or file.stem not in stems:
                file.unlink()
        if folder not in folders and not any(path.iterdir()):
            path.rmdir()
