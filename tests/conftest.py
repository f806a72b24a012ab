"""Shared fixtures: paths to the real public test data, a local Ray for the data-stage tests, and the
end-to-end tests' one shared pipeline run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pipeline_runs import PipelineRun

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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> PipelineRun:
    """One small pipeline run through every step, serve included (it ends with the process), shared by the
    end-to-end tests: tests that only read it use its root; tests that change a root copy its cached steps
    into their own (`pipeline_runs.copy_cached_steps`)."""
    from pipeline_runs import PipelineRun, free_port, last_summary, pipeline

    root = tmp_path_factory.mktemp("tiny_run") / "runs"
    pipeline(root, "--set", f"serve.port={free_port()}", "--set", "serve.keep_alive=false")
    return PipelineRun(root, last_summary(root))
