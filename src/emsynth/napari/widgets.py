"""magicgui widgets for napari: each runs `emsynth.napari.compute` in a `thread_worker`
(progress bar per slice, cancellable between slices) and adds or updates one layer."""


from pathlib import Path

import napari
from magicgui import magic_factory
from napari.qt.threading import FunctionWorker, create_worker
from napari.types import LayerDataTuple
from qtpy.QtCore import QTimer

from emsynth.napari import compute


def _n_slices(data) -> int:
    return 1 if data.ndim == 2 else int(data.shape[0])


def _worker(gen, total: int, desc: str, on_done) -> FunctionWorker:
    """A napari worker over a compute generator; `on_done(result)` gives the layer tuple."""

    def run():
        result = yield from gen
        return on_done(result)

    worker = create_worker(run, _progress={"total": total, "desc": desc}, _start_thread=False)
    # start once napari has connected its layer-adding slot to `returned` (after we return)
    QTimer.singleShot(0, worker.start)
    return worker


def _threshold_follows_model(widget) -> None:
    """Set the threshold slider to the model's saved threshold whenever the model changes."""

    @widget.model.changed.connect
    def _update(path) -> None:
        thr = compute.saved_threshold(path)
        if thr is not None:
            widget.threshold.value = thr


@magic_factory(
    call_button="Segment",
    model={"label": "model folder", "mode": "d"},
    threshold={"widget_type": "FloatSlider", "min": 0.0, "max": 1.0, "step": 0.005},
    widget_init=_threshold_follows_model,
)
def segment_mitochondria(
    image: napari.layers.Image, model: Path = Path("."), threshold: float = 0.5,
    tta: bool = False,
) -> FunctionWorker[LayerDataTuple]:
    """Segment mitochondria with a model from `emsynth segment train` -> labels layer."""
    data = image.data
    gen = compute.segment(data, model, threshold, tta)

    def done(result):
        _, labels = result
        return (labels, {"name": f"{image.name} mito", "scale": image.scale}, "labels")

    return _worker(gen, _n_slices(data), "segment mitochondria", done)


@magic_factory(
    call_button="Predict membranes",
    model={"label": "model folder", "mode": "d"},
    threshold={"widget_type": "FloatSlider", "min": 0.0, "max": 1.0, "step": 0.005},
    widget_init=_threshold_follows_model,
)
def predict_membranes(
    image: napari.layers.Image, mito: napari.layers.Labels | None = None,
    model: Path = Path("."), threshold: float = 0.5, tta: bool = False,
) -> FunctionWorker[LayerDataTuple]:
    """Membranes with a model from `emsynth membranes train` (mito: a labels layer, > 0 =
    mitochondrion; none = no mitochondria) -> labels layer (2 = membrane)."""
    data = image.data
    gen = compute.membranes(data, None if mito is None else mito.data, model, threshold, tta)

    def done(labels):
        return (labels, {"name": f"{image.name} membranes", "scale": image.scale}, "labels")

    return _worker(gen, _n_slices(data), "predict membranes", done)


def _rerun_on_edit(widget) -> None:
    """Re-synthesise when the painted labels change (while `live` is on)."""
    state = {"layer": None}

    def on_edit(event=None) -> None:
        if widget.live.value and widget.generator.value.exists():
            widget()

    def watch(layer) -> None:
        old = state["layer"]
        if old is not None:
            for ev in ("paint", "set_data"):
                getattr(old.events, ev).disconnect(on_edit)
        state["layer"] = layer
        if layer is not None:
            for ev in ("paint", "set_data"):
                getattr(layer.events, ev).connect(on_edit)

    widget.masks.changed.connect(watch)
    watch(widget.masks.value)


@magic_factory(
    call_button="Synthesize",
    generator={"label": "generator (GAN run folder)", "mode": "d"},
    seed={"min": 0, "max": 2**31 - 1},
    widget_init=_rerun_on_edit,
)
def synthesize_em(
    masks: napari.layers.Labels, generator: Path = Path("."), seed: int = 0,
    dropout: bool = True, live: bool = True,
) -> FunctionWorker[LayerDataTuple]:
    """`masks`: a labels layer; paint mitochondria (1), membranes (2), synapses (3); a generator from
    `emsynth gan train` draws the EM image (re-drawn on every edit while `live` is on; `seed`
    fixes the dropout / decoder noise)."""
    data = masks.data.copy()
    gen = compute.synthesize(data, generator, seed, dropout)

    def done(image):
        return (image, {"name": f"{masks.name} EM", "scale": masks.scale,
                        "colormap": "gray", "contrast_limits": (0, 255)}, "image")

    return _worker(gen, _n_slices(data), "synthesize EM", done)
