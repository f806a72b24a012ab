"""Where an RL step's time and memory go: rollout tokens/s, the share of step time in generation, scoring
(reward, reference log-probs and critic values, the three groups at once; and within it the reward and
reference groups' own compute), critic update, actor update and weight sync, and the peak memory of each
worker group, from the `vlm_rl` step's per-step log.

    .venv/bin/python benchmarks/rl_step.py [--profile tiny] [--root DIR] [--set key=value ...] [--reuse]

Runs the pipeline through `vlm_rl` in a subprocess against one run root (default `runs`; upstream steps
cached there are reused), forcing the RL step to run again unless `--reuse` (then the cached step's log
is read), and records the table in benchmarks/results/rl_step.json. The first step (the groups starting:
models loaded while the first rollout waits) is reported apart from the steady state. Peak memory is each
group's process's peak resident set (CPU); on GPUs the groups' device memory is the number to add.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from results_file import record

REPO = Path(__file__).resolve().parent.parent
PHASES = ("generation", "scoring", "critic", "actor", "weight_sync")  # sequential phases of a step
BUSY = ("reward_busy", "reference_busy")  # inside `scoring`, the reward and reference groups' own compute
GROUPS = ("rollout", "reference", "reward", "critic", "actor")


def run_rl(root: Path, args: list[str], reuse: bool) -> tuple[float, Path]:
    env = os.environ | {"SEEDVL_RUN_ROOT": str(root)}
    started = time.perf_counter()
    force = [] if reuse else ["--force", "vlm_rl"]
    done = subprocess.run([sys.executable, "pipelines/full.py", "--until", "vlm_rl", *force, *args], cwd=REPO,
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"pipeline failed:\n{done.stderr[-4000:]}")
    latest = sorted((root / "pipeline_runs").iterdir())[-1]
    steps = {s["name"]: s for s in json.loads((latest / "summary.json").read_text())["steps"]}
    return time.perf_counter() - started, Path(steps["vlm_rl"]["output_dir"]) / "vlm" / "rl_log.jsonl"


def breakdown(records: list[dict[str, Any]]) -> dict[str, float]:
    """Sums over the steps: tokens/s of the rollouts, each phase's share of step time, peak memory per group."""
    total = sum(r["step_seconds"] for r in records) or 1e-9
    row = {"steps": float(len(records)), "seconds_per_step": total / max(1, len(records)),
           "rollout_tokens_per_s": sum(r["rollout_tokens_per_s"] for r in records) / max(1, len(records))}
    for phase in PHASES:
        row[f"share_{phase}"] = sum(r.get(f"seconds/{phase}", 0.0) for r in records) / total
    row["share_other"] = 1.0 - sum(row[f"share_{p}"] for p in PHASES)
    for busy in BUSY:
        row[f"share_{busy}"] = sum(r.get(f"seconds/{busy}", 0.0) for r in records) / total
    for group in GROUPS:
        values = [r[f"{group}_peak_rss_mib"] for r in records if f"{group}_peak_rss_mib" in r]
        if values:
            row[f"peak_mib_{group}"] = max(values)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--root", default=str(REPO / "runs"))
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--reuse", action="store_true", help="read the cached vlm_rl step's log instead of rerunning it")
    args = parser.parse_args()
    wall, log_file = run_rl(Path(args.root).resolve(), ["--profile", args.profile,
                                                        *[x for o in args.overrides for x in ("--set", o)]], args.reuse)
    records = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    rows = {"first step (groups starting)": breakdown(records[:1]), "steady state": breakdown(records[1:])}
    columns = ["steps", "seconds_per_step", "rollout_tokens_per_s", *(f"share_{p}" for p in (*PHASES, "other", *BUSY)),
               *(f"peak_mib_{g}" for g in GROUPS)]
    print("| | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.3g}" if c in row else "-" for c in columns) + " |")
    record(REPO / "benchmarks" / "results" / "rl_step.json",
           {"profile": args.profile, "overrides": args.overrides, "wall_s": round(wall, 1), "reused": args.reuse},
           [{"name": name, **row} for name, row in rows.items()])


if __name__ == "__main__":
    main()
