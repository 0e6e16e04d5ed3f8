"""`PhantomConfig`: a generated phantom volume as a config section, and its one loader.

Every stage that can train on phantom data embeds this section as `phantom` under its data
settings (membranes `data.phantom`, GAN `data.phantom`, study `data.phantom` / `test.phantom`)
and loads it with `PhantomConfig.generate`, so the same four values give the same volume in
every stage:

    phantom: {domain: ca1, slices: 28, size: 256, seed: 0}
"""

from __future__ import annotations

from pydantic import Field, field_validator

from emsynth.config import StrictModel
from emsynth.data.phantom.domains import DOMAINS
from emsynth.data.phantom.generate import generate_volume
from emsynth.data.volume import Volume


class PhantomConfig(StrictModel):
    """`slices` consecutive phantom slices of `size` x `size` px of one domain, drawn with
    `seed` (deterministic: the same values give a byte-identical volume)."""

    domain: str = Field(description="Phantom domain: vnc (ssTEM-like) or ca1 (FIB-SEM-like).")
    slices: int = Field(20, ge=1, description="Volume depth (consecutive, related slices).")
    size: int = Field(512, ge=32, description="Slice side in pixels.")
    seed: int = Field(0, ge=0, description="Seed of the tissue and the imaging noise.")

    @field_validator("domain")
    @classmethod
    def _known_domain(cls, value: str) -> str:
        if value not in DOMAINS:
            raise ValueError(f"unknown phantom domain {value!r}; use one of "
                             f"{', '.join(sorted(DOMAINS))}")
        return value

    def generate(self) -> Volume:
        """The volume, with labels "mito" and "membrane"."""
        return generate_volume(self.domain, self.slices, (self.size, self.size), self.seed)

    def describe(self) -> str:
        return (f"phantom {self.domain}: {self.slices} slices of {self.size}^2 px, "
                f"seed {self.seed}")
