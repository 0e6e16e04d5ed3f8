"""Mask sources for synthesis beyond the masks of a real dataset: new tissue geometry.

The phantom's tissue model draws mitochondria and membrane masks without rendering an image;
fitted to a real mask set (`emsynth.data.phantom.fit_domain`), it gives new mask volumes with
that set's object counts, sizes and membrane density, for the GAN to turn into new images.
"""

from __future__ import annotations

import numpy as np

from emsynth.data.phantom import fit_domain, get_domain, iter_slices, mask_statistics
from emsynth.data.volume import MEMBRANE, MITO, Volume
from emsynth.errors import input_error


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
        if MITO not in like.labels:
            raise input_error(like.source or "volume", "has no mito label to fit the masks to",
                              "pass a dataset with mitochondria masks")
        target = mask_statistics(like.labels[MITO], like.labels.get(MEMBRANE))
        base = fit_domain(target, base, shape=tuple(like.shape[1:]))
        source += f":fitted-to={like.source}"
    slices = list(iter_slices(base, n_slices, shape, seed, with_image=False))
    return Volume(
        image=np.zeros((n_slices, *shape), np.uint8),
        labels={MITO: np.stack([s.mito for s in slices]),
                MEMBRANE: np.stack([s.membrane for s in slices])},
        pixel_size_nm=(base.pixel_size_nm, base.pixel_size_nm),
        source=source,
    )
