"""The VLM results tables (what each stage bought, and the stage-0 ablation) in one command.

    .venv/bin/python benchmarks/vlm_results.py [--profile tiny] [--root DIR] [--set key=value ...] [--no-readme]

Runs the pipeline through vlm_eval_stage2 twice in a subprocess against one run root (default: `runs`, so
steps already cached there are reused): as configured, and with the `skip_stage0` experiment. Reads
each VLM step's metrics from the run summary, prints two Markdown tables (evaluation per checkpoint;
training per stage; each stage's scores come from its own `vlm_eval_<stage>` step), records them in
benchmarks/results/vlm_results_<profile>.json and rewrites the
block between the `vlm-results` markers in README.md (`vlm-results-<profile>` for other profiles).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from results_file import record

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
STAGES = ("vlm_stage0", "vlm_stage1", "vlm_stage2")
EVAL_COLUMNS = ("caption_f1", "caption_colour_recall", "caption_shape_recall", "counting_accuracy",
                "counting_majority", "grounding_iou50", "pointing_hit", "ocr_exact", "video_tiou50",
                "video_qa_exact", "video_qa_majority", "heldout_answer_loss", "image_use_gap")
TRAIN_COLUMNS = ("seconds", "steps", "loss_first", "loss_last10", "aux_loss_mean", "tokens_per_s_mean",
                 "padding_mean")


def run_pipeline(root: Path, args: list[str]) -> tuple[float, dict[str, dict[str, Any]]]:
    env = os.environ | {"SEEDVL_RUN_ROOT": str(root)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "pipelines/full.py", "--until", "vlm_eval_stage2", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"pipeline failed:\n{done.stderr[-4000:]}")
    latest = sorted((root / "pipeline_runs").iterdir())[-1]
    steps = {s["name"]: s for s in json.loads((latest / "summary.json").read_text())["steps"]}
    return time.perf_counter() - started, steps


def evaluation_rows(steps: dict[str, dict[str, Any]], suffix: str) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    for name in STAGES:
        step = steps.get(name.replace("vlm_", "vlm_eval_"))
        if not step or step["status"] == "skipped":
            continue
        metrics = step["metrics"]
        untrained = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("eval_untrained/")}
        if untrained:
            rows[f"untrained{suffix}"] = untrained
        rows[f"{name.removeprefix('vlm_')}{suffix}"] = {k.split("/", 1)[1]: v for k, v in metrics.items()
                                                          if k.startswith("eval/")}
    return rows


def training_rows(steps: dict[str, dict[str, Any]], suffix: str) -> dict[str, dict[str, float]]:
    rows = {}
    for name in ("llm_pretrain", *STAGES):
        step = steps.get(name)
        if step and step["status"] != "skipped":
            seconds = step["duration_s"]
            if step["status"] == "cached":  # the run that computed it recorded its time in the manifest
                seconds = json.loads((Path(step["output_dir"]) / "_MANIFEST.json").read_text())["duration_s"]
            rows[f"{name.removeprefix('vlm_')}{suffix}"] = {"seconds": seconds, **step["metrics"]}
    return rows


def replace_readme_block(table: str, profile: str) -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    marker = "vlm-results" if profile == "tiny" else f"vlm-results-{profile}"
    pattern = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)
    if not pattern.search(text):
        print(f"README.md has no {marker} markers; not updated")
        return
    readme.write_text(pattern.sub(lambda m: m.group(1) + table + m.group(2), text))
    print("README.md updated")


def main() -> None:
    from components.vlm.eval_tasks import results_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--root", default=str(REPO / "runs"), help="run root (its cache is reused)")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--no-readme", action="store_true", help="print and record, but leave README.md alone")
    parser.add_argument("--no-ablation", action="store_true", help="skip the skip_stage0 run")
    args = parser.parse_args()
    base = ["--profile", args.profile, *[x for o in args.overrides for x in ("--set", o)]]
    root = Path(args.root).resolve()
    wall_main, main_steps = run_pipeline(root, base)
    wall_ablation, ablation_steps = (0.0, {}) if args.no_ablation else run_pipeline(
        root, [*base, "--experiment", "skip_stage0"])
    evaluation = evaluation_rows(main_steps, "") | {k: v for k, v in evaluation_rows(ablation_steps, " (no stage 0)").items()
                                                    if not k.startswith("untrained")}
    training = training_rows(main_steps, "") | {k: v for k, v in training_rows(ablation_steps, " (no stage 0)").items()
                                                if k.startswith("stage")}
    eval_columns = [c for c in EVAL_COLUMNS if any(c in row for row in evaluation.values())]
    eval_table = results_table(evaluation, eval_columns)
    train_table = results_table(training, list(TRAIN_COLUMNS))
    counts = next((row for row in evaluation.values()), {})
    items = ", ".join(f"{k.removeprefix('n_')} {int(v)}" for k, v in sorted(counts.items()) if k.startswith("n_"))
    block = (f"Profile `{args.profile}`, measured {time.strftime('%Y-%m-%d')} by `python benchmarks/vlm_results.py"
             f"{' --profile ' + args.profile if args.profile != 'tiny' else ''}` "
             f"(held-out items: {items or 'none'}).\n\n{eval_table}\n{train_table}")
    print(block)
    record(REPO / "benchmarks" / "results" / f"vlm_results_{args.profile}.json",
           {"profile": args.profile, "overrides": args.overrides, "wall_s": {"main": round(wall_main, 1),
                                                                            "ablation": round(wall_ablation, 1)}},
           [{"table": "evaluation", "rows": evaluation}, {"table": "training", "rows": training}])
    if not args.no_readme:
        replace_readme_block(block, args.profile)


if __name__ == "__main__":
    main()
