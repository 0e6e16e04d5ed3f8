"""Phantom domains: the parameters that make one phantom look like its microscope and tissue,
and the presets "vnc" (ssTEM, Drosophila VNC) and "ca1" (FIB-SEM, mouse CA1).

Geometry parameters (cell size, membrane thickness, mitochondrion count, width and shape) are
what `emsynth.data.phantom.fitting.fit_domain` adjusts to match a real mask set.
"""

from __future__ import annotations

from pydantic import Field

from emsynth.config import StrictModel
from emsynth.errors import EmsynthError


class PhantomDomain(StrictModel):
    """Everything that makes one phantom domain look like its microscope and tissue.

    Lengths are in pixels of the output image unless the name says nm. "Darkness" values are
    stain density: 0 is empty resin (white), 1 is fully stained (black).
    """

    name: str = Field(description="preset name, recorded in Volume.source")
    pixel_size_nm: float = Field(gt=0, description="in-plane pixel size")
    section_thickness_nm: float = Field(gt=0, description="z step between consecutive slices")

    # Cells and membranes
    cell_size_px: float = Field(gt=4, description="sqrt of the mean area per cell")
    cell_size_spread: float = Field(ge=0, description="log-normal sigma of the local cell size")
    membrane_thickness_px: float = Field(gt=1, description="mean membrane thickness")
    membrane_thickness_spread: float = Field(ge=0, description="log-normal sigma of thickness")
    corner_radius_px: float = Field(ge=0, description="rounding of cell corners (opening radius)")
    boundary_warp_px: float = Field(ge=0, description="amplitude of the cell-shape warp")
    boundary_warp_scale_px: float = Field(gt=0, description="correlation length of that warp")
    boundary_wiggle_px: float = Field(ge=0, description="amplitude of fine membrane wiggle")
    boundary_wiggle_scale_px: float = Field(gt=0, description="correlation length of wiggle")
    cell_tilt: float = Field(ge=0, description="mean tan(angle) of processes to the z axis")
    z_correlation_nm: float = Field(gt=0, description="depth over which cell shapes change")
    cell_life_nm: float = Field(gt=0, description="mean depth a cell profile persists")

    # Mitochondria
    mito_per_mpx: float = Field(ge=0, description="mitochondrion profiles per 1e6 pixels")
    mito_width_px: float = Field(gt=2, description="median mitochondrion width (2 x radius)")
    mito_width_spread: float = Field(ge=0, description="log-normal sigma of the width")
    mito_aspect: float = Field(ge=1, description="median length / width of a full profile")
    mito_aspect_spread: float = Field(ge=0, description="log-normal sigma of (aspect - 1)")
    mito_depth_nm: float = Field(gt=0, description="median extent of a mitochondrion in z")
    mito_margin_px: float = Field(ge=1, description="least gap between mitochondrion and membrane")

    # Stain
    cytoplasm_darkness: float = Field(ge=0, le=1)
    cell_tone_spread: float = Field(ge=0, description="per-cell variation of cytoplasm darkness")
    texture_darkness: float = Field(ge=0, description="amplitude of cytoplasm texture")
    texture_scale_px: float = Field(gt=0, description="grain size of cytoplasm texture")
    speckle_darkness: float = Field(ge=0, description="dark granules (ribosomes, filaments)")
    membrane_darkness: float = Field(ge=0, le=1.5)
    mito_darkness: float = Field(ge=0, le=1, description="mitochondrial matrix")
    mito_border_darkness: float = Field(ge=0, description="extra darkness of the double membrane")
    mito_border_px: float = Field(gt=0, description="width of one mitochondrial membrane")
    cristae_darkness: float = Field(ge=0)
    cristae_period_px: float = Field(gt=2)
    vesicles_per_mpx: float = Field(ge=0, description="small dark-rimmed vesicles per 1e6 px")
    vesicle_radius_px: float = Field(gt=1)

    # Imaging
    blur_px: float = Field(ge=0, description="Gaussian PSF sigma")
    brightness: float = Field(gt=0, description="grey value of unstained resin (0-255)")
    contrast: float = Field(gt=0, description="grey levels lost per unit darkness / 255")
    shot_noise: float = Field(ge=0, description="Poisson-like noise: std = sqrt(value * this)")
    read_noise: float = Field(ge=0, description="additive Gaussian noise std (grey levels)")
    grain_px: float = Field(ge=0, description="correlation of the noise (0 = white)")
    illumination: float = Field(ge=0, description="relative amplitude of uneven illumination")


