"""A tiny end-to-end study on phantoms with every stage (GAN, synthesis, three segmenters per
regime and seed, test evaluations) and the cache/resume behaviour around it."""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import yaml
from tiny import unet_micro
from typer.testing import CliRunner

import emsynth.gan.train
from emsynth.cli import app
from emsynth.data.phantom import generate_volume
from emsynth.data.readers import read_volume
from emsynth.data.volume import MEMBRANE, MITO
from emsynth.data.writers import write_slice_folder
from emsynth.study import cells, layout, runner
from emsynth.study.config import StudyConfig
from emsynth.study.data import load_source

ENGINE = {"steps": 3, "precision": "fp32", "device": "cpu", "checkpoint_every": 3,
          "log_every": 1, "val_every": 0, "image_every": 0}


def e2e_config(**changes) -> dict:
    cfg = {
        "name": "e2e",
        # 256 px (the GAN's crop), seed 0: about 10% mitochondria.
        "data": {"phantom": {"domain": "ca1", "slices": 10, "size": 256, "seed": 0}},
        "split": {"val_block": 2, "test_block": 2, "gap": 1},
        "regimes": [{"name": "1slice", "slices": 1}],
        "seeds": [0],
        "num_threads": 1,
        "gan": {"model": {"ngf": 4, "ndf": 4, "n_scales": 1}, "engine": ENGINE},
        "synthesis": {"count": 3, "size": 128, "masks": "real"},
        "mix": {"synthetic_share": 0.5},
        "segment": {
            "engine": ENGINE,
            "sampling": {"patch_size": 64, "batch_size": 2},
            "model": unet_micro(),
            "infer": {"window": 128, "sw_batch_size": 2},
        },
    }
    cfg.update(changes)
    return cfg


@pytest.fixture
def counted(monkeypatch):
    counts = {"gan": 0, "segment": 0, "eval": 0, "gan_volumes": []}
    for kind in ("gan", "segment", "eval"):
        original = getattr(cells, f"run_{kind}")

        def wrapper(*args, _original=original, _kind=kind, **kwargs):
            counts[_kind] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(cells, f"run_{kind}", wrapper)
    train_gan = emsynth.gan.train.train_gan

    def record_gan_data(cfg, run_dir, resume=True, volumes=None):
        counts["gan_volumes"].append(volumes)
        return train_gan(cfg, run_dir, resume, volumes)

    monkeypatch.setattr(emsynth.gan.train, "train_gan", record_gan_data)
    return counts


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path, counted):
    study = tmp_path / "study"
    config = tmp_path / "e2e.yaml"
    config.write_text(yaml.safe_dump(e2e_config()))
    result = CliRunner().invoke(app, ["study", "run", str(config), "-o", str(study)])
    assert result.exit_code == 0, result.output
    assert (counted["gan"], counted["segment"], counted["eval"]) == (1, 3, 3)
    index = json.loads((study / "study.json").read_text())
    assert [c["kind"] for c in index["cells"]] == ["gan"] + ["segment", "eval"] * 3
    assert all(c["done"] for c in index["cells"])

    # The GAN saw exactly the regime's one training slice (image, mito, membranes): no leakage.
    (volumes,) = counted["gan_volumes"]
    (seen,) = volumes
    (z,) = index["regimes"][0]["per_seed"]["0"]["slices"]
    assert z in index["data"]["blocks"]["train"] and len(seen) == 1
    full = load_source(StudyConfig.model_validate(e2e_config()).data).volume
    assert np.array_equal(seen.image[0], full.image[z])
    assert set(seen.labels) == {MITO, MEMBRANE}

    gan_dir = study / "cells" / index["cells"][0]["name"]
    synthetic = read_volume(gan_dir / cells.SYNTHETIC_DIR, "slices")
    assert synthetic.shape == (3, 128, 128) and set(synthetic.labels) == {MITO, MEMBRANE}
    assert synthetic.image.std() > 0
    real_seen = layout.load_preview(gan_dir / layout.REAL_PREVIEW)
    assert np.array_equal(real_seen["image"][0], full.image[z][:256, :256])
    assert set(real_seen) == {"image", MITO, MEMBRANE}
    gan_result = json.loads((gan_dir / "result.json").read_text())
    assert gan_result["gan"]["step"] == 3 and gan_result["synthetic_count"] == 3

    conditions = [c["labels"]["condition"] for c in index["cells"] if c["kind"] == "eval"]
    assert conditions == ["real", "real+synthetic", "synthetic"]
    test = full.select(index["data"]["blocks"]["test"])
    for entry in index["cells"]:
        if entry["kind"] == "eval":
            scores = json.loads((study / "cells" / entry["name"] / "result.json").read_text())
            # Scored on the test block (its mitochondria fraction, one IoU per slice), and the
            # scores are one set of counts. Per test pixel: truth t, prediction p, overlap
            # tp = recall * t; precision = tp / p, IoU = tp / (t + p - tp), Dice = 2 tp / (t + p).
            t = scores["foreground_fraction_truth"]
            p = scores["foreground_fraction_pred"]
            assert t == pytest.approx(test.labels[MITO].mean())
            assert len(scores["per_slice_iou"]) == len(test)
            tp = scores["recall"] * t
            assert scores["precision"] == pytest.approx(tp / p if p else 1.0)
            assert scores["iou"] == pytest.approx(tp / (t + p - tp))
            assert scores["dice"] == pytest.approx(2 * tp / (t + p))
    assert "foreground IoU" in result.output and "1slice" in result.output  # headline table
    assert (study / "report.html").is_file() and (study / "figures" / "data_1slice.png").is_file()
    # The provenance names the machine and the precision each kind of cell resolved to.
    from emsynth.engine.device import choose_precision, cpu_kind

    compute = index["compute"]
    assert compute["cpu"] == cpu_kind()
    gan_precision = choose_precision(e2e_config()["gan"]["engine"]["precision"],
                                     torch.device("cpu")).precision
    assert compute["gan_precision"].startswith(gan_precision)
    report_md = (study / "report.md").read_text()
    assert f"| machine | {cpu_kind()}" in report_md and "precision, segmenter cells" in report_md

    # Re-running trains nothing; a new synthesis setting redoes the GAN cell and everything
    # that used its images, but not the real-only segmenter.
    result = CliRunner().invoke(app, ["study", "run", str(config), "-o", str(study)])
    assert result.exit_code == 0, result.output
    assert (counted["gan"], counted["segment"], counted["eval"]) == (1, 3, 3)
    report_written = (study / "report.md").stat().st_mtime_ns
    result = CliRunner().invoke(app, ["study", "run", str(config), "-o", str(study),
                                      "--set", "synthesis.count=2", "--no-report"])
    assert result.exit_code == 0, result.output
    assert (counted["gan"], counted["segment"], counted["eval"]) == (2, 5, 5)
    assert (study / "report.md").stat().st_mtime_ns == report_written


