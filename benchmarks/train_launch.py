"""The fixed cost of one Ray Train launch on this machine: what every training step of the pipeline pays
before its first optimizer step and after its last, whatever it trains.

    .venv/bin/python benchmarks/train_launch.py [--workers 2] [--repeats 3]

Starts a local Ray (2 CPUs), then runs `TorchTrainer.fit` `--repeats` times for each scenario with the
runtime's own settings (gloo, one CPU per worker, a run folder under a temporary storage path):
- `empty`: a train loop that returns at once;
- `deepspeed import`: the loop imports deepspeed (the runtime's workers do);
- `deepspeed engine`: the loop builds a DeepSpeed ZeRO-2 engine on a one-layer model with the runtime's own
  `deepspeed_config` and takes one step.
Each fit's wall time is split into the time until the loop starts on rank 0 (the controller and worker
processes starting, their imports, the process group), the loop itself, and the time after it returns
(the controller noticing and tearing the group down). Records the table in
benchmarks/results/train_launch.json. The first fit of a scenario is reported apart (it pays first-use
costs in the driver).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from results_file import record

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def loop(config: dict[str, Any]) -> None:
    import time

    import ray.train

    started = time.time()
    if config["scenario"] != "empty":
        import deepspeed
    if config["scenario"] == "deepspeed engine":
        import torch

        from components.training.config import DeepSpeedSettings
        from components.training.runtime import deepspeed_config

        torch.set_num_threads(1)
        model = torch.nn.Linear(16, 16)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                          config=deepspeed_config(DeepSpeedSettings(zero_stage=2, bf16=False), 4))
        loss = engine(torch.randn(4, 16)).pow(2).mean()
        engine.backward(loss)
        engine.step()
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["marks"]).write_text(f"{started} {time.time()}\n")


def one_fit(scenario: str, workers: int, storage: Path, index: int) -> dict[str, float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    marks = storage / f"marks-{index}"
    begun = time.time()
    TorchTrainer(loop, train_loop_config={"scenario": scenario, "marks": str(marks)},
                 torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=f"launch-{index}", storage_path=str(storage))).fit()
    ended = time.time()
    loop_start, loop_end = (float(x) for x in marks.read_text().split())
    return {"wall_s": ended - begun, "before_loop_s": loop_start - begun, "loop_s": loop_end - loop_start,
            "after_loop_s": ended - loop_end}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import ray

    os.environ.setdefault("PYTHONPATH", str(REPO))
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    ray_init_s = time.perf_counter() - started
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="train-launch-") as folder:
        index = 0
        for scenario in ("empty", "deepspeed import", "deepspeed engine"):
            fits = []
            for _ in range(args.repeats):
                fits.append(one_fit(scenario, args.workers, Path(folder), index))
                index += 1
            later = fits[1:] or fits
            rows.append({"scenario": scenario, "first_wall_s": fits[0]["wall_s"],
                         **{key: statistics.median(f[key] for f in later) for key in fits[0]}})
    ray.shutdown()
    print(f"ray.init: {ray_init_s:.1f} s; {args.workers} workers, 1 CPU each, gloo; median of fits 2-{args.repeats}\n")
    print("| scenario | first fit s | fit s | before the loop s | loop s | after the loop s |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['scenario']} | {row['first_wall_s']:.1f} | {row['wall_s']:.1f} | {row['before_loop_s']:.1f} | "
              f"{row['loop_s']:.1f} | {row['after_loop_s']:.1f} |")
    record(REPO / "benchmarks" / "results" / "train_launch.json",
           {"workers": args.workers, "repeats": args.repeats, "ray_init_s": ray_init_s}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
