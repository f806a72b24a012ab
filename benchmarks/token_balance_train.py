"""Visual-token redistribution in real training: VLM stage 1 on 2 Ray Train workers (DeepSpeed ZeRO-2, gloo)
on a deliberately skewed image-size mix, with and without `train.vlm.token_balance`, in one command.

    .venv/bin/python benchmarks/token_balance_train.py [--steps 24] [--root /tmp/token_balance_bench]

The mix: the ViT keeps images near their native size (`max_pixels` 448x448 instead of the tiny profile's
112x112), so OCR documents and large crawl pictures cost up to 256 ViT patches while small pictures cost
16; stage 1 draws OCR and captions with equal weight, so some steps give one worker several documents
and the other a few small pictures. Both runs start from the same shards, ViT, LLM and seed (the shared
steps are cached), so they see the same batches. Per step, from the workers' log: the largest and the
mean number of ViT patches a worker loaded, the largest a worker ran the ViT on, and the step time.
Prints the per-step table and the means, and records them in benchmarks/results/token_balance_train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from results_file import record

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "token_balance_train.json"
SETTINGS = ["--set", "data.synthetic_crawl.num_samples=240", "--set", "data.synthetic_crawl.num_shards=2",
            "--set", "data.clip_scorer.train_samples=300", "--set", "data.clip_scorer.eval_samples=100",
            "--set", "data.clip_scorer.max_steps=20", "--set", "data.ocr.num_samples=64",
            "--set", "data.grounding.num_samples=16", "--set", "data.video.synthetic_clips=1",
            "--set", "train.vit_pretrain.vit.max_pixels=200704",
            "--set", "train.vit_pretrain.mim.steps=3", "--set", "train.vit_pretrain.siglip.steps=3",
            "--set", "train.vit_pretrain.video.steps=2", "--set", "train.vlm.llm_pretrain.steps=4",
            "--set", "train.vlm.stage1.mix={caption: 1.0, ocr: 1.0}", "--set", "train.vlm.stage1.max_tokens=1024",
            "--set", "train.vlm.stage1.max_images=4", "--set", "train.vlm.stage1.packs_per_step=1",
            "--experiment", "skip_stage0", "--until", "vlm_stage1", "--set", "train.vlm.eval.enabled=false",
            "--set", "train.vlm.holdout_fraction=0.1", "--set", "train.vit_pretrain.holdout_fraction=0.1"]
KEYS = ("vit_patches_max_loaded", "vit_patches_mean", "vit_patches_max_computed", "step_seconds")


def train(root: Path, steps: int, balance: bool) -> list[dict[str, float]]:
    """Stage 1's per-step records of one run (the shared steps come from the cache after the first)."""
    env = os.environ | {"SEEDVL_RUN_ROOT": str(root)}
    args = [sys.executable, "pipelines/full.py", *SETTINGS, "--set", f"train.vlm.stage1.steps={steps}",
            "--set", f"train.vlm.token_balance.enabled={str(balance).lower()}", "--force", "vlm_stage1"]
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"pipeline failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    latest = sorted((root / "pipeline_runs").iterdir())[-1]
    steps_run = {s["name"]: s for s in json.loads((latest / "summary.json").read_text())["steps"]}
    log = Path(steps_run["vlm_stage1"]["output_dir"]) / "vlm" / "train_log.jsonl"
    return [r for r in map(json.loads, log.read_text().splitlines()) if "global_step" in r and "part" in r
            and not r.get("part_end")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--root", type=Path, default=Path("/tmp/token_balance_bench"))
    args = parser.parse_args()
    runs = {balance: train(args.root, args.steps, balance) for balance in (False, True)}
    print(f"{'step':>4} | {'max loaded':>10} {'mean':>6} | {'off: max run':>12} {'s':>6} | {'on: max run':>11} {'s':>6}")
    rows = []
    for off, on in zip(runs[False], runs[True]):
        assert off["vit_patches_max_loaded"] == on["vit_patches_max_loaded"], "the two runs saw different batches"
        rows.append({"step": int(off["step"]), **{f"off_{k}": off[k] for k in KEYS},
                     **{f"on_{k}": on[k] for k in KEYS}})
        print(f"{int(off['step']):>4} | {off['vit_patches_max_loaded']:>10.0f} {off['vit_patches_mean']:>6.0f} | "
              f"{off['vit_patches_max_computed']:>12.0f} {off['step_seconds']:>6.2f} | "
              f"{on['vit_patches_max_computed']:>11.0f} {on['step_seconds']:>6.2f}")
    timed = rows[1:] or rows  # the first step pays for warm-up

    def mean(key: str) -> float:
        return statistics.fmean(row[key] for row in timed)

    summary = {"max_over_mean_off": mean("off_vit_patches_max_computed") / mean("off_vit_patches_mean"),
               "max_over_mean_on": mean("on_vit_patches_max_computed") / mean("on_vit_patches_mean"),
               "step_seconds_off": mean("off_step_seconds"), "step_seconds_on": mean("on_step_seconds")}
    summary["step_time_ratio_on_over_off"] = summary["step_seconds_on"] / summary["step_seconds_off"]
    print("\nmeans over steps 2..: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    record(RESULTS, {"command": "benchmarks/token_balance_train.py", "steps": args.steps, "workers": 2,
                     "summary": summary}, rows)


if __name__ == "__main__":
    main()
