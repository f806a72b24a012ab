"""Connecting to Ray: the cluster named in config or by RAY_ADDRESS (as under `ray job submit`),
else a local Ray started for this process, with the repo importable by its workers."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def ensure_ray(address: str, num_cpus: int | None, include_dashboard: bool, repo_root: Path) -> None:
    """Start or join Ray once per process; later calls do nothing."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    target = address or os.environ.get("RAY_ADDRESS", "")
    if target:
        log.info("joining Ray at %s", target)
        ray.init(address=target, log_to_driver=True)
        return
    log.info("starting a local Ray (num_cpus=%s)", num_cpus)
    pythonpath = os.pathsep.join(p for p in (str(repo_root), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=include_dashboard,
        dashboard_host="127.0.0.1",
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1"}},
        log_to_driver=True,
    )


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
