"""The VLM results tables (what each stage and SFT in each answer mode bought, each score beside its
shuffled-image control, the probes, rejection sampling, and the stage-0 ablation) in one command.

    .venv/bin/python benchmarks/vlm_results.py [--profile tiny] [--root DIR] [--set key=value ...] [--no-readme]
        [--seeds 0 1 2] [--no-ablation] [--until vlm_eval_stage2]

Runs the pipeline through vlm_eval_rl (SFT, the reward model and RL included; `--until` stops earlier) in a subprocess against one run root (default: `runs`,
so steps already cached there are reused): as configured (once per seed with `--seeds`), and through
vlm_eval_stage2 with the `skip_stage0` experiment. Reads each VLM step's metrics from the run summary and prints Markdown tables: evaluation per
checkpoint, every cell "true images / shuffled images" (each held-out item asked again with another
item's image; with several seeds, the mean and the spread over seeds); the image-use gap per task (answer
loss with shuffled minus own images, nats); the linear probes of per-image facts on the ViT after each
pretraining phase and on each stage's ViT and adapter; training per stage. Records them in
benchmarks/results/vlm_results_<profile>.json and rewrites the block between the `vlm-results` markers
in README.md (`vlm-results-<profile>` for other profiles).
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
SFT_MODES = (("thinking", "sft (thinking)"), ("direct", "sft (non-thinking)"))  # vlm_eval_sft's eval_<mode>/
RL_MODES = (("thinking", "rl (thinking)"), ("direct", "rl (non-thinking)"))  # vlm_eval_rl's, the same metrics
MODE_EVALS = (("vlm_eval_sft", SFT_MODES), ("vlm_eval_rl", RL_MODES))
RL_COLUMNS = ("reward_general_first", "reward_general_last", "reward_verifiable_first", "reward_verifiable_last",
              "verifier_pass_rate_first", "verifier_pass_rate_last", "mean_kl_general", "mean_kl_verifiable",
              "mean_entropy", "mean_response_length", "mean_explained_variance", "mean_truncated")
RM_COLUMNS = ("train_pairs", "heldout_pairs", "initial_heldout_pair_accuracy", "heldout_pair_accuracy",
              "heldout_pair_accuracy_verified", "heldout_pair_accuracy_reference", "heldout_pair_accuracy_concise",
              "heldout_pair_accuracy_faithful", "heldout_pair_accuracy_complete")
SFT_COLUMNS = ("format_ok", "answer_words", "thinking_words")
RS_COLUMNS = ("prompts", "samples", "sample_pass_rate", "acceptance_rate", "accepted", "format_failures", "truncated",
              "mean_thinking_words", "accepted_thinking_words")
EVAL_COLUMNS = ("caption_f1", "caption_object_colour_recall", "caption_shape_recall", "caption_background_recall",
                "counting_accuracy", "counting_majority", "grounding_iou", "grounding_iou50", "pointing_hit",
                "grounding_iou_1to3", "pointing_hit_1to3", "counting_accuracy_1to3", "counting_majority_1to3",
                "ocr_exact", "video_tiou50", "video_qa_exact", "video_qa_majority")
GAP_COLUMNS = ("heldout_answer_loss", "image_use_gap", "image_use_gap_caption", "image_use_gap_counting",
               "image_use_gap_grounding", "image_use_gap_ocr", "image_use_gap_video")
PROBE_COLUMNS = ("background_mean", "colour_present_mean", "colour_present_max", "shape_present_max", "count_max",
                 "count_majority", "cell_object", "cell_colour", "cell_colour_majority", "cell_position")
TRAIN_COLUMNS = ("seconds", "steps", "loss_first", "loss_last10", "aux_loss_mean", "tokens_per_s_mean",
                 "padding_mean")


UNTIL_STEPS = ("vlm_eval_stage2", "vlm_eval_sft", "vlm_eval_rl")


def run_pipeline(root: Path, args: list[str], until: str = "vlm_eval_rl") -> tuple[float, dict[str, dict[str, Any]]]:
    env = os.environ | {"SEEDVL_RUN_ROOT": str(root)}
    runs = root / "pipeline_runs"
    before = set(runs.iterdir()) if runs.is_dir() else set()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "pipelines/full.py", "--until", until, *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"pipeline failed:\n{done.stderr[-4000:]}")
    # this run's own record: another pipeline on the same root (a side experiment) may have started after it
    ours = [run for run in set(runs.iterdir()) - before if f"/{run.name}/" in done.stdout + done.stderr]
    new = ours or sorted(set(runs.iterdir()) - before)
    if len(new) != 1:
        sys.exit(f"cannot tell this run's record among {sorted(p.name for p in new)} in {runs}")
    steps = {s["name"]: s for s in json.loads((new[0] / "summary.json").read_text())["steps"]}
    return time.perf_counter() - started, steps


def evaluation_rows(steps: dict[str, dict[str, Any]], suffix: str) -> dict[str, dict[str, float]]:
    """Per checkpoint: its `eval/` metrics, and the shuffled-image controls under `shuffled:<metric>`."""
    rows: dict[str, dict[str, float]] = {}
    for name in STAGES:
        step = steps.get(name.replace("vlm_", "vlm_eval_"))
        if not step or step["status"] == "skipped":
            continue
        metrics = step["metrics"]
        untrained = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("eval_untrained/")}
        if untrained:
            rows[f"untrained{suffix}"] = untrained
        row = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("eval/")}
        row |= {"shuffled:" + k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("eval_shuffled/")}
        rows[f"{name.removeprefix('vlm_')}{suffix}"] = row
    for step_name, modes in MODE_EVALS:
        evaluated = steps.get(step_name)
        if not evaluated or evaluated["status"] == "skipped":
            continue
        for mode, label in modes:
            metrics = evaluated["metrics"]
            row = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"eval_{mode}/")}
            row |= {"shuffled:" + k.split("/", 1)[1]: v for k, v in metrics.items()
                    if k.startswith(f"eval_{mode}_shuffled/")}
            rows[f"{label}{suffix}"] = row
    return rows


def sampling_rows(steps: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Rejection sampling per task: `<task>/<metric>` of the step's metrics."""
    metrics = steps.get("rejection_sampling", {}).get("metrics", {})
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        task, slash, metric = key.partition("/")
        if slash:
            rows.setdefault(task, {})[metric] = value
    return rows


