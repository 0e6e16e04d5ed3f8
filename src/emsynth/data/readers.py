"""Read every supported EM layout into a `Volume`, validating each file on the way.

Layouts (see `read_volume`): "vnc" (Drosophila VNC stack: raw/ + membranes/, mitochondria/,
synapses/), "epfl-tiff" (multipage training.tif + training_groundtruth.tif), "slices" (images/ +
masks/ [+ membranes/, synapses/] [+ meta.json]; the EPFL per-slice layout and emsynth's own
output), "isbi" (images/ + masks/ with 0 = membrane), "generic" (images/ + any mask folder) and
"ome-zarr" (an OME-Zarr / NGFF 0.4 or 0.5 image with labels/<name>; `emsynth.data.omezarr`).
Images and masks pair by file stem; slices sort naturally (2 before 10).
"""

from __future__ import annotations

import json
import re
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from emsynth.data.omezarr import is_ome_zarr, read_ome_zarr
from emsynth.data.validate import (
    MAX_PLAUSIBLE_FRACTION,
    InputWarning,
    check_label_plausibility,
    largest_component_share,
    to_bool_mask,
    to_uint8_image,
)
from emsynth.data.volume import LABEL_NAMES, MEMBRANE, MITO, SYNAPSE, Volume
from emsynth.errors import EmsynthError, input_error

LAYOUTS = ("auto", "vnc", "epfl-tiff", "slices", "isbi", "generic", "ome-zarr")
POLARITIES = ("auto", "foreground-white", "foreground-black")
IMAGE_SUFFIXES = {".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"}
TIFF_SUFFIXES = {".tif", ".tiff"}
#: Pillow modes that convert to a numpy array as they are (others are expanded to RGB first).
PIL_ARRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "F", "RGB", "RGBA"}
#: Files that live in data folders without being slices.
IGNORED_NAMES = {"meta.json", "thumbs.db", "desktop.ini", "sha256sums", "readme.md", "readme.txt"}

#: Published pixel sizes of the fixed layouts (nm per pixel, y and x).
PIXEL_SIZE_NM = {"vnc": 4.6, "epfl-tiff": 5.0, "isbi": 4.0}
#: drosophila_vnc folder name -> label name.
VNC_LABEL_DIRS = {"mitochondria": MITO, "membranes": MEMBRANE, "synapses": SYNAPSE}
#: emsynth slice-folder name -> label name (255 = foreground in every one).
SLICE_LABEL_DIRS = {"masks": MITO, "membranes": MEMBRANE, "synapses": SYNAPSE}
EPFL_STEMS = ("training", "testing")
GT_SUFFIX = "_groundtruth"



@dataclass(frozen=True)
class SliceLayout:
    """A slice-folder layout: an image folder plus label folders, paired by file stem.

    label_dirs maps folder (relative to the dataset, or absolute) to label name; folders that
    are absent are skipped unless listed in `required`. foreground_black: the layout's mask
    convention (ISBI: 0 = membrane), used when the polarity is "auto".
    """

    name: str
    image_dir: str
    label_dirs: dict[str, str]
    pixel_size_nm: float | None = None
    required: tuple[str, ...] = ()
    foreground_black: bool = False

    @property
    def pixel_size(self) -> tuple[float, float] | None:
        return None if self.pixel_size_nm is None else (self.pixel_size_nm, self.pixel_size_nm)


#: The fixed slice-folder layouts ("generic" is built per call from --mask-dir).
SLICE_LAYOUTS: dict[str, SliceLayout] = {
    "vnc": SliceLayout("vnc", "raw", VNC_LABEL_DIRS, PIXEL_SIZE_NM["vnc"]),
    "isbi": SliceLayout("isbi", "images", {"masks": MEMBRANE}, PIXEL_SIZE_NM["isbi"],
                        required=("masks",), foreground_black=True),
    "slices": SliceLayout("slices", "images", SLICE_LABEL_DIRS),
}