DOMAINS: dict[str, PhantomDomain] = {
    # ssTEM of Drosophila larval VNC: thick dark membranes (~20% of pixels), high contrast,
    # grainy, smaller and sparser mitochondria (~4.5% of pixels in the real stack).
    "vnc": PhantomDomain(
        name="vnc",
        pixel_size_nm=4.6,
        section_thickness_nm=50.0,
        cell_size_px=70.0,
        cell_size_spread=0.5,
        membrane_thickness_px=7.0,
        membrane_thickness_spread=0.3,
        corner_radius_px=8.0,
        boundary_warp_px=5.0,
        boundary_warp_scale_px=28.0,
        boundary_wiggle_px=2.0,
        boundary_wiggle_scale_px=9.0,
        cell_tilt=0.25,
        z_correlation_nm=600.0,
        cell_life_nm=1500.0,
        mito_per_mpx=20.0,
        mito_width_px=52.0,
        mito_width_spread=0.3,
        mito_aspect=1.45,
        mito_aspect_spread=0.5,
        mito_depth_nm=900.0,
        mito_margin_px=3.0,
        cytoplasm_darkness=0.38,
        cell_tone_spread=0.07,
        texture_darkness=0.16,
        texture_scale_px=2.0,
        speckle_darkness=0.35,
        membrane_darkness=0.85,
        mito_darkness=0.6,
        mito_border_darkness=0.3,
        mito_border_px=1.6,
        cristae_darkness=0.35,
        cristae_period_px=9.0,
        vesicles_per_mpx=400.0,
        vesicle_radius_px=4.0,
        blur_px=0.9,
        brightness=235.0,
        contrast=210.0,
        shot_noise=1.5,
        read_noise=8.0,
        grain_px=1.0,
        illumination=0.06,
    ),
    # FIB-SEM of mouse CA1 hippocampus: thinner membranes, lower contrast, smooth noise, larger
    # and more numerous mitochondria (~6.7% of pixels with the Lucchi++ labels).
    "ca1": PhantomDomain(
        name="ca1",
        pixel_size_nm=5.0,
        section_thickness_nm=5.0,
        cell_size_px=56.0,
        cell_size_spread=0.5,
        membrane_thickness_px=5.0,
        membrane_thickness_spread=0.25,
        corner_radius_px=7.0,
        boundary_warp_px=7.0,
        boundary_warp_scale_px=35.0,
        boundary_wiggle_px=1.5,
        boundary_wiggle_scale_px=10.0,
        cell_tilt=0.4,
        z_correlation_nm=400.0,
        cell_life_nm=1500.0,
        mito_per_mpx=24.0,
        mito_width_px=56.0,
        mito_width_spread=0.25,
        mito_aspect=1.45,
        mito_aspect_spread=0.5,
        mito_depth_nm=900.0,
        mito_margin_px=2.0,
        cytoplasm_darkness=0.3,
        cell_tone_spread=0.03,
        texture_darkness=0.07,
        texture_scale_px=2.5,
        speckle_darkness=0.25,
        membrane_darkness=0.75,
        mito_darkness=0.55,
        mito_border_darkness=0.35,
        mito_border_px=2.0,
        cristae_darkness=0.12,
        cristae_period_px=11.0,
        vesicles_per_mpx=600.0,
        vesicle_radius_px=4.5,
        blur_px=1.8,
        brightness=215.0,
        contrast=190.0,
        shot_noise=0.6,
        read_noise=4.0,
        grain_px=1.2,
        illumination=0.04,
    ),
}


def get_domain(domain: str | PhantomDomain) -> PhantomDomain:
    """A preset by name, or the given domain unchanged."""
    if isinstance(domain, PhantomDomain):
        return domain
    if domain not in DOMAINS:
        raise EmsynthError(
            f"unknown phantom domain {domain!r}. Fix: use one of {', '.join(sorted(DOMAINS))}"
        )
    return DOMAINS[domain]
