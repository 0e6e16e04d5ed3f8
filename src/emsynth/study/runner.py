"""`run_study(cfg, study_dir)`: plan every cell of the study, then run those not yet done.

Order: the membrane model (when the study trains one), then for each seed and each regime the
GAN + synthesis cell, one segmenter per condition and one test evaluation per segmenter. Seeds
are the outer loop, so a study stopped early holds complete replicates. With share_gan, a regime
whose real data is the same for every seed gets one `gan-model` cell (planned with the first
seed) and each seed's GAN cell only synthesises from it. The plan and every cell's key go to
`study.json` (what the report reads); cells live in `cells/<kind>-<key>/`.

Several processes may run one study folder at once (`study run --workers N` starts them): each
takes, in plan order, the first unfinished cell whose inputs are done and that no other process
holds (Cell.try_lock), and waits when every remaining cell is held or waits on a held one.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from emsynth.config import dump_config
from emsynth.data.volume import MEMBRANE, MITO, Volume
from emsynth.engine import runinfo
from emsynth.engine.device import (
    choose_precision,
    cpu_capability,
    cpu_kind,
    resolve_precision,
    thread_count,
    torch_threads,
)
from emsynth.engine.progress import format_duration
from emsynth.errors import EmsynthError
from emsynth.gan.config import GanConfig
from emsynth.io import atomic_write_text, plain, resolve_path
from emsynth.segment.sampling import IMAGE, segment_data
from emsynth.study import cells
from emsynth.study import data as study_data
from emsynth.study.cache import (
    LOCK_REFRESH_S,
    Cell,
    CellSpec,
    canonical_json,
    hash_arrays,
    hash_files,
    sha256_text,
)
from emsynth.study.config import RegimeConfig, StudyConfig
from emsynth.study.layout import (
    CELLS_DIR,
    FORMAT,
    MIXED,
    PREVIEWS_DIR,
    REAL,
    STUDY_JSON,
    STUDY_YAML,
    canonical_layout,
    save_preview,
    variant_name,
)

#: Bump when what a kind of cell computes changes, so old results are not reused.
CELL_VERSIONS = {"membrane-model": 1, "gan-model": 1, "gan": 1, "segment": 1, "eval": 1}


@dataclass
class Planned:
    """A cell with the work that produces it."""

    cell: Cell
    work: Callable[[], dict[str, Any]]
    budget_s: float | None = None  # the engine's max_time, for the ETA before any timing
    deps: tuple[Cell, ...] = ()    # cells whose results the work reads

    def ready(self) -> bool:
        return all(dep.done for dep in self.deps)


@dataclass
class StudyState:
    """What the plan shares between cells: data, blocks and per-seed selections."""

    cfg: StudyConfig
    study_dir: Path
    source: study_data.Source
    blocks: study_data.Blocks
    test: Volume
    test_key: str
    test_description: str
    membrane_identity: dict[str, Any] | None = None
    membrane_model_dir: Path | None = None
    membrane_cell: Cell | None = None  # when the study trains its membrane model
    membrane_cache: Path | None = None
    selections: dict[tuple[str, int], study_data.Selection] = field(default_factory=dict)
    #: Regimes whose seeds share one GAN (share_gan and the same real data for every seed).
    shared_gans: set[str] = field(default_factory=set)


# --- progress --------------------------------------------------------------------------------

class StudyProgress:
    """Cells done / total with an ETA, printed as a line between cells (each training shows
    its own engine progress bar meanwhile, so a second live display would garble both).

    The ETA sums, over the cells still to run, the mean duration of finished cells of the same
    kind (from this session and from the records of earlier ones), else the cell's training
    budget (max_time); evaluation cells without a timing yet count as nothing.
    """

    def __init__(self, planned: list[Planned], console: Console, workers: int = 1):
        self.console = console
        self.workers = max(1, workers)  # processes sharing the remaining cells
        self.planned = planned
        self.durations: dict[str, list[float]] = {}
        for item in planned:
            record = item.cell.record() if item.cell.done else None
            if record and record.get("duration_s") is not None:
                self.durations.setdefault(item.cell.spec.kind, []).append(record["duration_s"])
        self.progress = Progress(
            TextColumn("[bold]study"), BarColumn(bar_width=24), MofNCompleteColumn(),
            TextColumn("cells"), TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
            TextColumn("{task.fields[status]}"), console=console,
        )
        self.task = self.progress.add_task("study", total=len(planned), eta="--:--", status="")
        self.done = 0

    def estimate(self, item: Planned) -> float:
        kind = item.cell.spec.kind
        if self.durations.get(kind):
            return float(np.mean(self.durations[kind]))
        return item.budget_s or 0.0

    def eta(self, remaining: list[Planned]) -> float:
        return float(sum(self.estimate(item) for item in remaining)) / self.workers

    def show(self, status: str, remaining: list[Planned]) -> None:
        self.progress.update(self.task, completed=self.done,
                             eta=format_duration(self.eta(remaining)), status=status)
        self.console.print(self.progress.make_tasks_table(self.progress.tasks))

    def finished(self, item: Planned, duration: float | None) -> None:
        self.done += 1
        if duration is not None:
            self.durations.setdefault(item.cell.spec.kind, []).append(duration)


def wide_console() -> Console:
    """stderr console; 160 columns when it is a log file, so progress lines are not cut."""
    console = Console(stderr=True)
    return console if console.is_terminal else Console(stderr=True, width=160)


def describe(spec: CellSpec) -> str:
    labels = " ".join(f"{k}={v}" for k, v in spec.labels.items() if k != "pixels")
    return f"{spec.kind} {labels}".strip()


# --- planning --------------------------------------------------------------------------------

def _membrane_setup(state: StudyState, planned: list[Planned]) -> None:
    """Work out where membranes come from; add the membrane-model cell when one is trained."""
    cfg, m = state.cfg, state.cfg.membranes
    if MEMBRANE not in cfg.gan.data.channels or not cfg.uses_synthetic:
        return
    if m.source == "labels":
        if MEMBRANE not in state.source.volume.labels:
            raise EmsynthError(
                f"{cfg.data.source}: has no membrane labels for the GAN's membrane channel. "
                "Fix: set membranes.source=model (with membranes.model_dir or "
                'membranes.train_config), or gan.data.channels=["mito"]'
            )
        return
    if m.source == "folder":
        folder = resolve_path(m.folder, "membranes.folder",
                                         "pass a slice folder with membranes/")
        labels = cells.folder_membranes(folder, state.source.volume)
        state.source.volume.labels[MEMBRANE] = labels
        state.membrane_identity = {"folder": hash_arrays(labels)}
        return
    if m.model_dir is not None:
        model_dir = resolve_path(m.model_dir, "membranes.model_dir",
                                            "pass the run folder of emsynth membranes train")
        model_key = hash_files(cells.membrane_model_files(model_dir))
    else:
        config_path = resolve_path(m.train_config, "membranes.train_config",
                                              "pass a YAML file from configs/membranes/")
        from emsynth.config import load_config
        from emsynth.membranes.config import MembraneConfig

        membrane_cfg = load_config(MembraneConfig, config_path)
        spec = CellSpec("membrane-model", CELL_VERSIONS["membrane-model"],
                        {"config": membrane_cfg.model_dump(mode="json")},
                        labels={"config": str(m.train_config)})
        cell = Cell(state.study_dir, spec)
        planned.append(Planned(cell, lambda: cells.train_membrane_model(cell, config_path),
                               membrane_cfg.engine.max_time))
        state.membrane_cell = cell
        model_dir = cell.dir / cells.MEMBRANE_RUN
        model_key = spec.key
    state.membrane_model_dir = model_dir
    state.membrane_identity = {"model": model_key, "threshold": m.threshold,
                               "thin_width": m.thin_width, "data": state.source.key}
    # Predicted slices are cached one PNG each, in a folder named by what determines them.
    name = f"membranes-{sha256_text(canonical_json(state.membrane_identity))[:16]}"
    state.membrane_cache = state.study_dir / CELLS_DIR / name


def _regime_volume(state: StudyState, regime, seed: int, with_membranes: bool) -> Volume:
    """The real annotated data of a regime and seed (membranes added for the GAN: predicted
    from this data alone, crops included; cells.predicted_membranes)."""
    selection = state.selections[(regime.name, seed)]
    volume = state.source.volume
    keep = {MITO} | ({MEMBRANE} if with_membranes else set())
    trimmed = Volume(volume.image, {k: v for k, v in volume.labels.items() if k in keep},
                     volume.pixel_size_nm, volume.source, volume.slice_names)
    real = study_data.cut(trimmed, selection)
    if with_membranes and state.membrane_model_dir is not None:
        device = cells.inference_device(state.cfg.gan.engine)
        m = state.cfg.membranes
        real.labels[MEMBRANE] = cells.predicted_membranes(
            state.membrane_cache, state.membrane_model_dir, real, selection.part_names(),
            m.threshold, m.thin_width, device,
            resolve_precision(state.cfg.gan.engine.precision, device))
    return real


def membrane_key(identity: dict[str, Any], selection: study_data.Selection) -> str:
    """The content key of a regime's predicted membranes: model, settings, data and selection.
    Crops are marked as predicted on the crop (earlier studies predicted whole slices, then
    cropped), so their GAN cells are redone; whole-slice keys are unchanged."""
    key = {**identity, "selection": selection.as_dict()}
    if selection.crop is not None:
        key["predicted_on"] = "crop"
    return sha256_text(canonical_json(key))


def gan_settings(gan_cfg: GanConfig) -> dict[str, Any]:
    """The study GAN's config as hashed into its cell key. The study's GAN has no validation
    block (StudyConfig.gan_config), so data.val_gap changes nothing: it is left out, and cells
    keep the keys they had before the field existed."""
    return gan_cfg.model_dump(mode="json", exclude={"data": {"val_gap"}})


#: SynthesisConfig fields added after the first studies ran, with the values that reproduce
#: them: left out of the GAN cell's key while at these values, so earlier results stay valid.
_NEW_SYNTHESIS_FIELDS = {"remodel_spacing": 20, "remodel_jitter": 4.0, "remodel_scale": 0.2,
                         "count_per_slice": None, "pixel_noise": 0.0}


def synthesis_settings(cfg: StudyConfig) -> dict[str, Any]:
    dumped = cfg.synthesis.model_dump(mode="json")
    return {k: v for k, v in dumped.items()
            if k not in _NEW_SYNTHESIS_FIELDS or v != _NEW_SYNTHESIS_FIELDS[k]}


def shares_gan(state: StudyState, regime: RegimeConfig) -> bool:
    """Whether a regime's seeds share one GAN: share_gan is on, there is more than one seed,
    and every seed drew the same real data (regime all, or a regime with data_seed). A GAN
    trained on one seed's data never serves a seed with other data: its images would carry
    annotation that seed does not have."""
    cfg = state.cfg
    seeds = cfg.regime_seeds(regime)
    if not (cfg.share_gan and len(seeds) > 1):
        return False
    drawn = [state.selections[(regime.name, seed)].as_dict() for seed in seeds]
    return all(d == drawn[0] for d in drawn)


def plan_cells(cfg: StudyConfig, study_dir: str | Path) -> list[Planned]:
    """Load the data and plan every cell without running any (a preset's smoke test: its
    cells, their kinds and labels)."""
    return plan_study(prepare(cfg, Path(study_dir)))


def plan_study(state: StudyState) -> list[Planned]:
    cfg, study_dir = state.cfg, state.study_dir
    planned: list[Planned] = []
    _membrane_setup(state, planned)
    volume = state.source.volume
    shape = volume.shape[1:]
    val_volume = volume.select(state.blocks.val)
    val_key = hash_arrays(val_volume.image, val_volume.labels[MITO])
    val_cache: dict[str, Any] = {}

    def val_data():
        if "val" not in val_cache:
            val_cache["val"] = segment_data(val_volume, [IMAGE], MITO)
        return val_cache["val"]

    with_membranes = MEMBRANE in cfg.gan.data.channels
    membrane_deps = (state.membrane_cell,) if state.membrane_cell is not None else ()
    eval_precision = resolve_precision(cfg.segment.engine.precision,
                                       cells.inference_device(cfg.segment.engine))
    for seed in cfg.seeds:
        for regime in cfg.regimes:
            if seed not in cfg.regime_seeds(regime):
                continue
            state.selections[(regime.name, seed)] = study_data.select(
                regime, state.blocks.train, seed, volume.labels[MITO])
    state.shared_gans = {regime.name for regime in cfg.regimes if shares_gan(state, regime)}
    gan_models: dict[str, Cell] = {}
    for seed in cfg.seeds:
        for regime in cfg.regimes:
            if seed not in cfg.regime_seeds(regime):
                continue
            selection = state.selections[(regime.name, seed)]
            real = study_data.cut(volume, selection)
            real_key = hash_arrays(real.image, real.labels[MITO])
            labels = {"regime": regime.name, "seed": seed, "pixels": selection.pixels(shape)}

            gan_cell = None
            layouts = cfg.layouts(regime.name)
            if cfg.regime_uses_synthetic(regime):
                gan_cfg = cfg.gan_config(regime)
                inputs = {"real": real_key}
                if with_membranes:
                    inputs["membranes"] = (
                        hash_arrays(real.labels[MEMBRANE]) if state.membrane_identity is None
                        else membrane_key(state.membrane_identity, selection))
                settings = {"gan": gan_settings(gan_cfg), "synthesis": synthesis_settings(cfg),
                            "seed": seed}
                if len(layouts) > 1:
                    settings["layouts"] = layouts
                if regime.synthetic_count is not None:
                    settings["synthetic_count"] = regime.synthetic_count
                gan_labels, model, budget = labels, None, gan_cfg.engine.max_time
                if regime.name in state.shared_gans:
                    model = gan_models.get(regime.name)
                    if model is None:
                        model = Cell(study_dir, CellSpec(
                            "gan-model", CELL_VERSIONS["gan-model"],
                            {"gan": gan_settings(gan_cfg)}, dict(inputs),
                            {"regime": regime.name, "seed": "shared"}))
                        gan_models[regime.name] = model

                        def model_work(cell=model, regime=regime, seed=seed, gan_cfg=gan_cfg):
                            real_data = _regime_volume(state, regime, seed, with_membranes)
                            return cells.run_gan_model(cell, gan_cfg, real_data)

                        planned.append(Planned(model, model_work, gan_cfg.engine.max_time,
                                               membrane_deps))
                    # The shared GAN's key stands for its recipe and data.
                    del settings["gan"]
                    inputs["gan_model"] = model.spec.key
                    gan_labels, budget = {**labels, "gan": "shared"}, None
                spec = CellSpec("gan", CELL_VERSIONS["gan"], settings, inputs, gan_labels)
                gan_cell = Cell(study_dir, spec)

                def gan_work(cell=gan_cell, regime=regime, seed=seed, layouts=layouts,
                             gan_cfg=gan_cfg, model=model):
                    real_data = _regime_volume(state, regime, seed, with_membranes)
                    return cells.run_gan(cell, cfg, real_data, seed,
                                         cells.inference_device(cfg.gan.engine), layouts,
                                         gan_cfg, model, regime.synthetic_count)

                planned.append(Planned(gan_cell, gan_work, budget,
                                       membrane_deps + ((model,) if model else ())))

            seg_settings = cells.segment_config(cfg, seed, regime.steps).model_dump(
                mode="json", exclude={"data"})
            variants = [(condition, None) for condition in cfg.regime_conditions(regime)]
            if cfg.ablation is not None and regime.name in cfg.ablation.regimes:
                a = cfg.ablation
                variants += [(MIXED, (layout, strategy, a.synthetic_share))
                             for layout in a.layouts for strategy in a.strategies]
            seen: set[str] = set()
            for condition, variant in variants:
                layout, strategy, share = variant or (layouts[0], cfg.mix.strategy,
                                                      cfg.mix.synthetic_share)
                layout = canonical_layout(layout)
                inputs = {"val": val_key}
                if condition != "synthetic":
                    inputs["real"] = real_key
                if condition != REAL:
                    inputs["gan"] = gan_cell.spec.key
                settings = {"segment": seg_settings, "condition": condition}
                if condition != REAL and layout != layouts[0]:
                    settings["layout"] = layout
                if condition == MIXED:
                    if strategy != "pretrain":
                        settings["synthetic_share"] = share
                    if strategy != "replace":  # replace: the keys of earlier studies
                        settings["strategy"] = strategy
                    if strategy == "pretrain":
                        settings["pretrain_steps"] = cfg.mix.pretrain_steps
                    if cfg.mix.real_bn_stats:  # absent when off: the keys of earlier studies
                        settings["real_bn_stats"] = "if better on validation"
                seg_labels = {**labels, "condition": condition}
                if variant is not None:
                    seg_labels["variant"] = variant_name(layout, strategy, share)
                seg_cell = Cell(study_dir, CellSpec("segment", CELL_VERSIONS["segment"],
                                                    settings, inputs, seg_labels))
                if seg_cell.spec.key in seen:  # an ablation variant that is the main recipe
                    continue
                seen.add(seg_cell.spec.key)
                folder = cells.synthetic_dir(layout, layouts[0])

                def seg_work(cell=seg_cell, condition=condition, seed=seed, regime=regime,
                             gan_cell=gan_cell, folder=folder, strategy=strategy, share=share):
                    real_data = segment_data(_regime_volume(state, regime, seed, False),
                                             [IMAGE], MITO)
                    synthetic = (cells.synthetic_data(gan_cell, folder) if condition != REAL
                                 else None)
                    return cells.run_segment(cell, cfg, condition, seed, real_data, synthetic,
                                             val_data(), steps=regime.steps,
                                             strategy=strategy, share=share)

                planned.append(Planned(seg_cell, seg_work, cfg.segment.engine.max_time,
                                       (gan_cell,) if condition != REAL else ()))
                eval_cell = Cell(study_dir, CellSpec(
                    "eval", CELL_VERSIONS["eval"], {"precision": eval_precision},
                    {"segmenter": seg_cell.spec.key, "test": state.test_key}, seg_labels))

                def eval_work(cell=eval_cell, seg_cell=seg_cell):
                    return cells.run_eval(cell, seg_cell, state.test,
                                          cells.inference_device(cfg.segment.engine),
                                          eval_precision)

                planned.append(Planned(eval_cell, eval_work, deps=(seg_cell,)))
    return planned


# --- the study index -------------------------------------------------------------------------

def write_index(state: StudyState, planned: list[Planned], status: str,
                started_at: str) -> dict[str, Any]:
    cfg = state.cfg
    shape = state.source.volume.shape
    regimes = []
    for regime in cfg.regimes:
        per_seed = {str(seed): {**state.selections[(regime.name, seed)].as_dict(),
                                "pixels": state.selections[(regime.name, seed)].pixels(shape[1:])}
                    for seed in cfg.regime_seeds(regime)}
        regimes.append({**regime.model_dump(mode="json"), "per_seed": per_seed,
                        "gan_shared": regime.name in state.shared_gans})
    index = {
        "format": FORMAT,
        "name": cfg.name,
        "status": status,
        "started_at": started_at,
        "updated_at": runinfo.now_iso(),
        "config": cfg.model_dump(mode="json"),
        "data": {"description": state.source.description, "key": state.source.key,
                 "shape": list(shape), "blocks": plain(vars(state.blocks))},
        "test": {"description": state.test_description, "key": state.test_key,
                 "slices": len(state.test)},
        "regimes": regimes,
        "cells": [{"name": p.cell.spec.name, "kind": p.cell.spec.kind, "key": p.cell.spec.key,
                   "labels": p.cell.spec.labels, "done": p.cell.done} for p in planned],
        "versions": runinfo.versions(),
        "git": runinfo.git_state(),
        "command": runinfo.command_line(),
        "compute": compute_record(cfg),
    }
    atomic_write_text(state.study_dir / STUDY_JSON, json.dumps(plain(index), indent=2) + "\n")
    atomic_write_text(state.study_dir / STUDY_YAML, dump_config(cfg))
    return index


def compute_record(cfg: StudyConfig) -> dict[str, Any]:
    """Where this invocation runs its cells: CPU kind, threads and the precision each kind of
    cell resolves to here (a study resumed elsewhere records the newest machine)."""
    record: dict[str, Any] = {"cpu": cpu_kind(), "cpu_capability": cpu_capability(),
                              "threads": thread_count(cfg.num_threads)}
    for name, engine in (("gan", cfg.gan.engine), ("segment", cfg.segment.engine)):
        choice = choose_precision(engine.precision, cells.inference_device(engine))
        record[f"{name}_precision"] = f"{choice.precision} ({engine.precision}: {choice.reason})"
    return record


def write_real_previews(state: StudyState) -> None:
    """Real training data of every regime (its first seed) for the report's figure grids."""
    channels = list(state.cfg.gan.data.channels) if state.cfg.uses_synthetic else [MITO]
    for regime in state.cfg.regimes:
        seed = state.cfg.regime_seeds(regime)[0]
        path = state.study_dir / PREVIEWS_DIR / f"real_{regime.name}.npz"
        volume = study_data.cut(state.source.volume, state.selections[(regime.name, seed)])
        save_preview(path, **cells.preview_of(volume, channels))