@pytest.mark.slow
def test_membranes_from_a_model_trained_as_a_cell(tmp_path, counted, monkeypatch):
    """Data without membrane labels: the study trains the membrane model once (a cell), predicts
    membranes of the slices the GAN sees (cached per slice), and reuses both on a re-run."""
    data = generate_volume("ca1", 10, (256, 256), seed=0)
    del data.labels[MEMBRANE]
    write_slice_folder(data, tmp_path / "mito_only")
    membrane_config = tmp_path / "membranes.yaml"
    membrane_config.write_text(yaml.safe_dump({
        "engine": {**ENGINE, "steps": 2},
        "data": {"phantom": {"domain": "vnc", "slices": 4, "size": 128},
                 "train_slices": "0-2", "val_slices": "3", "val_gap": 0},
        "sampling": {"patch_size": 64, "batch_size": 2},
        "model": unet_micro(),
        "infer": {"window": 128, "sw_batch_size": 2},
    }))
    trained = []
    original = cells.train_membrane_model
    monkeypatch.setattr(cells, "train_membrane_model",
                        lambda *a, **k: trained.append(1) or original(*a, **k))
    cfg = StudyConfig.model_validate(e2e_config(
        data={"source": str(tmp_path / "mito_only")}, conditions=["real", "synthetic"],
        membranes={"source": "model", "train_config": str(membrane_config), "threshold": 0.5}))
    study = tmp_path / "study"
    index = runner.run_study(cfg, study)
    assert [c["kind"] for c in index["cells"]][:2] == ["membrane-model", "gan"]
    assert trained == [1] and counted["gan"] == 1
    (z,) = index["regimes"][0]["per_seed"]["0"]["slices"]
    (cache,) = list((study / "cells").glob("membranes-*"))
    png = cache / f"{z:05d}.png"
    assert [p.name for p in cache.iterdir()] == [png.name]
    (volumes,) = counted["gan_volumes"]
    cached = iio.imread(png) > 127
    assert np.array_equal(volumes[0].labels[MEMBRANE][0], cached)
    written = png.stat().st_mtime_ns

    runner.run_study(cfg, study)
    assert trained == [1] and counted["gan"] == 1 and png.stat().st_mtime_ns == written
    # A trained model given by path predicts the same membranes, with no model cell.
    model_dir = study / "cells" / index["cells"][0]["name"] / "run"
    by_path = StudyConfig.model_validate(e2e_config(
        data={"source": str(tmp_path / "mito_only")}, conditions=["real", "synthetic"],
        membranes={"source": "model", "model_dir": str(model_dir), "threshold": 0.5}))
    index = runner.run_study(by_path, tmp_path / "study_by_path")
    assert index["cells"][0]["kind"] == "gan" and trained == [1]
    assert np.array_equal(counted["gan_volumes"][-1][0].labels[MEMBRANE][0], cached)


