"""OME-Zarr (NGFF) in and out: images and `labels/<name>` with their physical scale.

Reads NGFF 0.5 (zarr v3, metadata under the `ome` attribute) and NGFF 0.4 (zarr v2, metadata at
the top of `.zattrs`); writes NGFF 0.5 by default (0.4 on request). Only level 0 of a multiscale
pyramid is read; singleton `t` / `c` axes are dropped so that every image reads as (z, y, x).
Blockwise outputs get a pyramid (`declare_levels`, `downsample_yx`): levels halved in y and x,
each with its own scale and the half-pixel translation of its coarser pixel centres.

Label names map to emsynth's: `mito`/`mitochondria`, `membrane`/`membranes`,
`synapse`/`synapses`; any non-zero label value is foreground.

Arrays stay lazy (`OmeZarrImage.array` is a zarr array, sliced on demand), which is what the
blockwise runs (`emsynth.data.blocks`) read; `read_ome_zarr` loads a whole `Volume`.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emsynth.data.validate import InputWarning, check_label_plausibility
from emsynth.data.volume import MEMBRANE, MITO, SYNAPSE, Volume
from emsynth.errors import EmsynthError, input_error

NGFF_VERSION = "0.5"
READ_VERSIONS = ("0.4", "0.5")
#: OME-Zarr label-group name -> emsynth label name (and the name emsynth writes).
LABEL_ALIASES = {
    "mito": MITO, "mitochondria": MITO, "mitochondrion": MITO,
    "membrane": MEMBRANE, "membranes": MEMBRANE,
    "synapse": SYNAPSE, "synapses": SYNAPSE,
}
#: Display colours (RGBA) written into image-label metadata for value 1.
LABEL_COLORS = {MITO: [255, 0, 0, 255], MEMBRANE: [0, 255, 0, 255], SYNAPSE: [0, 0, 255, 255]}
#: Units NGFF allows for space axes -> nanometres.
UNIT_NM = {
    "angstrom": 0.1, "nanometer": 1.0, "micrometer": 1e3, "millimeter": 1e6,
    "centimeter": 1e7, "meter": 1e9, "picometer": 1e-3,
}
SUFFIXES = (".zarr",)
INSTALL_FIX = "install zarr >= 3 (pip install 'zarr>=3', Python >= 3.11)"


def require_zarr():
    try:
        import zarr
    except ImportError:  # pragma: no cover - zarr is a dependency on Python >= 3.11
        raise EmsynthError(f"OME-Zarr needs the zarr package. Fix: {INSTALL_FIX}") from None
    return zarr


def group_attrs(path: Path) -> dict | None:
    """The group attributes of a zarr v3 (zarr.json) or v2 (.zattrs) folder, without zarr."""
    v3 = path / "zarr.json"
    if v3.is_file():
        try:
            meta = json.loads(v3.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return meta.get("attributes", {}) if isinstance(meta, dict) else None
    v2 = path / ".zattrs"
    if v2.is_file():
        try:
            meta = json.loads(v2.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return meta if isinstance(meta, dict) else None
    return None


def _ome(attrs: dict) -> dict:
    """NGFF metadata: under "ome" in 0.5, at the top level in 0.4."""
    ome = attrs.get("ome")
    return ome if isinstance(ome, dict) else attrs


def is_ome_zarr(path: str | Path) -> bool:
    """True for a folder holding an OME-Zarr image (multiscales metadata), v0.4 or v0.5."""
    path = Path(path)
    if not path.is_dir():
        return False
    attrs = group_attrs(path)
    return attrs is not None and isinstance(_ome(attrs).get("multiscales"), list)


@dataclass
class OmeZarrImage:
    """Level 0 of one OME-Zarr image: a lazy (z, y, x) view plus scale and metadata."""

    path: Path
    array: Any  # ZYXView over a zarr array
    axes: list[str]
    scale_nm: tuple[float, float, float] | None
    version: str
    name: str = ""
    labels: dict[str, str] = field(default_factory=dict)  # emsynth name -> group name
    levels: int = 1  # multiscale levels declared (level 0 is read)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def pixel_size_nm(self) -> tuple[float, float] | None:
        return None if self.scale_nm is None else (self.scale_nm[1], self.scale_nm[2])

    def label(self, name: str) -> OmeZarrImage:
        """The label image `name` (an emsynth label name) as an OmeZarrImage."""
        return open_ome_zarr(self.path / "labels" / self.labels[name])


class ZYXView:
    """A zarr array with singleton t/c axes dropped, read as (z, y, x) (2D images as one slice).

    NGFF orders axes time, channel, space, so the spatial axes are the last two or three.
    Supports `shape`, `dtype`, `chunks` and slicing `view[z0:z1, y0:y1, x0:x1]`.
    """

    def __init__(self, array: Any, axes: list[str]) -> None:
        spatial = [a for a in axes if a in ("z", "y", "x")]
        if spatial not in (["z", "y", "x"], ["y", "x"]) or axes[-len(spatial):] != spatial:
            raise ValueError(f"axes {axes} are not (t, c,) z, y, x")
        for name, n in zip(axes[: -len(spatial)], array.shape):
            if n != 1:
                raise ValueError(f"axis {name!r} has {n} entries; only singleton t/c axes read")
        self._array = array
        self._lead = (0,) * (len(axes) - len(spatial))
        self._is2d = len(spatial) == 2
        pad = (1,) if self._is2d else ()
        self.shape = pad + tuple(array.shape[-len(spatial):])
        self.chunks = pad + tuple(array.chunks[-len(spatial):])
        self.dtype = array.dtype
        self.ndim = 3

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = tuple(key) + (slice(None),) * (3 - len(key))
        if self._is2d:
            return np.asarray(self._array[self._lead + key[1:]])[None][key[0]]
        return np.asarray(self._array[self._lead + key])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:, :, :]
        return out if dtype is None else out.astype(dtype)


def _scale_nm(path: Path, axes: list[dict], scale: list[float]) -> tuple[float, float, float]:
    out = {}
    for ax, s in zip(axes, scale):
        name = ax.get("name")
        if name not in ("z", "y", "x"):
            continue
        unit = ax.get("unit") or "micrometer"
        if unit not in UNIT_NM:
            warnings.warn(f"{path}: unknown unit {unit!r} on axis {name}; scale read as nm",
                          InputWarning, stacklevel=4)
        out[name] = float(s) * UNIT_NM.get(unit, 1.0)
    return (out.get("z", 1.0), out.get("y", 1.0), out.get("x", 1.0))


def open_ome_zarr(path: str | Path) -> OmeZarrImage:
    """Open level 0 of the OME-Zarr image at `path` lazily, with its scale in nm."""
    path = Path(path)
    attrs = group_attrs(path)
    if attrs is None or not isinstance(_ome(attrs).get("multiscales"), list):
        raise input_error(
            path, "not an OME-Zarr image (no multiscales metadata in zarr.json or .zattrs)",
            "pass the image group of an OME-Zarr (the folder holding zarr.json and 0/)",
        )
    ome = _ome(attrs)
    ms = ome["multiscales"][0]
    version = str(ome.get("version") or ms.get("version") or "0.4")
    if version not in READ_VERSIONS:
        warnings.warn(f"{path}: NGFF version {version} read as 0.5", InputWarning, stacklevel=2)
    try:
        axes = list(ms["axes"])
        axes = [a if isinstance(a, dict) else {"name": a} for a in axes]
        dataset = ms["datasets"][0]
        transforms = dataset.get("coordinateTransformations") or []
    except (KeyError, IndexError, TypeError) as err:
        raise input_error(path, f"malformed multiscales metadata ({err!r})",
                          "rewrite it with `emsynth data convert`") from None
    scale = next((t["scale"] for t in transforms if t.get("type") == "scale"), None)
    zarr = require_zarr()
    try:
        array = zarr.open_array(store=str(path / dataset["path"]), mode="r")
    except Exception as err:  # noqa: BLE001 - zarr raises several types on broken stores
        raise input_error(path / str(dataset["path"]),
                          f"cannot open the level-0 array ({type(err).__name__}: {err})",
                          "check that the OME-Zarr was written completely") from None
    names = [a.get("name") for a in axes]
    if len(names) != array.ndim:
        raise input_error(path, f"{len(names)} axes for a {array.ndim}-d array",
                          "fix the multiscales axes")
    try:
        view = ZYXView(array, names)
    except ValueError as err:
        raise input_error(path, str(err), "split the channels or time points first") from None
    labels = {}
    label_attrs = group_attrs(path / "labels")
    if label_attrs is not None:
        for group in _ome(label_attrs).get("labels", []) or []:
            name = LABEL_ALIASES.get(str(group).lower())
            if name is None:
                warnings.warn(f"{path / 'labels' / str(group)}: label {group!r} is not one of "
                              f"{', '.join(sorted(LABEL_ALIASES))}; skipped", InputWarning,
                              stacklevel=2)
            elif name not in labels:
                labels[name] = str(group)
    return OmeZarrImage(
        path=path,
        array=view,
        axes=names,
        scale_nm=_scale_nm(path, axes, scale) if scale else None,
        version=version,
        name=str(ms.get("name", "")),
        labels=labels,
        levels=len(ms["datasets"]),
    )


def _select(n: int, indices: Sequence[int] | None, where: Path) -> list[int]:
    if indices is None:
        return list(range(n))
    bad = [i for i in indices if not -n <= i < n]
    if bad:
        raise input_error(where, f"slice index {bad[0]} out of range ({n} slices)",
                          f"use indices 0..{n - 1}")
    return [i % n for i in indices]


def read_ome_zarr(
    path: str | Path, indices: Sequence[int] | None = None, polarity_given: bool = False
) -> Volume:
    """A whole `Volume` (image + recognised labels) from an OME-Zarr image, in memory."""
    from emsynth.data.validate import to_uint8_image

    image = open_ome_zarr(path)
    z = _select(image.shape[0], indices, image.path)
    raw = np.stack([image.array[i : i + 1][0] for i in z]) if indices is not None \
        else image.array[:, :, :]
    if raw.dtype != np.uint8:
        raw = np.stack([to_uint8_image(s, f"{image.path} slice {i}")[0] for i, s in zip(z, raw)])
    labels = {}
    for name in image.labels:
        lab_img = image.label(name)
        if lab_img.shape != image.shape:
            raise input_error(lab_img.path, f"label shape {lab_img.shape} differs from the image "
                              f"{image.shape}", "write the label at the image's level-0 size")
        lab = lab_img.array[:, :, :] if indices is None else \
            np.stack([lab_img.array[i : i + 1][0] for i in z])
        labels[name] = lab != 0
        check_label_plausibility(name, labels[name], [f"{lab_img.path}"], lab_img.path,
                                 polarity_given)
    names = (group_attrs(image.path) or {}).get("emsynth", {}).get("slice_names")
    if not (isinstance(names, list) and len(names) == image.shape[0]):
        names = [f"{i:04d}" for i in range(image.shape[0])]
    levels = f", {image.levels} levels" if image.levels > 1 else ""
    return Volume(raw, labels, image.pixel_size_nm,
                  f"{image.path} (ome-zarr {image.version}{levels})", [str(names[i]) for i in z])


# --- writing -------------------------------------------------------------------------------------


def _axes(unit: str = "nanometer") -> list[dict]:
    return [{"name": a, "type": "space", "unit": unit} for a in ("z", "y", "x")]


def level_transforms(scale_nm: Sequence[float], level: int) -> list[dict]:
    """coordinateTransformations of pyramid `level` (y, x halved `level` times): the scaled
    pixel size and, from level 1 on, the shift of a coarse pixel's centre to the middle of
    the fine pixels it averages."""
    z, y, x = (float(s) for s in scale_nm)
    f = 2.0 ** level
    out: list[dict] = [{"type": "scale", "scale": [z, y * f, x * f]}]
    if level:
        out.append({"type": "translation",
                    "translation": [0.0, y * (f - 1) / 2, x * (f - 1) / 2]})
    return out


def _multiscales(name: str, scale_nm: Sequence[float], version: str, levels: int = 1
                 ) -> list[dict]:
    ms: dict[str, Any] = {
        "name": name,
        "axes": _axes(),
        "datasets": [{"path": str(k), "coordinateTransformations": level_transforms(scale_nm, k)}
                     for k in range(levels)],
    }
    if version == "0.4":
        ms = {"version": "0.4", **ms}
    return [ms]


def _set_ome(group, version: str, **meta) -> None:
    if version == "0.4":
        group.attrs.update(meta)
    else:
        group.attrs.update({"ome": {"version": version, **meta}})


def default_chunks(shape: Sequence[int], dtype=np.uint8) -> tuple[int, int, int]:
    """~1-4 MB chunks: up to 16 slices of up to 512 x 512."""
    z, y, x = shape
    return (min(z, 16), min(y, 512), min(x, 512))


def _create_array(group, name: str, shape, chunks, dtype, version: str):
    kwargs: dict[str, Any] = {"fill_value": 0}
    if version != "0.4":
        kwargs["dimension_names"] = ("z", "y", "x")
    else:
        kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
    return group.create_array(name, shape=tuple(shape), chunks=tuple(chunks),
                              dtype=np.dtype(dtype), **kwargs)


def create_level(group_path: str | Path, level: int, shape, chunks, dtype):
    """An empty array for pyramid `level` in an existing image or label group (not declared
    in its multiscales until `declare_levels`)."""
    zarr = require_zarr()
    group = zarr.open_group(store=str(group_path), mode="r+")
    version = "0.4" if group.metadata.zarr_format == 2 else NGFF_VERSION
    return _create_array(group, str(level), shape, chunks, dtype, version)


def declare_levels(group_path: str | Path, levels: int) -> None:
    """List pyramid levels 0 .. levels - 1 in the multiscales of an image or label group,
    with the scale of level 0 kept (its other metadata, e.g. image-label, untouched)."""
    zarr = require_zarr()
    group = zarr.open_group(store=str(group_path), mode="r+")
    attrs = dict(group.attrs)
    ome = dict(_ome(attrs))
    ms = [dict(m) for m in ome["multiscales"]]
    first = ms[0]["datasets"][0].get("coordinateTransformations") or []
    scale = next((t["scale"] for t in first if t.get("type") == "scale"), [1.0, 1.0, 1.0])
    ms[0]["datasets"] = [{"path": str(k), "coordinateTransformations":
                          level_transforms(scale[-3:], k)} for k in range(levels)]
    ome["multiscales"] = ms
    group.attrs.update({"ome": ome} if "ome" in attrs else ome)


def set_emsynth(group_path: str | Path, **values: Any) -> None:
    """Merge `values` into a group's "emsynth" attributes."""
    zarr = require_zarr()
    group = zarr.open_group(store=str(group_path), mode="r+")
    meta = dict(group.attrs.get("emsynth", {}))
    group.attrs.update({"emsynth": {**meta, **values}})


