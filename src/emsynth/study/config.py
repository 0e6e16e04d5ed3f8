"""`StudyConfig`: the augmentation study's settings; presets in configs/study/*.yaml.

The study asks whether pix2pix images help a U-Net segment mitochondria when little annotated
data exists. Each *regime* fixes how much real annotated data there is; each *seed* re-draws
that data (which slices, which crops), the GAN and the segmenters' initialisation; each
*condition* trains a segmenter on real data, real + synthetic data, or synthetic data alone,
with the same step budget and augmentation. Thresholds are chosen on a validation block and
scores measured on a test block that nothing else touches.

The GAN and segmenter sections are the stages' own configs (`GanConfig`, `SegmentConfig`);
the study supplies their data, so their data-location fields must stay at the defaults. The GAN
section may start from a preset file (`gan: {preset: configs/gan/cpu_texture.yaml, ...}`): the
other keys are merged on top and the result is an ordinary `GanConfig`, so cell keys hash the
resolved recipe, never the file's path.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from emsynth.config import StrictModel, load_config
from emsynth.data.phantom.config import PhantomConfig
from emsynth.data.slices import DEFAULT_GAP
from emsynth.errors import EmsynthError
from emsynth.gan.config import GanConfig, GanDataConfig
from emsynth.io import resolve_path
from emsynth.segment.config import (
    DataConfig,
    ElasticSigma,
    ScaleRange,
    SegmentConfig,
    WarpConfig,
)
from emsynth.study.layout import CONDITIONS, REAL, canonical_layout

Condition = Literal["real", "real+synthetic", "synthetic"]
Layout = Literal["real", "deformed", "remodel", "procedural"]
Strategy = Literal["replace", "add", "pretrain"]


class SourceConfig(StrictModel):
    """An annotated volume: a dataset on disk (`source`) or a generated phantom (`phantom`)."""

    source: str | None = Field(
        None,
        description="Dataset path read with emsynth.data.readers.read_volume (relative paths: "
        "from the working directory, else from the repository root).",
    )
    layout: str = Field("auto", description="read_volume layout of `source`.")
    mask_dir: str | None = Field(
        None, description="Mask folder beside images/ (e.g. masks_epfl); None = the layout's."
    )
    phantom: PhantomConfig | None = Field(
        None,
        description="Instead of `source`: a generated phantom volume, e.g. "
        "{domain: ca1, slices: 40, size: 256, seed: 0}.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> SourceConfig:
        if self.source is not None and self.source.startswith("phantom:"):
            raise ValueError(f"source {self.source!r}: a phantom is written as phantom: "
                             f"{{domain: {self.source.split(':', 1)[1]}, slices: ..., size: ..., "
                             "seed: ...}")
        if (self.source is None) == (self.phantom is None):
            raise ValueError("give exactly one of source (a dataset path) and phantom")
        return self


class SplitConfig(StrictModel):
    """Contiguous z blocks of the data source: training first, then validation, then test."""

    val_block: int = Field(20, ge=1, description="Slices of the validation block (thresholds).")
    test_block: int = Field(
        30, ge=0, description="Slices of the test block (0 when the test set is another volume)."
    )
    gap: int = Field(
        DEFAULT_GAP, ge=0,
        description="Slices left out between blocks (neighbours are near-duplicates).",
    )


class RegimeConfig(StrictModel):
    """How much annotated real data a regime has: `slices` slices, cropped to `crop` px."""

    name: str = Field(description="Label in tables and plots, e.g. crop256, 1slice, all.")
    slices: int | Literal["all"] = Field(
        description='Slices evenly spaced over the training block, or "all" of it.'
    )
    crop: int | None = Field(
        None, ge=16, description="Square crop side at a random position; None = whole slices."
    )
    steps: int | None = Field(
        None, ge=1,
        description="Fixed step budget of this regime's real-only segmenter (the other "
        "conditions derive theirs from it); None = segment.engine.steps. segment.engine."
        "max_time stays a safety net.",
    )
    min_foreground: float = Field(
        0.02, ge=0, lt=1,
        description="Crops: redraw the random position (up to 100 times, else keep the fullest "
        "draw) until this share of the crop is mitochondria, as an annotator would pick a crop "
        "with objects in it; 0 = any position.",
    )
    gan_steps: int | None = Field(
        None, ge=1,
        description="Training steps of this regime's GAN; None = gan.engine.steps. A GAN on one "
        "256 px crop sees the same image every step and needs far fewer than one on slices.",
    )
    synthetic_count: int | None = Field(
        None, ge=1,
        description="Synthetic images of this regime per seed, instead of synthesis.count / "
        "count_per_slice (e.g. a cap for the regime with all slices).",
    )
    seeds: list[int] | None = Field(
        None, min_length=1,
        description="Seeds of this regime, a subset of the study's; None = all of them. E.g. "
        "5 seeds where data is scarce and seeds vary most, 3 where each cell costs more.",
    )
    conditions: list[Condition] | None = Field(
        None, min_length=1,
        description="Conditions trained at this regime, a subset of the study's; None = all of "
        "them. E.g. [real] for a regime that only gives real-only's reference (the gap to "
        "close): it needs no GAN.",
    )
    data_seed: int | None = Field(
        None, ge=0,
        description="Draw this regime's slices (and crops) with this seed for every study seed, "
        "so all seeds share the same real data (and, with share_gan, one GAN); the seeds then "
        "vary the synthetic images and the segmenters only. None = each seed draws its own "
        "data (the slice grid's offset and the crops are seeded; only 'all' is the same).",
    )

    @field_validator("slices")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("a regime needs at least one slice")
        return value


class MembraneSourceConfig(StrictModel):
    """Where the GAN's membrane channel comes from when the data has no membrane labels
    (the membrane model's own settings are emsynth.membranes.config.MembraneConfig)."""

    source: Literal["labels", "model", "folder"] = Field(
        "labels",
        description="labels: the data's own membrane labels; model: predicted by a membrane "
        "model (emsynth.membranes); folder: a precomputed slice folder with membranes/.",
    )
    model_dir: str | None = Field(
        None, description="source=model: a trained membrane model (run folder or its model/)."
    )
    train_config: str | None = Field(
        None,
        description="source=model without model_dir: a membranes YAML config; the study trains "
        "that model once as a cell of its own.",
    )
    folder: str | None = Field(
        None, description="source=folder: slice folder whose membranes/ match the data's slices."
    )
    threshold: float | None = Field(
        None, gt=0, lt=1, description="Probability threshold; None = the model's own."
    )
    thin_width: int = Field(
        0, ge=0, description="Thin predicted membranes to this width (px); 0 = keep as is."
    )

    @model_validator(mode="after")
    def _has_location(self) -> MembraneSourceConfig:
        if self.source == "model" and not (self.model_dir or self.train_config):
            raise ValueError("membranes.source=model needs model_dir or train_config")
        if self.source == "folder" and not self.folder:
            raise ValueError("membranes.source=folder needs membranes.folder")
        return self


class SynthesisConfig(WarpConfig):
    """How many synthetic images each regime x seed gets, and from which masks.

    The warp fields (`WarpConfig`: elastic_sigma, elastic_spacing, scale_range) deform the
    real masks (masks=real), with the segment stage's augmentation; their defaults here are
    stronger than for training crops."""

    count: int = Field(64, ge=1, description="Synthetic images (S) per regime and seed.")
    size: int = Field(256, ge=16, description="Side of each synthetic image (px).")
    masks: Layout = Field(
        "real",
        description="Mask layout (emsynth.synthesis.masks.layout_masks), built only from the "
        "regime's own annotation. deformed (or its older name real): random crops of the "
        "regime's masks, elastically deformed and flipped/rotated; remodel: the regime's "
        "membranes warped elastically and its own mitochondria pasted into the cells; "
        "procedural: phantom masks (emsynth.data.phantom.generate_masks) fitted to them.",
    )
    remodel_spacing: int = Field(
        20, ge=4, description="remodel: control-point spacing (px) of the membrane warp."
    )
    remodel_jitter: float = Field(
        4.0, ge=0, description="remodel: std (px) of the control points' displacements."
    )
    remodel_scale: float = Field(
        0.2, ge=0, lt=1,
        description="remodel: pasted mitochondria are zoomed by 1 +- this, within the observed "
        "range of profile areas.",
    )
    count_per_slice: int | None = Field(
        None, ge=1,
        description="Scale the synthetic count with the regime: this many images per real "
        "slice (a crop counts as one), at least `count`; None = `count` for every regime.",
    )
    elastic_sigma: ElasticSigma = 10.0
    scale_range: ScaleRange = 0.1
    procedural_domain: str = Field(
        "ca1", description="procedural masks: the phantom domain (ca1, vnc) they start from."
    )
    procedural_fit: bool = Field(
        True,
        description="procedural masks: fit the domain's geometry (object count, size, shape, "
        "membrane density) to the regime's own masks first.",
    )
    dropout: bool = Field(True, description="Keep generator dropout on (pix2pix's noise).")
    pixel_noise: float = Field(
        0.0, ge=0, description="Std (grey levels) of white noise added to the synthetic images "
        "(emsynth.gan.inference.add_pixel_noise): the generator does not draw real slices' "
        "detector noise. 0 = none.")


class MixConfig(StrictModel):
    """How the real+synthetic condition uses the synthetic images."""

    strategy: Strategy = Field(
        "replace",
        description="replace: each crop of a batch is synthetic with probability "
        "synthetic_share, same steps as real-only (synthetic crops displace real ones); add: "
        "every real crop of the real-only run kept, synthetic crops on top (each batch holds "
        "batch_size real crops in all over the run, the steps raised by 1/(1 - "
        "synthetic_share)); pretrain: train on synthetic images only (pretrain_steps), then "
        "fine-tune on the real data with the real-only recipe from those weights.",
    )
    synthetic_share: float = Field(
        0.5, gt=0, lt=1, description="replace/add: share of synthetic crops in a batch."
    )
    pretrain_steps: int | None = Field(
        None, ge=1, description="pretrain: steps on synthetic images; None = the real-only steps."
    )
    real_bn_stats: bool = Field(
        False,
        description="Before a real+synthetic segmenter chooses its threshold and is scored, "
        "re-estimate its BatchNorm statistics on un-augmented real training crops "
        "(emsynth.segment.batchnorm), so it normalises as for the real images it is scored on, "
        "and keep them where they score a higher validation IoU than the statistics of the "
        "real/synthetic blend it trained on; False = always the blend's.",
    )


class AblationConfig(StrictModel):
    """Extra real+synthetic segmenters: every mask layout x strategy at some regimes, sharing
    the main grid's GAN (one per regime x seed) and its real-only and synthetic-only cells."""

    regimes: list[str] = Field(default_factory=list, description="Regime names (e.g. 1slice).")
    layouts: list[Layout] = Field(default_factory=lambda: ["deformed", "remodel", "procedural"])
    strategies: list[Strategy] = Field(default_factory=lambda: ["add", "replace", "pretrain"])
    synthetic_share: float = Field(
        0.25, gt=0, lt=1, description="The share of the ablation's replace and add variants."
    )


def resolve_gan_preset(section: dict[str, Any]) -> dict[str, Any]:
    """The `gan:` section with its `preset` file loaded (a GanConfig YAML, validated on its
    own first so its errors name the file) and the section's other keys on top, section by
    section: `engine: {steps: 500}` changes one key of the preset's engine; a key's value is
    replaced whole (`loss: {class_l1_weights: {}}` clears the preset's class weights)."""

    section = dict(section)
    preset = section.pop("preset")
    if not isinstance(preset, str):
        raise EmsynthError(f"gan.preset {preset!r} is not a path. Fix: name a GAN config YAML, "
                           "e.g. configs/gan/cpu_texture.yaml")
    path = resolve_path(preset, "gan.preset", "pass a YAML file from configs/gan/")
    merged = load_config(GanConfig, path).model_dump(mode="json")
    for name, value in section.items():
        if isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = {**merged[name], **value}
        else:
            merged[name] = value
    return merged


class StudyConfig(StrictModel):
    name: str = Field("study", description="Title of the report.")
    data: SourceConfig
    split: SplitConfig = Field(default_factory=SplitConfig)
    test: SourceConfig | None = Field(
        None,
        description="Test volume (all its slices); None = the test block of `data`. The CLI's "
        "--test-data sets it.",
    )
    regimes: list[RegimeConfig] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    conditions: list[Condition] = Field(default_factory=lambda: list(CONDITIONS), min_length=1)
    membranes: MembraneSourceConfig = Field(default_factory=MembraneSourceConfig)
    gan: GanConfig = Field(
        default_factory=GanConfig,
        description="The GAN recipe (emsynth.gan.config.GanConfig), or {preset: <GAN config "
        "YAML>, ...}: the preset with the other keys merged on top (e.g. engine: {steps: ...}).",
    )
    share_gan: bool = Field(
        False,
        description="Train one GAN per regime where every seed has the same real data (regime "
        "all, or a regime with data_seed), with gan.engine.seed, and let each seed synthesise "
        "its own images from it; False = one GAN per regime and seed.",
    )
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    mix: MixConfig = Field(default_factory=MixConfig)
    ablation: AblationConfig | None = Field(
        None, description="Mask layout x strategy ablation (real+synthetic only); None = none."
    )
    segment: SegmentConfig = Field(default_factory=SegmentConfig)
    reference_iou: float | None = Field(
        None, gt=0, le=1,
        description="Validation foreground IoU of the segmentation preset on this study's "
        "split, for the report's target 'real-only on all slices within 0.02 of it' (compared "
        "with real-only's validation IoU at the regime with all slices); None = not checked.",
    )
    num_threads: int | None = Field(
        None, ge=1,
        description="torch CPU threads for the whole study (training, synthesis, inference); "
        "None = torch's default. 1 is fastest for tiny models and on a shared machine. Not "
        "part of any cell's key.",
    )

    @model_validator(mode="before")
    @classmethod
    def _gan_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("gan"), dict) and \
                "preset" in data["gan"]:
            data = {**data, "gan": resolve_gan_preset(data["gan"])}
        return data

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or min(value) < 0:
            raise ValueError("seeds must be distinct non-negative integers")
        return value

    @field_validator("conditions")
    @classmethod
    def _conditions(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a condition is listed twice")
        return [c for c in CONDITIONS if c in value]  # canonical order

    @field_validator("regimes")
    @classmethod
    def _regime_names(cls, value: list[RegimeConfig]) -> list[RegimeConfig]:
        names = [r.name for r in value]
        if len(set(names)) != len(names):
            raise ValueError("regime names must be distinct")
        return value

    @model_validator(mode="after")
    def _stage_data_untouched(self) -> StudyConfig:
        gan_data = self.gan.data
        if gan_data.paths or gan_data.phantom != GanDataConfig().phantom:
            raise ValueError("gan.data.paths/phantom: the study supplies the GAN's data; "
                             "remove them")
        seg_data = self.segment.data
        if seg_data != DataConfig():
            raise ValueError("segment.data: the study supplies the segmenter's data; remove it")
        return self

    @model_validator(mode="after")
    def _crops_fit_the_gan(self) -> StudyConfig:
        crop = self.gan.data.crop
        small = [r.name for r in self.regimes if r.crop is not None and r.crop < crop
                 and self.regime_uses_synthetic(r)]
        if small:
            raise ValueError(f"regime {small[0]!r}: its crop is smaller than the GAN's "
                             f"{crop} px training crop (gan.data.crop); use crop >= {crop}")
        return self

    @model_validator(mode="after")
    def _regime_subsets(self) -> StudyConfig:
        """A regime's own seeds and conditions are some of the study's, each once."""
        for regime in self.regimes:
            for field, own, study in (("seed", regime.seeds, self.seeds),
                                      ("condition", regime.conditions, self.conditions)):
                if own is None:
                    continue
                extra = [v for v in own if v not in study]
                if extra or len(set(own)) != len(own):
                    what = f"{field} {extra[0]!r}" if extra else f"a {field} twice"
                    raise ValueError(f"regimes: {regime.name!r} lists {what}; its {field}s are "
                                     f"some of the study's ({', '.join(map(str, study))})")
        return self

    def regime_seeds(self, regime: RegimeConfig) -> list[int]:
        """The seeds run at a regime, in the study's order."""
        return [s for s in self.seeds if regime.seeds is None or s in regime.seeds]

    def regime_conditions(self, regime: RegimeConfig) -> list[str]:
        """The conditions trained at a regime, in the canonical order."""
        wanted = regime.conditions or self.conditions
        return [c for c in self.conditions if c in wanted]

    def regime_uses_synthetic(self, regime: RegimeConfig) -> bool:
        return any(c != REAL for c in self.regime_conditions(regime)) or bool(
            self.ablation and regime.name in self.ablation.regimes)

    @model_validator(mode="after")
    def _ablation_regimes(self) -> StudyConfig:
        if self.ablation is None:
            return self
        names = {r.name for r in self.regimes}
        unknown = [r for r in self.ablation.regimes if r not in names]
        if unknown:
            raise ValueError(f"ablation.regimes: {unknown[0]!r} is not a regime (have "
                             f"{', '.join(sorted(names))})")
        return self

    @property
    def uses_synthetic(self) -> bool:
        return any(c != REAL for c in self.conditions) or bool(
            self.ablation and self.ablation.regimes)

    def layouts(self, regime: str) -> list[str]:
        """The mask layouts a regime's GAN cell synthesises: synthesis.masks first, then the
        ablation's others (deformed and real are one layout)."""
        out = [canonical_layout(self.synthesis.masks)]
        if self.ablation is not None and regime in self.ablation.regimes:
            out += [canonical_layout(layout) for layout in self.ablation.layouts]
        return list(dict.fromkeys(out))

    def gan_config(self, regime: RegimeConfig | None = None) -> GanConfig:
        """The GAN config as trained by the study: no held-out slices (the regime's data is
        all the GAN may see), and the regime's own step count (gan_steps) if it has one."""
        data = self.gan.data.model_copy(update={"val_block": 0})
        update: dict[str, Any] = {"data": data}
        if regime is not None and regime.gan_steps is not None:
            update["engine"] = self.gan.engine.model_copy(update={"steps": regime.gan_steps})
        return self.gan.model_copy(update=update)
