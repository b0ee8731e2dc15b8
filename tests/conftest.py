import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GEONET_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"


@pytest.fixture
def shared_data():
    """``../shared/data``; tests that use it skip when it is absent (a user's clone has none)."""
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA} (set GEONET_SHARED to its parent folder)")
    return DATA


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    monkeypatch.setenv("GDAL_NUM_THREADS", "1")
