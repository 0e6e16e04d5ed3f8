"""Stage 5, segmentation: a binary U-Net segmenter (mitochondria by default) on the shared engine.

Patch sampling (`sampling`), batch-wise augmentation (`augment`), the network and its saved form
(`model`), the engine `Task` (`task`), training end to end (`train`), sliding-window inference
with TTA (`infer`), foreground metrics (`metrics`), the robust threshold rule (`threshold`) and
`emsynth segment ...` (`cli`). Input channels and target label are config, so the membrane stage
reuses it with inputs ["image", "mito"] and target "membrane".
"""
