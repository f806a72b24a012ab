"""The end-to-end tests' shared tiny pipeline run: the settings (a smaller crawl than the tiny profile's,
same code paths), running the real entry point, reading a run's step summary, and copying cached steps
into a fresh run root so a test starts from the shared run's outputs instead of recomputing them."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SMALL = ["--set", "data.synthetic_crawl.num_samples=240", "--set", "data.synthetic_crawl.num_shards=2",
         "--set", "data.clip_scorer.train_samples=300", "--set", "data.clip_scorer.eval_samples=100",
         "--set", "data.clip_scorer.max_steps=20", "--set", "data.ocr.num_samples=16",
         "--set", "data.grounding.num_samples=16", "--set", "data.video.synthetic_clips=1",
         "--set", "train.vit_pretrain.mim.steps=3", "--set", "train.vit_pretrain.siglip.steps=3",
         "--set", "train.vit_pretrain.video.steps=2", "--set", "train.vit_pretrain.checkpoint_every=2",
         "--set", "train.vlm.llm_pretrain.steps=4", "--set", "train.vlm.stage0.steps=2",
         "--set", "train.vlm.stage1.steps=3", "--set", "train.vlm.stage2.steps=2",
         "--set", "train.vlm.checkpoint_every=1", "--set", "train.vlm.eval.max_items_per_kind=2",
         "--set", "train.vlm.eval.max_new_tokens=4", "--set", "train.vlm.eval.batch_size=4",
         "--set", "train.vlm.eval.gap_batches=1", "--set", "train.vlm.holdout_fraction=0.1",
         "--set", "train.vit_eval.probe_images=60", "--set", "train.vlm.eval.probe_images=60",
         "--set", "train.vit_pretrain.holdout_fraction=0.1",  # the single clip (hash 0.12) stays in training
         "--set", "train.vlm.sft.steps=2", "--set", "train.vlm.sft_rs.steps=2",
         "--set", "train.vlm.rejection_sampling.prompts_per_task=2",
         "--set", "train.vlm.rejection_sampling.samples_per_prompt=2",
         "--set", "train.vlm.rejection_sampling.max_new_tokens=8", "--set", "train.vlm.eval.thinking_max_new_tokens=8",
         "--set", "train.vlm.reward_model.steps=2", "--set", "train.vlm.reward_model.caption_prompts=4",
         "--set", "train.vlm.rl.steps=2", "--set", "train.vlm.rl.value_pretrain_steps=1",
         "--set", "train.vlm.rl.prompts_per_step=2", "--set", "train.vlm.rl.samples_per_prompt=2",
         "--set", "train.vlm.rl.max_new_tokens=8", "--set", "train.vlm.rl.algo.max_response_tokens=8",
         "--set", "train.vlm.rl.prompts_per_task=2", "--set", "train.vlm.rl.updates_per_step=1",
         "--set", "train.vlm.rl.checkpoint_every=1"]
DATA_STEPS = ("synthetic_crawl", "ingest", "basic_filters", "clip_scorer", "clip_filter", "dedup", "rebalance",
              "ocr_samples", "grounding_samples", "video_samples", "write_shards")
VLM_STEPS = ("llm_pretrain", "vlm_stage0", "vlm_eval_stage0", "vlm_stage1", "vlm_eval_stage1", "vlm_stage2",
             "vlm_eval_stage2")
SFT_STEPS = ("sft_data", "vlm_sft", "rejection_sampling", "vlm_sft_rs", "vlm_eval_sft")
RL_STEPS = ("reward_model", "vlm_rl", "vlm_eval_rl")


@dataclasses.dataclass(frozen=True)
class PipelineRun:
    root: Path  # run.root: cache/, mlflow.db, pipeline_runs/
    steps: dict[str, dict]  # the run's summary.json, by step name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pipeline(root: Path, *args: str, timeout: float = 1500, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`python pipelines/full.py` with the small settings and `args`, its run root at `root`."""
    env = os.environ | {"SEEDVL_RUN_ROOT": str(root)}
    done = subprocess.run([sys.executable, "pipelines/full.py", *SMALL, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"pipeline failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


def last_summary(root: Path) -> dict[str, dict]:
    latest = sorted((root / "pipeline_runs").iterdir())[-1]
    return {step["name"]: step for step in json.loads((latest / "summary.json").read_text())["steps"]}


def copy_cached_steps(source: Path, dest: Path, steps: tuple[str, ...]) -> None:
    """The cache entries of `steps` from one run root into another (entries are relocatable: manifests hold
    relative paths); the MLflow store is not copied, so the new root's tracking starts empty."""
    for step in steps:
        if (source / "cache" / step).is_dir():
            shutil.copytree(source / "cache" / step, dest / "cache" / step,
                            ignore=shutil.ignore_patterns(".staging-*"))


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM a process started with `start_new_session=True` and its children; SIGKILL after a minute."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