@dataclass(frozen=True)
class ReadOptions:
    """How one `read_volume` call reads masks and which slices it reads.

    foreground_black: masks have black foreground; polarity_given: the user stated the
    polarity (skip the inverted-mask check); indices: only these slices (natural order).
    """

    foreground_black: bool = False
    polarity_given: bool = False
    indices: Sequence[int] | None = None


LAYOUT_HELP = (
    "expected one of: raw/ + membranes|mitochondria|synapses/ (vnc), training.tif + "
    "training_groundtruth.tif (epfl-tiff), images/ + masks/ (slices or isbi), images/ + "
    "--mask-dir FOLDER (generic), or an OME-Zarr image (zarr.json or .zattrs with multiscales)"
)


def natural_key(name: str) -> list:
    """Sort key that orders embedded numbers by value: 'slice2' before 'slice10'."""
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", name)]


class _Notes:
    """Collects per-file conversion notes and reports each once per folder."""

    def __init__(self) -> None:
        self._files: dict[str, list[str]] = defaultdict(list)

    def add(self, note: str | None, where: str | Path) -> None:
        if note:
            self._files[note].append(str(where))

    def flush(self, folder: str | Path) -> None:
        for note, files in self._files.items():
            example = f" (e.g. {Path(files[0]).name})" if len(files) > 1 else ""
            warnings.warn(
                f"{folder}: {len(files)} {note}{example}", InputWarning, stacklevel=4
            )
        self._files.clear()


def read_slice_file(path: Path) -> np.ndarray:
    """The raw array of one single-slice image file, or an error saying it cannot be read."""
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                arr = series.asarray()
                axes = series.axes
            if "S" in axes and axes.index("S") != arr.ndim - 1:
                arr = np.moveaxis(arr, axes.index("S"), -1)
                axes = axes.replace("S", "") + "S"
            stack_dims = [n for ax, n in zip(axes, arr.shape) if ax not in "YXS"]
            if any(n > 1 for n in stack_dims):
                raise input_error(
                    path,
                    f"multipage TIFF with {int(np.prod(stack_dims))} pages in a slice folder",
                    "use --layout epfl-tiff for a stack, or save one page per file",
                )
            return arr.reshape([n for ax, n in zip(axes, arr.shape) if ax in "YXS"])
        # Pillow directly: twice as fast as imageio's wrapper on large stacks.
        with Image.open(path) as img:
            if img.mode not in PIL_ARRAY_MODES:  # palette, CMYK, ...: expand to colour
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            return np.asarray(img)
    except EmsynthError:
        raise
    except Exception as err:  # noqa: BLE001 - decoders raise many types on corrupt data
        raise input_error(
            path,
            f"cannot read the file ({type(err).__name__}: {err}); it is corrupt, truncated or "
            "not an image",
            "re-export it as an 8-bit PNG or TIFF",
        ) from None


def list_slices(folder: Path, what: str) -> dict[str, Path]:
    """Image files of a slice folder by stem, in natural order; errors for empty folders."""
    if not folder.is_dir():
        raise input_error(
            folder, f"{what} folder does not exist", f"create it with one {what} per slice"
        )
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower() not in IGNORED_NAMES
    ]
    slices = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if not slices:
        if others:
            suffixes = sorted({p.suffix or "(no suffix)" for p in others})
            raise input_error(
                folder,
                f"no readable image files, only {len(others)} files of unsupported format "
                f"{', '.join(suffixes)}",
                "convert them to 8-bit PNG or TIFF (one slice per file)",
            )
        raise input_error(folder, f"{what} folder is empty", f"put one {what} file per slice in it")
    by_stem: dict[str, Path] = {}
    for p in slices:
        if p.stem in by_stem:
            raise input_error(
                p,
                f"two files share the stem {p.stem!r} ({by_stem[p.stem].name} and {p.name})",
                "keep one file per slice name",
            )
        by_stem[p.stem] = p
    if others:
        warnings.warn(
            f"{folder}: ignored {len(others)} non-image files (e.g. {others[0].name})",
            InputWarning,
            stacklevel=3,
        )
    return {stem: by_stem[stem] for stem in sorted(by_stem, key=natural_key)}


