"""The napari plugin: its compute functions, the npe2 manifest, and the three widgets driven in
a real headless viewer on phantom data with tiny untrained models.

Headless: Qt runs offscreen (no window ever shows), and napari's canvas gets its OpenGL from
an X display: pytest-xvfb (in the napari extra) starts a virtual one (Xvfb) for the session
wherever Xvfb is installed. Without any display there is no OpenGL and the viewer test skips,
saying so. Set EMSYNTH_NAPARI_SCREENSHOTS=docs to refresh the widget screenshots the README
shows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np
import pytest
import torch
from tiny import unet_micro

from emsynth.data.phantom import generate_volume
from emsynth.membranes.normalize import Normalizer
from emsynth.segment.config import InferConfig, ModelConfig
from emsynth.segment.model import Segmenter, build_model

pytest.importorskip("napari", reason="the napari extra is not installed "
                    "(pip install -e '.[napari]')")
pytest.importorskip("pytestqt", reason="pytest-qt (the napari extra) is not installed")

from emsynth.napari import compute

SHOTS = os.environ.get("EMSYNTH_NAPARI_SCREENSHOTS")


def _segmenter(folder: Path, channels: list[str], target: str, threshold: float,
               meta: dict | None = None) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate(unet_micro())
    Segmenter(net=build_model(cfg, len(channels)).eval(), model=cfg, channel_names=channels,
              target_name=target, threshold=threshold, infer=InferConfig(window=64),
              meta=meta or {}).save(folder / "model")
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from emsynth.gan.data import Conditioning
    from emsynth.gan.export import GENERATOR_FILE, export_generator
    from emsynth.gan.networks import build_generator

    root = tmp_path_factory.mktemp("models")
    mito = _segmenter(root / "mito", ["image"], "mito", 0.42)
    membranes = _segmenter(root / "membranes", ["image", "mito"], "membrane", 0.37,
                           {"membranes": {"normalizer": Normalizer("standardize").as_dict()}})
    torch.manual_seed(0)
    (root / "gan").mkdir()
    export_generator(root / "gan" / GENERATOR_FILE, build_generator("unet", 2, 8),
                     Conditioning(("mito", "membrane"), "-1,1"))
    return {"mito": mito, "membranes": membranes, "gan": root / "gan"}


@pytest.fixture(scope="module")
def phantom():
    return generate_volume("ca1", n_slices=2, shape=(96, 112), seed=0)


def _run(gen):
    """Drive a compute generator to its end; (progress values, result)."""
    steps = []
    try:
        while True:
            steps.append(next(gen))
    except StopIteration as stop:
        return steps, stop.value


def test_compute_matches_the_cli_functions(models, phantom):
    from emsynth.segment.infer import predict_with

    assert compute.saved_threshold(models["mito"]) == pytest.approx(0.42)
    assert compute.saved_threshold(models["mito"] / "nowhere") is None
    steps, (prob, labels) = _run(compute.segment(phantom.image, models["mito"]))
    assert steps == [1, 2]
    expected = predict_with(Segmenter.load(models["mito"]), phantom.image, precision="fp32")
    np.testing.assert_allclose(prob, expected, atol=1e-6)
    assert np.array_equal(labels, (expected >= 0.42).astype(np.uint8))
    _, (prob2d, _) = _run(compute.segment(phantom.image[0].astype(np.float32), models["mito"]))
    assert prob2d.shape == phantom.shape[1:]
    _, mem = _run(compute.membranes(phantom.image, phantom.labels["mito"], models["membranes"]))
    assert mem.shape == phantom.shape and set(np.unique(mem)) <= {0, 2}
    painted = phantom.labels["mito"][0] * 1 + phantom.labels["membrane"][0] * 2
    _, em = _run(compute.synthesize(painted.astype(np.uint8), models["gan"], seed=3))
    _, again = _run(compute.synthesize(painted.astype(np.uint8), models["gan"], seed=3))
    _, other = _run(compute.synthesize(painted.astype(np.uint8), models["gan"], seed=4))
    assert em.dtype == np.uint8 and em.shape == painted.shape
    assert np.array_equal(em, again) and not np.array_equal(em, other)


def test_manifest_is_valid_and_lists_three_widgets():
    from npe2 import PluginManifest
    from npe2.cli import app as npe2_cli
    from typer.testing import CliRunner

    manifest = PluginManifest.from_distribution("emsynth")
    names = [w.display_name for w in manifest.contributions.widgets]
    assert names == ["Segment mitochondria", "Predict membranes", "Synthesize EM"]
    # `npe2 validate --imports` on the installed distribution and on the manifest file itself
    source = Path(compute.__file__).with_name("napari.yaml")
    for target in ("emsynth", str(source)):
        result = CliRunner().invoke(npe2_cli, ["validate", target, "--imports"])
        assert result.exit_code == 0 and "valid!" in result.output, result.output


def _result(qtbot, worker):
    """Wait for a widget's worker and return the layer tuple it hands napari."""
    with qtbot.waitSignal(worker.returned, timeout=60000) as signal:
        pass
    return signal.args[0]


