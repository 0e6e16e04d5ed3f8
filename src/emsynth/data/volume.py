"""The one in-memory representation of every EM data source."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Label channel names used across the package.
MITO = "mito"
MEMBRANE = "membrane"
SYNAPSE = "synapse"
LABEL_NAMES = (MITO, MEMBRANE, SYNAPSE)


@dataclass
class Volume:
    """A stack of greyscale EM slices with named binary label channels.

    image: (z, y, x) uint8. labels: name -> (z, y, x) bool, same shape as image.
    pixel_size_nm: (y, x) in nanometres when known. source: where it came from (path, layout).
    slice_names: one name per slice (file stem or index), kept for writing outputs back.
    """

    image: np.ndarray
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    pixel_size_nm: tuple[float, float] | None = None
    source: str = ""
    slice_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.image.ndim != 3:
            raise ValueError(f"image must be (z, y, x), got shape {self.image.shape}")
        if self.image.dtype != np.uint8:
            raise ValueError(f"image must be uint8, got {self.image.dtype}")
        for name, lab in self.labels.items():
            if lab.shape != self.image.shape:
                raise ValueError(f"label {name!r} shape {lab.shape} != image {self.image.shape}")
            if lab.dtype != bool:
                raise ValueError(f"label {name!r} must be bool, got {lab.dtype}")
        if not self.slice_names:
            self.slice_names = [f"{i:04d}" for i in range(self.image.shape[0])]
        if len(self.slice_names) != self.image.shape[0]:
            raise ValueError("one slice name per slice")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.image.shape[0]

    def select(self, indices) -> Volume:
        """A new Volume holding only the given slices (a list, range or slice)."""
        idx = np.arange(len(self))[indices] if isinstance(indices, slice) else np.asarray(indices)
        return Volume(
            image=self.image[idx],
            labels={k: v[idx] for k, v in self.labels.items()},
            pixel_size_nm=self.pixel_size_nm,
            source=self.source,
            slice_names=[self.slice_names[i] for i in idx],
        )

    def label_fractions(self) -> dict[str, float]:
        return {k: float(v.mean()) for k, v in self.labels.items()}
