"""The driver side of every trained stage (ViT pretraining, the LLM's text pretraining, the VLM stages,
and the post-training stages to come): typed DeepSpeed settings -> DeepSpeed's config, one Ray Train
`TorchTrainer` launch with failure handling and checkpoint/resume, and the workers' log read back.

A trained stage is a typed config slice, a step function that calls `launch`, and a
`train_loop_per_worker` built from `components.training.worker`. The workers write one JSON line per
step to `train_log.jsonl` in the stage's output folder (`worker.TrainLog`), and `read_log` is the one
reader of it: a start record per worker-group start (restarts are counted from them), step records
(the last one of each global step wins after a restart), and one end record per part (a ViT phase, a
VLM stage) with the sample counts over all workers. A line cut short by a killed worker is skipped; a
missing log is an error (the workers must write where the driver reads).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from components.common.resources import Resources
from components.training.config import DeepSpeedSettings

log = logging.getLogger(__name__)
FAILED_ONCE = ".failed_once"  # the marker `worker.maybe_fail` leaves so a test failure happens once


class JobSettings(Protocol):
    """What `launch` reads of a stage's config: how many workers, on what, how often to retry."""

    num_workers: int
    use_gpu: bool
    max_failures: int
    resources: Resources


def deepspeed_config(settings: DeepSpeedSettings, micro_batch: int) -> dict[str, Any]:
    """DeepSpeed's config for one engine: the optimizer and schedule are torch objects passed in."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": settings.gradient_clipping,
        "zero_optimization": {"stage": settings.zero_stage},
        "bf16": {"enabled": settings.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def launch(name: str, train_loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], job: JobSettings,
           storage: Path, out_dir: Path) -> None:
    """Run `train_loop` on `job.num_workers` Ray Train workers (gloo on CPU, NCCL on GPU). A worker that
    dies restarts the group from the latest checkpoint, up to `job.max_failures` times. Ray Train's own
    checkpoints under `storage` are removed afterwards: the stage's exports are what later stages read."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"threads": max(1, int(job.resources.num_cpus)), **loop_config},
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu,
                                     resources_per_worker={"CPU": job.resources.num_cpus},
                                     label_selector=job.resources.label_selector() or None),  # image, on a cluster
        run_config=RunConfig(name=name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=job.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    trainer.fit()
    shutil.rmtree(storage, ignore_errors=True)
    (out_dir / FAILED_ONCE).unlink(missing_ok=True)


@dataclasses.dataclass
class TrainLogRecords:
    """A train log read back: step records in global-step order, one end record per part, restarts."""

    steps: list[dict[str, Any]]
    ends: dict[str, dict[str, Any]]
    restarts: int
    starts: list[dict[str, Any]]

    def part(self, name: str) -> list[dict[str, Any]]:
        return [record for record in self.steps if record["part"] == name]


def read_log(path: Path) -> TrainLogRecords:
    """The workers' log (see the module docstring). Raises FileNotFoundError when it is missing."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the training workers must write into the step's output "
                                "folder, so run.root has to be storage every Ray node sees")
    steps: dict[int, dict[str, Any]] = {}
    ends: dict[str, dict[str, Any]] = {}
    starts: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            log.warning("skipping a cut-short line in %s", path)
            continue
        if not isinstance(record, dict):
            log.warning("skipping a line that is not a record in %s", path)
        elif record.get("event") == "start":
            starts.append(record)
        elif record.get("part_end"):
            ends[str(record["part"])] = record
        elif "global_step" in record and "part" in record:
            steps[int(record["global_step"])] = record
        else:
            log.warning("skipping a record without part and global_step in %s", path)
    return TrainLogRecords([steps[s] for s in sorted(steps)], ends, max(0, len(starts) - 1), starts)


TRAIN_PREFIX = "train"  # every trained stage logs `train/<metric>`, so the UI overlays the stages' curves
SMOOTHING = 0.9  # the EMA weight of the past in `train/loss_smoothed`


def smoothed(values: list[float], beta: float = SMOOTHING) -> list[float]:
    """The debiased exponential moving average of `values` (TensorBoard's smoothing): the first point is
    the first value, and early points are not pulled towards zero."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {beta}")
    out, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta ** count))
    return out


def step_metric_series(records: list[dict[str, Any]]) -> list[tuple[dict[str, float], int]]:
    """Each step record as `(metrics, global_step)`: every number as `train/<metric>` (`train/loss`,
    `train/lr`, `train/tokens_per_s`, ...) plus `train/loss_smoothed`, an EMA that restarts with each
    part (a ViT phase's loss is another quantity than the one before it)."""
    series: list[tuple[dict[str, float], int]] = []
    average, count, part = 0.0, 0, None
    for record in records:
        if record["part"] != part:
            average, count, part = 0.0, 0, record["part"]
        metrics = {f"{TRAIN_PREFIX}/{key}": float(value) for key, value in record.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)
                   and key not in ("global_step", "step")}
        if "loss" in record:
            average, count = SMOOTHING * average + (1 - SMOOTHING) * float(record["loss"]), count + 1
            metrics[f"{TRAIN_PREFIX}/loss_smoothed"] = average / (1 - SMOOTHING ** count)
        series.append((metrics, int(record["global_step"])))
    return series


def log_step_metrics(records: list[dict[str, Any]], log_metrics: Callable[[dict[str, float], int | None], None]
                     ) -> None:
    """Every step record's numbers to MLflow at its global step (`step_metric_series`)."""
    for metrics, step in step_metric_series(records):
        log_metrics(metrics, step)


def summarise(records: list[dict[str, Any]], end: dict[str, Any] | None, timed_keys: tuple[str, ...]) -> dict[str, float]:
    """The first and last loss, the mean of the last 10 steps' losses, the step count, the mean of
    `timed_keys` over the steps after the first (which pays for warm-up), and the end record's sample
    counts (kept and dropped by reason, over all workers)."""
    summary: dict[str, float] = {"steps": float(len(records))}
    if records:
        tail = records[-10:]
        summary |= {"loss_first": float(records[0]["loss"]), "loss_last": float(records[-1]["loss"]),
                    "loss_last10": sum(float(r["loss"]) for r in tail) / len(tail)}
        timed = records[1:] or records
        for key in timed_keys:
            values = [float(r[key]) for r in timed if key in r]
            if values:
                summary[f"{key}_mean"] = sum(values) / len(values)
    for key, value in (end or {}).items():
        if key.startswith("samples_"):
            summary[key] = float(value)
    return summary
