"""Generating phantom slices, masks and volumes: deterministic per seed, checked up front,
lazy per slice."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from emsynth.data.phantom.domains import PhantomDomain, get_domain
from emsynth.data.phantom.tissue import Tissue
from emsynth.data.volume import MEMBRANE, MITO, Volume
from emsynth.errors import EmsynthError


@dataclass
class PhantomSlice:
    """One generated slice: image (None when only masks were asked for) and boolean masks.

    cells holds the cell id of every pixel (membrane pixels keep the id of the cell whose
    boundary they belong to); it lets tests check that membranes close every cell.
    """

    image: np.ndarray | None
    mito: np.ndarray
    membrane: np.ndarray
    cells: np.ndarray



def _slices(domain, n_slices, shape, seed, with_image) -> Iterator[PhantomSlice]:
    """Check the arguments now (not on the first slice), then generate lazily."""
    d = get_domain(domain)
    shape = (int(shape[0]), int(shape[1]))
    if min(shape) < 16:
        raise EmsynthError(f"phantom size {shape} is too small. Fix: use at least 16 x 16 pixels")
    if n_slices < 1:
        raise EmsynthError(f"phantom needs at least one slice, got {n_slices}. Fix: pass >= 1")
    tissue = Tissue(d, shape, seed, n_slices)

    def generate() -> Iterator[PhantomSlice]:
        for z in range(n_slices):
            g = tissue.geometry(z)
            image = tissue.render(g, z) if with_image else None
            yield PhantomSlice(image, g.mito_ids > 0, g.membrane, g.cells)

    return generate()


def iter_slices(
    domain: str | PhantomDomain = "vnc",
    n_slices: int = 1,
    shape: tuple[int, int] = (512, 512),
    seed: int = 0,
    *,
    with_image: bool = True,
) -> Iterator[PhantomSlice]:
    """Yield the slices of one phantom volume in z order (for progress bars)."""
    return _slices(domain, n_slices, shape, seed, with_image)


def generate_slice(
    domain: str | PhantomDomain = "vnc", shape: tuple[int, int] = (512, 512), seed: int = 0
) -> PhantomSlice:
    """One slice: image, mito, membrane (identical to slice 0 of a one-slice volume)."""
    return next(_slices(domain, 1, shape, seed, True))


def generate_masks(
    domain: str | PhantomDomain = "vnc", shape: tuple[int, int] = (512, 512), seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(mito, membrane) boolean masks of one slice, without rendering an image.

    Same masks as `generate_slice` with the same arguments; use a PhantomDomain with fitted
    geometry fields to match the statistics of a real mask set.
    """
    s = next(_slices(domain, 1, shape, seed, False))
    return s.mito, s.membrane


def generate_volume(
    domain: str | PhantomDomain = "vnc",
    n_slices: int = 8,
    shape: tuple[int, int] = (512, 512),
    seed: int = 0,
) -> Volume:
    """A phantom volume with labels "mito" and "membrane"; consecutive slices are related."""
    d = get_domain(domain)
    slices = list(_slices(d, n_slices, shape, seed, True))
    return phantom_volume(d, slices, seed)


def phantom_volume(domain: PhantomDomain, slices: list[PhantomSlice], seed: int) -> Volume:
    """Stack generated slices into a Volume."""
    return Volume(
        image=np.stack([s.image for s in slices]),
        labels={
            MITO: np.stack([s.mito for s in slices]),
            MEMBRANE: np.stack([s.membrane for s in slices]),
        },
        pixel_size_nm=(domain.pixel_size_nm, domain.pixel_size_nm),
        source=f"phantom:{domain.name}:seed={seed}",
    )
