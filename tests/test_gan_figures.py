"""The GAN comparison figure: masks | real | synthetic columns, one per generator."""

from __future__ import annotations

import shutil

import imageio.v3 as iio
import numpy as np
from tiny import GAN_TINY, GAN_TRAIN_ONLY
from typer.testing import CliRunner

from emsynth.cli import app
from emsynth.config import load_config
from emsynth.data.figures import OVERLAY_COLOURS
from emsynth.data.phantom import generate_volume
from emsynth.data.volume import MEMBRANE, MITO
from emsynth.data.writers import write_slice_folder
from emsynth.gan import figures
from emsynth.gan.config import GanConfig
from emsynth.gan.figures import mask_rgb
from emsynth.gan.train import train_gan


def test_mask_rgb_draws_mitochondria_over_membranes():
    membrane = np.zeros((4, 4), bool)
    membrane[:, 0] = True
    mito = np.zeros((4, 4), bool)
    mito[0, :] = True
    rgb = mask_rgb({MEMBRANE: membrane, MITO: mito})
    np.testing.assert_allclose(rgb[0, 0], OVERLAY_COLOURS[MITO][1])  # both: mito on top
    np.testing.assert_allclose(rgb[3, 0], OVERLAY_COLOURS[MEMBRANE][1])
    np.testing.assert_allclose(rgb[3, 3], 0.0)


def test_figure_cli_puts_one_column_per_generator(tmp_path, monkeypatch):
    volume = generate_volume("vnc", 3, (256, 256), seed=5)
    write_slice_folder(volume, tmp_path / "data")
    runs = {}
    for name, channels in (("both", "[mito,membrane]"), ("mito", "[mito]")):
        cfg = load_config(GanConfig, GAN_TINY, [
            "engine.steps=2", *GAN_TRAIN_ONLY, "engine.device=cpu", f"data.channels={channels}",
        ])
        runs[name] = tmp_path / name
        train_gan(cfg, runs[name], resume=False, volumes=[volume])

    widths = {}
    for case, gens in (("one", ["both"]), ("two", ["both", "mito"])):
        out = tmp_path / f"{case}.png"
        args = ["gan", "figure", "--data", str(tmp_path / "data"), "--out", str(out),
                "--slices", "0-1", "--device", "cpu", "--crop", "128"]
        for gen in gens:
            args += ["-g", str(runs[gen])]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert f"{len(gens)} generator(s)" in result.output
        png = iio.imread(out)
        widths[case] = png.shape[1]
        # The mask column shows the mitochondria in red.
        red = (png[..., 0] > 200) & (png[..., 1] < 80) & (png[..., 2] < 80)
        assert red.sum() > 100
    # A second generator adds one column of the same width (2.4 in of 4 columns' width).
    assert abs(widths["two"] / widths["one"] - 4 / 3) < 0.02
    # Generators on the same masks are each named by their run folder, the others by their masks.
    shutil.copytree(runs["both"], tmp_path / "both_again")
    drawn = {}
    monkeypatch.setattr(figures, "comparison_figure",
                        lambda out, volume, columns, **kw: drawn.update(columns))
    args = ["gan", "figure", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "n.png"),
            "--slices", "0", "--device", "cpu"]
    for gen in (runs["both"], tmp_path / "both_again", runs["mito"]):
        args += ["-g", str(gen)]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert list(drawn) == ["both", "both_again", "synthetic (mito)"]
    bad = CliRunner().invoke(app, ["gan", "figure", "-g", str(runs["both"]), "--data",
                                   str(tmp_path / "data"), "--out", str(tmp_path / "f.jpg")])
    assert bad.exception is not None and "PNG" in str(bad.exception)