# --- running ---------------------------------------------------------------------------------

def prepare(cfg: StudyConfig, study_dir: Path) -> StudyState:
    """Load the data, split it and load the test set."""
    source = study_data.load_source(cfg.data, "data")
    blocks = study_data.split(cfg, len(source.volume))
    if cfg.test is None:
        test = source.volume.select(blocks.test)
        description = (f"slices {blocks.test[0]}-{blocks.test[-1]} of the data "
                       "(held-out contiguous block)")
    else:
        loaded = study_data.load_source(cfg.test, "test")
        test, description = loaded.volume, loaded.description
    test_key = hash_arrays(test.image, test.labels[MITO])
    return StudyState(cfg, Path(study_dir), source, blocks, test, test_key, description)


def run_study(cfg: StudyConfig, study_dir: str | Path, resume: bool = True,
              console: Console | None = None, workers: int = 1,
              kinds: list[str] | None = None,
              reuse: list[Path] | None = None) -> dict[str, Any]:
    """Run every unfinished cell; returns the study index (study.json). `workers`: how many
    processes share this study folder now (for the ETA; each process takes its own cells).
    `kinds`: run only cells of these kinds (e.g. the GANs first, on another machine).
    `reuse`: other study folders whose finished cells with the same key are copied instead of
    run (two presets that share regimes and recipes)."""
    unknown = sorted(set(kinds or ()) - set(CELL_VERSIONS))
    if unknown:
        raise EmsynthError(f"--kinds {unknown[0]}: no such kind of cell. Fix: use some of "
                           f"{', '.join(CELL_VERSIONS)}")
    with torch_threads(cfg.num_threads):
        return _run(cfg, Path(study_dir), resume, console or wide_console(), workers, kinds,
                    [Path(d) for d in reuse or []])


