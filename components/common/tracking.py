"""Experiment tracking: one MLflow parent run per pipeline run, one child run per stage.

Stages talk to a `Tracker`; `NullTracker` accepts everything and records nothing, so no code
branches on whether tracking is on. `MlflowTracker` writes through `MlflowClient` with explicit run
ids (no global active-run state), which keeps parent/child runs straight.

A local store (`sqlite:///<root>/mlflow.db`, artifacts in `<root>/mlartifacts`) records absolute
artifact URIs, so a moved run root would list no artifacts: `relocate_moved_artifacts` rewrites them to
the root's new place (the pipeline does so when it starts; `python -m components.common.tracking
relocate <root>` before `mlflow ui`), and an experiment whose artifacts are still missing is named with
the fix.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from components.common.cache import pid_alive

log = logging.getLogger(__name__)
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
            missing = local_path(found.artifact_location)
            used = bool(self.client.search_runs([found.experiment_id], max_results=1))
            if missing is not None and not missing.exists() and used:
                log.warning("experiment %r keeps its artifacts in %s, which does not exist: its runs will list no "
                            "artifacts. If the run root was moved, run `python -m components.common.tracking relocate "
                            "<new root>`; else set mlflow.experiment to a new name", experiment, missing)
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
        items = [Metric(key, float(value), stamp, step)
                 for metrics, step in series for key, value in sorted(metrics.items())]
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


RELOCATED = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("model_versions", "source"),
             ("model_versions", "storage_location"), ("logged_models", "artifact_location"))
ARTIFACTS_DIR = "mlartifacts"


def local_path(uri: str) -> Path | None:
    """The local folder of a `file://` URI or an absolute path; None for any other store."""
    if uri.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path))
    return Path(uri) if uri.startswith("/") else None


def relocate_moved_artifacts(root: Path) -> dict[str, int]:
    """For the local store in `root` (`mlflow.db`): every experiment whose artifact folder is a missing
    `.../mlartifacts` while `root/mlartifacts` exists was moved with the root, so its URIs (and its
    runs' and model versions') are rewritten to `root/mlartifacts`. Returns the rows changed per old
    location ({} when nothing moved). Run it while no pipeline writes to the store."""
    database, target = root / "mlflow.db", root / ARTIFACTS_DIR
    if not database.is_file() or not target.is_dir():
        return {}
    changed: dict[str, int] = {}
    with contextlib.closing(sqlite3.connect(database)) as connection, connection:
        locations = {str(location) for (location,) in connection.execute("SELECT artifact_location FROM experiments")}
        for old in sorted(locations):
            path = local_path(old)
            if path is None or path.name != ARTIFACTS_DIR or path.exists() or path == target:
                continue
            new = target.as_uri() if old.startswith("file://") else str(target)
            changed[old] = rewrite_prefix(connection, old, new)
    return changed


def rewrite_prefix(connection: sqlite3.Connection, old: str, new: str) -> int:
    """Replace the prefix `old` (whole path segments only) by `new` in every artifact column of the store."""
    tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    total = 0
    for table, column in RELOCATED:
        if table not in tables or column not in {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}:
            continue
        total += connection.execute(
            f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE {column} = ? OR substr({column}, 1, ?) = ?",
            (new, len(old) + 1, old, len(old) + 1, old + "/")).rowcount
    return total


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "relocate":
        print("usage: python -m components.common.tracking relocate <run root holding mlflow.db>", file=sys.stderr)
        return 2
    root = Path(argv[1]).expanduser().resolve()
    if not (root / "mlflow.db").is_file():
        print(f"{root}: no mlflow.db here (give the run root, e.g. runs/)", file=sys.stderr)
        return 2
    moved = relocate_moved_artifacts(root)
    for old, rows in moved.items():
        print(f"{old} -> {root / ARTIFACTS_DIR} ({rows} rows)")
    if not moved:
        print(f"{root}: artifact locations already point here")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
