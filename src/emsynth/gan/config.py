"""`GanConfig`: the pix2pix mask-to-EM GAN's settings; presets in configs/gan/*.yaml.

Defaults are the study's spec (pix2pix: ngf = ndf = 64, 256 crops, batch 1, LSGAN + 100 x L1,
Adam 2e-4 with betas (0.5, 0.999), constant learning rate then a linear decay to zero).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from emsynth.config import StrictModel
from emsynth.data.phantom.config import PhantomConfig
from emsynth.data.volume import LABEL_NAMES, MEMBRANE, MITO
from emsynth.engine.config import EngineConfig
from emsynth.gan.networks import SIDE_MULTIPLE


class GanDataConfig(StrictModel):
    paths: list[str] = Field(
        default_factory=list,
        description="Datasets (folders or TIFFs, read with emsynth.data.readers.read_volume); "
        "empty = the phantom below.",
    )
    layout: str = Field("auto", description="Layout of every path (auto = detect).")
    phantom: PhantomConfig = Field(
        PhantomConfig(domain="vnc", slices=8, size=512, seed=0),
        description="The generated volume trained on when `paths` is empty (demos, tests).",
    )
    channels: list[str] = Field(
        default_factory=lambda: [MITO, MEMBRANE],
        description='Conditioning masks in channel order; ["mito"] for the ablation.',
    )
    mask_range: Literal["-1,1", "0,1"] = Field(
        "-1,1", description='Mask channel values: "-1,1" (pix2pix scales inputs so) or "0,1".'
    )
    val_block: int = Field(
        2, ge=0, description="Last slices of every volume held out for validation (0 = none)."
    )
    crop: int = Field(256, description="Training crop side; a multiple of 256 (8 levels).")
    batch_size: int = Field(1, ge=1)
    augment: bool = Field(True, description="Random flips and 90-degree rotations.")

    @field_validator("channels")
    @classmethod
    def _known_channels(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one conditioning channel")
        unknown = [c for c in value if c not in LABEL_NAMES]
        if unknown:
            raise ValueError(f"unknown channel {unknown[0]!r}; use {', '.join(LABEL_NAMES)}")
        if len(set(value)) != len(value):
            raise ValueError("a channel is listed twice")
        return value

    @field_validator("crop")
    @classmethod
    def _crop_multiple(cls, value: int) -> int:
        if value < SIDE_MULTIPLE or value % SIDE_MULTIPLE:
            raise ValueError(f"must be a positive multiple of {SIDE_MULTIPLE}, got {value}")
        return value


class GanModelConfig(StrictModel):
    ngf: int = Field(64, ge=1, description="Generator width (64 = C64-...-C512 as in pix2pix).")
    ndf: int = Field(64, ge=1, description="Discriminator width (64 = C64-C128-C256-C512).")
    n_scales: int = Field(3, ge=1, le=3, description="PatchGANs at full, 1/2, 1/4 resolution.")


class GanLossConfig(StrictModel):
    adversarial: Literal["lsgan", "vanilla", "hinge"] = "lsgan"
    l1_weight: float = Field(100.0, ge=0)
    feature_matching_weight: float = Field(
        0.0, ge=0, description="pix2pixHD discriminator feature matching (10 there); 0 = off."
    )


class GanOptimConfig(StrictModel):
    lr: float = Field(2e-4, gt=0, description="Adam learning rate of both networks.")
    beta1: float = Field(0.5, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    decay_start: float = Field(
        0.5, ge=0, le=1,
        description="Fraction of engine.steps after which the rate decays linearly to zero.",
    )


class GanConfig(StrictModel):
    data: GanDataConfig = GanDataConfig()
    model: GanModelConfig = GanModelConfig()
    loss: GanLossConfig = GanLossConfig()
    optim: GanOptimConfig = GanOptimConfig()
    engine: EngineConfig = EngineConfig(
        steps=20000, checkpoint_every=1000, log_every=50, val_every=1000, image_every=1000
    )

    @model_validator(mode="after")
    def _crop_fits_phantom(self) -> GanConfig:
        if not self.data.paths and self.data.phantom.size < self.data.crop:
            raise ValueError(
                f"data.phantom.size={self.data.phantom.size} is smaller than data.crop="
                f"{self.data.crop}"
            )
        return self