def clear_study(cfg: StudyConfig, study_dir: str | Path) -> None:
    """Forget every cell of this config (--no-resume), before any worker starts."""
    state = prepare(cfg, Path(study_dir))
    forget(state, plan_study(state))


def forget(state: StudyState, planned: list[Planned]) -> None:
    """Delete the planned cells' folders and the predicted-membrane cache."""
    for item in planned:
        item.cell.clear()
    if state.membrane_cache is not None:
        shutil.rmtree(state.membrane_cache, ignore_errors=True)


#: How often a process with nothing to take looks again for a cell another one finished.
POLL_S = 10.0


class LockRefresher:
    """Refreshes the lock of the cell in flight from a background thread, so other processes
    see its holder is alive even during a cell of hours."""

    def __init__(self, cell: Cell):
        self.cell, self.stop = cell, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.wait(LOCK_REFRESH_S):
            self.cell.refresh_lock()

    def __enter__(self) -> None:
        self.thread.start()

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.cell.unlock()


def settle_exported(planned: list[Planned], reuse: list[Path]) -> set[str]:
    """Cells finished without their artifacts (from an export: results, no models) stand as
    done unless a cell still to run reads them; those run again, and so on up their inputs.
    Returns the keys of the cells whose artifacts a cell still to run reads. Walks the plan
    from its end (a cell's inputs are planned before it)."""
    read_later: set[str] = set()
    for item in reversed(planned):
        cell = item.cell
        artifacts = cell.spec.key in read_later
        if cell.done and (cell.has_artifacts or not artifacts):
            continue
        if cell.finished_in(reuse, artifacts) is not None:
            continue  # copied when its turn comes
        if cell.done:
            cell.clear()  # its result alone is here, and a cell to run reads its models
        read_later.update(dep.spec.key for dep in item.deps)
    return read_later


