"""The work inside each kind of study cell, built from the stages' own functions.

- membrane-model: trains the membrane model (emsynth.membranes) when the config names a
  training config instead of a trained model;
- membranes: predicted membrane masks of the data's slices, cached slice by slice;
- gan: trains pix2pix on one regime x seed's real data only, then synthesises S images from
  each mask layout the study asks for (emsynth.synthesis.masks.layout_masks);
- gan-model: a regime's GAN shared by its seeds (share_gan, where every seed has the same real
  data): trained once; each seed's gan cell then only synthesises from it;
- segment: trains one mitochondria U-Net (real, real+synthetic with a strategy: replace, add
  or pretrain, or synthetic data) and chooses its threshold on the validation block;
- eval: scores one trained segmenter on the test set.

Each function does the work into its cell folder and returns the result the runner records.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import torch

from emsynth.data.readers import read_volume
from emsynth.data.volume import MEMBRANE, MITO, Volume
from emsynth.data.writers import write_slice_folder
from emsynth.engine.config import EngineConfig
from emsynth.engine.device import resolve_device, resolve_precision
from emsynth.errors import EmsynthError, input_error
from emsynth.gan.config import GanConfig
from emsynth.io import atomic_path, resolve_path
from emsynth.segment.batchnorm import batchnorm_layers, reestimate_batchnorm
from emsynth.segment.config import SegmentConfig
from emsynth.segment.infer import predict_with
from emsynth.segment.metrics import score_volume
from emsynth.segment.model import MODEL_DIR, SIDECAR, WEIGHTS, Segmenter, model_folder
from emsynth.segment.sampling import (
    IMAGE,
    MixedSampler,
    PatchSampler,
    SegmentData,
    segment_data,
)
from emsynth.segment.task import SegmentTask
from emsynth.segment.train import FINAL_METRICS, fit_task
from emsynth.study.cache import Cell, hash_arrays
from emsynth.study.config import StudyConfig
from emsynth.study.layout import (
    MIXED,
    PREVIEW,
    REAL,
    REAL_PREVIEW,
    SYNTHETIC,
    canonical_layout,
    layout_preview,
    save_preview,
)

GAN_RUN = "gan"
SYNTHETIC_DIR = "synthetic"
SEGMENT_RUN = "run"
MEMBRANE_RUN = "run"
#: Crops kept in previews for the report's figure grids.
PREVIEW_COUNT = 4
PREVIEW_SIDE = 256


class StudyInterrupted(EmsynthError):
    """A cell's work was stopped by Ctrl-C or SIGTERM: the cell stays unfinished."""

    exit_code = 130


def check_finished(result: dict[str, Any], where: Path) -> None:
    """A training stopped by a signal is not a result (its checkpoint lets a rerun resume)."""
    reason = str(result.get("stop_reason", ""))
    if reason.startswith("signal"):
        raise StudyInterrupted(f"{where}: training stopped ({reason}). Fix: rerun the same "
                               "command to resume; finished cells are kept")


def inference_device(engine: EngineConfig) -> torch.device:
    return resolve_device(engine.device)


def preview_of(volume: Volume, channels: list[str], count: int = PREVIEW_COUNT,
               side: int = PREVIEW_SIDE) -> dict[str, np.ndarray]:
    """The first `count` slices of a volume, top-left `side` px: image plus label channels."""
    n = min(count, len(volume))
    window = (slice(0, n), slice(0, side), slice(0, side))
    out = {"image": volume.image[window]}
    out.update({name: volume.labels[name][window] for name in channels if name in volume.labels})
    return out


# --- membranes -------------------------------------------------------------------------------

def train_membrane_model(cell: Cell, config_path: Path) -> dict[str, Any]:
    """Train the membrane model of `config_path` into the cell (emsynth.membranes)."""
    from emsynth.config import load_config
    from emsynth.membranes.config import MembraneConfig
    from emsynth.membranes.task import train_membranes

    cfg = load_config(MembraneConfig, config_path)
    if cfg.data.phantom is None:  # its data path is relative to the repo, like ours
        path = resolve_path(cfg.data.path, "membrane training data",
                                       f"fix data.path in {config_path}")
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(path)})})
    result = train_membranes(cfg, cell.dir / MEMBRANE_RUN)
    check_finished(result, cell.dir)
    return {"final_validation": result["final"], "threshold": result["threshold"],
            "steps": result["step"], "train_s": result["elapsed_s"],
            "stop_reason": result["stop_reason"], "model_dir": f"{MEMBRANE_RUN}/{MODEL_DIR}"}


