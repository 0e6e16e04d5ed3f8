"""Procedural EM tissue ("phantom"): the embedded default dataset, with no downloads.

Cells are a noise-warped Voronoi tessellation of drifting seeds; their boundaries, thickened and
rounded at the corners, make the membrane mask. Mitochondria are 3-D capsules owned by a cell and
clipped to its interior, so consecutive slices show them moving, appearing and vanishing. An
imaging model (blur, shot and read noise, brightness, contrast, uneven illumination) turns the
tissue into a uint8 image. Everything is deterministic per seed and vectorised with numpy/scipy.

Modules: `domains` (PhantomDomain and the presets), `noise` (random fields), `tissue` (cells,
membranes, mitochondria and the imaging model), `generate` (slices, masks, volumes),
`fitting` (mask statistics and fitting a domain to a real mask set) and `config`
(`PhantomConfig`, the config section every stage uses for a generated volume).

Geometry parameters (cell size, membrane thickness, mitochondrion count, width and shape) live
on `PhantomDomain` so that masks with the statistics of a real mask set can be generated
(`generate_masks`) without rendering an image.
"""

from emsynth.data.phantom.config import PhantomConfig
from emsynth.data.phantom.domains import DOMAINS, PhantomDomain, get_domain
from emsynth.data.phantom.fitting import MaskStatistics, fit_domain, mask_statistics
from emsynth.data.phantom.generate import (
    PhantomSlice,
    generate_masks,
    generate_slice,
    generate_volume,
    iter_slices,
    phantom_volume,
)

__all__ = [
    "DOMAINS",
    "MaskStatistics",
    "PhantomConfig",
    "PhantomDomain",
    "PhantomSlice",
    "fit_domain",
    "generate_masks",
    "generate_slice",
    "generate_volume",
    "get_domain",
    "iter_slices",
    "mask_statistics",
    "phantom_volume",
]
