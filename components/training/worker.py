"""The worker side of every trained stage: what each Ray Train worker's `train_loop_per_worker` is built
from. `start_worker` reads the rank and device; `make_engine` wraps a model's trainable parameter
groups in AdamW, a warmup-cosine schedule and a DeepSpeed ZeRO engine; `run_steps` is the step loop
(the test-only `fail_at_step`, one step function call, one log record, a checkpoint every N steps);
`restore` hands back the latest checkpoint's progress after a restart; `export_on_rank0` gathers ZeRO-3
shards and writes a plain export from rank 0.

Progress is the part (a ViT phase), the step in it, the global step and the data stream's position
(opaque to the runtime), saved beside DeepSpeed's files in the same checkpoint; data order is a pure
function of the seed and the position, so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from components.training.config import DeepSpeedSettings
from components.training.runtime import FAILED_ONCE, SMOOTHING, deepspeed_config
from components.training.shards import DropCounter

log = logging.getLogger(__name__)
CHECKPOINT_TAG = "ckpt"


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    rank: int
    world_size: int
    device: torch.device


@dataclasses.dataclass
class Progress:
    """Where a worker is: what `restore` hands back after a restart."""

    part: int = 0  # index of the current part (ViT phase); 0 for single-part jobs
    step: int = 0  # steps done in that part
    global_step: int = 0  # steps done in the job
    data: dict[str, Any] = dataclasses.field(default_factory=dict)  # this worker's data position and drops


@dataclasses.dataclass(frozen=True)
class StepLoop:
    """One part's loop: its name in the log, its length, and how it checkpoints and (in tests) fails."""

    part: str
    steps: int
    checkpoint_every: int
    fail_at_step: int = -1  # the global step at which the last worker exits once (-1: never)