def membrane_model_files(model_dir: Path) -> list[Path]:
    """The weight and sidecar files of a membrane model (a run folder or its model/), whose
    content hash stands for the model in cell keys."""
    folder = model_folder(model_dir)
    files = [folder / WEIGHTS, folder / SIDECAR]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise input_error(model_dir, "is not a trained membrane model (no "
                          f"{missing[0].name})", "pass the run folder of emsynth membranes train")
    return files


def predicted_membranes(cache_dir: Path, model_dir: Path, real: Volume, names: list[str],
                        threshold: float | None, thin_width: int, device: torch.device,
                        precision: str) -> np.ndarray:
    """Binary membranes of a regime's real data `real` (its slices or crops), predicted by the
    membrane model from `real`'s own image and mitochondria labels only; each plane is cached
    as `<name>.png` in `cache_dir` (named by the hash of model, data and settings), so each is
    predicted once.

    A crop regime's membranes are predicted on the crop alone (image and labels), not on the
    whole slice: the GAN, the synthetic masks and the segmenters see only the crop, so the
    membrane channel does too. Labels zeroed outside the crop on a whole-slice prediction
    would instead tell the model that no mitochondria lie around the crop (false next to its
    edges) and show it image context nothing else of the regime sees."""
    from emsynth.membranes.predict import MembraneModel, predict_membranes, thin_membranes

    out = np.empty(real.shape, bool)
    missing = []
    for i, name in enumerate(names):
        path = cache_dir / f"{name}.png"
        if path.is_file():
            out[i] = iio.imread(path) > 127
        else:
            missing.append(i)
    if not missing:
        return out
    model = MembraneModel.load(model_dir, str(device))
    cut_level = model.threshold if threshold is None else threshold
    chunk = 8
    for start in range(0, len(missing), chunk):
        part = missing[start:start + chunk]
        sub = real.select(part)
        prob = predict_membranes(model, sub, sub.labels[MITO], str(device), precision)
        binary = prob >= cut_level
        if thin_width:
            binary = thin_membranes(binary, thin_width)
        for i, plane in zip(part, binary, strict=True):
            out[i] = plane
            with atomic_path(cache_dir / f"{names[i]}.png") as tmp:
                iio.imwrite(tmp, plane.astype(np.uint8) * 255, extension=".png")
    return out


def folder_membranes(folder: Path, volume: Volume) -> np.ndarray:
    """Membranes of every slice of `volume` from a precomputed slice folder."""
    found = read_volume(folder, "slices")
    if MEMBRANE not in found.labels:
        raise input_error(folder, "has no membranes/ folder", "pass a slice folder written by "
                          "emsynth membranes predict")
    if found.shape != volume.shape:
        raise input_error(folder, f"holds {found.shape} slices, the study data {volume.shape}",
                          "predict membranes for exactly the study's data source")
    return found.labels[MEMBRANE]


# --- GAN and synthesis -----------------------------------------------------------------------

def synthetic_dir(layout: str, main: str) -> str:
    """The GAN cell's folder of one layout's images: synthetic/ for the study's own layout
    (synthesis.masks), synthetic-<layout>/ for the ablation's others."""
    return SYNTHETIC_DIR if layout == main else f"{SYNTHETIC_DIR}-{layout}"


def synthetic_count(cfg: StudyConfig, n_slices: int, regime_count: int | None = None) -> int:
    """Synthetic images of a regime: its own synthetic_count, else synthesis.count, or
    count_per_slice per real slice (at least count)."""
    s = cfg.synthesis
    if regime_count is not None:
        return regime_count
    return s.count if s.count_per_slice is None else max(s.count, s.count_per_slice * n_slices)