@pytest.mark.slow
def test_membranes_from_a_precomputed_folder(tmp_path, counted):
    with_membranes = generate_volume("ca1", 10, (256, 256), seed=0)
    write_slice_folder(with_membranes, tmp_path / "membranes")
    mito_only = generate_volume("ca1", 10, (256, 256), seed=0)
    del mito_only.labels[MEMBRANE]
    write_slice_folder(mito_only, tmp_path / "mito_only")
    cfg = StudyConfig.model_validate(e2e_config(
        data={"source": str(tmp_path / "mito_only")}, conditions=["synthetic"],
        membranes={"source": "folder", "folder": str(tmp_path / "membranes")}))
    index = runner.run_study(cfg, tmp_path / "study")
    (z,) = index["regimes"][0]["per_seed"]["0"]["slices"]
    (volumes,) = counted["gan_volumes"]
    assert np.array_equal(volumes[0].labels[MEMBRANE][0], with_membranes.labels[MEMBRANE][z])


@pytest.mark.slow
def test_no_gan_or_segmenter_cell_opens_the_test_block(tmp_path):
    """The same study with GANs (real, real+synthetic, synthetic) on data whose test block is
    poisoned (images inverted, labels flipped) trains the same GAN, synthesises the same
    images and trains the same segmenters with the same thresholds: no GAN, synthesis or
    segmenter cell reads the test slices; only the evaluations do. (Segmenters alone, with
    fit_task: tests/test_study_runner.py.)"""
    from safetensors.torch import load_file

    volume = generate_volume("ca1", 10, (256, 256), seed=0)
    write_slice_folder(volume, tmp_path / "clean")
    test_block = slice(8, 10)  # split 2/2/gap 1 of 10 slices: train 0-3, val 5-6, test 8-9
    volume.image[test_block] = 255 - volume.image[test_block]
    for name in (MITO, MEMBRANE):
        volume.labels[name][test_block] = ~volume.labels[name][test_block]
    write_slice_folder(volume, tmp_path / "poisoned")

    found = []
    for name in ("clean", "poisoned"):
        cfg = StudyConfig.model_validate(e2e_config(data={"source": str(tmp_path / name),
                                                          "layout": "slices"}))
        study = tmp_path / f"study_{name}"
        index = runner.run_study(cfg, study)
        assert index["data"]["blocks"]["test"] == [8, 9]
        cells_dir = study / "cells"
        out = {"scores": [], "weights": {}, "thresholds": {}}
        for entry in index["cells"]:
            folder = cells_dir / entry["name"]
            if entry["kind"] == "gan":
                out["generator"] = load_file(str(folder / "gan" / "generator.safetensors"))
                out["synthetic"] = read_volume(folder / cells.SYNTHETIC_DIR, "slices").image
            elif entry["kind"] == "segment":
                condition = entry["labels"]["condition"]
                out["weights"][condition] = load_file(str(folder / "model" / "model.safetensors"))
                out["thresholds"][condition] = json.loads(
                    (folder / "result.json").read_text())["threshold"]
            else:
                out["scores"].append(json.loads((folder / "result.json").read_text())["iou"])
        found.append(out)
    clean, poisoned = found
    assert clean["scores"] != poisoned["scores"]  # the poison is there, where the evals score
    assert all(torch.equal(clean["generator"][k], poisoned["generator"][k])
               for k in clean["generator"])
    assert np.array_equal(clean["synthetic"], poisoned["synthetic"])
    assert set(clean["weights"]) == {"real", "real+synthetic", "synthetic"}
    for condition, weights in clean["weights"].items():
        assert all(torch.equal(weights[k], poisoned["weights"][condition][k]) for k in weights)
    assert clean["thresholds"] == poisoned["thresholds"]
