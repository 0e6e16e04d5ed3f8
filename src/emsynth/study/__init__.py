"""The augmentation study: does adding GAN images improve U-Net mitochondria segmentation?

`emsynth study run CONFIG` plans cells (GAN + synthesis per regime and seed, one segmenter and
one test evaluation per condition), caches each under the study folder by the hash of what
determines it, and skips finished cells on a re-run; `emsynth study report DIR` summarises.
"""