def train_regime_gan(run_dir: Path, gan_cfg: GanConfig, real: Volume) -> dict[str, Any]:
    """Train the GAN on `real` alone (its conditioning labels included) into `run_dir`;
    returns the training's scalar results (steps, time, stop reason, last losses)."""
    from emsynth.gan.train import train_gan

    if min(real.shape[1:]) < gan_cfg.data.crop:
        raise EmsynthError(
            f"the real data ({real.shape[1]}x{real.shape[2]} px) is smaller than the GAN's "
            f"{gan_cfg.data.crop} px training crop. Fix: use regimes.crop >= gan.data.crop"
        )
    result = train_gan(gan_cfg, run_dir, volumes=[conditioned_volume(real, gan_cfg)])
    check_finished(result, run_dir.parent)
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str))}


def conditioned_volume(real: Volume, gan_cfg: GanConfig) -> Volume:
    """`real` with only the GAN's conditioning channels (data.channels) as labels."""
    return Volume(real.image, {name: real.labels[name] for name in gan_cfg.data.channels},
                  real.pixel_size_nm, real.source, real.slice_names)


def run_gan_model(cell: Cell, gan_cfg: GanConfig, real: Volume) -> dict[str, Any]:
    """A regime's GAN shared by its seeds (StudyConfig.share_gan): trained once on the data
    every seed has, with gan.engine.seed; each seed's `run_gan` cell synthesises from it."""
    return {"gan": train_regime_gan(cell.dir / GAN_RUN, gan_cfg, real)}


def run_gan(cell: Cell, cfg: StudyConfig, real: Volume, seed: int, device: torch.device,
            layouts: list[str] | None = None, gan_cfg: GanConfig | None = None,
            trained: Cell | None = None, count: int | None = None) -> dict[str, Any]:
    """Train the GAN on `real` alone with the study seed (`gan_cfg`: the regime's recipe,
    StudyConfig.gan_config), or take the shared GAN of the `trained` cell (run_gan_model); then
    synthesise `synthetic_count` images from the masks of each layout (`layouts`, the first
    being the study's own, synthesis.masks; emsynth.synthesis.masks.layout_masks), built from
    `real`'s masks only and seeded by the study seed."""
    from emsynth.gan.export import load_generator
    from emsynth.gan.inference import synthesize_volume
    from emsynth.synthesis import masks as mask_sources

    gan_cfg = gan_cfg or cfg.gan_config()
    if trained is None:
        gan_cfg = gan_cfg.model_copy(update={"engine": gan_cfg.engine.model_copy(
            update={"seed": seed})})
        run_dir = cell.dir / GAN_RUN
        summary = train_regime_gan(run_dir, gan_cfg, real)
    else:
        run_dir = trained.dir / GAN_RUN
        summary = trained.result()["gan"]
    channels = list(gan_cfg.data.channels)
    conditioned = conditioned_volume(real, gan_cfg)
    generator, conditioning, _ = load_generator(run_dir, device)

    s = cfg.synthesis
    main = canonical_layout(s.masks)
    layouts = layouts or [main]
    count = synthetic_count(cfg, len(real), count)
    precision = resolve_precision(gan_cfg.engine.precision, device)
    per_layout: dict[str, dict[str, Any]] = {}
    for layout in layouts:
        masks, mask_source = mask_sources.layout_masks(layout, real, channels, count, s.size,
                                                       seed, s)
        volume = mask_sources.mask_volume(masks, mask_source)
        synthetic = synthesize_volume(generator, volume, conditioning, dropout=s.dropout,
                                      seed=seed, device=device, precision=precision,
                                      pixel_noise=s.pixel_noise)
        folder = synthetic_dir(layout, main)
        write_slice_folder(synthetic, cell.dir / folder)
        save_preview(cell.dir / layout_preview(layout, main), **preview_of(synthetic, channels))
        per_layout[layout] = {
            "folder": folder,
            "size": list(synthetic.shape[1:]),
            "mask_source": mask_source,
            "mito_fraction_synthetic": float(synthetic.labels[MITO].mean()),
            "mean_intensity_synthetic": float(synthetic.image.mean()),
            "synthetic_key": hash_arrays(synthetic.image, synthetic.labels[MITO]),
        }
    save_preview(cell.dir / REAL_PREVIEW, **preview_of(conditioned, channels))
    first = per_layout[layouts[0]]
    out = {
        "gan": summary,
        "synthetic_count": count,
        "synthetic_size": first["size"],
        "mito_fraction_real": float(real.labels[MITO].mean()),
        "mean_intensity_real": float(real.image.mean()),
        **{k: v for k, v in first.items() if k not in ("folder", "size")},
    }
    if len(layouts) > 1:
        out["layouts"] = per_layout
    if trained is not None:
        out["gan_shared"] = trained.spec.name
    return out


