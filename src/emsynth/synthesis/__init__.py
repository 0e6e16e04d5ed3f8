"""Stage: synthetic EM volumes from masks with a trained GAN generator (whole slices, one pass)."""

from emsynth.synthesis.inference import load_generator, synthesize_volume

__all__ = ["load_generator", "synthesize_volume"]
