"""`MembraneConfig`: the membrane-transfer model's settings (presets in configs/membranes/).

The network, sampling, loss, optimiser, inference and threshold sections are the segmentation
stage's own classes: the membrane model *is* a segmenter with inputs (EM image, mitochondria
mask) and target "membrane" (`segment_config()` builds that SegmentConfig). What is added here
is what transfer needs: the training sources (VNC, optional ISBI slices, or a phantom domain),
the domain-robustness augmentations (`robust`, each switchable) and intensity normalisation.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from emsynth.config import StrictModel
from emsynth.data.phantom.config import PhantomConfig
from emsynth.data.slices import DEFAULT_GAP
from emsynth.engine.config import EngineConfig
from emsynth.segment.config import (
    AugmentConfig,
    DataConfig,
    GeometryConfig,
    InferConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    SamplingConfig,
    SegmentConfig,
    ThresholdConfig,
)

#: Model input channels, in order, and the target label.
INPUTS = ["image", "mito"]
TARGET = "membrane"
#: Where the mitochondria channel of a volume can come from (predict's --mito-from).
MITO_FROM_HELP = (
    '"labels" (the volume\'s own mitochondria masks), "zeros" (no mitochondria: for membrane-only '
    "data such as ISBI 2012) or a mitochondria model folder from `emsynth segment train` "
    "(its thresholded prediction)."
)


class MembraneDataConfig(StrictModel):
    """Where the training slices come from."""

    path: str = Field(
        "../shared/data/drosophila_vnc",
        description="Training dataset with membrane and mitochondria labels (any layout).",
    )
    layout: str = Field("auto", description="read_volume layout of `path`.")
    phantom: PhantomConfig | None = Field(
        None,
        description="Train on this generated phantom volume instead of `path`, e.g. "
        "{domain: vnc, slices: 20, size: 256, seed: 0}.",
    )
    train_slices: str | None = Field(
        None,
        description='Training slices of `path`, e.g. "0-10"; None = every slice but the '
        "validation block and its gap.",
    )
    val_slices: str = Field("16-19", description="Held-out contiguous block: threshold choice.")
    val_gap: int = Field(
        DEFAULT_GAP, ge=0,
        description="Slices on each side of val_slices that never train (the segment stage's "
        "data.val_gap): VNC 16-19 held out trains on 0-10.",
    )
    extra_path: str | None = Field(
        None,
        description="Extra membrane-only training slices (e.g. ISBI 2012, layout isbi); all of "
        "its slices are used. Its mitochondria channel comes from `extra_mito`.",
    )
    extra_mito: str = Field(
        "zeros",
        description='Mitochondria channel of the extra slices: "zeros" (no mitochondria) or '
        "the folder of a mitochondria segmenter (emsynth segment train) to predict it.",
    )
    extra_share: float = Field(
        0.3, ge=0.0, le=1.0, description="Expected share of training crops from the extra slices."
    )

    @field_validator("train_slices", "val_slices", mode="before")
    @classmethod
    def _slice_spec_as_text(cls, value: object) -> object:
        """`--set data.val_slices=19` arrives as the YAML integer 19."""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class RobustConfig(StrictModel):
    """Domain-robustness augmentation of the EM image channel only; each one is switchable.

    Probabilities are per crop; 0 turns an augmentation off. Order: geometry, then
    brightness/contrast/gamma, then blur, then noise (as in an imaging chain: PSF, then noise).
    """

    noise_prob: float = Field(0.5, ge=0.0, le=1.0, description="Share of crops given noise.")
    noise_max: float = Field(
        0.08, ge=0.0, description="Gaussian noise sigma ~ U(0, noise_max) on the 0-1 image scale."
    )
    intensity_prob: float = Field(
        0.5, ge=0.0, le=1.0, description="Share of crops given brightness/contrast/gamma."
    )
    brightness: float = Field(0.15, ge=0.0, description="Additive shift in +- this (0-1 scale).")
    contrast: float = Field(0.5, ge=0.0, lt=1.0, description="Contrast factor in 1 +- this.")
    gamma: float = Field(0.4, ge=0.0, lt=1.0, description="Gamma in exp(+- this).")
    blur_prob: float = Field(0.3, ge=0.0, le=1.0, description="Share of crops blurred.")
    blur_max: float = Field(2.0, ge=0.0, description="Gaussian blur sigma ~ U(0, blur_max) px.")
    mito_dropout: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Share of crops whose mitochondria channel is zeroed, so the model also "
        "works where no mitochondria mask exists (ISBI with --mito-from zeros).",
    )


class NormalizeConfig(StrictModel):
    """Intensity normalisation of every slice, applied identically at train and predict time."""

    method: Literal["none", "standardize", "histmatch"] = Field(
        "standardize",
        description="standardize: each slice to mean `mean`, std `std` (grey levels); "
        "histmatch: each slice's histogram matched to the pooled training histogram.",
    )
    mean: float = Field(128.0, ge=0.0, le=255.0)
    std: float = Field(48.0, gt=0.0, le=128.0)


class MembraneConfig(StrictModel):
    engine: EngineConfig = Field(default_factory=EngineConfig)
    data: MembraneDataConfig = Field(default_factory=MembraneDataConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    geometry: GeometryConfig = Field(default_factory=GeometryConfig)
    robust: RobustConfig = Field(default_factory=RobustConfig)
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    threshold: ThresholdConfig = Field(default_factory=ThresholdConfig)

    @model_validator(mode="after")
    def _valid_as_segmenter(self) -> MembraneConfig:
        self.segment_config()  # patch/window divisibility etc., checked at load time
        return self

    def segment_config(self) -> SegmentConfig:
        """The segmentation-stage config this model trains with (intensity augmentation is
        done by the segment stage; blur, noise and mito dropout by emsynth.membranes.augment)."""
        g, r = self.geometry, self.robust
        return SegmentConfig(
            engine=self.engine,
            data=DataConfig(
                inputs=list(INPUTS), target=TARGET,
                train_slices=self.data.train_slices, val_slices=self.data.val_slices,
                val_gap=self.data.val_gap,
            ),
            sampling=self.sampling,
            augment=AugmentConfig(
                **g.model_dump(), noise_prob=0.0, intensity_prob=r.intensity_prob,
                brightness=r.brightness, contrast=r.contrast, gamma=r.gamma,
            ),
            model=self.model,
            loss=self.loss,
            optim=self.optim,
            infer=self.infer,
            threshold=self.threshold,
        )


_ROBUST_OFF = ["robust.noise_prob=0", "robust.intensity_prob=0", "robust.blur_prob=0",
               "robust.mito_dropout=0", "normalize.method=none"]
_ROBUST_ALL = ["normalize.method=standardize", "robust.noise_prob=0.5",
               "robust.intensity_prob=0.5", "robust.blur_prob=0.3"]
#: Domain-robustness ablation: variant name -> config overrides on top of a preset (later keys
#: win). Shared by benchmarks/membranes_ablation.py and benchmarks/membranes_transfer.py.
AUGMENTATION_VARIANTS: dict[str, list[str]] = {
    "none": _ROBUST_OFF,
    "noise": [*_ROBUST_OFF, "robust.noise_prob=0.5"],
    "intensity": [*_ROBUST_OFF, "robust.intensity_prob=0.5"],
    "blur": [*_ROBUST_OFF, "robust.blur_prob=0.3"],
    "standardize": [*_ROBUST_OFF, "normalize.method=standardize"],
    "histmatch": [*_ROBUST_OFF, "normalize.method=histmatch"],
    "all": [*_ROBUST_ALL, "robust.mito_dropout=0"],
    "all+dropout": [*_ROBUST_ALL, "robust.mito_dropout=0.3"],
}


def variant_names(spec: str) -> list[str]:
    """The names in a comma-separated list of AUGMENTATION_VARIANTS; ValueError on unknown ones."""
    names = [v.strip() for v in spec.split(",") if v.strip()]
    unknown = [n for n in names if n not in AUGMENTATION_VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from "
                         f"{', '.join(AUGMENTATION_VARIANTS)}")
    return names