def _check_pairs(images: dict[str, Path], masks: dict[str, Path], mask_folder: Path) -> None:
    """Every image needs a mask of the same stem and vice versa; name the unpaired stems."""
    missing = [s for s in images if s not in masks]
    extra = [s for s in masks if s not in images]
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise input_error(
            mask_folder,
            f"no mask for {len(missing)} image(s) with stem {shown} "
            f"(e.g. {images[missing[0]]})",
            f"add {mask_folder / missing[0]}.png (same stem as the image) or remove the image",
        )
    if extra:
        shown = ", ".join(extra[:3]) + (" ..." if len(extra) > 3 else "")
        raise input_error(
            masks[extra[0]],
            f"{len(extra)} mask(s) without an image of the same stem: {shown}",
            "rename the mask to its image's stem or remove it",
        )


def _select(stems: list[str], indices: Sequence[int] | None, where: Path) -> list[str]:
    if indices is None:
        return stems
    n = len(stems)
    bad = [i for i in indices if not -n <= i < n]
    if bad:
        raise input_error(
            where, f"slice index {bad[0]} out of range ({n} slices)", f"use indices 0..{n - 1}"
        )
    return [stems[i] for i in indices]


def _read_images(files: list[Path], folder: Path) -> np.ndarray:
    notes = _Notes()
    stack: np.ndarray | None = None
    for z, path in enumerate(files):
        img, note = to_uint8_image(read_slice_file(path), path)
        notes.add(note, path)
        if stack is None:
            stack = np.empty((len(files), *img.shape), np.uint8)
        elif img.shape != stack.shape[1:]:
            raise input_error(
                path,
                f"shape {img.shape[0]}x{img.shape[1]} differs from {files[0].name} "
                f"({stack.shape[1]}x{stack.shape[2]}); all slices must have one size",
                "crop or pad every slice to the same height x width, or remove this file",
            )
        stack[z] = img
    notes.flush(folder)
    assert stack is not None  # list_slices never returns an empty folder
    return stack


def _read_masks(
    files: list[Path], image_files: list[Path], folder: Path, shape: tuple, black: bool
) -> np.ndarray:
    notes = _Notes()
    stack = np.empty(shape, bool)
    for z, (path, image_path) in enumerate(zip(files, image_files)):
        mask, note = to_bool_mask(read_slice_file(path), path, foreground_black=black)
        notes.add(note, path)
        if mask.shape != shape[1:]:
            raise input_error(
                path,
                f"mask shape {mask.shape[0]}x{mask.shape[1]} differs from its image "
                f"{image_path} ({shape[1]}x{shape[2]})",
                "save the mask at the image's size (same height x width)",
            )
        stack[z] = mask
    notes.flush(folder)
    return stack


def _read_meta(path: Path) -> dict:
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise input_error(
            meta_path, f"cannot parse meta.json ({err})", "fix the JSON or delete meta.json"
        ) from None
    if not isinstance(meta, dict):
        raise input_error(meta_path, "meta.json must hold a JSON object", "fix or delete it")
    return meta


def _meta_pixel_size(meta: dict, meta_path: Path) -> tuple[float, float] | None:
    value = meta.get("pixel_size_nm")
    if value is None:
        return None
    if isinstance(value, (int, float)) and value > 0:
        return (float(value), float(value))
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, (int, float)) and v > 0 for v in value)
    ):
        return (float(value[0]), float(value[1]))
    raise input_error(
        meta_path,
        f"pixel_size_nm must be a positive number or [y, x], got {value!r}",
        "fix or delete the pixel_size_nm entry",
    )