def synthetic_data(gan_cell: Cell, folder: str = SYNTHETIC_DIR) -> SegmentData:
    volume = read_volume(gan_cell.dir / folder, "slices")
    return segment_data(volume, [IMAGE], MITO)


# --- segmenters ------------------------------------------------------------------------------

def segment_config(cfg: StudyConfig, seed: int, steps: int | None = None) -> SegmentConfig:
    """The segmenter config of every condition of one seed: same budget, augmentation and
    initialisation seed, so conditions differ only in their data. `steps`: the regime's fixed
    step budget (RegimeConfig.steps), else segment.engine.steps.

    The study supplies the data (its own blocks, split.gap), so data.val_gap is unused here: it
    stays 0, the value segmenters checkpointed before its default became 5 recorded, so
    interrupted cells still resume."""
    update: dict[str, Any] = {"seed": seed}
    if steps is not None:
        update["steps"] = steps
    engine = cfg.segment.engine.model_copy(update=update)
    data = cfg.segment.data.model_copy(update={"val_gap": 0})
    return cfg.segment.model_copy(update={"engine": engine, "data": data})


def with_steps(seg_cfg: SegmentConfig, steps: int) -> SegmentConfig:
    """`seg_cfg` at `steps`, its wall-clock safety net scaled with them: a run planned at twice
    the steps (add at share 0.5) gets twice the time, so the net does not cut it short where
    the real-only run of the same regime finishes (lucchi_cpu's all-slice add runs stopped at
    6341-6498 of 8000 steps before it scaled)."""
    engine = seg_cfg.engine
    update: dict[str, Any] = {"steps": steps}
    if engine.max_time is not None:
        update["max_time"] = engine.max_time * steps / engine.steps
    return seg_cfg.model_copy(update={"engine": engine.model_copy(update=update)})