def test_widgets_without_a_viewer(qtbot, models, phantom):
    """The three widgets on Qt offscreen alone (no OpenGL, no display): the layer each returns
    equals the compute function's result; the threshold follows the model; a paint re-runs."""
    import napari

    from emsynth.napari.widgets import predict_membranes, segment_mitochondria, synthesize_em

    image = napari.layers.Image(phantom.image, name="em")
    seg = segment_mitochondria()
    seg.model.value = models["mito"]
    assert seg.threshold.value == pytest.approx(0.42)
    data, meta, kind = _result(qtbot, seg(image=image))
    _, (_, expected) = _run(compute.segment(phantom.image, models["mito"], 0.42))
    assert kind == "labels" and meta["name"] == "em mito" and np.array_equal(data, expected)

    mem = predict_membranes()
    mem.model.value = models["membranes"]
    assert mem.threshold.value == pytest.approx(0.37)
    mito = napari.layers.Labels(expected, name="em mito")
    data, meta, _ = _result(qtbot, mem(image=image, mito=mito))
    _, want = _run(compute.membranes(phantom.image, expected, models["membranes"], 0.37))
    assert meta["name"] == "em membranes" and np.array_equal(data, want)

    painted = (phantom.labels["mito"][0] * 1 + phantom.labels["membrane"][0] * 2).astype(np.uint8)
    layout = napari.layers.Labels(painted, name="layout")
    syn = synthesize_em()
    syn.generator.value = models["gan"]
    syn.seed.value = 3
    syn.masks.choices = [layout]  # a viewer would offer its labels layers
    syn.masks.value = layout
    data, meta, kind = _result(qtbot, syn())
    _, want = _run(compute.synthesize(painted, models["gan"], seed=3))
    assert kind == "image" and meta["name"] == "layout EM" and np.array_equal(data, want)
    # live: setting new data on the painted layer runs the widget again by itself
    runs = []
    syn.called.connect(runs.append)
    edited = painted.copy()
    edited[:20, :20] = 1
    layout.data = edited
    qtbot.waitUntil(lambda: len(runs) == 1, timeout=60000)
    again, _, _ = _result(qtbot, runs[0])
    assert not np.array_equal(again, data)


#: Prints the OpenGL version a Qt offscreen surface gets here ("none": no OpenGL).
_GL_PROBE = """
import sys
from qtpy.QtGui import QGuiApplication, QOffscreenSurface, QOpenGLContext
app = QGuiApplication(sys.argv[:1])
surface = QOffscreenSurface()
surface.create()
context = QOpenGLContext()
version = None
if context.create() and context.makeCurrent(surface):
    from OpenGL.GL import GL_VERSION, glGetString
    version = glGetString(GL_VERSION)
print(version.decode() if version else "none")
"""


@pytest.fixture(scope="module")
def opengl() -> str:
    """The OpenGL version napari's canvas will get (probed in a child process, so this one's
    QApplication stays napari's), or a skip that says how to get one."""
    try:
        done = subprocess.run([sys.executable, "-c", _GL_PROBE], capture_output=True,
                              text=True, timeout=120, check=False)
        lines = done.stdout.strip().splitlines()
        version = lines[-1] if done.returncode == 0 and lines else "none"
    except subprocess.TimeoutExpired:
        version = "none"
    if version == "none":
        pytest.skip(f"no OpenGL for napari's canvas (DISPLAY={os.environ.get('DISPLAY') or 'unset'}"
                    "; Qt offscreen has none without an X display): install Xvfb (apt: xvfb "
                    "libgl1-mesa-dri), which pytest-xvfb (napari extra) starts by itself, or "
                    "run under `xvfb-run -a`")
    return version


def _shoot(viewer, tmp_path, name):
    folder = Path(SHOTS) if SHOTS else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    viewer.window._qt_window.resize(1000, 560)
    viewer.window.screenshot(str(folder / f"napari_{name}.png"), canvas_only=False)


def test_widgets_in_a_headless_viewer(opengl, make_napari_viewer, qtbot, models, phantom,
                                      tmp_path):
    from emsynth.napari.widgets import predict_membranes, segment_mitochondria, synthesize_em

    viewer = make_napari_viewer()
    image = viewer.add_image(phantom.image, name="em")

    seg = segment_mitochondria()
    viewer.window.add_dock_widget(seg, name="Segment mitochondria")
    seg.image.value = image
    seg.model.value = models["mito"]
    assert seg.threshold.value == pytest.approx(0.42)  # the model's saved threshold
    seg()
    qtbot.waitUntil(lambda: "em mito" in viewer.layers, timeout=60000)
    assert viewer.layers["em mito"].data.shape == phantom.shape
    _shoot(viewer, tmp_path, "segment")

    mem = predict_membranes()
    viewer.window.add_dock_widget(mem, name="Predict membranes")
    mem.image.value = image
    mem.mito.value = viewer.layers["em mito"]
    mem.model.value = models["membranes"]
    assert mem.threshold.value == pytest.approx(0.37)
    mem()
    qtbot.waitUntil(lambda: "em membranes" in viewer.layers, timeout=60000)
    _shoot(viewer, tmp_path, "membranes")

    painted = (phantom.labels["mito"][0] * 1 + phantom.labels["membrane"][0] * 2).astype(np.uint8)
    labels = viewer.add_labels(painted, name="layout")
    syn = synthesize_em()
    viewer.window.add_dock_widget(syn, name="Synthesize EM")
    syn.masks.value = labels
    syn.generator.value = models["gan"]
    syn()
    qtbot.waitUntil(lambda: "layout EM" in viewer.layers, timeout=60000)
    first = viewer.layers["layout EM"].data.copy()
    # an edit re-synthesises by itself (live): paint a mitochondrion into the corner
    edited = labels.data.copy()
    edited[:20, :20] = 1
    labels.data = edited
    qtbot.waitUntil(lambda: not np.array_equal(viewer.layers["layout EM"].data, first),
                    timeout=60000)
    for name in ("em", "em mito", "em membranes"):
        viewer.layers[name].visible = False
    _shoot(viewer, tmp_path, "synthesize")
