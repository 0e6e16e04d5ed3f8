"""`emsynth study compare`: two studies with known scores (written here, no training), paired by
regime, condition and seed."""

from __future__ import annotations

import json

import pytest
from scipy import stats
from test_report_render import IOU, write_study
from typer.testing import CliRunner

from emsynth.cli import app
from emsynth.errors import EmsynthError
from emsynth.report import load_results
from emsynth.report.compare import compare_studies
from emsynth.report.stats import holm
from emsynth.study import layout as files

#: Study B: study A's scores plus these per-seed changes.
CHANGE = {("1slice", "synthetic"): [0.20, 0.25, 0.15], ("1slice", "real"): [0.01, -0.01, 0.02]}


def _studies(tmp_path, test_key_b="t", draws_b=None):
    a, b = tmp_path / "a", tmp_path / "b"
    write_study(a)
    write_study(b, {k: [v + d for v, d in zip(vals, CHANGE.get(k, [0.0] * 3))]
                    for k, vals in IOU.items()})
    for folder, key in ((a, "t"), (b, test_key_b)):
        index = json.loads((folder / files.STUDY_JSON).read_text())
        index["test"]["key"] = key
        if folder == b and draws_b is not None:
            index["regimes"][1]["per_seed"]["0"]["slices"] = draws_b
        (folder / files.STUDY_JSON).write_text(json.dumps(index))
    return a, b


def test_recipe_differences_are_paired_over_seeds_with_holm_over_rows(tmp_path):
    a, b = _studies(tmp_path)
    rows, skipped = compare_studies(load_results(a), load_results(b))
    assert skipped == []
    by = {(r.regime, r.condition): r for r in rows}
    assert set(by) == set(IOU)
    synthetic = by[("1slice", "synthetic")]
    assert synthetic.difference.mean == pytest.approx(0.20)
    assert synthetic.a.mean == pytest.approx(sum(IOU[("1slice", "synthetic")]) / 3)
    after = [v + d for v, d in zip(IOU[("1slice", "synthetic")], CHANGE[("1slice", "synthetic")])]
    expected = stats.ttest_rel(after, IOU[("1slice", "synthetic")]).pvalue
    assert synthetic.difference.p == pytest.approx(expected)
    unchanged = by[("all", "real")]
    assert unchanged.difference.mean == pytest.approx(0.0) and unchanged.difference.p == 1.0
    ps = [r.difference.p for r in rows]
    assert [r.p_holm for r in rows] == pytest.approx(holm(ps))
    assert [r.regime for r in rows][:4] == ["1slice"] * 4  # the study's regime order


def test_other_test_volume_is_refused_and_other_draws_are_left_out(tmp_path):
    a, b = _studies(tmp_path / "1", test_key_b="other")
    with pytest.raises(EmsynthError, match="same test volume"):
        compare_studies(load_results(a), load_results(b))
    a, b = _studies(tmp_path / "2", draws_b=[5])
    rows, skipped = compare_studies(load_results(a), load_results(b))
    assert skipped == ["all"] and {r.regime for r in rows} == {"1slice"}


def test_cli_prints_the_paired_table(tmp_path):
    a, b = _studies(tmp_path)
    result = CliRunner().invoke(app, ["study", "compare", str(a), str(b)])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "synthetic " in x and "1slice" in x
                and "real+" not in x)
    assert "+0.200" in line
    result = CliRunner().invoke(app, ["study", "compare", str(a), str(b), "--metric", "x"])
    assert isinstance(result.exception, EmsynthError)
