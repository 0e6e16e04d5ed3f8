"""`SegmentConfig`: everything a segmentation run needs besides the data path.

Inputs and target are names, not assumptions: the mitochondria stage uses inputs ["image"] and
target "mito"; the membrane stage uses inputs ["image", "mito"] and target "membrane".
Presets live in configs/segment/*.yaml.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_serializer, model_validator

from emsynth.config import StrictModel
from emsynth.data.slices import DEFAULT_GAP
from emsynth.engine.config import EngineConfig


class DataConfig(StrictModel):
    inputs: list[str] = Field(
        default_factory=lambda: ["image"],
        description='Input channels in order: "image" (the EM slice) or a label name (as 0/255).',
    )
    target: str = Field("mito", description="Label name the model predicts.")
    train_slices: str | None = Field(
        None, description='Training slices, e.g. "0-144" or "0-9,20-29"; None = all but val.'
    )
    val_slices: str | None = Field(
        None,
        description='Validation slices, one contiguous block ("145-164"); None = last val_block.',
    )
    val_block: int = Field(
        20,
        ge=0,
        description="Size of the contiguous z block at the end used for validation when "
        "val_slices is not given (0 = no validation).",
    )
    val_gap: int = Field(
        DEFAULT_GAP,
        ge=0,
        description="Slices on each side of the validation block that never train, given "
        "train_slices included (emsynth.data.slices.training_slices): neighbouring slices "
        "correlate at ~0.9, so without a gap validation is optimistic. 0 only for volumes too "
        "short for one.",
    )

    @model_validator(mode="after")
    def _inputs_nonempty(self) -> DataConfig:
        if not self.inputs:
            raise ValueError("data.inputs needs at least one channel")
        return self


class SamplingConfig(StrictModel):
    patch_size: int = Field(256, ge=16, description="Square training crop side in pixels.")
    batch_size: int = Field(8, ge=1)
    foreground_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Expected fraction of crops centred on a random foreground pixel.",
    )


#: The warp's parameters as field types (constraints and meaning in one place): classes that
#: need another default (the study's mask deformation) re-use these with their own default.
ElasticSigma = Annotated[
    float, Field(ge=0.0, description="Displacement std of the warp's control points (px).")
]
ElasticSpacing = Annotated[int, Field(ge=8, description="Control-point spacing of the warp (px).")]
ScaleRange = Annotated[
    float,
    Field(ge=0.0, lt=1.0, description="Zoom factor in 1 +- this, with the warp (also covers "
          "pixel-size differences between datasets)."),
]


class WarpConfig(StrictModel):
    """The elastic warp and zoom of emsynth.segment.augment (`elastic_transform`)."""

    elastic_sigma: ElasticSigma = 8.0
    elastic_spacing: ElasticSpacing = 64
    scale_range: ScaleRange = 0.0


class GeometryConfig(WarpConfig):
    """Geometric augmentation, applied alike to every input channel and the label: the part
    of the segment stage's augmentation the membrane stage configures as `geometry`."""

    dihedral: bool = Field(True, description="Random flips and 90-degree rotations.")
    elastic_prob: float = Field(0.0, ge=0.0, le=1.0, description="Share of crops warped.")
    rotate_prob: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of crops given a free rotation."
    )


class AugmentConfig(GeometryConfig):
    """Each augmentation has an on/off switch (probability 0 disables the random ones):
    the geometry (`GeometryConfig`) plus noise and brightness/contrast/gamma on the image."""

    noise_prob: float = Field(0.0, ge=0.0, le=1.0)
    noise_std: float = Field(0.03, ge=0.0, description="Gaussian noise std on the 0-1 image scale.")
    intensity_prob: float = Field(
        0.0, ge=0.0, le=1.0, description="Share with brightness/contrast/gamma."
    )
    brightness: float = Field(0.1, ge=0.0, description="Additive shift in +- this (0-1 scale).")
    contrast: float = Field(0.2, ge=0.0, lt=1.0, description="Contrast factor in 1 +- this.")
    gamma: float = Field(0.2, ge=0.0, lt=1.0, description="Gamma in exp(+- this).")


