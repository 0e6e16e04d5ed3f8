"""emsynth: conditional-GAN synthesis of EM images from masks, and a study of whether the
synthetic images improve mitochondria segmentation."""

__version__ = "0.1.0"