class AddSampler:
    """Every real crop of a real-only run, synthetic crops on top: over `total_steps` batches
    of `batch_size` crops, exactly `real_crops` come from the real sampler, spread evenly
    (batch i holds floor((i+1) q) - floor(i q) real crops, q = real_crops / total_steps), the
    rest from the synthetic one. The batch counter is saved with the checkpoint."""

    def __init__(self, real: PatchSampler, synthetic: PatchSampler, real_crops: int,
                 total_steps: int):
        self.real, self.synthetic = real, synthetic
        self.real_crops, self.total_steps = real_crops, total_steps
        self.batches = 0
        self.real_drawn = 0

    def real_count(self, i: int) -> int:
        if i >= self.total_steps:
            return 0
        return (self.real_crops * (i + 1)) // self.total_steps - (self.real_crops * i) // \
            self.total_steps

    def sample(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        n_real = min(self.real_count(self.batches), batch_size)
        self.batches += 1
        self.real_drawn += n_real
        parts = [sampler.sample(rng, n) for sampler, n in
                 ((self.real, n_real), (self.synthetic, batch_size - n_real)) if n]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.batches, "real_drawn": self.real_drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches = int(state.get("batches", 0))
        self.real_drawn = int(state.get("real_drawn", 0))


class StudySegmentTask(SegmentTask):
    """A SegmentTask that may start from given weights (`init_state`: the pretrain strategy's
    fine-tuning) and checkpoints its sampler's state (AddSampler's batch counter)."""

    def __init__(self, cfg: SegmentConfig, train: SegmentData, val: SegmentData | None = None,
                 init_state: dict[str, torch.Tensor] | None = None,
                 bn_data: SegmentData | None = None):
        super().__init__(cfg, train, val)
        self.init_state = init_state
        self.bn_data = bn_data  # mix.real_bn_stats: the real crops BatchNorm is re-estimated on

    def setup(self, ctx) -> None:
        super().setup(ctx)
        if self.init_state is not None:  # a resumed checkpoint replaces these afterwards
            self.net.load_state_dict(self.init_state)

    def validate(self, ctx) -> dict[str, float]:
        """With bn_data: score as trained, re-estimate BatchNorm on real crops and score again
        (threshold chosen anew), then keep whichever statistics score the higher validation
        IoU, a choice on the validation block like the threshold's. The scores as trained are
        kept as before_bn/*; real_bn is 1 when the re-estimated statistics were kept."""
        if self.bn_data is None or not batchnorm_layers(self.net):
            return super().validate(ctx)
        before = super().validate(ctx)
        trained = {k: v.clone() for k, v in self.net.state_dict().items()}
        kept = (self.threshold, self.threshold_choice, self._preview)
        p = self.cfg.sampling
        sampler = PatchSampler(self.bn_data, p.patch_size, p.foreground_fraction)
        reestimate_batchnorm(self.net, sampler, BN_BATCHES, p.batch_size, ctx.device,
                             seed=self.cfg.engine.seed, autocast=ctx.autocast)
        after = super().validate(ctx)
        use_real = after.get("fg_iou", 0.0) > before.get("fg_iou", 0.0)
        if not use_real:
            self.net.load_state_dict(trained)
            self.threshold, self.threshold_choice, self._preview = kept
        chosen = after if use_real else before
        return {**chosen, "real_bn": float(use_real),
                **{f"before_bn/{k}": v for k, v in before.items()
                   if k in ("fg_iou", "fg_dice", "threshold")}}

    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()
        if hasattr(self.sampler, "state_dict"):
            state["sampler"] = self.sampler.state_dict()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        if hasattr(self.sampler, "load_state_dict") and "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])


PRETRAIN_RUN = "pretrain"
#: Batches of real crops BatchNorm statistics are re-estimated on (mix.real_bn_stats).
BN_BATCHES = 50


def run_segment(cell: Cell, cfg: StudyConfig, condition: str, seed: int, real: SegmentData,
                synthetic: SegmentData | None, val: SegmentData, *, steps: int | None = None,
                strategy: str | None = None, share: float | None = None) -> dict[str, Any]:
    """Train one segmenter with the segment stage's `fit_task` (threshold chosen on `val`),
    exporting the model to the cell's model/ beside its run/.

    `steps`: the regime's real-only step budget. real and synthetic train that many steps.
    real+synthetic follows `strategy` (default mix.strategy) with `share` (default
    mix.synthetic_share): replace draws each crop of a batch from the synthetic images with
    probability `share` (a MixedSampler), same steps; add keeps exactly the real-only run's
    real crops (steps x batch size) and fills the batches up with synthetic crops, over
    steps / (1 - share) steps (AddSampler); pretrain trains on the synthetic images alone
    (mix.pretrain_steps, default `steps`) into pretrain/, then fine-tunes those weights on the
    real data with the real-only recipe. Only the regime's real data, the synthetic images and
    the validation block reach the task: never the test block.
    """
    seg_cfg = segment_config(cfg, seed, steps)
    base_steps = seg_cfg.engine.steps
    strategy = strategy or cfg.mix.strategy
    share = cfg.mix.synthetic_share if share is None else share
    if condition != REAL and synthetic is None:
        raise ValueError(f"condition {condition} needs synthetic data")
    p = seg_cfg.sampling
    extra: dict[str, Any] = {}
    init_state = None
    if condition == MIXED and strategy == "add":
        total = math.ceil(base_steps / (1.0 - share))
        seg_cfg = with_steps(seg_cfg, total)
    elif condition == MIXED and strategy == "pretrain":
        pre_steps = cfg.mix.pretrain_steps or base_steps
        pre_dir = cell.dir / PRETRAIN_RUN
        pre_model = pre_dir / MODEL_DIR
        if not (pre_model / WEIGHTS).is_file():
            pre = fit_task(StudySegmentTask(with_steps(seg_cfg, pre_steps), synthetic, val),
                           pre_dir, resume=True, meta={"condition": condition, "seed": seed,
                                                       "phase": "pretrain"})
            check_finished(pre, cell.dir)
        pretrained = Segmenter.load(pre_model, torch.device("cpu"))
        init_state = {k: v.detach().clone() for k, v in pretrained.net.state_dict().items()}
        pre_record = json.loads((pre_dir / FINAL_METRICS).read_text())
        extra["pretrain"] = {"steps": pre_record["engine"].get("step"),
                             "stop_reason": pre_record["engine"].get("stop_reason"),
                             "validation": pre_record["final"],
                             "weights_key": state_key(init_state)}
    train = synthetic if condition == SYNTHETIC else real
    bn_data = real if condition == MIXED and cfg.mix.real_bn_stats else None
    task = StudySegmentTask(seg_cfg, train, val, init_state, bn_data)
    if condition == MIXED and strategy == "replace":
        task.sampler = MixedSampler(
            [task.sampler, PatchSampler(synthetic, p.patch_size, p.foreground_fraction)],
            [1.0 - share, share],
        )
    elif condition == MIXED and strategy == "add":
        task.sampler = AddSampler(
            task.sampler, PatchSampler(synthetic, p.patch_size, p.foreground_fraction),
            real_crops=base_steps * p.batch_size, total_steps=seg_cfg.engine.steps)
    result = fit_task(task, cell.dir / SEGMENT_RUN, resume=True,
                      meta={"condition": condition, "seed": seed}, model_dir=cell.dir / MODEL_DIR)
    check_finished(result, cell.dir)
    if isinstance(task.sampler, AddSampler):
        extra["real_crops"] = task.sampler.real_drawn
    elif condition == REAL or (condition == MIXED and strategy == "pretrain"):
        extra["real_crops"] = int(result["step"]) * p.batch_size
    out = {
        "condition": condition,
        "threshold": result["threshold"],
        "validation": result["final"],
        "steps": result["step"],
        "steps_planned": seg_cfg.engine.steps,
        "train_s": result["elapsed_s"],
        "stop_reason": result["stop_reason"],
        "loss": result.get("loss"),
        "threshold_rule": result["threshold_rule"],
        "real_images": 0 if condition == SYNTHETIC else len(real),
        "synthetic_images": 0 if condition == REAL else len(synthetic),
        **extra,
    }
    if condition == MIXED:
        out.update({"strategy": strategy,
                    "synthetic_share": None if strategy == "pretrain" else share})
    return out


def state_key(state: dict[str, torch.Tensor]) -> str:
    """A content hash of a network's weights."""
    return hash_arrays(*[state[k].detach().cpu().float().numpy() for k in sorted(state)])


def run_eval(cell: Cell, segment_cell: Cell, test: Volume, device: torch.device,
             precision: str) -> dict[str, Any]:
    """Foreground scores of a trained segmenter on the test volume at its chosen threshold."""
    segmenter = Segmenter.load(segment_cell.dir / MODEL_DIR, device)
    prob = predict_with(segmenter, test.image, device, precision)
    pred = prob >= segmenter.threshold
    truth = test.labels[MITO]
    scores = score_volume(pred, truth)
    middle = len(test) // 2
    window = (middle, slice(0, 2 * PREVIEW_SIDE), slice(0, 2 * PREVIEW_SIDE))
    save_preview(cell.dir / PREVIEW, image=test.image[window], truth=truth[window],
                 pred=pred[window])
    return {"iou": scores.iou, "dice": scores.dice, "precision": scores.precision,
            "recall": scores.recall, "threshold": segmenter.threshold,
            "per_slice_iou": scores.per_slice_iou,
            "foreground_fraction_pred": scores.foreground_fraction_pred,
            "foreground_fraction_truth": scores.foreground_fraction_truth}