def _read_slice_layout(path: Path, layout: SliceLayout, options: ReadOptions) -> Volume:
    """images/ (or raw/) plus label folders paired by stem; label folders that are absent are
    skipped unless listed in layout.required."""
    image_folder = path / layout.image_dir
    images = list_slices(image_folder, "image")
    meta = _read_meta(path)  # checked before the slow part so that its errors come first
    if meta.get("complete") is False:  # emsynth's writer sets it True after the last slice
        raise input_error(
            path / "meta.json",
            "this slice folder was not completely written (the write was interrupted)",
            "rerun the command that wrote it",
        )
    pixel_size = _meta_pixel_size(meta, path / "meta.json") or layout.pixel_size
    names = {stem: stem for stem in images}
    if isinstance(meta.get("slice_names"), list):
        if len(meta["slice_names"]) != len(images):
            raise input_error(
                path / "meta.json",
                f"lists {len(meta['slice_names'])} slice_names but {image_folder} holds "
                f"{len(images)} images",
                "regenerate the folder or delete slice_names from meta.json",
            )
        names = {stem: str(name) for stem, name in zip(images, meta["slice_names"])}
    present = {}
    for dir_name, label in layout.label_dirs.items():
        folder = Path(dir_name) if Path(dir_name).is_absolute() else path / dir_name
        if folder.is_dir() or dir_name in layout.required:
            present[label] = (folder, list_slices(folder, f"{label} mask"))
    for folder, masks in present.values():
        _check_pairs(images, masks, folder)
    stems = _select(list(images), options.indices, image_folder)
    image_files = [images[s] for s in stems]
    image = _read_images(image_files, image_folder)
    labels = {}
    for label, (folder, masks) in present.items():
        files = [masks[s] for s in stems]
        labels[label] = _read_masks(files, image_files, folder, image.shape,
                                    options.foreground_black)
        check_label_plausibility(label, labels[label], files, folder, options.polarity_given)
    source = f"{path} ({layout.name})"
    if layout.name == "generic":
        (mask_folder, label), = layout.label_dirs.items()
        source = f"{path} (generic: {Path(mask_folder).name} as {label})"
    if meta.get("source"):
        source += f" from {meta['source']}"
    return Volume(image, labels, pixel_size, source, [names[s] for s in stems])


def _epfl_pair(path: Path) -> tuple[Path, Path | None]:
    """(image TIFF, ground-truth TIFF or None) for a folder or an image TIFF path."""
    if path.is_file():
        if path.stem.endswith(GT_SUFFIX):
            image = path.with_name(path.stem[: -len(GT_SUFFIX)] + path.suffix)
            raise input_error(
                path, "this is the ground-truth TIFF", f"pass the image TIFF {image} instead"
            )
        gt = path.with_name(path.stem + GT_SUFFIX + path.suffix)
        return path, gt if gt.is_file() else None
    tiffs = {p.stem: p for p in path.iterdir() if p.suffix.lower() in TIFF_SUFFIXES}
    found = [tiffs[s] for s in EPFL_STEMS if s in tiffs]
    if len(found) > 1:
        raise input_error(
            path,
            f"holds both {found[0].name} and {found[1].name}",
            f"pass the one you want, e.g. {found[0]}",
        )
    if not found:
        found = [p for s, p in tiffs.items() if s + GT_SUFFIX in tiffs]
        if len(found) != 1:
            raise input_error(
                path,
                "no multipage TIFF pair (NAME.tif + NAME_groundtruth.tif) found",
                "pass the image TIFF itself, or use another --layout",
            )
    gt = tiffs.get(found[0].stem + GT_SUFFIX)
    return found[0], gt


def _read_tiff_pages(
    path: Path, indices: Sequence[int] | None, expect_pages: int | None = None
) -> tuple[int, list[tuple[int, np.ndarray]]]:
    """(page count, [(page index, raw array)] for the selected pages) of a multipage TIFF."""
    try:
        with tifffile.TiffFile(path) as tif:
            n = len(tif.pages)
            first = tif.pages[0]
            if n == 1 and first.planarconfig == tifffile.PLANARCONFIG.SEPARATE:
                raise input_error(
                    path,
                    f"holds one colour page with {first.samplesperpixel} separate planes, not "
                    "a stack of greyscale pages (tifffile stores 3- and 4-slice stacks so "
                    "unless told otherwise)",
                    "re-save the stack with tifffile.imwrite(path, stack, "
                    "photometric='minisblack')",
                )
            if expect_pages is not None and n != expect_pages:
                raise input_error(
                    path,
                    f"has {n} pages but the image TIFF has {expect_pages}",
                    "give the ground truth of exactly this volume (one page per image slice)",
                )
            return n, [(i, tif.pages[i].asarray()) for i in _select(list(range(n)), indices, path)]
    except EmsynthError:
        raise
    except Exception as err:  # noqa: BLE001 - decoders raise many types on corrupt data
        raise input_error(
            path,
            f"cannot read the TIFF ({type(err).__name__}: {err}); it is corrupt or truncated",
            "re-export the stack as a multipage 8-bit TIFF",
        ) from None


