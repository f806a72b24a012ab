"""Wall time of the tiny pipeline: cold, fully cached, and after one knob change, in one command.

    .venv/bin/python benchmarks/pipeline_times.py [--profile tiny] [--set key=value ...] [--keep DIR]

Prints a table and records it in benchmarks/results/pipeline_times.json. Each run is the real entry
point in a subprocess against a fresh run root, so start-up costs (Ray, MLflow) are included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_file import record

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "pipeline_times.json"


def timed_run(root: Path, args: list[str]) -> tuple[float, dict[str, dict]]:
    env = os.environ | {"SEEDVL_RUN_ROOT": str(root)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "pipelines/full.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"pipeline failed:\n{done.stderr[-4000:]}")
    latest = sorted((root / "pipeline_runs").iterdir())[-1]
    steps = {s["name"]: s for s in json.loads((latest / "summary.json").read_text())["steps"]}
    return seconds, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--keep", metavar="DIR", help="use (and keep) this empty run root instead of a temporary one")
    args = parser.parse_args()
    base = ["--profile", args.profile, *[x for o in args.overrides for x in ("--set", o)]]
    scenarios = [
        ("cold (empty cache)", base),
        ("fully cached rerun", base),
        ("one knob changed (basic_filters)", [*base, "--set", "data.basic_filters.min_short_side=150"]),
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="seedvl-bench-") as tmp:
        root = Path(args.keep or tmp)
        if root.exists() and any(root.iterdir()):
            sys.exit(f"--keep {root}: must be empty (a cold run needs an empty cache)")
        for name, scenario_args in scenarios:
            seconds, steps = timed_run(root, scenario_args)
            ran = [n for n, s in steps.items() if s["status"] == "ran"]
            rows.append({"scenario": name, "wall_s": round(seconds, 1), "steps_ran": ran,
                         "step_s": {n: round(s["duration_s"], 1) for n, s in steps.items() if s["status"] == "ran"}})
    cold = rows[0]["wall_s"]
    print(f"\n{'scenario':<34} {'wall s':>7} {'vs cold':>8}  steps that ran (s)")
    for row in rows:
        ran = ", ".join(f"{n} {s}" for n, s in row["step_s"].items()) or "none"
        print(f"{row['scenario']:<34} {row['wall_s']:>7.1f} {row['wall_s'] / cold:>8.2f}  {ran}")
    record(RESULTS, {"profile": args.profile, "overrides": args.overrides}, rows)


if __name__ == "__main__":
    main()