def downsample_yx(array: np.ndarray, kind: str) -> np.ndarray:
    """(z, y, x) -> (z, ceil(y/2), ceil(x/2)): 2 x 2 means (images, probabilities; rounded for
    integers) or maxima (labels: a thin membrane stays visible at coarse levels). An odd last
    row or column is averaged with itself."""
    z, h, w = array.shape
    padded = np.pad(array, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
    quads = padded.reshape(z, (h + 1) // 2, 2, (w + 1) // 2, 2)
    if kind == "max":
        return quads.max(axis=(2, 4))
    if kind != "mean":
        raise ValueError(f"unknown downsampling {kind!r}")
    mean = quads.mean(axis=(2, 4), dtype=np.float64)
    if np.issubdtype(array.dtype, np.integer):
        mean = np.rint(mean)
    return mean.astype(array.dtype)


def create_image(
    path: str | Path,
    shape: Sequence[int],
    dtype=np.uint8,
    *,
    scale_nm: Sequence[float] | None = None,
    chunks: Sequence[int] | None = None,
    name: str = "image",
    version: str = NGFF_VERSION,
    extra: dict | None = None,
):
    """Create an empty single-level OME-Zarr image group at `path`; returns its level-0 array.

    scale_nm: (z, y, x) in nm (default 1). extra: JSON attributes stored under "emsynth".
    """
    zarr = require_zarr()
    fmt = 2 if version == "0.4" else 3
    group = zarr.open_group(store=str(path), mode="w", zarr_format=fmt)
    _set_ome(group, version, multiscales=_multiscales(name, scale_nm or (1.0, 1.0, 1.0), version))
    if extra:
        group.attrs.update({"emsynth": extra})
    return _create_array(group, "0", shape, chunks or default_chunks(shape), dtype, version)


def create_label(
    image_path: str | Path,
    label: str,
    shape: Sequence[int],
    dtype=np.uint8,
    *,
    scale_nm: Sequence[float] | None = None,
    chunks: Sequence[int] | None = None,
    version: str = NGFF_VERSION,
):
    """Create `labels/<label>` in an OME-Zarr image (image-label metadata, value 1 coloured,
    source pointing back at the image) and return its empty level-0 array."""
    zarr = require_zarr()
    root = zarr.open_group(store=str(image_path), mode="r+")
    labels = root.require_group("labels")
    existing = list(_ome(dict(labels.attrs)).get("labels", []) or [])
    if label not in existing:
        existing.append(label)
    _set_ome(labels, version, labels=existing)
    group = labels.create_group(label, overwrite=True)
    image_label: dict[str, Any] = {
        "colors": [{"label-value": 1, "rgba": LABEL_COLORS.get(label, [255, 255, 0, 255])}],
        "source": {"image": "../../"},
    }
    if version == "0.4":
        image_label = {"version": "0.4", **image_label}
    _set_ome(group, version, multiscales=_multiscales(label, scale_nm or (1.0, 1.0, 1.0),
                                                      version), **{"image-label": image_label})
    return _create_array(group, "0", shape, chunks or default_chunks(shape), dtype, version)


def scale_of(volume: Volume, z_nm: float | None = None) -> tuple[float, float, float]:
    """(z, y, x) nm of a volume: its pixel size (1 nm when unknown), z = `z_nm` or the y size."""
    y, x = volume.pixel_size_nm or (1.0, 1.0)
    return (float(z_nm) if z_nm else y, y, x)


def write_volume(
    volume: Volume,
    out: str | Path,
    *,
    chunks: Sequence[int] | None = None,
    version: str = NGFF_VERSION,
    z_nm: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a Volume as an OME-Zarr image with its labels, atomically (temp folder + rename)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise input_error(out, "already exists", "choose a new output path or delete it first")
    scale = scale_of(volume, z_nm)
    chunks = chunks or default_chunks(volume.shape)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        arr = create_image(tmp, volume.shape, np.uint8, scale_nm=scale, chunks=chunks,
                           name=Path(volume.source.split(" (")[0]).name or "image",
                           version=version, extra={"source": volume.source,
                                                   "slice_names": list(volume.slice_names)})
        arr[...] = volume.image
        for name, lab in volume.labels.items():
            larr = create_label(tmp, name, volume.shape, np.uint8, scale_nm=scale, chunks=chunks,
                                version=version)
            larr[...] = lab.astype(np.uint8)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
