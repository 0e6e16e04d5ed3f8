"""Random fields the phantom draws from: Gaussian noise with a correlation length, and fields
that change smoothly from slice to slice."""

from __future__ import annotations

import functools

import numpy as np
import scipy.fft


@functools.lru_cache(maxsize=64)
def gaussian_transfer(shape: tuple[int, int], scale: float) -> np.ndarray:
    """Fourier transfer function of a Gaussian filter with sigma `scale` (rfft layout)."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    return np.exp(-2.0 * (np.pi * scale) ** 2 * (fy**2 + fx**2)).astype(np.float32)


def gaussian_noise_field(
    rng: np.random.Generator, shape: tuple[int, int], scale: float
) -> np.ndarray:
    """Zero-mean, unit-std float32 Gaussian random field with correlation length ~`scale`,
    synthesised directly in the Fourier domain (one inverse FFT)."""
    if scale <= 0:
        return rng.standard_normal(shape, dtype=np.float32)
    transfer = gaussian_transfer(tuple(shape), float(scale))
    spectrum = np.empty(transfer.shape, np.complex64)
    spectrum.real = rng.standard_normal(transfer.shape, dtype=np.float32)
    spectrum.imag = rng.standard_normal(transfer.shape, dtype=np.float32)
    spectrum *= transfer
    spectrum[0, 0] = 0  # no constant offset: the field varies around zero over the frame
    field = scipy.fft.irfft2(spectrum, s=shape)
    std = field.std()
    return field / std if std > 0 else field


class EvolvingField:
    """A random field that changes smoothly with z: A cos(rate z) + B sin(rate z)."""

    def __init__(self, rng, shape, scale, rate, n_slices):
        self.rate = rate
        self.a = gaussian_noise_field(rng, shape, scale)
        self.b = gaussian_noise_field(rng, shape, scale) if n_slices > 1 else None

    def at(self, z: int) -> np.ndarray:
        if self.b is None or z == 0:
            return self.a
        phase = self.rate * z
        return self.a * np.float32(np.cos(phase)) + self.b * np.float32(np.sin(phase))
