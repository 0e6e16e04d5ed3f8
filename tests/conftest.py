"""Shared fixtures: the real data folder (tests skip with a reason where it is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real EM data not found at {SHARED_DATA} (CI provides ../shared/data)")
    return SHARED_DATA