class ModelConfig(StrictModel):
    arch: Literal["unet", "basicunet"] = "unet"
    channels: list[int] = Field(
        default_factory=lambda: [16, 32, 64, 128, 256],
        description="Feature widths per level (basicunet: exactly 6 values).",
    )
    strides: list[int] = Field(
        default_factory=lambda: [2, 2, 2, 2],
        description="unet: one stride per level below the top.",
    )
    num_res_units: int = Field(2, ge=0, description="unet: residual units per block.")
    norm: Literal["batch", "instance"] = "batch"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _shape(self) -> ModelConfig:
        if self.arch == "unet" and len(self.strides) != len(self.channels) - 1:
            raise ValueError("model.strides needs one entry fewer than model.channels")
        if self.arch == "basicunet" and len(self.channels) != 6:
            raise ValueError("basicunet needs exactly 6 model.channels")
        return self

    @property
    def divisor(self) -> int:
        """Input sides must be multiples of this for the skip connections to line up."""
        if self.arch == "basicunet":
            return 16
        out = 1
        for s in self.strides:
            out *= s
        return out


#: LossConfig options added after runs were recorded: left out of its dumps while the clDice
#: term is off (cldice_weight 0, the value that reproduces those runs).
ADDED_LOSS_OPTIONS = ("cldice_weight", "cldice_iters")


class LossConfig(StrictModel):
    """DiceCE on the foreground logit, plus an optional soft clDice term.

    The clDice options (ADDED_LOSS_OPTIONS) are left out of every dump while the term is off,
    so recorded configs and content keys made before they existed (run resume checks, the
    study's cell keys, TSTR's cached reference) stay the same."""

    dice_weight: float = Field(1.0, ge=0.0)
    ce_weight: float = Field(1.0, ge=0.0)
    batch_dice: bool = Field(
        True, description="Dice over the whole batch (stable when crops hold no foreground)."
    )
    cldice_weight: float = Field(
        0.0, ge=0.0,
        description="Weight of a soft clDice term (Shit et al. 2021; MONAI SoftclDiceLoss on the "
        "foreground probability) added to DiceCE: it rewards a predicted skeleton inside the "
        "target and a target skeleton covered by the prediction, i.e. thin connected structures "
        "such as membranes; 0 = off (DiceCE alone).",
    )
    cldice_iters: int = Field(
        3, ge=1, description="Soft-skeleton iterations of clDice: at least the half-width (px) "
        "of the thickest structure to thin.",
    )

    @model_serializer(mode="wrap")
    def _omit_added_defaults(self, handler):
        dumped = handler(self)
        if self.cldice_weight == 0.0:
            for key in ADDED_LOSS_OPTIONS:
                dumped.pop(key, None)
        return dumped


class OptimConfig(StrictModel):
    name: Literal["adam", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps before the cosine decay.")
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0, description="Final lr as a share of lr.")


class InferConfig(StrictModel):
    window: int = Field(256, ge=16, description="Sliding-window side in pixels.")
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    sw_batch_size: int = Field(8, ge=1, description="Windows per forward pass.")
    blend: Literal["gaussian", "constant"] = "gaussian"
    tta: bool = Field(False, description="Average the 8 flip/rot90 views.")
    slices_per_batch: int = Field(
        4, ge=1, description="Slices handed to the sliding window at once."
    )


class ThresholdConfig(StrictModel):
    """See emsynth.segment.threshold for the rule these parameters feed."""

    choose: bool = Field(True, description="Choose on validation; False keeps 0.5.")
    low: float = Field(0.3, gt=0.0, le=0.5)
    high: float = Field(0.7, ge=0.5, lt=1.0)
    tolerance: float = Field(0.005, ge=0.0)
    shrink: float = Field(0.5, ge=0.0, le=1.0)


class SegmentConfig(StrictModel):
    engine: EngineConfig = Field(default_factory=EngineConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    threshold: ThresholdConfig = Field(default_factory=ThresholdConfig)

    @model_validator(mode="after")
    def _divisible(self) -> SegmentConfig:
        d = self.model.divisor
        if self.sampling.patch_size % d:
            raise ValueError(f"sampling.patch_size must be a multiple of {d} for this model")
        if self.infer.window % d:
            raise ValueError(f"infer.window must be a multiple of {d} for this model")
        return self