def _read_epfl_tiff(path: Path, options: ReadOptions) -> Volume:
    image_path, gt_path = _epfl_pair(path)
    notes = _Notes()
    n_pages, pages = _read_tiff_pages(image_path, options.indices)
    slices, names = [], []
    for i, raw in pages:
        where = f"{image_path} page {i}"
        img, note = to_uint8_image(raw, where)
        notes.add(note, where)
        if slices and img.shape != slices[0].shape:
            raise input_error(
                where,
                f"shape {img.shape[0]}x{img.shape[1]} differs from the first page "
                f"({slices[0].shape[0]}x{slices[0].shape[1]})",
                "re-export the stack with one page size",
            )
        slices.append(img)
        names.append(f"{i:04d}")
    notes.flush(image_path)
    image = np.stack(slices)
    labels = {}
    if gt_path is None:
        warnings.warn(
            f"{image_path}: no ground truth {image_path.stem}{GT_SUFFIX}{image_path.suffix} "
            "beside it; read the images without labels",
            InputWarning,
            stacklevel=3,
        )
    else:
        masks, files = [], []
        for i, raw in _read_tiff_pages(gt_path, options.indices, n_pages)[1]:
            where = f"{gt_path} page {i}"
            mask, note = to_bool_mask(raw, where, foreground_black=options.foreground_black)
            notes.add(note, where)
            if mask.shape != image.shape[1:]:
                raise input_error(
                    where,
                    f"shape {mask.shape[0]}x{mask.shape[1]} differs from the image pages "
                    f"({image.shape[1]}x{image.shape[2]})",
                    "give the ground truth of exactly this volume",
                )
            masks.append(mask)
            files.append(where)
        notes.flush(gt_path)
        labels[MITO] = np.stack(masks)
        check_label_plausibility(MITO, labels[MITO], files, gt_path, options.polarity_given)
    pixel = PIXEL_SIZE_NM["epfl-tiff"]
    return Volume(image, labels, (pixel, pixel), f"{image_path} (epfl-tiff)", names)


