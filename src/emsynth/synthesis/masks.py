"""Mask sources for synthesis: the masks the GAN turns into new images.

- `deformed_masks`: random crops of a real mask set, flipped/rotated and elastically deformed
  with the segmentation stage's augmentation;
- `procedural_masks`: independent phantom mask sets (one tissue each), optionally with the
  geometry fitted to a real mask set;
- `phantom_masks`: consecutive slices of one phantom mask volume, optionally fitted likewise;
- `remodel_masks`: new layouts from the volume's own annotation: its membranes warped
  elastically, its own mitochondria profiles pasted into the cells (`layout_masks` picks one
  of the study's layouts by name, `layout_figure` draws them side by side).

The phantom's tissue model draws mitochondria and membrane masks without rendering an image;
fitted to a real mask set (`emsynth.data.phantom.fit_domain`), it gives masks with that set's
object counts, sizes and membrane density. `mask_volume` wraps masks as a Volume with a blank
image for `emsynth.synthesis.synthesize_volume`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from emsynth.data.phantom import (
    PhantomDomain,
    fit_domain,
    generate_masks,
    get_domain,
    iter_slices,
    mask_statistics,
)
from emsynth.data.volume import MEMBRANE, MITO, Volume
from emsynth.errors import input_error
from emsynth.segment import augment
from emsynth.segment.config import AugmentConfig


def fitted_domain(domain: str | PhantomDomain, like: Volume, shape: tuple[int, int]
                  ) -> PhantomDomain:
    """`domain` with its mask geometry fitted to `like`'s mito (and membrane) labels,
    measured on generated slices of `shape`."""
    if MITO not in like.labels:
        raise input_error(like.source or "volume", "has no mito label to fit the masks to",
                          "pass a dataset with mitochondria masks")
    target = mask_statistics(like.labels[MITO], like.labels.get(MEMBRANE))
    return fit_domain(target, get_domain(domain), shape=shape)


def phantom_masks(
    domain: str = "vnc",
    n_slices: int = 8,
    shape: tuple[int, int] = (1024, 1024),
    seed: int = 0,
    *,
    like: Volume | None = None,
) -> Volume:
    """A mask volume (labels mito and membrane, consecutive slices related) from the phantom.

    like: first fit the domain's mask geometry to this volume's mito (and membrane) labels,
    measured on slices of its size. The image is blank (zeros): only the masks are meant to
    be used, by `synthesize_volume`, which replaces it.
    """
    base = get_domain(domain)
    source = f"phantom-masks:{base.name}:seed={seed}"
    if like is not None:
        base = fitted_domain(base, like, tuple(like.shape[1:]))
        source += f":fitted-to={like.source}"
    slices = list(iter_slices(base, n_slices, shape, seed, with_image=False))
    return Volume(
        image=np.zeros((n_slices, *shape), np.uint8),
        labels={MITO: np.stack([s.mito for s in slices]),
                MEMBRANE: np.stack([s.membrane for s in slices])},
        pixel_size_nm=(base.pixel_size_nm, base.pixel_size_nm),
        source=source,
    )


def procedural_masks(volume: Volume, channels: list[str], count: int, size: int, seed: int,
                     domain: str, fit: bool) -> tuple[dict[str, np.ndarray], str]:
    """`count` independent phantom mask sets of `size` px (one tissue seed each, so unlike the
    slices of one phantom volume they are not near-duplicates), from `domain`, with its
    geometry first fitted to the volume's masks when `fit`. Returns the masks and a label."""
    chosen = get_domain(domain)
    if fit:
        side = min(size, *volume.shape[1:])
        chosen = fitted_domain(chosen, volume, (side, side))
    pairs = [generate_masks(chosen, (size, size), seed * 1_000_003 + i) for i in range(count)]
    found = {MITO: np.stack([p[0] for p in pairs]), MEMBRANE: np.stack([p[1] for p in pairs])}
    label = f"procedural ({domain}{', fitted to the real masks' if fit else ''})"
    return {name: found[name] for name in channels}, label


