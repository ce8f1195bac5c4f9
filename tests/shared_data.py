"""Where ../shared lives (parity fixture, demo clips), for tests that need it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    return Path(os.environ.get("RT_ENGINE_SHARED", REPO.parent / "shared"))


FIXTURE = shared_dir() / "fixtures" / "pcavs_official_v1"
DEMO = shared_dir() / "data" / "demo" / "pcavs" / "misc"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not present (set RT_ENGINE_SHARED to the shared/ folder)")
    return path
