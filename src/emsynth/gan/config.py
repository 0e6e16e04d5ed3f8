"""`GanConfig`: the pix2pix mask-to-EM GAN's settings; presets in configs/gan/*.yaml.

Defaults are the study's spec (pix2pix: ngf = ndf = 64, 256 crops, batch 1, LSGAN + 100 x L1,
Adam 2e-4 with betas (0.5, 0.999), constant learning rate then a linear decay to zero).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from emsynth.config import StrictModel
from emsynth.data.phantom.config import PhantomConfig
from emsynth.data.slices import DEFAULT_GAP
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
    val_gap: int = Field(
        DEFAULT_GAP, ge=0,
        description="Slices before each validation block that never train (emsynth.data."
        "slices.split_blocks): neighbours of a validation slice are near-duplicates of it.",
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
    arch: Literal["unet", "spade"] = Field(
        "unet", description="Generator: the spec pix2pix U-Net, or SPADE (Park et al. 2019: "
        "the masks modulate every decoder block).",
    )
    ngf: int = Field(64, ge=1, description="Generator width (64 = C64-...-C512 as in pix2pix).")
    ndf: int = Field(64, ge=1, description="Discriminator width (64 = C64-C128-C256-C512).")
    n_scales: int = Field(
        3, ge=1, le=4, description="PatchGANs; scale i at 1/2^i resolution (full, 1/2, 1/4).")
    d_downsample: bool = Field(
        True, description="Scale i sees the pair downsampled 2^i times (pix2pixHD); false = "
        "every PatchGAN sees full resolution (Han et al. 2018: two full-resolution Ds).",
    )
    spectral_norm: bool = Field(False, description="Spectral norm on every convolution of D.")
    decoder_noise: float = Field(
        0.0, ge=0, description="Sigma of Gaussian noise added to every decoder block's output, "
        "in training and at synthesis (Han et al.: 0.1); 0 = off (the spec).",
    )
    upsample: Literal["transpose", "resize", "bilinear"] = Field(
        "transpose", description="How the U-Net decoder upsamples: 4x4 stride-2 transposed "
        "convolution (the spec), or 2x nearest (resize) or bilinear resize and a 3x3 "
        "convolution (no checkerboard artefacts, Odena et al. 2016; bilinear also draws no "
        "block-grid lattice). SPADE always resizes (nearest).",
    )


class GanLossConfig(StrictModel):
    adversarial: Literal["lsgan", "vanilla", "hinge"] = "lsgan"
    l1_weight: float = Field(100.0, ge=0)
    feature_matching_weight: float = Field(
        0.0, ge=0, description="pix2pixHD discriminator feature matching (10 there); 0 = off."
    )
    class_l1_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Per-class L1 weights, e.g. {membrane: 2, mito: 4} (Han et al.): a pixel's "
        "L1 is multiplied by the largest weight of the conditioning masks it is in (1 outside "
        "all of them); names must be in data.channels. Empty = plain L1 (the spec).",
    )
    scale_weights: list[float] | None = Field(
        None, description="Weight of each discriminator scale in the adversarial and feature "
        "matching losses (one per model.n_scales, e.g. [0.5, 0.5]); None = their mean.",
    )
    consistency_weight: float = Field(
        0.0, ge=0, description="Mask-consistency loss weight: 1 - Dice between the input mito "
        "mask and a frozen mito segmenter's prediction on the synthetic image; 0 = off.",
    )
    consistency_segmenter: str | None = Field(
        None, description="The frozen segmenter for the consistency loss: an `emsynth segment "
        "train` run folder or its model/ (image input only).",
    )

    @field_validator("class_l1_weights")
    @classmethod
    def _positive_class_weights(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [name for name, weight in value.items() if not weight > 0]
        if bad:
            raise ValueError(f"class weight of {bad[0]!r} must be > 0")
        return value


class GanOptimConfig(StrictModel):
    lr: float = Field(2e-4, gt=0, description="Adam learning rate of both networks.")
    beta1: float = Field(0.5, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    decay_start: float = Field(
        0.5, ge=0, le=1,
        description="Fraction of engine.steps after which the rate decays linearly to zero.",
    )
    g_steps_per_d: int = Field(
        1, ge=1, description="Generator updates per discriminator update, each with a fresh "
        "generator pass on the step's batch (Han et al.: 2); 1 = pix2pix.",
    )


class GanDiffAugmentConfig(StrictModel):
    """DiffAugment (Zhao et al. 2020) on what D sees, real and synthetic pairs alike, in both
    updates; differentiable, so G's gradient passes through it. Off by default."""

    policy: list[Literal["translation", "colour", "cutout"]] = Field(
        default_factory=list,
        description="translation: shift the (masks, image) pair together; colour (brightness "
        "and contrast) and cutout: the image only. Empty = off.",
    )
    translation: float = Field(0.125, gt=0, le=0.5, description="Largest shift, in sides.")
    cutout: float = Field(0.5, gt=0, le=1, description="Cutout square side, in sides.")


class GanConfig(StrictModel):
    data: GanDataConfig = GanDataConfig()
    model: GanModelConfig = GanModelConfig()
    loss: GanLossConfig = GanLossConfig()
    optim: GanOptimConfig = GanOptimConfig()
    diffaugment: GanDiffAugmentConfig = GanDiffAugmentConfig()
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

    @model_validator(mode="after")
    def _loss_options_fit(self) -> GanConfig:
        loss = self.loss
        unknown = [c for c in loss.class_l1_weights if c not in self.data.channels]
        if unknown:
            raise ValueError(f"loss.class_l1_weights names {unknown[0]!r}, which is not in "
                             f"data.channels {self.data.channels}")
        if loss.scale_weights is not None and len(loss.scale_weights) != self.model.n_scales:
            raise ValueError(f"loss.scale_weights has {len(loss.scale_weights)} entries for "
                             f"model.n_scales={self.model.n_scales}")
        if loss.consistency_weight > 0:
            if not loss.consistency_segmenter:
                raise ValueError("loss.consistency_weight > 0 needs loss.consistency_segmenter")
            if MITO not in self.data.channels:
                raise ValueError("the consistency loss needs mito in data.channels")
        return self


#: Options added after the spec, with the value that reproduces it. A run's stored task config
#: leaves them out while they hold that value, so runs written before they existed resume.
ADDED_OPTIONS: dict[tuple[str, str], object] = {
    ("model", "arch"): "unet",
    ("model", "d_downsample"): True,
    ("model", "spectral_norm"): False,
    ("model", "decoder_noise"): 0.0,
    ("model", "upsample"): "transpose",
    ("loss", "class_l1_weights"): {},
    ("loss", "scale_weights"): None,
    ("loss", "consistency_weight"): 0.0,
    ("loss", "consistency_segmenter"): None,
    ("optim", "g_steps_per_d"): 1,
    ("data", "val_gap"): 0,
    ("diffaugment", None): {"policy": [], "translation": 0.125, "cutout": 0.5},
}


def stored_config(cfg: GanConfig) -> dict:
    """`cfg` as JSON data without the engine section and without added options at their
    spec value (see ADDED_OPTIONS); what a run records and compares on resume."""
    dumped = cfg.model_dump(mode="json", exclude={"engine"})
    if not cfg.data.val_block:  # no validation block: the gap changes nothing
        dumped["data"]["val_gap"] = ADDED_OPTIONS[("data", "val_gap")]
    for (section, key), default in ADDED_OPTIONS.items():
        if key is None:
            if dumped.get(section) == default:
                dumped.pop(section)
        elif dumped[section].get(key) == default:
            dumped[section].pop(key)
    return dumped