def take_next(pending: list[Planned]) -> Planned | None:
    """The first pending cell whose inputs are done and that this process could lock."""
    for item in pending:
        if item.cell.done or not item.ready():
            continue
        if item.cell.try_lock():
            if item.cell.done:  # finished elsewhere since the check above
                item.cell.unlock()
                continue
            return item
    return None


def _run(cfg: StudyConfig, study_dir: Path, resume: bool, console: Console,
         workers: int = 1, kinds: list[str] | None = None,
         reuse: list[Path] | None = None) -> dict[str, Any]:
    study_dir.mkdir(parents=True, exist_ok=True)
    started_at = runinfo.now_iso()
    state = prepare(cfg, study_dir)
    planned = plan_study(state)
    if not resume:
        forget(state, planned)
    write_index(state, planned, "running", started_at)
    write_real_previews(state)
    read_later = settle_exported(planned, reuse or [])
    progress = StudyProgress(planned, console, workers)
    cached = [p for p in planned if p.cell.done]
    for item in cached:
        progress.finished(item, None)
    if cached:
        console.print(f"{len(cached)} of {len(planned)} cells already done (skipped)")
    pending = [p for p in planned if not p.cell.done
               and (kinds is None or p.cell.spec.kind in kinds)]
    # Regime by regime (stable, so within a regime the plan's order): a run that stops early
    # leaves whole regimes finished, whose GANs the next run does not need again.
    rank = {regime.name: i for i, regime in enumerate(cfg.regimes)}
    pending.sort(key=lambda p: rank.get(p.cell.spec.labels.get("regime"), -1))
    waiting = False
    while pending:
        item = take_next(pending)
        if item is None:
            finished_elsewhere = [p for p in pending if p.cell.done]
            for done in finished_elsewhere:
                progress.finished(done, None)
            pending = [p for p in pending if not p.cell.done]
            if not pending:
                break
            if not any(p.cell.held_elsewhere() for p in pending):
                # Nothing held and nothing ready can only mean an input failed elsewhere and
                # was released: it is ready again on the next pass.
                if not any(p.ready() for p in pending):
                    raise EmsynthError(f"{study_dir}: cells wait on inputs that no process "
                                       "runs. Fix: run the kinds of cell they wait on first "
                                       "(--kinds), or rerun the same command")
                continue
            if not waiting:
                progress.show("waiting for cells another process runs", pending)
                waiting = True
            time.sleep(POLL_S)
            continue
        waiting = False
        pending.remove(item)
        source = item.cell.adopt(reuse, item.cell.spec.key in read_later) if reuse else None
        if source is not None:
            item.cell.unlock()
            progress.finished(item, None)
            console.print(f"[green]reused[/] {describe(item.cell.spec)} from {source}",
                          highlight=False)
            continue
        progress.show(f"running {describe(item.cell.spec)}", [item, *pending])
        with LockRefresher(item.cell):
            record = item.cell.start()
            try:
                result = item.work()
            except KeyboardInterrupt as err:  # outside training (which stops cleanly itself)
                item.cell.fail(record, err)
                write_index(state, planned, "interrupted", started_at)
                raise cells.StudyInterrupted(
                    f"{item.cell.dir}: interrupted. Fix: rerun the same command to resume; "
                    "finished cells are kept") from None
            except BaseException as err:
                item.cell.fail(record, err)
                write_index(state, planned, "failed", started_at)
                raise
            duration = item.cell.finish(record, result)
        item.cell.drop_checkpoints()
        progress.finished(item, duration)
        console.print(f"[green]done[/] {describe(item.cell.spec)} in "
                      f"{format_duration(duration)}", highlight=False)
    progress.show("finished", [])
    status = "finished" if all(p.cell.done for p in planned) else "running"
    return write_index(state, planned, status, started_at)