def start_worker(threads: int) -> WorkerInfo:
    """Torch threads, the compiled-ops folder, and this worker's rank and device."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "seedvl" / "torch_extensions"))
    import ray.train
    import ray.train.torch

    torch.set_num_threads(max(1, threads))
    context = ray.train.get_context()
    return WorkerInfo(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())


def warmup_cosine(steps: int, warmup_steps: int, floor: float = 0.1) -> Callable[[int], float]:
    """LR factor: linear warmup over `warmup_steps`, then a cosine from 1 down to `floor` at `steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def make_engine(model: torch.nn.Module, groups: list[dict[str, Any]], learning_rate: float, weight_decay: float,
                schedule: Callable[[int], float], settings: DeepSpeedSettings, micro_batch: int) -> Any:
    """A DeepSpeed engine over `groups` (AdamW parameter groups, each may set its own `lr`)."""
    import deepspeed

    optimizer = torch.optim.AdamW(groups, lr=learning_rate, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(settings, micro_batch))
    return engine


class TrainLog:
    """Rank 0 appends one JSON line per record to `train_log.jsonl` (read back by `runtime.read_log`)."""

    def __init__(self, out_dir: Path, rank: int) -> None:
        self.path, self.rank = out_dir / "train_log.jsonl", rank

    def write(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def start(self, progress: Progress, **fields: Any) -> None:
        """One per worker-group start: the driver counts restarts from them."""
        self.write({"event": "start", "part_index": progress.part, "step": progress.step, **fields})

    def end(self, part: str, counts: DropCounter, global_step: int) -> None:
        self.write({"part": part, "part_end": True, "global_step": global_step, **counts.as_metrics("samples_")})


def run_steps(loop: StepLoop, engine: Any, progress: Progress, step: Callable[[int], dict[str, float]],
              data_state: Callable[[], dict[str, Any]], worker: WorkerInfo, train_log: TrainLog,
              out_dir: Path) -> None:
    """Call `step(step_in_part)` until the part has `loop.steps` steps; log every step's metrics (with the
    step's wall time); checkpoint every `checkpoint_every` steps and at the end. Rank 0 prints a progress
    line (`ProgressPrinter`) to the driver's terminal."""
    printer = ProgressPrinter(loop.part, loop.steps, progress.step) if worker.rank == 0 else None
    while progress.step < loop.steps:
        maybe_fail(loop.fail_at_step, progress.global_step, worker, out_dir)
        started = time.perf_counter()
        metrics = step(progress.step)
        metrics.setdefault("step_seconds", time.perf_counter() - started)
        progress.step += 1
        progress.global_step += 1
        record = {"part": loop.part, **metrics, "step": progress.step, "global_step": progress.global_step}
        train_log.write(record)
        if printer is not None:
            printer.update(progress.step, metrics)
        if progress.step % loop.checkpoint_every == 0 or progress.step == loop.steps:
            progress.data = data_state()
            save_checkpoint(engine, progress, worker.rank, record)


class ProgressPrinter:
    """`[part] step N/M  loss L (smoothed S)  lr R  T s/step  ETA ...` printed at the first step, then at
    most once every `every_s` seconds, and at the last step; the ETA is the mean step time since this
    worker group (re)started times the steps left."""

    def __init__(self, part: str, steps: int, start_step: int, every_s: float = 10.0,
                 write: Callable[[str], None] | None = None) -> None:
        self.part, self.steps, self.start_step, self.every_s = part, steps, start_step, every_s
        self.write = write or write_stdout
        self.started = self.last = time.perf_counter()
        self.average, self.count, self.printed = 0.0, 0, False

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if "loss" in metrics:
            self.average, self.count = SMOOTHING * self.average + (1 - SMOOTHING) * float(metrics["loss"]), self.count + 1
        now = time.perf_counter()
        if self.printed and step < self.steps and now - self.last < self.every_s:
            return
        self.printed, self.last = True, now
        self.write(self.line(step, metrics, (now - self.started) / max(1, step - self.start_step)))

    def line(self, step: int, metrics: dict[str, float], seconds_per_step: float) -> str:
        parts = [f"[{self.part}] step {step}/{self.steps}"]
        if "loss" in metrics:
            parts.append(f"loss {float(metrics['loss']):.4f} (smoothed {self.average / (1 - SMOOTHING ** self.count):.4f})")
        if "lr" in metrics:
            parts.append(f"lr {float(metrics['lr']):.2e}")
        parts.append(f"{seconds_per_step:.2f} s/step")
        parts.append("done" if step >= self.steps else f"ETA {format_seconds(seconds_per_step * (self.steps - step))}")
        return "  ".join(parts)


def write_stdout(line: str) -> None:
    """One line to the worker's stdout, which Ray forwards to the driver's terminal. Not `print`: Ray
    Train patches it to also log the line, and the driver then shows it twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def format_seconds(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def save_checkpoint(engine: Any, progress: Progress, rank: int, metrics: dict[str, Any]) -> None:
    """Every worker saves its DeepSpeed shard and its progress; Ray Train merges them into one checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag=CHECKPOINT_TAG)
        (Path(folder) / f"progress_rank{rank}.json").write_text(json.dumps(dataclasses.asdict(progress)))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"checkpoint_{progress.global_step:07d}")


def restore(rank: int) -> tuple[Progress, Any]:
    """The progress saved in the latest checkpoint Ray Train hands back after a restart (and that
    checkpoint), or a fresh start (and None)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Progress(), None
    with checkpoint.as_directory() as folder:
        progress = Progress(**json.loads((Path(folder) / f"progress_rank{rank}.json").read_text()))
    log.info("resuming from %s at part %d step %d", checkpoint.path, progress.part, progress.step)
    return progress, checkpoint


def load_engine_state(engine: Any, checkpoint: Any) -> None:
    """Model, optimizer and schedule state from a checkpoint `restore` returned."""
    with checkpoint.as_directory() as folder:  # no copy when the storage is a local or shared path
        engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)


def gathered_model(engine: Any) -> Any:
    """A context in which every rank holds full parameters (needed under ZeRO-3 only)."""
    import deepspeed

    if engine.zero_optimization_stage() == 3:
        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def export_on_rank0(engine: Any, rank: int, write: Callable[[torch.nn.Module], None]) -> None:
    """`write(full model)` on rank 0, with ZeRO-3 shards gathered on every rank; all ranks wait for it."""
    with gathered_model(engine):
        if rank == 0:
            write(engine.module)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_workers_counts(counter: DropCounter) -> DropCounter:
    """The sum of every worker's counts (kept and dropped by reason)."""
    if not torch.distributed.is_initialized():
        return counter
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, dict(counter))
    total = DropCounter()
    for counts in gathered:
        total.update(counts)
    return total


def all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    """The sums over all workers of each value (on the engine's device: NCCL reduces only CUDA tensors)."""
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    return totals.tolist()


def maybe_fail(fail_at_step: int, global_step: int, worker: WorkerInfo, out_dir: Path) -> None:
    """Testing aid: the last worker dies once, abruptly, at `fail_at_step` (a marker file makes it once)."""
    if fail_at_step != global_step or worker.rank != worker.world_size - 1:
        return
    marker = out_dir / FAILED_ONCE
    if marker.exists():
        return
    marker.write_text(str(global_step))
    log.warning("fail_at_step=%d: worker %d exits now", global_step, worker.rank)
    os._exit(1)