def deformed_masks(volume: Volume, channels: list[str], count: int, size: int, seed: int,
                   elastic_sigma: float, elastic_spacing: int, scale_range: float
                   ) -> dict[str, np.ndarray]:
    """`count` random square crops of the volume's masks, each flipped/rotated and elastically
    deformed with the segmentation stage's augmentation (labels re-thresholded at 0.5)."""
    side = min(size, *volume.shape[1:])
    rng = np.random.default_rng([seed, 0x5EED])
    aug = AugmentConfig(dihedral=True, elastic_prob=1.0 if elastic_sigma > 0 else 0.0,
                        elastic_sigma=elastic_sigma, elastic_spacing=elastic_spacing,
                        scale_range=scale_range)
    out = {name: np.empty((count, side, side), bool) for name in channels}
    for i in range(count):
        z = rng.integers(0, len(volume))
        y0 = rng.integers(0, volume.shape[1] - side + 1)
        x0 = rng.integers(0, volume.shape[2] - side + 1)
        crop = np.stack([volume.labels[name][z, y0:y0 + side, x0:x0 + side]
                         for name in channels]).astype(np.float32)[None]
        params = augment.draw_params(rng, aug, 1, side)
        # apply() warps "image" channels bilinearly and thresholds the "label": pass the first
        # mask as the label and threshold the rest here, with no intensity changes.
        rest, first = augment.apply(torch.from_numpy(crop[:, 1:]),
                                    torch.from_numpy(crop[:, :1]), params, [])
        warped = torch.cat([first, rest], 1)[0].numpy() >= 0.5
        for c, name in enumerate(channels):
            out[name][i] = warped[c]
    return out


def mask_volume(masks: dict[str, np.ndarray], source: str) -> Volume:
    """Masks as a Volume (blank image) for emsynth.synthesis.synthesize_volume."""
    shape = next(iter(masks.values())).shape
    return Volume(np.zeros(shape, np.uint8), masks, source=source)


# --- remodelled layouts ------------------------------------------------------------------------

#: Smallest mitochondrion profile (px) taken as an instance to paste.
MIN_INSTANCE_PX = 20
#: Free pixels kept between a pasted mitochondrion and membranes or other mitochondria.
PASTE_MARGIN = 2


@dataclass
class Instance:
    """One real mitochondrion profile: its bounding-box mask and orientation (radians, as
    skimage's regionprops: angle between the row axis and the major axis)."""

    mask: np.ndarray
    orientation: float

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def mito_instances(mito: np.ndarray, min_px: int = MIN_INSTANCE_PX) -> list[Instance]:
    """The mitochondrion profiles of (z, y, x) or (y, x) masks that do not touch the border
    (cut profiles are not whole shapes); all profiles when every one touches it."""
    from skimage.measure import regionprops

    mito = np.asarray(mito, bool)
    mito = mito[None] if mito.ndim == 2 else mito
    inside: list[Instance] = []
    cut: list[Instance] = []
    for plane in mito:
        labels, _ = ndi.label(plane)
        for region in regionprops(labels):
            if region.area < min_px:
                continue
            y0, x0, y1, x1 = region.bbox
            found = Instance(np.asarray(region.image, bool), float(region.orientation))
            touches = y0 == 0 or x0 == 0 or y1 == plane.shape[0] or x1 == plane.shape[1]
            (cut if touches else inside).append(found)
    return inside or cut


