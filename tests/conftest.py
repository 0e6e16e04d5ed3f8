"""Shared fixtures: the real data folder (tests skip with a reason where it is absent).

The tiny configurations the tests train live in tests/tiny.py (module constants, since most are
needed at import time)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real EM data not found at {SHARED_DATA} (CI provides ../shared/data)")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Test models are tiny: they gain nothing from threads, and on a shared CPU the spin-waits
    of idle OpenMP threads make them up to 10x slower."""
    import torch

    from emsynth.engine import device

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    patch = pytest.MonkeyPatch()
    patch.setattr(device, "usable_cores", lambda: 1)  # the engine's default thread count
    yield
    patch.undo()
    torch.set_num_threads(before)
