"""Stage: synthetic EM volumes from masks with a trained GAN generator (whole slices, one pass)."""

from emsynth.gan.export import load_generator
from emsynth.synthesis.inference import synthesize_volume

__all__ = ["load_generator", "synthesize_volume"]