def _transformed(instance: Instance, angle: float, scale: float) -> np.ndarray:
    """The instance mask zoomed by `scale` and rotated by `angle` radians (counter-clockwise
    in (row, column) image coordinates, i.e. its orientation grows by `angle`)."""
    plane = np.pad(instance.mask.astype(np.float32), 2)
    if scale != 1.0:
        plane = ndi.zoom(plane, scale, order=1)
    plane = ndi.rotate(plane, np.degrees(angle), order=1, reshape=True)
    out = plane >= 0.5
    if not out.any():
        return out
    rows, cols = np.flatnonzero(out.any(1)), np.flatnonzero(out.any(0))
    return out[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _paste_mito(shape: tuple[int, int], membrane: np.ndarray | None, instances: list[Instance],
                target: float, scale_range: float, rng: np.random.Generator, tries: int
                ) -> np.ndarray:
    """Mitochondria pasted into the cells of one membrane plane (module docstring of
    `remodel_masks`) until `target` of the pixels are mitochondria or `tries` run out."""
    from skimage.measure import regionprops

    free = ~membrane if membrane is not None else np.ones(shape, bool)
    cells, _ = ndi.label(free, structure=ndi.generate_binary_structure(2, 1))
    regions = [r for r in regionprops(cells) if r.area >= 2 * MIN_INSTANCE_PX]
    mito = np.zeros(shape, bool)
    if not regions or not instances:
        return mito
    areas = np.array([i.area for i in instances], np.float64)
    lo, hi = areas.min(), areas.max()
    cell_area = np.array([r.area for r in regions], np.float64)
    blocked = np.zeros(shape, bool)  # mitochondria grown by the margin
    grow = ndi.generate_binary_structure(2, 2)
    want = target * mito.size
    have = 0
    for _ in range(tries):
        if have >= want:
            break
        inst = instances[int(rng.integers(len(instances)))]
        scale = float(rng.uniform(1 - scale_range, 1 + scale_range))
        # Keep the area within the observed range of profile areas.
        scale = float(np.clip(scale, np.sqrt(lo / inst.area), np.sqrt(hi / inst.area)))
        fits = np.flatnonzero(cell_area >= 1.5 * inst.area * scale**2)
        if not len(fits):
            continue
        pick = int(rng.choice(fits, p=cell_area[fits] / cell_area[fits].sum()))
        region = regions[pick]
        # Oriented with the cell (membranes): its major axis along the cell's, +-20 degrees.
        if membrane is not None:
            along = region.orientation + rng.normal(0.0, np.radians(10))
        else:
            along = rng.uniform(-np.pi, np.pi)
        piece = _transformed(inst, along - inst.orientation, scale)
        if rng.random() < 0.5:
            piece = piece[::-1, ::-1]
        h, w = piece.shape
        if not piece.any() or h + 2 * PASTE_MARGIN >= shape[0] or w + 2 * PASTE_MARGIN >= shape[1]:
            continue
        coords = region.coords[int(rng.integers(len(region.coords)))]
        y0 = int(np.clip(coords[0] - h // 2, PASTE_MARGIN, shape[0] - h - PASTE_MARGIN))
        x0 = int(np.clip(coords[1] - w // 2, PASTE_MARGIN, shape[1] - w - PASTE_MARGIN))
        m = PASTE_MARGIN
        halo = ndi.binary_dilation(np.pad(piece, m), grow, iterations=m)
        window = (slice(y0 - m, y0 + h + m), slice(x0 - m, x0 + w + m))
        # Reject pastes that leave the cell (touch its membrane) or touch a mitochondrion.
        if (cells[window][halo] != region.label).any() or blocked[window][halo].any():
            continue
        added = int(piece.sum())
        if have + added - want > want - have:  # overshoots more than it helps: try another
            continue
        have += added
        mito[y0:y0 + h, x0:x0 + w] |= piece
        blocked[window] |= halo
    return mito


def remodel_masks(volume: Volume, channels: list[str], count: int, size: int, seed: int,
                  spacing: int = 20, jitter: float = 4.0, scale_range: float = 0.2,
                  tries: int = 400) -> dict[str, np.ndarray]:
    """New mask layouts from the volume's own annotation only.

    Membranes: random crops of the volume's membranes, flipped/rotated and warped elastically
    (control points every `spacing` px, displacements of std `jitter` px), their
    mitochondria dropped. Mitochondria: the volume's own profiles (`mito_instances`), each
    pasted into a random cell (a 4-connected non-membrane region, drawn by area) at a random
    position, rotated so its major axis follows the cell's, zoomed by up to `scale_range` but
    kept within the observed range of profile areas; a paste that would come closer than
    `PASTE_MARGIN` px to the cell's membrane, another mitochondrion or the image border is
    rejected, and so is one that would overshoot the volume's mitochondria fraction by more
    than it falls short without it; pasting stops once the crop holds that fraction.
    Without a membrane channel, mitochondria are pasted anywhere free, in any orientation.
    """
    if MITO not in volume.labels:
        raise input_error(volume.source or "volume", "has no mito label to remodel",
                          "pass a dataset with mitochondria masks")
    side = min(size, *volume.shape[1:])
    rng = np.random.default_rng([seed, 0x4E30])
    with_membrane = MEMBRANE in channels and MEMBRANE in volume.labels
    membranes = None
    if with_membrane:
        membranes = deformed_masks(volume, [MEMBRANE], count, side, seed, jitter, spacing,
                                   0.0)[MEMBRANE]
    instances = mito_instances(volume.labels[MITO])
    target = float(volume.labels[MITO].mean())
    mito = np.stack([
        _paste_mito((side, side), None if membranes is None else membranes[i], instances, target,
                    scale_range, rng, tries)
        for i in range(count)])
    found = {MITO: mito}
    if membranes is not None:
        found[MEMBRANE] = membranes
    missing = [name for name in channels if name not in found]
    if missing:
        raise input_error(volume.source or "volume", f"has no {missing[0]} label to remodel",
                          "drop it from the GAN's channels or add its masks")
    return {name: found[name] for name in channels}


#: Mask layouts of synthesis.masks ("real" is the older name of "deformed").
LAYOUTS = ("deformed", "remodel", "procedural")


def layout_masks(layout: str, volume: Volume, channels: list[str], count: int, size: int,
                 seed: int, settings) -> tuple[dict[str, np.ndarray], str]:
    """The masks of one layout (`settings`: the study's SynthesisConfig) and a label."""
    s = settings
    if layout in ("real", "deformed"):
        return deformed_masks(volume, channels, count, size, seed, s.elastic_sigma,
                              s.elastic_spacing, s.scale_range), "real masks, deformed"
    if layout == "remodel":
        return remodel_masks(volume, channels, count, size, seed, s.remodel_spacing,
                             s.remodel_jitter, s.remodel_scale), \
            "remodelled (warped membranes, real mitochondria pasted into cells)"
    if layout == "procedural":
        return procedural_masks(volume, channels, count, size, seed, s.procedural_domain,
                                s.procedural_fit)
    raise ValueError(f"unknown mask layout {layout!r} (choose from {', '.join(LAYOUTS)})")


def layout_figure(out_path, layouts: dict[str, dict[str, np.ndarray]], rows: int = 4,
                  title: str = "") -> Path:
    """A grid of mask sets: one column per layout (e.g. real, deformed, remodel, procedural),
    `rows` samples each, mitochondria red on membranes green (emsynth.data.figures.image_grid)."""
    from emsynth.data.figures import image_grid

    def rgb(masks: dict[str, np.ndarray], i: int) -> np.ndarray:
        mito = masks[MITO][i]
        plane = np.zeros((*mito.shape, 3), np.uint8)
        if MEMBRANE in masks:
            plane[..., 1] = masks[MEMBRANE][i] * 200
        plane[mito] = (230, 30, 30)
        return plane

    n = min(rows, *(len(m[MITO]) for m in layouts.values()))
    columns = [(name, [rgb(masks, i) for i in range(n)], 1.0) for name, masks in layouts.items()]
    return image_grid(out_path, columns, [f"#{i}" for i in range(n)], title=title)
