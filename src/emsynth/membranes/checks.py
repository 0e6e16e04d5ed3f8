"""Plausibility numbers for predicted membranes where no membrane ground truth exists (CA1).

Three properties real cell membranes have, measured per slice and pooled over the volume:

- a membrane pixel fraction in the range of labelled data (VNC ground truth: about 20%);
- membranes never run through a mitochondrion: the share of mitochondrion *interior* pixels
  (mask eroded by a few px, so boundary disagreements do not count) marked membrane is ~0;
- boundaries are closed: the non-membrane connected components (4-connected, per slice) are
  mostly cell-sized rather than tiny fragments, and the membrane skeleton has few open ends
  (a closed boundary network has none, except where it leaves the image).

Compare a prediction's numbers with the same numbers of ground-truth membranes (e.g.
`emsynth membranes check ../shared/data/drosophila_vnc`) rather than with absolute targets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import skeletonize

from emsynth.data.volume import MEMBRANE, MITO, Volume
from emsynth.errors import input_error

#: A mitochondrion interior more than this share on membrane is flagged.
MITO_CROSSING_LIMIT = 0.01
_FOUR = ndi.generate_binary_structure(2, 1)
_NEIGHBOURS = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]])


@dataclass(frozen=True)
class Plausibility:
    slices: int
    membrane_fraction: float
    mito_interior_px: int
    mito_interior_on_membrane: float  # share of eroded mito pixels marked membrane (expect ~0)
    regions: int  # non-membrane 4-connected components, summed over slices
    fragment_share: float  # share of those regions smaller than min_region_px
    cell_area_share: float  # share of non-membrane pixels inside regions >= min_region_px
    median_region_px: float
    endpoints_per_1k: float  # open skeleton ends per 1000 membrane-skeleton pixels
    min_region_px: int
    erode_px: int

    def as_dict(self) -> dict:
        return asdict(self)

    def flags(self) -> list[str]:
        """Human-readable problems (empty when nothing looks wrong)."""
        out = []
        if self.mito_interior_on_membrane > MITO_CROSSING_LIMIT:
            out.append(
                f"membranes cross mitochondria: {self.mito_interior_on_membrane:.1%} of "
                f"mitochondrion interior pixels are membrane (limit {MITO_CROSSING_LIMIT:.0%})"
            )
        if self.fragment_share > 0.5:
            out.append(f"{self.fragment_share:.0%} of regions are fragments (< "
                       f"{self.min_region_px} px): boundaries are noisy")
        if self.cell_area_share < 0.8:
            out.append(f"only {self.cell_area_share:.0%} of the cytoplasm lies in cell-sized "
                       "regions")
        return out


def open_endpoints(skeleton: np.ndarray, margin: int = 6) -> int:
    """Skeleton pixels with at most one 8-neighbour, ignoring a `margin` at the image border
    (lines that leave the image end there without being open)."""
    neighbours = ndi.convolve(skeleton.astype(np.uint8), _NEIGHBOURS, mode="constant")
    ends = skeleton & (neighbours <= 1)
    if margin:
        ends[:margin], ends[-margin:], ends[:, :margin], ends[:, -margin:] = (False,) * 4
    return int(ends.sum())


def check_membranes(
    membranes: np.ndarray,
    mito: np.ndarray | None = None,
    erode_px: int = 3,
    min_region_px: int = 150,
) -> Plausibility:
    """Plausibility numbers of a (z, y, x) or (y, x) bool membrane mask (module docstring).

    min_region_px: smallest cell profile; at 5 nm/px, 150 px is a ~70 nm wide profile, below
    the thinnest axons, so smaller non-membrane regions are fragments.
    """
    # `!= 0` makes canonical 0/1 booleans: 1-bit PNG readers can yield bools stored as byte
    # 255, on which skimage's compiled skeletonize crashes.
    membranes = np.asarray(membranes) != 0
    mito = None if mito is None else np.asarray(mito) != 0
    if membranes.ndim == 2:
        membranes = membranes[None]
        mito = None if mito is None else mito[None]
    interior_px = 0
    interior_hit = 0
    areas: list[np.ndarray] = []
    skeleton_px = 0
    endpoints = 0
    for z, plane in enumerate(membranes):
        if mito is not None:
            interior = ndi.binary_erosion(mito[z], _FOUR, iterations=erode_px) if erode_px else mito[z]
            interior_px += int(interior.sum())
            interior_hit += int((interior & plane).sum())
        labels, n = ndi.label(~plane, structure=_FOUR)
        if n:
            areas.append(np.bincount(labels.ravel())[1:])
        skeleton = skeletonize(plane)
        skeleton_px += int(skeleton.sum())
        endpoints += open_endpoints(skeleton)
    region_areas = np.concatenate(areas) if areas else np.zeros(0, dtype=np.int64)
    cells = region_areas >= min_region_px
    background = region_areas.sum()
    return Plausibility(
        slices=len(membranes),
        membrane_fraction=float(membranes.mean()),
        mito_interior_px=interior_px,
        mito_interior_on_membrane=interior_hit / interior_px if interior_px else 0.0,
        regions=len(region_areas),
        fragment_share=float((~cells).mean()) if len(region_areas) else 0.0,
        cell_area_share=float(region_areas[cells].sum() / background) if background else 0.0,
        median_region_px=float(np.median(region_areas)) if len(region_areas) else 0.0,
        endpoints_per_1k=1000.0 * endpoints / skeleton_px if skeleton_px else 0.0,
        min_region_px=min_region_px,
        erode_px=erode_px,
    )


def check_volume(volume: Volume, erode_px: int = 3, min_region_px: int = 150,
                 where: str | Path | None = None) -> Plausibility:
    """Plausibility numbers of a volume's membrane labels (its mitochondria labels, where it
    has some, for the crossing test); a one-line error naming `where` when it has none."""
    if MEMBRANE not in volume.labels:
        raise input_error(where or volume.source,
                          f"has no membrane labels (has {sorted(volume.labels)})",
                          "pass a folder with membranes/ (e.g. the output of membranes predict)")
    return check_membranes(volume.labels[MEMBRANE], volume.labels.get(MITO), erode_px,
                           min_region_px)


def format_plausibility(p: Plausibility, title: str = "") -> str:
    rows = [
        ("slices", f"{p.slices}"),
        ("membrane pixel fraction", f"{p.membrane_fraction:.4f}"),
        (f"mito interior (eroded {p.erode_px} px) on membrane",
         f"{p.mito_interior_on_membrane:.4f} of {p.mito_interior_px} px"),
        ("non-membrane regions", f"{p.regions}"),
        (f"fragments (< {p.min_region_px} px) share of regions", f"{p.fragment_share:.4f}"),
        ("cytoplasm share in cell-sized regions", f"{p.cell_area_share:.4f}"),
        ("median region area (px)", f"{p.median_region_px:.0f}"),
        ("open skeleton ends per 1000 skeleton px", f"{p.endpoints_per_1k:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [title] if title else []
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"FLAG: {f}" for f in p.flags()]
    return "\n".join(lines)
