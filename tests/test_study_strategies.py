"""The study's ways to use synthetic images (add, replace, pretrain), fixed step budgets per
regime, the layout x strategy ablation in the plan, and the presets loading and planning."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import unet_micro

from emsynth.config import load_config
from emsynth.data.phantom import generate_volume
from emsynth.data.volume import MITO
from emsynth.segment.model import Segmenter
from emsynth.segment.sampling import IMAGE, PatchSampler, segment_data
from emsynth.study import cells, runner
from emsynth.study.cache import Cell, CellSpec
from emsynth.study.config import StudyConfig

ROOT = Path(__file__).resolve().parents[1]
ENGINE = {"steps": 4, "precision": "fp32", "device": "cpu", "checkpoint_every": 2,
          "log_every": 2, "val_every": 0, "image_every": 0}
BATCH = 2


def config(**changes) -> StudyConfig:
    cfg = {
        "name": "strategies",
        "data": {"phantom": {"domain": "ca1", "slices": 12, "size": 128, "seed": 3}},
        "split": {"val_block": 2, "test_block": 2, "gap": 1},
        "regimes": [{"name": "1slice", "slices": 1, "steps": 3},
                    {"name": "2slices", "slices": 2}],
        "seeds": [0],
        "num_threads": 1,
        "segment": {"engine": ENGINE, "sampling": {"patch_size": 32, "batch_size": BATCH},
                    "model": unet_micro(), "infer": {"window": 64, "sw_batch_size": 2}},
    }
    cfg.update(changes)
    return StudyConfig.model_validate(cfg)


@pytest.fixture(scope="module")
def data():
    """Real crops of 96 px, synthetic images of 64 px (so a crop's source shows in its size)."""
    real = generate_volume("ca1", 2, (96, 96), seed=1)
    synthetic = generate_volume("ca1", 3, (64, 64), seed=2)
    val = generate_volume("ca1", 1, (64, 64), seed=3)
    return tuple(segment_data(v, [IMAGE], MITO) for v in (real, synthetic, val))


@pytest.fixture
def drawn(monkeypatch):
    """Crops drawn per source (real: 96 px slices, synthetic: 64 px)."""
    counts = {"real": 0, "synthetic": 0}
    original = PatchSampler.sample

    def sample(self, rng, batch_size):
        counts["real" if self.inputs.shape[-1] == 96 else "synthetic"] += batch_size
        return original(self, rng, batch_size)

    monkeypatch.setattr(PatchSampler, "sample", sample)
    return counts


def cell(tmp_path: Path, name: str) -> Cell:
    return Cell(tmp_path, CellSpec("segment", 1, {"name": name}))


def test_add_keeps_every_real_crop_and_raises_the_steps(tmp_path, data, drawn):
    real, synthetic, val = data
    cfg = config(mix={"strategy": "add", "synthetic_share": 0.5})
    only_real = cells.run_segment(cell(tmp_path, "real"), cfg, "real", 0, real, None, val,
                                  steps=3)
    assert only_real["steps"] == 3 and drawn == {"real": 3 * BATCH, "synthetic": 0}
    assert only_real["real_crops"] == 3 * BATCH
    drawn.update(real=0, synthetic=0)
    added = cells.run_segment(cell(tmp_path, "add"), cfg, "real+synthetic", 0, real, synthetic,
                              val, steps=3)
    assert added["strategy"] == "add" and added["steps"] == math.ceil(3 / 0.5) == 6
    assert drawn["real"] == added["real_crops"] == only_real["real_crops"]
    assert drawn["synthetic"] == 6 * BATCH - 3 * BATCH


def test_the_safety_net_scales_with_the_steps_add_plans(tmp_path, data, monkeypatch):
    """A wall-clock net sized for the regime's steps must not cut an add run (twice the steps)
    short: lucchi_cpu's all-slice add runs stopped at ~6400 of 8000 steps before it scaled."""
    real, synthetic, val = data
    seen = []
    original = cells.fit_task

    def fit(task, *args, **kwargs):
        seen.append((task.cfg.engine.steps, task.cfg.engine.max_time))
        return original(task, *args, **kwargs)

    monkeypatch.setattr(cells, "fit_task", fit)
    engine = {**ENGINE, "max_time": 60.0}
    cfg = config(mix={"strategy": "add", "synthetic_share": 0.75},
                 segment={**config().segment.model_dump(mode="json"), "engine": engine})
    cells.run_segment(cell(tmp_path, "real"), cfg, "real", 0, real, None, val, steps=3)
    cells.run_segment(cell(tmp_path, "add"), cfg, "real+synthetic", 0, real, synthetic, val,
                      steps=3)
    assert seen == [(3, 60.0), (12, 240.0)]


def test_add_sampler_spreads_the_real_crops_exactly():
    class Fake:
        def __init__(self, tag):
            self.tag = tag

        def sample(self, rng, n):
            return np.full((n, 1, 2, 2), self.tag, np.uint8), np.zeros((n, 1, 2, 2), np.uint8)

    sampler = cells.AddSampler(Fake(1), Fake(2), real_crops=7 * 8, total_steps=10)
    rng = np.random.default_rng(0)
    per_batch = [int((sampler.sample(rng, 8)[0] == 1).all(axis=(1, 2, 3)).sum())
                 for _ in range(10)]
    assert sum(per_batch) == 56 == sampler.real_drawn and max(per_batch) - min(per_batch) <= 1
    state = sampler.state_dict()
    again = cells.AddSampler(Fake(1), Fake(2), 56, 10)
    again.load_state_dict(state)
    assert again.batches == 10 and again.sample(rng, 8)[0].min() == 2  # past the plan: synthetic


def test_replace_keeps_the_steps_and_mixes_by_share(tmp_path, data, drawn):
    real, synthetic, val = data
    cfg = config(mix={"strategy": "replace", "synthetic_share": 0.5})
    out = cells.run_segment(cell(tmp_path, "replace"), cfg, "real+synthetic", 0, real,
                            synthetic, val, steps=4)
    assert out["steps"] == 4 and out["synthetic_share"] == 0.5
    assert drawn["real"] + drawn["synthetic"] == 4 * BATCH and drawn["synthetic"] > 0


def test_pretrain_fine_tunes_from_the_pretrained_weights(tmp_path, data, drawn, monkeypatch):
    real, synthetic, val = data
    cfg = config(mix={"strategy": "pretrain", "pretrain_steps": 2})
    starts = []
    setup = cells.StudySegmentTask.setup

    def record_start(self, ctx):
        setup(self, ctx)
        starts.append({k: v.detach().clone() for k, v in self.net.state_dict().items()})

    monkeypatch.setattr(cells.StudySegmentTask, "setup", record_start)
    where = cell(tmp_path, "pretrain")
    out = cells.run_segment(where, cfg, "real+synthetic", 0, real, synthetic, val, steps=3)
    assert len(starts) == 2  # the pretraining, then the fine-tuning
    pretrained = Segmenter.load(where.dir / cells.PRETRAIN_RUN / "model").net.state_dict()
    assert all(torch.equal(starts[1][k], pretrained[k]) for k in pretrained)
    assert not all(torch.equal(starts[0][k], pretrained[k]) for k in pretrained)
    assert out["pretrain"]["steps"] == 2 and out["steps"] == 3
    assert out["pretrain"]["weights_key"] == cells.state_key(pretrained)
    # The fine-tuning is the real-only recipe: real crops only, as many as real-only draws.
    assert drawn == {"real": 3 * BATCH, "synthetic": 2 * BATCH}
    assert out["real_crops"] == 3 * BATCH
    fine_tuned = Segmenter.load(where.dir / "model").net.state_dict()
    assert not all(torch.equal(fine_tuned[k], pretrained[k]) for k in pretrained)


def test_plan_has_fixed_steps_per_regime_and_the_ablation(tmp_path):
    cfg = config(conditions=["real", "real+synthetic", "synthetic"],
                 mix={"strategy": "add", "synthetic_share": 0.5},
                 synthesis={"masks": "remodel", "count": 2, "size": 64},
                 ablation={"regimes": ["1slice"], "layouts": ["deformed", "remodel"],
                           "strategies": ["add", "pretrain"], "synthetic_share": 0.5})
    planned = runner.plan_cells(cfg, tmp_path / "study")
    specs = [p.cell.spec for p in planned]
    segments = [s for s in specs if s.kind == "segment"]
    steps = {s.labels["regime"]: s.settings["segment"]["engine"]["steps"] for s in segments}
    assert steps == {"1slice": 3, "2slices": ENGINE["steps"]}
    gans = [s for s in specs if s.kind == "gan"]
    assert [g.settings.get("layouts") for g in gans] == [["remodel", "deformed"], None]
    variants = [s.labels.get("variant") for s in segments if s.labels["regime"] == "1slice"]
    # remodel/add 0.5 is the main recipe: planned once, as the main grid's cell.
    assert variants == [None, None, None, "deformed/add 0.5", "deformed/pretrain",
                        "remodel/pretrain"]
    assert len({s.key for s in segments}) == len(segments)
    deformed = next(s for s in segments if s.labels.get("variant") == "deformed/add 0.5")
    assert deformed.settings["layout"] == "deformed" and deformed.settings["strategy"] == "add"
    evals = [s for s in specs if s.kind == "eval"]
    assert len(evals) == len(segments)
    with pytest.raises(ValueError, match="not a regime"):
        config(ablation={"regimes": ["5slices"]})


@pytest.mark.parametrize("name", ["demo", "lucchi_cpu", "lucchi_gpu", "lucchi_scarce_cpu",
                                  "lucchi_noise_cpu"])
def test_presets_load_with_todays_defaults(name):
    cfg = load_config(StudyConfig, ROOT / "configs" / "study" / f"{name}.yaml")
    if name in ("demo", "lucchi_gpu"):  # the new keys' defaults reproduce the earlier study
        assert cfg.mix.strategy == "replace" and cfg.ablation is None
        assert cfg.synthesis.masks == "real" and cfg.synthesis.count_per_slice is None
        assert all(r.steps is None for r in cfg.regimes)
        assert runner.synthesis_settings(cfg) == cfg.synthesis.model_dump(
            mode="json", exclude={"remodel_spacing", "remodel_jitter", "remodel_scale",
                                  "count_per_slice", "pixel_noise"})
    else:  # the redesigned CPU presets (issue 13): fixed budgets, BatchNorm on real crops
        assert all(r.steps is not None for r in cfg.regimes)
        assert cfg.mix.real_bn_stats and cfg.segment.model.norm == "batch"
        scarce = [r for r in cfg.regimes if r.name in ("crop256", "1slice")]
        assert all(len(cfg.regime_seeds(r)) >= 5 for r in scarce)
        assert all(len(cfg.regime_seeds(r)) >= 3 for r in cfg.regimes)


def test_noise_preset_is_lucchi_cpu_but_for_the_segmenters_noise_and_its_regimes():
    """lucchi_noise_cpu.yaml asks one question (noise on half the segmenters' crops): drift
    from lucchi_cpu.yaml in anything else would confound its comparison with that study."""
    load = partial(load_config, StudyConfig)
    base = load(ROOT / "configs" / "study" / "lucchi_cpu.yaml").model_dump()
    noise = load(ROOT / "configs" / "study" / "lucchi_noise_cpu.yaml").model_dump()
    assert (base["segment"]["augment"]["noise_prob"], noise["segment"]["augment"]["noise_prob"]) \
        == (0.3, 0.5)
    scarce = load(ROOT / "configs" / "study" / "lucchi_scarce_cpu.yaml").model_dump()
    known = {r["name"]: r for r in scarce["regimes"] + base["regimes"]}  # the control: scarce's
    assert [r["name"] for r in noise["regimes"]] == ["1slice", "1slice-2x", "2slices"]
    assert all(r == known[r["name"]] for r in noise["regimes"])
    for cfg in (base, noise):
        cfg["segment"]["augment"].pop("noise_prob")
        cfg.pop("regimes"), cfg.pop("name")
    assert noise == base


def test_synthetic_count_scales_with_the_regime_unless_the_regime_sets_it(tmp_path):
    cfg = config(synthesis={"count": 64, "count_per_slice": 64})
    assert [cells.synthetic_count(cfg, n) for n in (1, 2, 5, 110)] == [64, 128, 320, 7040]
    assert cells.synthetic_count(cfg, 110, 640) == 640
    # A regime's own count enters its GAN cell's key; the other regimes' keys stay.
    data = {"conditions": ["real", "synthetic"]}
    plain = runner.plan_cells(config(**data), tmp_path / "a")
    regimes = [{"name": "1slice", "slices": 1, "steps": 3},
               {"name": "2slices", "slices": 2, "synthetic_count": 5}]
    capped = runner.plan_cells(config(**data, regimes=regimes), tmp_path / "b")
    gans = [[p.cell.spec for p in plan if p.cell.spec.kind == "gan"] for plan in (plain, capped)]
    assert gans[0][0].key == gans[1][0].key and gans[0][1].key != gans[1][1].key
    assert gans[1][1].settings["synthetic_count"] == 5


def test_pixel_noise_enters_the_gan_cell_key_only_when_set(tmp_path):
    """synthesis.pixel_noise changes the synthetic images, so it must change the cell that
    makes them; at its default (0) the cells of studies run before it keep their keys."""
    data = {"conditions": ["real", "synthetic"]}
    specs = {}
    for noise in (0.0, 7.5):
        plan = runner.plan_cells(config(**data, synthesis={"pixel_noise": noise}),
                                 tmp_path / str(noise))
        specs[noise] = [p.cell.spec for p in plan if p.cell.spec.kind == "gan"]
    assert "pixel_noise" not in json.dumps([s.settings for s in specs[0.0]])
    assert all(s.settings["synthesis"]["pixel_noise"] == 7.5 for s in specs[7.5])
    assert not {s.key for s in specs[7.5]} & {s.key for s in specs[0.0]}


def test_scarce_preset_plans_its_cells(tmp_path):
    """A smoke test of configs/study/lucchi_scarce_cpu.yaml without running it (hours):
    load the data, split it and plan every cell."""
    cfg = load_config(StudyConfig, ROOT / "configs" / "study" / "lucchi_scarce_cpu.yaml")
    source = ROOT.parent / "shared" / "data" / "lucchi_pp" / "train"
    if not source.is_dir():
        pytest.skip(f"{source} is absent")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": str(source)})})
    planned = runner.plan_cells(cfg, tmp_path / "study")
    kinds = [p.cell.spec.kind for p in planned]
    seeds = len(cfg.seeds)
    assert kinds.count("membrane-model") == 1 and kinds.count("gan") == 2 * seeds
    # 1slice (data_seed 0): one GAN shared by the seeds; crop256: one per seed, 500 steps.
    models = [p.cell.spec for p in planned if p.cell.spec.kind == "gan-model"]
    assert [m.labels["regime"] for m in models] == ["1slice"]
    crop_gans = [p.cell.spec for p in planned if p.cell.spec.kind == "gan"
                 and p.cell.spec.labels["regime"] == "crop256"]
    assert {g.settings["gan"]["engine"]["steps"] for g in crop_gans} == {500}
    assert len({tuple(g.inputs.values()) for g in crop_gans}) == seeds  # a crop per seed
    # crop: 3 conditions; 1 slice: 3 + 9 ablation variants (its add uses share 0.25, the main
    # recipe 0.5, so none duplicates it); the controls 1slice-2x (5 seeds) and all (3 seeds)
    # train real-only segmenters and no GAN.
    assert kinds.count("segment") == kinds.count("eval") == (3 + 3 + 9) * seeds + 5 + 3
    segments = [p.cell.spec for p in planned if p.cell.spec.kind == "segment"]
    budget = {r.name: r.steps for r in cfg.regimes}
    assert all(s.settings["segment"]["engine"]["steps"] == budget[s.labels["regime"]]
               for s in segments)
    controls = [s for s in segments if s.labels["regime"] in ("1slice-2x", "all")]
    assert {s.labels["condition"] for s in controls} == {"real"} and len(controls) == 8
    assert budget["1slice-2x"] == 2 * budget["1slice"]
    assert {s.settings["segment"]["model"]["norm"] for s in segments} == {"batch"}
    mixed = [s for s in segments if s.labels["condition"] == "real+synthetic"]
    assert all(s.settings["real_bn_stats"] for s in mixed)
    # 1slice-2x draws the same slice as 1slice: its real-only cells differ only in steps.
    one = {s.labels["seed"]: s.inputs["real"] for s in segments
           if s.labels["regime"] == "1slice" and s.labels["condition"] == "real"}
    two = {s.labels["seed"]: s.inputs["real"] for s in controls
           if s.labels["regime"] == "1slice-2x"}
    assert one == two
    assert not any(p.cell.done for p in planned)


@pytest.mark.slow
def test_tiny_study_with_the_ablation_end_to_end(tmp_path):
    """One GAN cell synthesises every layout it is asked for; each ablation variant trains on
    its layout's images with its strategy; the report keeps the variants out of the main
    table and shows them in the ablation table."""
    from emsynth.data.readers import read_volume
    from emsynth.report import build_report

    gan_engine = {**ENGINE, "steps": 2, "checkpoint_every": 2}
    cfg = config(
        data={"phantom": {"domain": "ca1", "slices": 10, "size": 256, "seed": 0}},
        regimes=[{"name": "1slice", "slices": 1, "steps": 2}],
        conditions=["real", "real+synthetic"],
        gan={"model": {"ngf": 4, "ndf": 4, "n_scales": 1}, "engine": gan_engine},
        synthesis={"count": 2, "size": 128, "masks": "remodel"},
        mix={"strategy": "add", "synthetic_share": 0.5},
        ablation={"regimes": ["1slice"], "layouts": ["deformed", "procedural"],
                  "strategies": ["pretrain"]})
    study = tmp_path / "study"
    index = runner.run_study(cfg, study)
    assert index["status"] == "finished"
    (gan,) = [c for c in index["cells"] if c["kind"] == "gan"]
    gan_dir = study / "cells" / gan["name"]
    for folder in ("synthetic", "synthetic-deformed", "synthetic-procedural"):
        assert read_volume(gan_dir / folder, "slices").shape == (2, 128, 128)
    segments = {c["labels"].get("variant"): c for c in index["cells"] if c["kind"] == "segment"}
    assert set(segments) == {None, "deformed/pretrain", "procedural/pretrain"}
    pre = json.loads((study / "cells" / segments["deformed/pretrain"]["name"] / "result.json")
                     .read_text())
    assert pre["strategy"] == "pretrain" and pre["pretrain"]["steps"] == 2 and pre["steps"] == 2
    results, _, md_path = build_report(study)
    assert results.missing == 0 and set(results.conditions) == {"real", "real+synthetic"}
    report = md_path.read_text()
    assert "Ablation: mask layout x strategy" in report and "procedural/pretrain" in report
    # One figure per mask layout, from the GAN cell's previews; steps of every segmenter.
    for layout in ("remodel", "deformed", "procedural"):
        assert (study / "figures" / f"layout_{layout}.png").is_file()
        assert f"(figures/layout_{layout}.png)" in report
    steps = report[report.index("### Segmenter training steps"):]
    assert "| 1slice | real | 1 | 2 | 2 |  | 4 | steps |" in steps
    assert "| 1slice | real+synthetic [procedural/pretrain] | 1 | 2 | 2 | 2 | 4 | steps |" in steps
    assert "3 paired comparisons of test foreground IoU (1 in the main table, 2 in the " \
           "ablation); none has a p-value (fewer than 2 seeds)." in report


def test_the_default_gap_leaves_study_cells_and_old_runs_as_they_were(tmp_path):
    """The GAN's data.val_gap (default 5) came after its other options. Runs record their
    config without it while it is 0 (what they trained with), so runs written before it resume
    with `-s data.val_gap=0` (the default now trains other slices, so resuming with it is
    refused). The study's GAN has no validation block and its segmenters get their data from
    the study, so their keys and recorded configs stay as they were: interrupted cells resume."""
    from emsynth.gan.config import GanConfig, stored_config
    from emsynth.segment.config import DataConfig

    assert "val_gap" not in stored_config(GanConfig.model_validate({"data": {"val_gap": 0}}))["data"]
    assert stored_config(GanConfig())["data"]["val_gap"] == 5
    cfg = config(conditions=["real", "synthetic"],
                 data={"phantom": {"domain": "ca1", "slices": 12, "size": 256, "seed": 3}},
                 regimes=[{"name": "1slice", "slices": 1}])
    assert cfg.gan_config().data.val_block == 0
    assert "val_gap" not in stored_config(cfg.gan_config())["data"]
    (gan,) = [p.cell.spec for p in runner.plan_cells(cfg, tmp_path) if p.cell.spec.kind == "gan"]
    assert "val_gap" not in gan.settings["gan"]["data"]
    assert gan.settings["gan"] == cfg.gan_config().model_dump(
        mode="json", exclude={"data": {"val_gap"}})
    assert DataConfig().val_gap == 5 and cells.segment_config(cfg, 0).data == DataConfig(val_gap=0)


def test_batchnorm_is_reestimated_on_real_crops_only(data):
    """reestimate_batchnorm: running statistics become the average over the given crops
    (one batch: its mean and unbiased variance), weights, momentum and mode untouched."""
    from emsynth.segment.batchnorm import reestimate_batchnorm
    from emsynth.segment.model import to_float

    real, _, _ = data
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    bn = net[1]
    bn.running_mean.fill_(9.0)
    bn.running_var.fill_(9.0)
    net.eval()
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k
               and "num_batches" not in k}
    sampler = PatchSampler(real, 32, 0.3)
    assert reestimate_batchnorm(net, sampler, 1, 4, torch.device("cpu"), seed=5) == 1
    inputs, _ = sampler.sample(np.random.default_rng(5), 4)  # the same crops again
    with torch.no_grad():
        features = net[0](to_float(torch.from_numpy(inputs)))
    expected_mean = features.mean(dim=(0, 2, 3))
    expected_var = features.var(dim=(0, 2, 3), unbiased=True)
    assert torch.allclose(bn.running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(bn.running_var, expected_var, rtol=1e-4)
    assert not net.training and bn.momentum == 0.1
    assert all(torch.equal(net.state_dict()[k], v) for k, v in weights.items())


def test_real_bn_stats_are_kept_only_where_validation_improves(tmp_path, data, monkeypatch):
    """mix.real_bn_stats: a real+synthetic segmenter is scored with the BatchNorm statistics
    of its blend, then re-estimated on real crops and scored again; the better on validation
    IoU is exported (scores scripted here: first better, then second better)."""
    from emsynth.segment.task import SegmentTask

    real, synthetic, val = data
    model = {**unet_micro(), "norm": "batch"}
    base = config(mix={"strategy": "replace", "synthetic_share": 0.5})
    base = base.model_copy(update={"segment": base.segment.model_copy(update={
        "model": base.segment.model.model_copy(update=model)})})
    with_real = base.model_copy(update={"mix": base.mix.model_copy(
        update={"real_bn_stats": True})})
    blended = cells.run_segment(cell(tmp_path, "blend"), base, "real+synthetic", 0, real,
                                synthetic, val, steps=3)
    assert "before_bn/fg_iou" not in blended["validation"]
    blend = Segmenter.load(cell(tmp_path, "blend").dir / "model").net.state_dict()

    original = SegmentTask.validate
    for scripted, use_real in (([0.5, 0.6], True), ([0.6, 0.5], False)):
        scores = iter(scripted)
        monkeypatch.setattr(SegmentTask, "validate",
                            lambda self, ctx, scores=scores: {**original(self, ctx),
                                                              "fg_iou": next(scores)})
        name = f"real-bn-{use_real}"
        result = cells.run_segment(cell(tmp_path, name), with_real, "real+synthetic", 0, real,
                                   synthetic, val, steps=3)
        v = result["validation"]
        assert (v["fg_iou"], v["before_bn/fg_iou"], v["real_bn"]) == (0.6, 0.5 if use_real
                                                                     else 0.6, float(use_real))
        # Same seed, same training: the weights equal the blend's; the statistics differ only
        # where the re-estimated ones were kept.
        state = Segmenter.load(cell(tmp_path, name).dir / "model").net.state_dict()
        stats = [k for k in blend if k.endswith("running_mean")]
        assert stats and all(torch.allclose(blend[k], state[k]) != use_real for k in stats)
        assert all(torch.equal(blend[k], state[k]) for k in blend if "running" not in k
                   and "num_batches" not in k)
