"""The study report on a study folder with known scores (written here, no training): paired
t-test p and Holm-adjusted p for every comparison, how many comparisons were made, steps per
segmenter, and one figure per mask layout from the GAN cells' previews."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from emsynth.report import build_report
from emsynth.report.stats import holm
from emsynth.study import layout as files

SEEDS = [0, 1, 2]
#: Test IoU per (regime, condition) and seed.
IOU = {
    ("1slice", "real"): [0.60, 0.62, 0.64],
    ("1slice", "real+synthetic"): [0.65, 0.66, 0.70],
    ("1slice", "synthetic"): [0.50, 0.55, 0.50],
    ("1slice", "real+synthetic [remodel/add 0.25]"): [0.61, 0.64, 0.63],
    ("all", "real"): [0.80, 0.81, 0.79],
    ("all", "real+synthetic"): [0.79, 0.81, 0.77],
    ("all", "synthetic"): [0.70, 0.72, 0.69],
}


def _cell(study: Path, name: str, kind: str, labels: dict, result: dict | None) -> dict:
    folder = study / files.CELLS_DIR / name
    folder.mkdir(parents=True)
    if result is not None:
        (folder / files.RESULT).write_text(json.dumps(result))
        (folder / files.DONE).write_text(json.dumps({"key": name}))
    return {"name": name, "kind": kind, "key": name, "labels": labels, "done": True}


def _preview(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"image": rng.integers(0, 255, (2, 32, 32), dtype=np.uint8),
            "mito": rng.random((2, 32, 32)) > 0.8, "membrane": rng.random((2, 32, 32)) > 0.7}


def write_study(study: Path) -> None:
    """A finished 2-regime x 3-condition x 3-seed study with one ablation variant at 1slice:
    eval cells with the IoU above, segment cells with their steps, and per regime and seed a
    GAN cell that synthesised the main layout (remodel) and, at 1slice, also deformed."""
    rng = np.random.default_rng(0)
    cells = []
    for seed in SEEDS:
        for regime in ("1slice", "all"):
            layouts = ["remodel", "deformed"] if regime == "1slice" else ["remodel"]
            result = {"gan": {"step": 50, "elapsed_s": 3.0}, "synthetic_count": 2,
                      "synthetic_size": [32, 32], "mask_source": "remodel masks",
                      "mito_fraction_real": 0.1, "mito_fraction_synthetic": 0.1,
                      "mean_intensity_real": 120.0, "mean_intensity_synthetic": 118.0}
            if len(layouts) > 1:
                result["layouts"] = {name: {"mask_source": f"{name} masks"} for name in layouts}
            name = f"gan-{regime}-{seed}"
            cells.append(_cell(study, name, "gan", {"regime": regime, "seed": seed}, result))
            for layout in layouts:
                files.save_preview(study / files.CELLS_DIR / name /
                                   files.layout_preview(layout, "remodel"), **_preview(rng))
    for (regime, condition), values in IOU.items():
        plain, _, variant = condition.partition(" [")
        for seed, iou in zip(SEEDS, values):
            labels = {"regime": regime, "seed": seed, "condition": plain}
            if variant:
                labels["variant"] = variant.rstrip("]")
            key = f"{regime}-{condition}-{seed}".replace(" ", "_").replace("/", "_")
            steps = 400 if regime == "1slice" else 800
            planned = steps * 2 if plain == "real+synthetic" and not variant else steps
            segment = {"steps": planned - (seed == 2 and regime == "all"),
                       "steps_planned": planned, "real_crops": steps * 8,
                       "stop_reason": "time" if seed == 2 and regime == "all" else "steps"}
            cells.append(_cell(study, f"segment-{key}", "segment", labels, segment))
            cells.append(_cell(study, f"eval-{key}", "eval", labels,
                               {"iou": iou, "dice": 2 * iou / (1 + iou)}))
    per_seed = {str(s): {"slices": [3], "corners": None, "crop": None, "pixels": 64 * 64}
                for s in SEEDS}
    index = {
        "format": files.FORMAT, "name": "known", "status": "finished",
        "started_at": "t0", "updated_at": "t1",
        "config": {"regimes": [{"name": "1slice"}, {"name": "all"}],
                   "conditions": ["real", "real+synthetic", "synthetic"], "seeds": SEEDS,
                   "synthesis": {"count": 2, "masks": "remodel"},
                   "mix": {"synthetic_share": 0.5}},
        "data": {"description": "phantom", "blocks": {"train": [0, 1], "val": [7], "test": [9]}},
        "test": {"description": "test block", "slices": 1},
        "regimes": [{"name": r, "slices": n, "crop": None,
                     "per_seed": {**per_seed} if r == "1slice" else
                     {s: {**v, "pixels": 4 * 64 * 64} for s, v in per_seed.items()}}
                    for r, n in (("1slice", 1), ("all", 4))],
        "cells": cells,
    }
    (study / files.STUDY_JSON).write_text(json.dumps(index))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    study = tmp_path_factory.mktemp("known")
    write_study(study)
    results, _, md_path = build_report(study)
    return study, results, md_path.read_text()


def test_every_comparison_has_its_p_and_holm_p(report):
    _, results, md = report
    iou = {key: dict(zip(SEEDS, v)) for key, v in IOU.items()}
    compared = [("1slice", "real+synthetic"), ("1slice", "synthetic"), ("all", "real+synthetic"),
                ("all", "synthetic"), ("1slice", "real+synthetic [remodel/add 0.25]")]
    raw = [stats.ttest_rel(list(iou[key].values()), list(iou[(key[0], "real")].values())).pvalue
           for key in compared]
    comparisons = results.comparisons("iou")
    assert [(k[0], k[1]) for k in comparisons] == compared  # main grid, then the ablation
    for key, p, adjusted in zip(compared, raw, holm(raw)):
        c = comparisons[(*key, "real")]
        assert c.difference.p == pytest.approx(p) and c.p_holm == pytest.approx(adjusted)
    # By hand: the smallest p (all, synthetic: differences -0.10, -0.09, -0.10) is multiplied
    # by all 5 comparisons, the next (1slice, real+synthetic: differences 0.05, 0.04, 0.06, p
    # 0.0131) by 4: Holm p 0.052, no longer below 0.05 although its interval excludes 0.
    loss = comparisons[("all", "synthetic", "real")]
    gain = comparisons[("1slice", "real+synthetic", "real")]
    assert sorted(raw)[:2] == [loss.difference.p, gain.difference.p]
    assert loss.p_holm == pytest.approx(5 * loss.difference.p)
    assert gain.difference.p == pytest.approx(0.013072, abs=1e-6)
    assert gain.p_holm == pytest.approx(4 * 0.013072, abs=1e-5)
    assert "+0.050 [+0.025, +0.075] (n=3) *; p 0.013, Holm p 0.052" in md
    assert ("5 paired comparisons of test foreground IoU (4 in the main table, 1 in the "
            "ablation); p-values (two-sided paired t-test over seeds) of all 5, Holm-adjusted "
            "across those 5.") in md
    ablation = md[md.index("### Ablation"):]
    variant = comparisons[("1slice", "real+synthetic [remodel/add 0.25]", "real")]
    assert (f"| 1slice | remodel/add 0.25 | 0.627 ± 0.038 (n=3) | +0.007 [-0.031, +0.045] "
            f"(n=3) | {variant.difference.p:.3f} | {variant.p_holm:.3f} |") in ablation
    # The main recipe's row is the main table's comparison, not a sixth one.
    assert "| 1slice | real+synthetic (main recipe) | 0.670 ± 0.066 (n=3) | +0.050" in ablation
    assert "p 0.013" not in md[md.index("### Test foreground Dice"):md.index("### Per-seed")]


def test_steps_per_segmenter(report):
    _, _, md = report
    table = md[md.index("### Segmenter training steps"):]
    assert "| 1slice | real | 3 | 400 | 400 |  | 3,200 | steps |" in table
    assert "| 1slice | real+synthetic | 3 | 800 | 800 |  | 3,200 | steps |" in table
    assert "| 1slice | real+synthetic [remodel/add 0.25] | 3 | 400 | 400 |" in table
    assert "| all | real | 3 | 799–800 | 800 |  | 6,400 | steps, time |" in table


def test_one_figure_per_mask_layout(report):
    study, _, md = report
    for layout in ("remodel", "deformed"):
        assert (study / "figures" / f"layout_{layout}.png").stat().st_size > 1000
        assert f"![Mask layout {layout}: synthetic images (seed 0)](figures/layout_{layout}.png)" \
            in md
    assert "Masks: deformed masks." in md
    assert not (study / "figures" / "layout_procedural.png").exists()
    assert (study / "figures" / "iou_vs_regime.png").is_file()  # IoU vs annotated px, CIs
    html = (study / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(list((study / "figures").glob("*.png")))
