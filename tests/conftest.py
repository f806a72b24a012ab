"""Shared fixtures: paths to the real public test data and a local Ray for the data-stage tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REAL_DATA = REPO.parent / "shared" / "data" / "real"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real test data not found at {REAL_DATA} (it sits beside the repo as shared/data/real)")
    return REAL_DATA


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One small local Ray per test module, shut down at its end so end-to-end tests start clean."""
    import ray

    from components.common.ray_env import ensure_ray

    ensure_ray("", 2, False, REPO)
    yield
    ray.shutdown()
