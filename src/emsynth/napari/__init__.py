"""The napari plugin (optional extra: `pip install -e '.[napari]'`): widgets *Segment
mitochondria*, *Predict membranes* and *Synthesize EM*, registered through the npe2 manifest
`napari.yaml` (entry point `napari.manifest`). `compute` holds the work (no Qt); `widgets` the
magicgui front ends that run it in a napari `thread_worker`."""
