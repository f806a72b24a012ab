"""Quality of the CLIP-score filter on a large labelled synthetic crawl: precision and recall of
removing the mismatched-caption pairs (goal: both >= 0.9), measured through the real pipeline.

    .venv/bin/python benchmarks/clip_filter_quality.py [--samples 5000] [--profile tiny] [--set key=value ...]

Runs `pipelines/full.py --until clip_filter` with a crawl of `--samples` images in a fresh run root
(so the scorer is trained here too, as in a cold tiny run), then reads the clip_scorer and clip_filter
metrics from the run's summary; `hindsight_*` is the best balanced precision/recall any threshold
reaches on this crawl (read from its labels, so the scorer's ceiling here, not a result). Prints a table and records it in benchmarks/results/clip_filter_quality.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pipeline_times import timed_run
from results_file import record

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "clip_filter_quality.json"
SHOWN = ("mismatch_precision", "mismatch_recall", "threshold", "rows_in", "rows_kept", "dropped.clip_score_low",
         "hindsight_precision", "hindsight_recall", "hindsight_threshold")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    shards = max(4, args.samples // 500)
    run_args = ["--profile", args.profile, "--until", "clip_filter",
                "--set", f"data.synthetic_crawl.num_samples={args.samples}",
                "--set", f"data.synthetic_crawl.num_shards={shards}", *[x for o in args.overrides for x in ("--set", o)]]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="seedvl-clipq-") as tmp:
        _, steps = timed_run(Path(tmp), run_args)
    wall = time.perf_counter() - started
    scorer, filtered = steps["clip_scorer"]["metrics"], steps["clip_filter"]["metrics"]
    row = {"samples": args.samples, **{k: filtered.get(k) for k in SHOWN},
           "scorer_pair_accuracy": scorer.get("pair_accuracy"), "scorer_s": round(steps["clip_scorer"]["duration_s"], 1),
           "clip_filter_s": round(steps["clip_filter"]["duration_s"], 1), "wall_s": round(wall, 1)}
    print(f"\n{'metric':<28} value")
    for key, value in row.items():
        print(f"{key:<28} {value if not isinstance(value, float) else round(value, 4)}")
    record(RESULTS, {"profile": args.profile, "overrides": args.overrides}, [row])


if __name__ == "__main__":
    main()