def rl_rows(steps: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The reward model (held-out pair accuracy before and after training) and the RL step's reward curve
    (reward by type over the first and the last quarter of the policy steps, the run's means)."""
    rows = {}
    for name, label in (("reward_model", "reward model"), ("vlm_rl", "rl")):
        step = steps.get(name)
        if step and step["status"] != "skipped":
            rows[label] = dict(step["metrics"])
    return rows


def only(runs: list[dict[str, dict[str, float]]], row: str) -> dict[str, dict[str, tuple[float, float]]]:
    """One row of `rl_rows` over seeds (the reward model and RL have tables of their own columns)."""
    return {k: v for k, v in over_seeds(runs).items() if k == row}


def probe_rows(steps: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The probes: raw pixels, the ViT after each pretraining phase (vit_eval), each stage's ViT and adapter."""
    rows: dict[str, dict[str, float]] = {}
    vit = steps.get("vit_eval", {}).get("metrics", {})
    for name in ("pixels", "initial", "mim", "siglip", "video"):
        row = {k.removeprefix(f"probe_{name}_"): v for k, v in vit.items() if k.startswith(f"probe_{name}_")}
        if row:
            rows["RGB histograms (pixels)" if name == "pixels" else f"ViT {name}"] = row
    for name in STAGES:
        metrics = steps.get(name.replace("vlm_", "vlm_eval_"), {}).get("metrics", {})
        for part in ("vit", "adapter"):
            row = {k.removeprefix(f"eval/probe_{part}_"): v for k, v in metrics.items()
                   if k.startswith(f"eval/probe_{part}_")}
            if row:
                rows[f"{name.removeprefix('vlm_')} {part}"] = row
    return rows


def over_seeds(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Mean and spread (population std) of each metric of each row over seeds (rows every seed has)."""
    import numpy as np

    out: dict[str, dict[str, tuple[float, float]]] = {}
    for row in runs[0]:
        if not all(row in run for run in runs):
            continue
        out[row] = {}
        for metric in runs[0][row]:
            values = [run[row][metric] for run in runs if metric in run[row]]
            if len(values) == len(runs):
                out[row][metric] = (float(np.mean(values)), float(np.std(values)))
    return out


def cell(stats: dict[str, tuple[float, float]], metric: str, controls: bool) -> str:
    def one(key: str) -> str | None:
        if key not in stats:
            return None
        mean, spread = stats[key]
        return f"{mean:.3f}" + (f" ±{spread:.3f}" if spread > 0 else "")
    true = one(metric)
    if true is None:
        return "-"
    shuffled = one("shuffled:" + metric) if controls else None
    return true if shuffled is None else f"{true} / {shuffled}"


def table(rows: dict[str, dict[str, tuple[float, float]]], columns: tuple[str, ...], controls: bool = False) -> str:
    columns = tuple(c for c in columns if any(c in r for r in rows.values()))
    if not columns:
        return ""
    lines = ["| checkpoint | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(cell(stats, c, controls) for c in columns) + " |" for name, stats in rows.items()]
    return "\n".join(lines) + "\n"


def training_rows(steps: dict[str, dict[str, Any]], suffix: str) -> dict[str, dict[str, float]]:
    rows = {}
    for name in ("llm_pretrain", *STAGES, "vlm_sft", "rejection_sampling", "vlm_sft_rs", "reward_model", "vlm_rl"):
        step = steps.get(name)
        if step and step["status"] != "skipped":
            seconds = step["duration_s"]
            if step["status"] == "cached":  # the run that computed it recorded its time in the manifest
                seconds = json.loads((Path(step["output_dir"]) / "_MANIFEST.json").read_text())["duration_s"]
            rows[f"{name.removeprefix('vlm_')}{suffix}"] = {"seconds": seconds, **step["metrics"]}
    return rows


def sections(evaluation: dict, samplings: list, rls: list, probes: list, training: dict) -> list[tuple[str, str]]:
    """The block's tables with their headings, leaving out those with nothing to show (a run that stops at
    stage 2 has no rejection sampling, reward model or RL)."""
    images = int(next(iter(probes[0].values()), {}).get("images", 0)) if probes else 0
    candidates = [
        ("", table(evaluation, EVAL_COLUMNS, controls=True)),
        ("Answer lengths (words) and the thinking format (one `<think>` block, then an answer):\n\n",
         table(evaluation, SFT_COLUMNS, controls=True)),
        ("Rejection sampling from the first SFT round, with thinking on (per task; acceptance: prompts with at least one "
         "verified answer):\n\n", table(over_seeds(samplings), RS_COLUMNS)),
        ("Reward model (Bradley-Terry on our own pairs: verified or reference answers over wrong samples, concise over "
         "rambling captions, faithful over one-colour-swapped captions, complete over one-object-dropped captions; "
         "held-out prompts' pairs):\n\n",
         table(only(rls, "reward model"), RM_COLUMNS)),
        ("Hybrid RL, the reward curve (first and last quarter of the policy steps) and the run's means:\n\n",
         table(only(rls, "rl"), RL_COLUMNS)),
        ("Answer loss on held-out samples and the image-use gap (shuffled minus own images, nats):\n\n",
         table(evaluation, GAP_COLUMNS)),
        (f"Linear probes (held-out fifth of {images} pictures; balanced accuracy for background/present, accuracy for "
         "counts and cells):\n\n", table(over_seeds(probes), PROBE_COLUMNS)),
        ("", table(training, TRAIN_COLUMNS)),
    ]
    return [(heading, text) for heading, text in candidates if text]


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--root", default=str(REPO / "runs"), help="run root (its cache is reused)")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="run.seed values (mean and spread)")
    parser.add_argument("--no-readme", action="store_true", help="print and record, but leave README.md alone")
    parser.add_argument("--no-ablation", action="store_true", help="skip the skip_stage0 run")
    parser.add_argument("--until", default="vlm_eval_rl", choices=UNTIL_STEPS,
                        help="the last step of each seed's run (vlm_eval_stage2: the perception stages only)")
    args = parser.parse_args()
    base = ["--profile", args.profile, *[x for o in args.overrides for x in ("--set", o)]]
    root = Path(args.root).resolve()
    seeds = args.seeds or [None]
    walls, evaluations, probes, trainings, samplings, rls = [], [], [], [], [], []
    for seed in seeds:
        wall, steps = run_pipeline(root, base + ([] if seed is None else ["--set", f"run.seed={seed}"]), args.until)
        walls.append(round(wall, 1))
        evaluations.append(evaluation_rows(steps, ""))
        probes.append(probe_rows(steps))
        trainings.append(training_rows(steps, ""))
        samplings.append(sampling_rows(steps))
        rls.append(rl_rows(steps))
    wall_ablation, ablation_steps = (0.0, {}) if args.no_ablation else run_pipeline(
        root, [*base, "--experiment", "skip_stage0"], until="vlm_eval_stage2")
    evaluation = over_seeds(evaluations)
    evaluation |= {k: {m: (v, 0.0) for m, v in row.items()} for k, row in
                   evaluation_rows(ablation_steps, " (no stage 0)").items() if not k.startswith("untrained")}
    training = over_seeds(trainings)
    training |= {k: {m: (v, 0.0) for m, v in row.items()} for k, row in
                 training_rows(ablation_steps, " (no stage 0)").items() if k.startswith("stage")}
    counts = next((row for row in evaluations[0].values()), {})
    items = ", ".join(f"{k.removeprefix('n_')} {int(v)}" for k, v in sorted(counts.items()) if k.startswith("n_"))
    seeds_text = f", seeds {', '.join(map(str, seeds))} (mean ±spread)" if args.seeds else ""
    block = (f"Profile `{args.profile}`, measured {time.strftime('%Y-%m-%d')} by `python benchmarks/vlm_results.py"
             f"{' --profile ' + args.profile if args.profile != 'tiny' else ''}"
             f"{' --seeds ' + ' '.join(map(str, seeds)) if args.seeds else ''}"
             f"{' --until ' + args.until if args.until != 'vlm_eval_rl' else ''}"
             f"{' --no-ablation' if args.no_ablation else ''}{''.join(' --set ' + o for o in args.overrides)}` "
             f"(held-out items: {items or 'none'}{seeds_text}). Each cell: true images / shuffled images.\n\n"
             + "\n".join(f"{heading}{text}" for heading, text in sections(evaluation, samplings, rls, probes, training)))
    print(block)
    record(REPO / "benchmarks" / "results" / f"vlm_results_{args.profile}.json",
           {"profile": args.profile, "overrides": args.overrides, "seeds": seeds,
            "until": args.until, "wall_s": {"main": walls, "ablation": round(wall_ablation, 1)}},
           [{"table": "evaluation", "rows": evaluations}, {"table": "probes", "rows": probes},
            {"table": "training", "rows": trainings}, {"table": "rejection_sampling", "rows": samplings},
            {"table": "rl", "rows": rls},
            {"table": "ablation", "rows": evaluation_rows(ablation_steps, " (no stage 0)")}])
    if not args.no_readme:
        replace_readme_block(block, args.profile)


if __name__ == "__main__":
    main()
