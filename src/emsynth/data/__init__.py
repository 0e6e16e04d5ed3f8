"""Stage 1, data: readers for every EM layout, validation, the phantom generator, fetch."""

from emsynth.data.volume import LABEL_NAMES, MEMBRANE, MITO, SYNAPSE, Volume

__all__ = ["LABEL_NAMES", "MEMBRANE", "MITO", "SYNAPSE", "Volume"]