def _looks_like_isbi(mask_folder: Path) -> bool:
    """ISBI membrane masks: mostly white, and the dark foreground is one connected network.

    Inverted mitochondria masks are also mostly white, but their dark part is many blobs.
    """
    files = list(list_slices(mask_folder, "mask").values())
    sample = [files[0], files[len(files) // 2], files[-1]]
    dark = [to_bool_mask(read_slice_file(p), p, foreground_black=True)[0] for p in sample]
    if np.mean([d.mean() for d in dark]) >= 1 - MAX_PLAUSIBLE_FRACTION:
        return False
    return float(np.mean([largest_component_share(d) for d in dark])) > 0.5


def _detect_here(path: Path) -> str | None:
    if is_ome_zarr(path):
        return "ome-zarr"
    if path.is_file():
        return "epfl-tiff" if path.suffix.lower() in TIFF_SUFFIXES else None
    if (path / "raw").is_dir() and any((path / d).is_dir() for d in VNC_LABEL_DIRS):
        return "vnc"
    if (path / "images").is_dir():
        if (path / "masks").is_dir() and not (path / "meta.json").is_file():
            return "isbi" if _looks_like_isbi(path / "masks") else "slices"
        return "slices"
    tiffs = {p.stem for p in path.iterdir() if p.suffix.lower() in TIFF_SUFFIXES}
    if any(s in tiffs for s in EPFL_STEMS) or any(s + GT_SUFFIX in tiffs for s in tiffs):
        return "epfl-tiff"
    return None


def detect_layout(path: str | Path) -> str:
    """The layout name of a dataset path, or an error listing what was expected."""
    path = Path(path)
    if not path.exists():
        raise input_error(path, "does not exist", "check the path (a dataset folder or a TIFF)")
    layout = _detect_here(path)
    if layout is not None:
        return layout
    if path.is_file():
        raise input_error(
            path,
            f"is a {path.suffix or 'suffix-less'} file, not a dataset",
            "pass a dataset folder or a multipage TIFF; " + LAYOUT_HELP,
        )
    below = []
    for child in sorted(p for p in path.iterdir() if p.is_dir()):
        try:
            found = _detect_here(child)
        except EmsynthError:
            found = None
        if found:
            below.append(f"{child} ({found})")
    if below:
        raise input_error(
            path,
            "no dataset layout here, but subfolders hold datasets: " + ", ".join(below[:4]),
            f"pass one of those folders, e.g. {below[0].split(' (')[0]}",
        )
    raise input_error(path, "no known dataset layout", LAYOUT_HELP)


def resolve_layout(path: str | Path, layout: str = "auto", mask_dir: str | None = None) -> str:
    """The layout `read_volume` will use: a given mask_dir means "generic" reading."""
    if layout not in LAYOUTS:
        raise input_error(path, f"unknown layout {layout!r}", f"use one of {', '.join(LAYOUTS)}")
    if mask_dir is not None:
        if layout not in ("auto", "generic", "slices"):
            raise input_error(
                path,
                f"--mask-dir does not apply to layout {layout!r}",
                "drop --mask-dir, or use --layout generic",
            )
        return "generic"
    if layout == "generic":
        raise input_error(path, "layout 'generic' needs a mask folder", "pass --mask-dir FOLDER")
    return detect_layout(path) if layout == "auto" else layout


def read_volume(
    path: str | Path,
    layout: str = "auto",
    *,
    mask_dir: str | None = None,
    label: str = MITO,
    polarity: str = "auto",
    indices: Sequence[int] | None = None,
) -> Volume:
    """Read and validate an EM dataset into a `Volume`.

    layout: "auto" (detect), "vnc", "epfl-tiff", "slices", "isbi" or "generic". mask_dir: a mask
    folder (relative to path, or absolute) read as label `label` beside images/ ("generic"
    reading; implied by giving mask_dir). polarity: "auto" uses the layout's convention
    (foreground white, except isbi) and rejects masks that look inverted; "foreground-white" or
    "foreground-black" states it for every mask folder read and skips the inversion check.
    indices: read only these slices (positions in natural order), e.g. for a quick look.
    """
    path = Path(path)
    if not path.exists():
        raise input_error(path, "does not exist", "check the path (a dataset folder or a TIFF)")
    if polarity not in POLARITIES:
        raise input_error(
            path, f"unknown polarity {polarity!r}", f"use one of {', '.join(POLARITIES)}"
        )
    if label not in LABEL_NAMES:
        raise input_error(path, f"unknown label {label!r}", f"use one of {', '.join(LABEL_NAMES)}")
    layout = resolve_layout(path, layout, mask_dir)
    if layout != "epfl-tiff" and not path.is_dir():
        raise input_error(path, f"layout {layout!r} needs a folder", "pass the dataset folder")
    spec = SLICE_LAYOUTS.get(layout)
    default_black = spec is not None and spec.foreground_black
    options = ReadOptions(
        foreground_black=polarity == "foreground-black" or (polarity == "auto" and default_black),
        polarity_given=polarity != "auto",
        indices=indices,
    )
    if layout == "epfl-tiff":
        return _read_epfl_tiff(path, options)
    if layout == "ome-zarr":
        if mask_dir is not None:
            raise input_error(path, "--mask-dir does not apply to OME-Zarr",
                              "its labels are read from labels/<name>; drop --mask-dir")
        return read_ome_zarr(path, indices, options.polarity_given)
    if layout == "generic":
        mask_folder = Path(mask_dir) if Path(mask_dir).is_absolute() else path / mask_dir
        if not mask_folder.is_dir():
            found = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name != "images")
            raise input_error(
                mask_folder,
                "mask folder does not exist",
                f"pass --mask-dir as a folder inside {path} "
                f"(found: {', '.join(found) or 'none'})",
            )
        generic = SliceLayout("generic", "images", {str(mask_folder): label},
                              required=(str(mask_folder),))
        return _read_slice_layout(path, generic, options)
    if layout == "slices" and not (path / "masks").is_dir():
        folders = sorted(
            p.name for p in path.iterdir()
            if p.is_dir() and p.name not in ("images", *SLICE_LABEL_DIRS)
        )
        if folders:
            warnings.warn(
                f"{path}: no masks/ folder, reading images without mitochondria labels; to read "
                f"a mask folder use --mask-dir (found: {', '.join(folders)})",
                InputWarning,
                stacklevel=2,
            )
    return _read_slice_layout(path, SLICE_LAYOUTS[layout], options)


def volume_stats(volume: Volume) -> dict:
    """Numbers `emsynth data info` prints: shape, label fractions, intensity statistics.

    Percentiles come from the 256-bin histogram, exact for uint8 and fast on large stacks.
    """
    # Per slice: bincount casts to int64, which for a whole stack would cost 8 bytes a voxel.
    hist = sum(np.bincount(s.ravel(), minlength=256) for s in volume.image).astype(np.float64)
    levels = np.arange(256)
    total = hist.sum()
    mean = float((hist * levels).sum() / total)
    std = float(np.sqrt((hist * (levels - mean) ** 2).sum() / total))
    cdf = np.cumsum(hist) / total
    z, y, x = volume.shape
    return {
        "source": volume.source,
        "slices": z,
        "shape": [z, y, x],
        "dtype": str(volume.image.dtype),
        "pixel_size_nm": list(volume.pixel_size_nm) if volume.pixel_size_nm else None,
        "first_slice": volume.slice_names[0],
        "last_slice": volume.slice_names[-1],
        "label_fractions": volume.label_fractions(),
        "intensity": {
            "mean": round(mean, 3),
            "std": round(std, 3),
            "p1": int(np.searchsorted(cdf, 0.01)),
            "p99": int(np.searchsorted(cdf, 0.99)),
            "min": int(np.flatnonzero(hist)[0]),
            "max": int(np.flatnonzero(hist)[-1]),
        },
    }


def open_lazy(path: str | Path, layout: str = "auto", *, mask_dir: str | None = None,
              label: str = MITO):
    """(uint8 (z, y, x) array that reads on demand, (z, y, x) scale in nm, source text).

    OME-Zarr and multipage uint8 TIFF stacks stay on disk (the TIFF through tifffile's zarr
    store); every other layout is read whole with `read_volume`.
    """
    import tifffile

    from emsynth.data.omezarr import open_ome_zarr, require_zarr, scale_of

    path = Path(path)
    used = resolve_layout(path, layout, mask_dir)
    if used == "ome-zarr":
        image = open_ome_zarr(path)
        if image.array.dtype != np.uint8:
            raise input_error(path, f"holds {image.array.dtype} data; blockwise prediction reads "
                              "uint8", "convert it with `emsynth data convert`")
        return image.array, image.scale_nm, f"{path} (ome-zarr {image.version})"
    if used == "epfl-tiff" and path.is_file():
        try:
            store = tifffile.imread(path, aszarr=True)
            array = require_zarr().open_array(store=store, mode="r")
        except Exception:  # noqa: BLE001 - fall back to the validating reader below
            array = None
        if array is not None and array.ndim == 3 and array.dtype == np.uint8:
            pixel = PIXEL_SIZE_NM["epfl-tiff"]
            return array, (pixel, pixel, pixel), f"{path} (tiff, read lazily)"
    volume = read_volume(path, used, mask_dir=mask_dir, label=label)
    return volume.image, scale_of(volume), volume.source
