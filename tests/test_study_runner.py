"""The study runner on a tiny phantom study (real-data condition only, so no GAN): planning,
skipping finished cells, losing only the cell in flight on a crash, a new test set re-running
only the evaluations, and the report it feeds."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from tiny import unet_micro
from typer.testing import CliRunner

from emsynth.cli import app
from emsynth.config import load_config
from emsynth.data.phantom import generate_volume
from emsynth.data.volume import MEMBRANE, MITO
from emsynth.data.writers import write_slice_folder
from emsynth.errors import EmsynthError
from emsynth.report import build_report
from emsynth.report.stats import summarize
from emsynth.segment.infer import predict_with
from emsynth.segment.model import Segmenter
from emsynth.segment.threshold import choose_threshold
from emsynth.study import cells, runner
from emsynth.study.config import StudyConfig
from emsynth.study.data import load_source

TINY_ENGINE = {"steps": 4, "precision": "fp32", "device": "cpu", "checkpoint_every": 2,
               "log_every": 2, "val_every": 0, "image_every": 0}


def tiny_config(**changes) -> dict:
    cfg = {
        "name": "tiny",
        # 128 px, seed 3: about 11% mitochondria (small phantoms can hold none at all)
        "data": {"phantom": {"domain": "ca1", "slices": 12, "size": 128, "seed": 3}},
        "split": {"val_block": 2, "test_block": 2, "gap": 1},
        "regimes": [{"name": "crop32", "slices": 1, "crop": 32}, {"name": "2slices", "slices": 2}],
        "seeds": [0, 1],
        "num_threads": 1,
        "conditions": ["real"],
        "segment": {
            "engine": TINY_ENGINE,
            "sampling": {"patch_size": 32, "batch_size": 2},
            "model": unet_micro(),
            "infer": {"window": 64, "sw_batch_size": 2},
        },
    }
    cfg.update(changes)
    return cfg


def write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def calls(monkeypatch):
    """Count the segmenter trainings and evaluations the runner starts."""
    counts = {"segment": 0, "eval": 0}
    original_segment, original_eval = cells.run_segment, cells.run_eval

    def run_segment(*args, **kwargs):
        counts["segment"] += 1
        return original_segment(*args, **kwargs)

    def run_eval(*args, **kwargs):
        counts["eval"] += 1
        return original_eval(*args, **kwargs)

    monkeypatch.setattr(cells, "run_segment", run_segment)
    monkeypatch.setattr(cells, "run_eval", run_eval)
    return counts


def test_run_skip_and_report(tmp_path, calls):
    cfg = StudyConfig.model_validate(tiny_config())
    study = tmp_path / "study"
    index = runner.run_study(cfg, study)
    assert calls == {"segment": 4, "eval": 4}  # 2 regimes x 2 seeds x 1 condition
    assert index["status"] == "finished"
    assert [c["kind"] for c in index["cells"]] == ["segment", "eval"] * 4
    assert all(c["done"] for c in index["cells"])
    blocks = index["data"]["blocks"]
    assert blocks == {"train": list(range(6)), "val": [7, 8], "test": [10, 11]}
    crop = index["regimes"][0]["per_seed"]
    assert crop["0"]["crop"] == 32 and crop["0"]["slices"][0] in blocks["train"]
    assert crop["0"] != crop["1"]  # the seed re-draws the slice and the crop
    assert index["regimes"][1]["per_seed"]["0"]["pixels"] == 2 * 128 * 128

    # Provenance of every cell: config, seed, versions, git, timing.
    for entry in index["cells"]:
        record = json.loads((study / "cells" / entry["name"] / "cell.json").read_text())
        assert record["status"] == "done" and record["duration_s"] > 0
        assert record["versions"]["torch"] and "commit" in record["git"]
        assert record["labels"]["seed"] in (0, 1)
    first = study / "cells" / index["cells"][0]["name"]
    assert (first / "model" / "model.safetensors").is_file()
    assert not (first / "run" / "checkpoints").exists()  # dropped once the cell is done
    segment = json.loads((first / "result.json").read_text())
    assert segment["steps"] == 4
    # The threshold is the rule's choice on the exported model's validation-block
    # probabilities; the model carries it, and the cell's evaluation scores with it.
    model = Segmenter.load(first / "model")
    val = load_source(cfg.data).volume.select(blocks["val"])
    choice = choose_threshold(predict_with(model, val.image, precision="fp32"), val.labels[MITO])
    assert segment["threshold"] == model.threshold == pytest.approx(choice.threshold)
    assert segment["threshold_rule"] == choice.reason
    assert index["cells"][1]["kind"] == "eval"
    evaluation = json.loads((study / "cells" / index["cells"][1]["name"] / "result.json")
                            .read_text())
    assert evaluation["threshold"] == segment["threshold"]

    # A second run trains and evaluates nothing and leaves the results untouched.
    results_before = {p: p.read_text() for p in study.glob("cells/*/result.json")}
    runner.run_study(cfg, study)
    assert calls == {"segment": 4, "eval": 4}
    assert {p: p.read_text() for p in study.glob("cells/*/result.json")} == results_before

    results, html_path, md_path = build_report(study)
    assert results.missing == 0
    for regime in ("crop32", "2slices"):
        iou = results.scores["iou"][(regime, "real")]
        assert sorted(iou) == [0, 1]
        expected = summarize([iou[0], iou[1]])
        assert expected.text() in md_path.read_text()
    html = html_path.read_text()
    sources = re.findall(r"""src=['"]([^'"]*)['"]""", html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in html and "http://" not in html and "https://" not in html
    assert (study / "figures" / "iou_vs_regime.png").is_file()
    assert (study / "figures" / "test_predictions.png").is_file()
    assert (study / "figures" / "data_crop32.png").is_file()
    assert "figures/iou_vs_regime.png" in md_path.read_text()


def test_crash_loses_only_the_cell_in_flight(tmp_path, calls, monkeypatch):
    cfg = StudyConfig.model_validate(tiny_config())
    study = tmp_path / "study"
    working = cells.run_segment

    def crash_on_third(*args, **kwargs):
        if calls["segment"] == 2:  # two trainings done: the third one crashes
            raise RuntimeError("simulated crash")
        return working(*args, **kwargs)

    monkeypatch.setattr(cells, "run_segment", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        runner.run_study(cfg, study)
    assert calls == {"segment": 2, "eval": 2}
    index = json.loads((study / "study.json").read_text())
    assert index["status"] == "failed"
    # Regime by regime: both seeds of the first regime, then the crash in the second.
    done = [c["done"] for c in index["cells"]]  # planned seed by seed
    assert done == [True, True, False, False, True, True, False, False]
    crashed = study / "cells" / index["cells"][2]["name"] / "cell.json"
    failed = json.loads(crashed.read_text())
    assert failed["status"] == "failed" and "simulated crash" in failed["error"]

    monkeypatch.setattr(cells, "run_segment", working)
    runner.run_study(cfg, study)
    # Only the crashed cell and the ones after it ran.
    assert calls == {"segment": 2 + 2, "eval": 2 + 2}
    failed_again = json.loads(crashed.read_text())
    assert failed_again["status"] == "done" and failed_again["attempts"] == 2


def test_other_test_set_reruns_only_evaluations(tmp_path, calls):
    study = tmp_path / "study"
    runner.run_study(StudyConfig.model_validate(tiny_config(seeds=[0])), study)
    assert calls == {"segment": 2, "eval": 2}
    other = tiny_config(seeds=[0], test={"phantom": {"domain": "ca1", "slices": 3,
                                                     "size": 128, "seed": 1}})
    index = runner.run_study(StudyConfig.model_validate(other), study)
    assert calls == {"segment": 2, "eval": 4}
    assert index["test"]["slices"] == 3 and "seed 1" in index["test"]["description"]
    # A changed training setting re-runs the segmenters (and their evaluations) too.
    longer = tiny_config(seeds=[0])
    longer["segment"]["engine"] = {**TINY_ENGINE, "steps": 5}
    runner.run_study(StudyConfig.model_validate(longer), study)
    assert calls == {"segment": 4, "eval": 6}


def test_no_resume_redoes_cells(tmp_path, calls):
    cfg = StudyConfig.model_validate(tiny_config(seeds=[0], regimes=[
        {"name": "1slice", "slices": 1}]))
    runner.run_study(cfg, tmp_path)
    runner.run_study(cfg, tmp_path, resume=False)
    assert calls == {"segment": 2, "eval": 2}


def test_a_signal_stop_leaves_the_cell_unfinished(tmp_path, calls, monkeypatch):
    cfg = StudyConfig.model_validate(tiny_config(seeds=[0], regimes=[
        {"name": "1slice", "slices": 1}]))
    from emsynth.segment import train as segment_train  # the engine call inside fit_task

    real_train = segment_train.train

    def stopped_by_sigterm(*args, **kwargs):
        return {**real_train(*args, **kwargs), "stop_reason": "signal:SIGTERM"}

    monkeypatch.setattr(segment_train, "train", stopped_by_sigterm)
    with pytest.raises(cells.StudyInterrupted, match="rerun the same command") as caught:
        runner.run_study(cfg, tmp_path)
    assert caught.value.exit_code == 130
    index = json.loads((tmp_path / "study.json").read_text())
    assert index["status"] == "failed" and not any(c["done"] for c in index["cells"])
    monkeypatch.setattr(segment_train, "train", real_train)
    index = runner.run_study(cfg, tmp_path)
    assert all(c["done"] for c in index["cells"]) and calls["segment"] == 2


def test_config_errors(tmp_path):
    with pytest.raises(EmsynthError, match="smaller than the GAN"):
        load_config(StudyConfig, write_config(tmp_path, tiny_config(
            conditions=["real", "synthetic"])))
    with pytest.raises(EmsynthError, match="regime names"):
        load_config(StudyConfig, write_config(tmp_path, tiny_config(
            regimes=[{"name": "a", "slices": 1}, {"name": "a", "slices": 2}])))
    with pytest.raises(EmsynthError, match="segment.data"):
        bad = tiny_config()
        bad["segment"]["data"] = {"val_block": 3}
        load_config(StudyConfig, write_config(tmp_path, bad))
    with pytest.raises(EmsynthError, match="training block has 6"):
        runner.run_study(StudyConfig.model_validate(tiny_config(
            regimes=[{"name": "many", "slices": 7}])), tmp_path / "s")
    with pytest.raises(EmsynthError, match="unknown phantom domain 'mouse'"):
        load_config(StudyConfig, write_config(tmp_path, tiny_config(
            data={"phantom": {"domain": "mouse"}})))
    mito_only = generate_volume("ca1", 12, (128, 128), seed=3)
    del mito_only.labels[MEMBRANE]
    write_slice_folder(mito_only, tmp_path / "mito_only")
    with pytest.raises(EmsynthError, match="no membrane labels"):
        runner.run_study(StudyConfig.model_validate(tiny_config(
            data={"source": str(tmp_path / "mito_only")}, conditions=["real", "synthetic"],
            regimes=[{"name": "1slice", "slices": 1}])),
            tmp_path / "s")


def test_missing_source_is_a_one_line_error(tmp_path):
    path = write_config(tmp_path, tiny_config(data={"source": "no/such/folder"}))
    result = CliRunner().invoke(app, ["study", "run", str(path), "-o", str(tmp_path / "s")])
    assert isinstance(result.exception, EmsynthError)
    assert "no/such/folder" in str(result.exception) and "Fix:" in str(result.exception)


def test_report_of_a_folder_without_study(tmp_path):
    with pytest.raises(EmsynthError, match="study.json"):
        build_report(tmp_path)


def test_cli_test_data_scores_on_another_volume(tmp_path, calls):
    other = generate_volume("ca1", 3, (128, 128), seed=1)
    del other.labels[MEMBRANE]
    write_slice_folder(other, tmp_path / "other")
    config = write_config(tmp_path, tiny_config(seeds=[0], regimes=[
        {"name": "1slice", "slices": 1}]))
    study = tmp_path / "study"
    args = ["study", "run", str(config), "-o", str(study), "--no-report"]
    assert CliRunner().invoke(app, args).exit_code == 0
    result = CliRunner().invoke(app, [*args, "--test-data", str(tmp_path / "other"),
                                      "--test-layout", "slices"])
    assert result.exit_code == 0, result.output
    assert calls == {"segment": 1, "eval": 2}  # the same segmenter, scored on a new volume
    index = json.loads((study / "study.json").read_text())
    assert str(tmp_path / "other") in index["test"]["description"]
    assert index["test"]["slices"] == 3
    assert index["config"]["test"]["layout"] == "slices"


def test_crash_inside_training_resumes_the_cell_from_its_checkpoint(tmp_path, monkeypatch):
    from emsynth.segment.task import SegmentTask

    cfg = StudyConfig.model_validate(tiny_config(seeds=[0], regimes=[
        {"name": "1slice", "slices": 1}]))
    real_step = SegmentTask.train_step
    steps = []

    def crash_at_step_3(self, batch, ctx):
        steps.append(1)
        if len(steps) == 3:  # the checkpoint of step 2 is on disk
            raise RuntimeError("power cut")
        return real_step(self, batch, ctx)

    monkeypatch.setattr(SegmentTask, "train_step", crash_at_step_3)
    with pytest.raises(RuntimeError, match="power cut"):
        runner.run_study(cfg, tmp_path)
    index = runner.run_study(cfg, tmp_path)
    segment_dir = tmp_path / "cells" / index["cells"][0]["name"]
    run = json.loads((segment_dir / "run" / "run.json").read_text())
    assert run["resumed_from"].endswith("step_00000002.pt") and run["start_step"] == 2
    assert json.loads((segment_dir / "result.json").read_text())["steps"] == 4
    assert len(steps) == 3 + 2  # two steps before the crash, then only steps 3 and 4


def test_a_segmenter_cell_goes_through_fit_task_and_never_opens_the_test_block(
        tmp_path, monkeypatch):
    """The same study on data whose test block is poisoned (images inverted, labels
    swapped) trains identical segmenters: neither training nor the threshold choice reads
    the test slices. Every study segmenter is trained and exported by segment.train.fit_task."""
    import torch
    from safetensors.torch import load_file

    from emsynth.segment import train as segment_train

    fitted = []

    def spy(task, run_dir, *args, **kwargs):
        fitted.append(Path(run_dir))
        return segment_train.fit_task(task, run_dir, *args, **kwargs)

    monkeypatch.setattr(cells, "fit_task", spy)
    volume = generate_volume("ca1", 12, (128, 128), seed=3)
    del volume.labels[MEMBRANE]
    write_slice_folder(volume, tmp_path / "clean")
    test_block = slice(10, 12)  # split 2/2/gap 1 of 12 slices: train 0-5, val 7-8, test 10-11
    volume.image[test_block] = 255 - volume.image[test_block]
    volume.labels["mito"][test_block] = ~volume.labels["mito"][test_block]
    write_slice_folder(volume, tmp_path / "poisoned")

    weights, thresholds, scores = [], [], []
    for name in ("clean", "poisoned"):
        data = {"source": str(tmp_path / name), "layout": "slices"}
        cfg = StudyConfig.model_validate(tiny_config(data=data, seeds=[0], regimes=[
            {"name": "2slices", "slices": 2}]))
        index = runner.run_study(cfg, tmp_path / f"study_{name}")
        assert index["data"]["blocks"]["test"] == [10, 11]
        segment = next(c for c in index["cells"] if c["kind"] == "segment")
        cell_dir = tmp_path / f"study_{name}" / "cells" / segment["name"]
        assert fitted[-1] == cell_dir / cells.SEGMENT_RUN
        weights.append(load_file(str(cell_dir / "model" / "model.safetensors")))
        thresholds.append(json.loads((cell_dir / "result.json").read_text())["threshold"])
        evaluation = next(c for c in index["cells"] if c["kind"] == "eval")
        scores.append(json.loads((tmp_path / f"study_{name}" / "cells" / evaluation["name"]
                                  / "result.json").read_text())["iou"])
    assert len(fitted) == 2
    assert scores[0] != scores[1]  # the poison is there, in the test block the evals score
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert thresholds[0] == thresholds[1]


def test_a_cell_held_by_another_process_is_skipped_then_waited_for(tmp_path, calls, monkeypatch):
    """Cells another process holds are left to it: this process runs every other ready cell,
    waits, and takes the held cell over once its holder is gone."""
    import socket
    import subprocess
    import sys
    import threading
    import time

    cfg = StudyConfig.model_validate(tiny_config(seeds=[0]))
    study = tmp_path / "study"
    planned = runner.plan_cells(cfg, study)
    held = planned[0].cell  # crop32's segmenter; its evaluation waits on it
    held.dir.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    held.lock_path.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
    monkeypatch.setattr(runner, "POLL_S", 0.05)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(index=runner.run_study(cfg, study)))
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not planned[3].cell.done and time.monotonic() < deadline:  # 2slices' evaluation
            time.sleep(0.1)
        assert planned[3].cell.done and planned[2].cell.done
        assert not held.done and not planned[1].cell.done and thread.is_alive()
        assert calls == {"segment": 1, "eval": 1}
    finally:
        sleeper.kill()  # the holder dies: its lock goes stale
        sleeper.wait()
    thread.join(120)
    assert outcome["index"]["status"] == "finished"
    assert calls == {"segment": 2, "eval": 2}
    assert held.record()["attempts"] == 1 and not held.lock_path.exists()


def test_cli_workers_share_one_study(tmp_path):
    """`study run --workers 2`: a helper process takes cells beside this one; every cell runs
    exactly once and the index ends finished."""
    config = write_config(tmp_path, tiny_config())
    study = tmp_path / "study"
    result = CliRunner().invoke(app, ["study", "run", str(config), "-o", str(study),
                                      "--workers", "2", "--no-report"])
    assert result.exit_code == 0, result.output
    index = json.loads((study / "study.json").read_text())
    assert index["status"] == "finished" and all(c["done"] for c in index["cells"])
    records = [json.loads((study / "cells" / c["name"] / "cell.json").read_text())
               for c in index["cells"]]
    assert all(r["attempts"] == 1 for r in records)
    assert not list(study.glob("cells/*/lock.json"))
    assert (study / "logs" / "worker-2.log").is_file()
    assert "2 workers x 1 torch thread(s)" in result.output


def test_a_regime_with_real_only_plans_no_gan(tmp_path):
    """regimes[].conditions: a reference regime trains real-only segmenters and no GAN, while
    the others keep every condition."""
    data = tiny_config(conditions=["real", "synthetic"], seeds=[0])
    data["regimes"] = [{"name": "1slice", "slices": 1},
                       {"name": "all", "slices": "all", "conditions": ["real"]}]
    cfg = StudyConfig.model_validate(data)
    planned = runner.plan_cells(cfg, tmp_path / "study")
    by_regime = {}
    for item in planned:
        spec = item.cell.spec
        by_regime.setdefault(spec.labels["regime"], []).append(
            (spec.kind, spec.labels.get("condition")))
    assert by_regime["1slice"] == [("gan", None), ("segment", "real"), ("eval", "real"),
                                   ("segment", "synthetic"), ("eval", "synthetic")]
    assert by_regime["all"] == [("segment", "real"), ("eval", "real")]
    # The real-only cells of 1slice are the same cells with or without the reference regime.
    alone = StudyConfig.model_validate({**data, "regimes": data["regimes"][:1]})
    keys = {p.cell.spec.key for p in runner.plan_cells(alone, tmp_path / "other")}
    assert keys <= {p.cell.spec.key for p in planned}

    data["regimes"][1]["conditions"] = ["real+synthetic"]
    with pytest.raises(ValueError, match="'all' lists condition 'real\\+synthetic'"):
        StudyConfig.model_validate(data)


def test_regime_seeds_are_a_subset_of_the_studys(tmp_path):
    data = tiny_config(seeds=[0, 1, 2])
    data["regimes"][1]["seeds"] = [0, 2]
    cfg = StudyConfig.model_validate(data)
    planned = runner.plan_cells(cfg, tmp_path / "study")
    seeds = {}
    for item in planned:
        seeds.setdefault(item.cell.spec.labels["regime"], set()).add(item.cell.spec.labels["seed"])
    assert seeds == {"crop32": {0, 1, 2}, "2slices": {0, 2}}
    data["regimes"][1]["seeds"] = [3]
    with pytest.raises(ValueError, match="'2slices' lists seed 3"):
        StudyConfig.model_validate(data)


def test_kinds_runs_only_those_cells(tmp_path, calls):
    cfg = StudyConfig.model_validate(tiny_config(seeds=[0]))
    study = tmp_path / "study"
    index = runner.run_study(cfg, study, kinds=["segment"])
    assert calls == {"segment": 2, "eval": 0} and index["status"] == "running"
    assert [c["done"] for c in index["cells"]] == [True, False, True, False]
    with pytest.raises(EmsynthError, match="--kinds evaluation: no such kind"):
        runner.run_study(cfg, study, kinds=["evaluation"])
    assert runner.run_study(cfg, study)["status"] == "finished"
    assert calls == {"segment": 2, "eval": 2}


def test_reuse_copies_finished_cells_of_another_study(tmp_path, calls):
    """--reuse: cells another study finished with the same key are copied, not run; the rest
    (here the second seed) run as usual."""
    first = tmp_path / "first"
    runner.run_study(StudyConfig.model_validate(tiny_config(seeds=[0])), first)
    assert calls == {"segment": 2, "eval": 2}
    second = tmp_path / "second"
    index = runner.run_study(StudyConfig.model_validate(tiny_config(seeds=[0, 1])), second,
                             reuse=[first])
    assert calls == {"segment": 4, "eval": 4}  # seed 1 only
    assert index["status"] == "finished"
    for entry in index["cells"]:
        record = json.loads((second / "cells" / entry["name"] / "cell.json").read_text())
        theirs = first / "cells" / entry["name"]
        assert ("adopted_from" in record) == (entry["labels"]["seed"] == 0)
        if entry["labels"]["seed"] == 0:
            assert record["adopted_from"] == str(theirs)
            assert (second / "cells" / entry["name"] / "result.json").read_text() == \
                (theirs / "result.json").read_text()


def test_an_export_carries_a_study_to_a_folder_without_its_models(tmp_path, calls):
    """`study export` keeps records, results and the report's previews, not models; --reuse
    of the export counts its cells as finished, and re-runs a segmenter only where a cell still
    to run (an evaluation missing from the export, or one on a new test set) needs its model."""
    cfg = StudyConfig.model_validate(tiny_config())
    study, export = tmp_path / "study", tmp_path / "results" / "study"
    runner.run_study(cfg, study)
    assert calls == {"segment": 4, "eval": 4}
    result = CliRunner().invoke(app, ["study", "export", str(study), "-o", str(export),
                                      "--previews"])
    assert result.exit_code == 0, result.output
    assert "exported 8 of 8 cells" in result.output
    assert not list(export.rglob("*.safetensors")) and not list(export.glob("cells/*/*/"))
    first_seed_evals = [c for c in json.loads((study / "study.json").read_text())["cells"]
                        if c["kind"] == "eval"]
    previews = sorted(p.parent.name for p in export.glob("cells/*/preview.npz"))
    assert previews == sorted(c["name"] for c in first_seed_evals if c["labels"]["seed"] == 0)

    # Everything in the export: nothing runs, the results are the study's own.
    whole = tmp_path / "whole"
    assert runner.run_study(cfg, whole, reuse=[export])["status"] == "finished"
    assert calls == {"segment": 4, "eval": 4}
    for mine in whole.glob("cells/*/result.json"):
        assert mine.read_text() == (study / "cells" / mine.parent.name / "result.json").read_text()
        record = json.loads((mine.parent / "cell.json").read_text())
        assert record["artifacts"] is False and record["adopted_from"].startswith(str(export))
    assert build_report(whole)[0].missing == 0

    # One evaluation missing from the export: its segmenter is trained again (the same result:
    # same seed, CPU and versions), the other cells come from the export.
    index = json.loads((study / "study.json").read_text())
    seg, ev = index["cells"][2], index["cells"][3]
    shutil.rmtree(export / "cells" / ev["name"])
    partial = tmp_path / "partial"
    runner.run_study(cfg, partial, reuse=[export])
    assert calls == {"segment": 5, "eval": 5}
    for name in (seg["name"], ev["name"]):
        theirs = json.loads((study / "cells" / name / "result.json").read_text())
        mine = json.loads((partial / "cells" / name / "result.json").read_text())
        assert mine["threshold"] == theirs["threshold"]
        assert "artifacts" not in json.loads((partial / "cells" / name / "cell.json").read_text())
    assert (partial / "cells" / seg["name"] / "model" / "model.safetensors").is_file()

    # A new test set after the export was taken back: every segmenter's model is needed again.
    other = tiny_config(test={"phantom": {"domain": "ca1", "slices": 3, "size": 128, "seed": 1}})
    runner.run_study(StudyConfig.model_validate(other), whole, reuse=[export])
    assert calls == {"segment": 9, "eval": 9}


def test_export_of_a_folder_without_study_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from emsynth.cli import main

    monkeypatch.setattr(sys, "argv", ["emsynth", "study", "export", str(tmp_path), "-o",
                                      str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no readable study.json" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
