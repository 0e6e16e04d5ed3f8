"""The study's GAN recipe and GAN cells: a preset file with overrides merged on top (cells keyed
by the resolved recipe, not the path), a step count per regime, data_seed, and one GAN shared by
the seeds of a regime whose real data is the same for every seed (share_gan)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny import unet_micro

import emsynth.gan.train
from emsynth.config import load_config
from emsynth.data.readers import read_volume
from emsynth.errors import EmsynthError
from emsynth.gan.config import GanConfig
from emsynth.report import build_report
from emsynth.study import cells, runner
from emsynth.study.config import StudyConfig

ROOT = Path(__file__).resolve().parents[1]
TEXTURE = ROOT / "configs" / "gan" / "cpu_texture.yaml"
ENGINE = {"steps": 2, "precision": "fp32", "device": "cpu", "checkpoint_every": 2,
          "log_every": 1, "val_every": 0, "image_every": 0}


def config(**changes) -> dict:
    cfg = {
        "name": "gan",
        "data": {"phantom": {"domain": "ca1", "slices": 12, "size": 256, "seed": 0}},
        "split": {"val_block": 2, "test_block": 2, "gap": 1},
        "regimes": [{"name": "1slice", "slices": 1}, {"name": "all", "slices": "all"}],
        "seeds": [0, 1],
        "num_threads": 1,
        "conditions": ["real", "synthetic"],
        "gan": {"model": {"ngf": 4, "ndf": 4, "n_scales": 1}, "engine": ENGINE},
        "synthesis": {"count": 2, "size": 128},
        "segment": {"engine": ENGINE, "sampling": {"patch_size": 64, "batch_size": 2},
                    "model": unet_micro(), "infer": {"window": 128, "sw_batch_size": 2}},
    }
    cfg.update(changes)
    return cfg


def specs(cfg: dict, tmp_path: Path, kind: str) -> list:
    planned = runner.plan_cells(StudyConfig.model_validate(cfg), tmp_path)
    return [p.cell.spec for p in planned if p.cell.spec.kind == kind]


def test_a_gan_preset_with_overrides_is_the_resolved_recipe(tmp_path):
    """gan: {preset, ...}: the preset file with the other keys merged on top; the GAN cells'
    keys are those of the same recipe written out in full, wherever the file lies."""
    preset = config(gan={"preset": str(TEXTURE), "engine": ENGINE,
                         "model": {"ngf": 4, "ndf": 4}})
    cfg = StudyConfig.model_validate(preset)
    texture = load_config(GanConfig, TEXTURE)
    assert cfg.gan.model.decoder_noise == 0.1 and cfg.gan.model.ngf == 4  # preset + override
    assert cfg.gan.loss == texture.loss and cfg.gan.optim.g_steps_per_d == 2
    # merged key by key: steps from the override, max_time from the preset
    assert cfg.gan.engine.steps == 2 and cfg.gan.engine.max_time == texture.engine.max_time
    assert texture.engine.steps != 2
    written = {**texture.model_dump(mode="json")}
    written["model"] = {**written["model"], "ngf": 4, "ndf": 4}
    written["engine"] = {**written["engine"], **ENGINE}
    inline = config(gan=written)
    copied = tmp_path / "elsewhere.yaml"
    shutil.copy(TEXTURE, copied)
    moved = config(gan={"preset": str(copied), "engine": ENGINE, "model": {"ngf": 4, "ndf": 4}})
    keys = [[s.key for s in specs(c, tmp_path / str(i), "gan")]
            for i, c in enumerate((preset, inline, moved))]
    assert keys[0] == keys[1] == keys[2] and len(set(keys[0])) == 4
    # A key's value is replaced whole, not merged: an empty mapping clears the preset's.
    cleared = StudyConfig.model_validate(config(gan={"preset": str(TEXTURE),
                                                     "loss": {"class_l1_weights": {}}}))
    assert cleared.gan.loss.class_l1_weights == {} and cleared.gan.loss.l1_weight == 10.0
    # The study folder's config is the resolved recipe: no preset key left.
    assert "preset" not in StudyConfig.model_validate(preset).model_dump(mode="json")["gan"]

    with pytest.raises(EmsynthError, match="gan.preset not found"):
        StudyConfig.model_validate(config(gan={"preset": "configs/gan/nope.yaml"}))
    with pytest.raises(ValueError, match="ngff"):  # unknown keys still rejected
        StudyConfig.model_validate(config(gan={"preset": str(TEXTURE), "model": {"ngff": 4}}))


def test_study_presets_use_the_texture_gan():
    texture = load_config(GanConfig, TEXTURE)
    for name in ("lucchi_cpu", "lucchi_scarce_cpu"):
        cfg = load_config(StudyConfig, ROOT / "configs" / "study" / f"{name}.yaml")
        assert cfg.gan.model == texture.model and cfg.gan.loss == texture.loss
        assert cfg.gan.optim == texture.optim and cfg.share_gan
        assert cfg.gan.engine.steps == 3000 and cfg.gan.engine.max_time == 6000
        crop = next(r for r in cfg.regimes if r.crop is not None)
        assert crop.gan_steps == 500 and crop.data_seed is None
        assert all(r.data_seed == 0 for r in cfg.regimes if r.crop is None and r.slices != "all")


def test_gan_steps_per_regime_and_unchanged_keys_without(tmp_path):
    plain = specs(config(), tmp_path / "a", "gan")
    steps = specs(config(regimes=[{"name": "1slice", "slices": 1, "gan_steps": 7},
                                  {"name": "all", "slices": "all"}]), tmp_path / "b", "gan")
    assert [s.settings["gan"]["engine"]["steps"] for s in steps] == [7, 2, 7, 2]
    assert [s.key for s in plain][1::2] == [s.key for s in steps][1::2]  # regime all unchanged
    assert all(s.key != t.key for s, t in zip(plain[::2], steps[::2], strict=True))
    # share_gan off: the keys the GAN cells had before it existed (recipe + seed per cell).
    cfg = StudyConfig.model_validate(config())
    assert [s.settings for s in plain][:2] == [
        {"gan": runner.gan_settings(cfg.gan_config()), "synthesis": runner.synthesis_settings(cfg),
         "seed": 0}] * 2


def test_data_seed_gives_every_seed_the_same_data(tmp_path):
    cfg = StudyConfig.model_validate(config(
        seeds=[0, 1, 2, 3], regimes=[{"name": "1slice", "slices": 1},
                                     {"name": "fixed", "slices": 1, "data_seed": 5}]))
    state = runner.prepare(cfg, tmp_path)
    runner.plan_study(state)
    per_seed = {name: [state.selections[(name, s)].slices for s in cfg.seeds]
                for name in ("1slice", "fixed")}
    assert len({tuple(v) for v in per_seed["1slice"]}) > 1  # each seed draws its own slice
    assert per_seed["fixed"] == [per_seed["fixed"][0]] * 4


def test_share_gan_plans_one_gan_per_regime_with_the_same_data(tmp_path):
    cfg = config(share_gan=True, seeds=[0, 1, 2],
                 regimes=[{"name": "1slice", "slices": 1},
                          {"name": "fixed", "slices": 1, "data_seed": 0},
                          {"name": "all", "slices": "all", "gan_steps": 3}])
    planned = runner.plan_cells(StudyConfig.model_validate(cfg), tmp_path)
    models = [p.cell.spec for p in planned if p.cell.spec.kind == "gan-model"]
    # Planned with the first seed, before that seed's GAN cells that use them.
    assert [m.labels["regime"] for m in models] == ["fixed", "all"]
    order = [(p.cell.spec.kind, p.cell.spec.labels["regime"]) for p in planned]
    assert order.index(("gan-model", "fixed")) == order.index(("gan", "fixed")) - 1
    assert models[1].settings["gan"]["engine"]["steps"] == 3
    assert models[0].settings["gan"]["engine"]["seed"] == 0  # gan.engine.seed, not a study seed
    gans = [p.cell.spec for p in planned if p.cell.spec.kind == "gan"]
    assert len(gans) == 9  # every seed still synthesises its own images
    for regime, model in (("fixed", models[0]), ("all", models[1])):
        mine = [g for g in gans if g.labels["regime"] == regime]
        assert {g.inputs["gan_model"] for g in mine} == {model.key}
        assert [g.settings["seed"] for g in mine] == [0, 1, 2] and len({g.key for g in mine}) == 3
        assert all(g.labels["gan"] == "shared" and "gan" not in g.settings for g in mine)
    own = [g for g in gans if g.labels["regime"] == "1slice"]
    assert all("gan_model" not in g.inputs and "gan" in g.settings for g in own)
    # One seed: nothing to share.
    one = specs({**cfg, "seeds": [0]}, tmp_path / "one", "gan-model")
    assert one == []


@pytest.mark.slow
def test_a_shared_gan_trains_once_and_each_seed_synthesises_its_own(tmp_path, monkeypatch):
    trained = []
    original = emsynth.gan.train.train_gan
    monkeypatch.setattr(emsynth.gan.train, "train_gan",
                        lambda cfg, run_dir, resume=True, volumes=None:
                        trained.append(cfg.engine.seed) or original(cfg, run_dir, resume, volumes))
    cfg = StudyConfig.model_validate(config(
        share_gan=True, regimes=[{"name": "all", "slices": "all"}]))
    study = tmp_path / "study"
    index = runner.run_study(cfg, study)
    assert trained == [cfg.gan.engine.seed]  # one GAN for both seeds, with the GAN's own seed
    assert [c["kind"] for c in index["cells"]][:2] == ["gan-model", "gan"]
    assert index["regimes"][0]["gan_shared"] is True
    (model,) = [c for c in index["cells"] if c["kind"] == "gan-model"]
    gan_cells = [c for c in index["cells"] if c["kind"] == "gan"]
    images = [read_volume(study / "cells" / c["name"] / cells.SYNTHETIC_DIR, "slices").image
              for c in gan_cells]
    assert len(images) == 2 and not np.array_equal(images[0], images[1])  # seeded per seed
    for c in gan_cells:
        result = json.loads((study / "cells" / c["name"] / "result.json").read_text())
        assert result["gan_shared"] == model["name"] and result["gan"]["step"] == 2
        assert not (study / "cells" / c["name"] / cells.GAN_RUN).exists()
    _, _, md_path = build_report(study)
    report = md_path.read_text()
    assert ("GANs: one per regime and seed, except at all, where every seed has the same real "
            "data and the seeds share one GAN") in report
    assert "| all | 0 | shared by the seeds | 2 |" in report
    # A rerun trains nothing; the study folder records the resolved recipe.
    runner.run_study(cfg, study)
    assert trained == [cfg.gan.engine.seed]
    assert "preset" not in yaml.safe_load((study / "study.yaml").read_text())["gan"]


def test_an_export_reruns_a_shared_gan_only_for_an_unfinished_seed(tmp_path, monkeypatch):
    """A study continued from its export (`study export`, then `run --reuse`): the regime's GAN
    is trained again only because a segmenter still to run reads its images, and the re-run
    GAN synthesises the same images (same seed, CPU and versions)."""
    from emsynth.study.export import export_study

    trained = []
    original = emsynth.gan.train.train_gan
    monkeypatch.setattr(emsynth.gan.train, "train_gan",
                        lambda cfg, run_dir, resume=True, volumes=None:
                        trained.append(run_dir) or original(cfg, run_dir, resume, volumes))
    cfg = StudyConfig.model_validate(config(
        share_gan=True, regimes=[{"name": "all", "slices": "all"}]))
    study, export = tmp_path / "study", tmp_path / "export"
    index = runner.run_study(cfg, study)
    assert len(trained) == 1
    summary = export_study(study, export)
    assert summary.cells == summary.planned == len(index["cells"])
    runner.run_study(cfg, tmp_path / "whole", reuse=[export])
    assert len(trained) == 1  # every cell finished in the export: nothing to train

    unfinished = next(c for c in index["cells"] if c["kind"] == "eval"
                      and c["labels"]["seed"] == 1 and c["labels"]["condition"] == "synthetic")
    shutil.rmtree(export / "cells" / unfinished["name"])
    again = tmp_path / "again"
    runner.run_study(cfg, again, reuse=[export])
    assert len(trained) == 2  # the shared GAN, for seed 1's synthetic segmenter
    gan = next(c for c in index["cells"] if c["kind"] == "gan" and c["labels"]["seed"] == 1)
    mine, theirs = (read_volume(folder / "cells" / gan["name"] / cells.SYNTHETIC_DIR,
                                "slices").image for folder in (again, study))
    np.testing.assert_array_equal(mine, theirs)
    seed0 = next(c for c in index["cells"] if c["kind"] == "gan" and c["labels"]["seed"] == 0)
    assert not (again / "cells" / seed0["name"] / cells.SYNTHETIC_DIR).exists()  # not needed
    assert build_report(again)[0].missing == 0
