"""Experiment tracking: one MLflow parent run per pipeline run, one child run per stage.

Stages talk to a `Tracker`; `NullTracker` accepts everything and records nothing, so no code
branches on whether tracking is on. `MlflowTracker` writes through `MlflowClient` with explicit run
ids (no global active-run state), which keeps parent/child runs straight.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from components.common.cache import pid_alive

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000  # MLflow's limit on metrics in one log_batch


class Tracker(Protocol):
    tracking_uri: str  # '' when nothing is recorded

    def start(self, name: str, tags: Mapping[str, str], parent: str | None = None) -> str: ...
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_history(self, run_id: str, series: Sequence[tuple[Mapping[str, float], int]]) -> None: ...
    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None: ...
    def log_artifact(self, run_id: str, path: Path, artifact_dir: str | None = None) -> None: ...
    def end(self, run_id: str, status: str = "FINISHED") -> None: ...
    def close_abandoned(self) -> int: ...


class NullTracker:
    """Tracking switched off: every call is accepted and nothing is written."""

    tracking_uri = ""

    def start(self, name: str, tags: Mapping[str, str], parent: str | None = None) -> str:
        return f"null-{name}"

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_history(self, run_id: str, series: Sequence[tuple[Mapping[str, float], int]]) -> None:
        pass

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        pass

    def log_artifact(self, run_id: str, path: Path, artifact_dir: str | None = None) -> None:
        pass

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        pass

    def close_abandoned(self) -> int:
        return 0


class MlflowTracker:
    """Runs in one MLflow experiment, created with our artifact location when it is new (none: the
    tracking server's default, so a team server proxies the artifacts)."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location or None)
        else:
            self.experiment_id = found.experiment_id
        self.tracking_uri = tracking_uri

    def start(self, name: str, tags: Mapping[str, str], parent: str | None = None) -> str:
        all_tags = dict(tags) | {"host": socket.gethostname(), "pid": str(os.getpid())}
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:MAX_PARAM_CHARS]) for key, value in sorted(params.items())]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[start : start + PARAMS_PER_BATCH])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(key, float(value), stamp, step or 0) for key, value in sorted(metrics.items())]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, metrics=items[start : start + PARAMS_PER_BATCH])

    def log_history(self, run_id: str, series: Sequence[tuple[Mapping[str, float], int]]) -> None:
        """Many steps' metrics at once (a cached step's curves), in batches of MLflow's 1,000-metric limit."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(key, float(value), stamp, step) for metrics, step in series for key, value in sorted(metrics.items())]
        for start in range(0, len(items), METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=items[start : start + METRICS_PER_BATCH])

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: Path, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_dir)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def close_abandoned(self) -> int:
        """Mark runs left RUNNING by a killed process on this host as KILLED; returns how many."""
        closed = 0
        host = socket.gethostname()
        for run in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
            tags = run.data.tags
            if tags.get("host") == host and tags.get("pid", "").isdigit() and not pid_alive(int(tags["pid"])):
                self.client.set_terminated(run.info.run_id, status="KILLED")
                closed += 1
        return closed


def git_commit(repo: Path) -> str:
    """The commit the code runs at, with `-dirty` if the tree has changes; outside a git checkout (as
    in a `ray job submit` working dir) $SEEDVL_GIT_COMMIT, else `unknown`."""
    if os.environ.get("SEEDVL_GIT_COMMIT"):
        return os.environ["SEEDVL_GIT_COMMIT"]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit
