"""The VLM pipeline steps: `llm_pretrain` (a byte-level BPE trained on the corpus, then text-only training
of the built MoE LLM, standing in for a pretrained LLM) and `vlm_stage0`, `vlm_stage1`, `vlm_stage2`
(one Ray Train + DeepSpeed job each; what trains, on which mix and at what length is `train.vlm.stageN`).

Every stage ends with the evaluation suite on its exported checkpoint, logged to its own MLflow run as
`eval/<metric>`; a stage that starts from a fresh adapter (no earlier stage) also evaluates its starting
point as `eval_untrained/<metric>`. Each step runs alone too: `python -m components.vlm.stages <step> ...`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from components.common.contract import Component, StageContext, StageResult, component, file_stats
from components.vlm.config import MIX_TASKS, VlmConfig

log = logging.getLogger(__name__)
RUN_ONLY = ("fail_at_step", "checkpoint_every", "max_failures")  # how a job runs, not what it computes
LATER_THAN = {"llm_pretrain": ("stage0", "stage1", "stage2", "eval", "adapter_hidden", "system_prompt", *RUN_ONLY),
              "stage0": ("stage1", "stage2", *RUN_ONLY), "stage1": ("stage2", *RUN_ONLY), "stage2": RUN_ONLY}


def llm_fingerprint(cfg: VlmConfig) -> dict[str, Any]:
    """The pretrained LLM folder's files enter the cache key; a missing one fails with the fix."""
    if not cfg.llm.pretrained_path:
        return {}
    folder = Path(cfg.llm.pretrained_path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"train.vlm.llm.pretrained_path={cfg.llm.pretrained_path!r} has no config.json: give a "
                                "local Hugging Face model folder, or set it to '' to build the LLM from train.vlm.llm")
    return {"pretrained_llm": file_stats(sorted(p for p in folder.iterdir() if p.is_file()))}


def read_log(path: Path) -> tuple[list[dict[str, Any]], int, dict[str, Any]]:
    """The step records of a train log (the last record of each step wins after a restart), the
    restarts, and the end record (sample counts over all workers)."""
    records: dict[int, dict[str, Any]] = {}
    starts, end = 0, {}
    if not path.exists():
        return [], 0, {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("event") == "start":
            starts += 1
        elif record.get("stage_end"):
            end = record
        else:
            records[int(record["step"])] = record
    return [records[s] for s in sorted(records)], max(0, starts - 1), end


def train_tokenizer_from_shards(shards_dir: Path, cfg: VlmConfig, folder: Path) -> int:
    """Train the byte-level BPE on the training split's text and save it; returns the texts used."""
    from components.vit.shard_data import DropCounter, ShardStream, task_shards
    from components.vlm.data import corpus_texts, decode_sample, vlm_split_key
    from components.vlm.tokenizer import save_tokenizer, train_tokenizer

    texts: list[str] = []
    counter = DropCounter()
    for task in MIX_TASKS:
        shards = task_shards(shards_dir, (task,))
        if not shards:
            continue
        stream = ShardStream(shards, 0, 1, 0, held_out=False, holdout_fraction=cfg.holdout_fraction,
                             counter=counter, split_key=vlm_split_key)
        for raw in stream.epoch(0):
            sample = decode_sample(raw, task, counter)
            if sample is not None:
                texts += corpus_texts(sample)
    tokenizer = train_tokenizer(texts, cfg.llm.vocab_size, cfg.llm.tokenizer_min_frequency)
    save_tokenizer(tokenizer, folder)
    return len(texts)


def run_trainer(ctx: StageContext[VlmConfig], stage: str, loop_extra: dict[str, Any], out_dir: Path) -> None:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from components.vlm.train_loop import train_loop_per_worker

    cfg = ctx.config
    loop_config = {"config": cfg, "stage": stage, "shards": str(ctx.inputs["shards"]), "out_dir": str(out_dir),
                   "seed": ctx.seed, "threads": max(1, int(cfg.resources.num_cpus)), **loop_extra}
    storage = ctx.workdir / "ray_train"
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.resources.num_cpus},
                                     label_selector=cfg.resources.label_selector() or None),
        run_config=RunConfig(name=stage, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    trainer.fit()
    shutil.rmtree(storage, ignore_errors=True)
    (out_dir / ".failed_once").unlink(missing_ok=True)


def log_training(ctx: StageContext[VlmConfig], stage: str, out_dir: Path) -> dict[str, float]:
    """Per-step metrics to MLflow as `<stage>/<metric>`; the summary (first/last loss, means) back."""
    records, restarts, end = read_log(out_dir / "train_log.jsonl")
    for record in records:
        ctx.log_metrics({f"{stage}/{k}": float(v) for k, v in record.items()
                         if isinstance(v, (int, float)) and k != "step"}, int(record["step"]))
    metrics: dict[str, float] = {"restarts": float(restarts), "steps": float(len(records))}
    if records:
        metrics |= {"loss_first": float(records[0]["loss"]), "loss_last": float(records[-1]["loss"]),
                    "loss_last10": sum(float(r["loss"]) for r in records[-10:]) / len(records[-10:])}
        timed = records[1:] or records  # the first step pays for warm-up
        for key in ("tokens_per_s", "images_per_s", "padding", "aux_loss", "step_seconds"):
            metrics[f"{key}_mean"] = sum(float(r[key]) for r in timed) / len(timed)
    for key, value in end.items():  # kept and dropped by reason, all workers
        if key.startswith("samples_"):
            metrics[key] = float(value)
    return metrics


def run_llm_pretrain(ctx: StageContext[VlmConfig]) -> StageResult:
    cfg = ctx.config
    out_dir = ctx.outputs["llm"]
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = train_tokenizer_from_shards(ctx.inputs["shards"], cfg, out_dir / "tokenizer")
    run_trainer(ctx, "llm_pretrain", {"tokenizer": str(out_dir / "tokenizer")}, out_dir)
    metrics = log_training(ctx, "llm_pretrain", out_dir) | {"tokenizer_texts": float(texts)}
    (out_dir / "summary.json").write_text(json.dumps(metrics, indent=1))
    return StageResult(metrics=metrics, artifacts=["llm/summary.json", "llm/train_log.jsonl"])


def make_stage_runner(stage: str) -> Callable[[StageContext[VlmConfig]], StageResult]:
    def run_stage(ctx: StageContext[VlmConfig]) -> StageResult:
        cfg = ctx.config
        llm_fingerprint(cfg)
        out_dir = ctx.outputs["vlm"]
        out_dir.mkdir(parents=True, exist_ok=True)
        previous = ctx.inputs.get("previous")
        if previous is None and "llm" not in ctx.inputs and not cfg.llm.pretrained_path:
            raise ValueError(f"{stage} has no LLM: enable train.vlm.llm_pretrain or set train.vlm.llm.pretrained_path")
        llm = str(ctx.inputs["llm"] / "model") if "llm" in ctx.inputs else str(Path(cfg.llm.pretrained_path).expanduser())
        extra = {"previous": str(previous / "model") if previous else None, "vit": str(last_vit_export(ctx.inputs["vit"])),
                 "llm": llm, "llm_is_ours": "llm" in ctx.inputs}
        run_trainer(ctx, stage, extra, out_dir)
        metrics = log_training(ctx, stage, out_dir)
        if cfg.eval.enabled:
            metrics |= evaluate_stage(ctx, stage, out_dir, previous is None)
        shutil.rmtree(out_dir / "initial", ignore_errors=True)
        (out_dir / "summary.json").write_text(json.dumps(metrics, indent=1))
        return StageResult(metrics=metrics, artifacts=["vlm/summary.json", "vlm/train_log.jsonl"])
    run_stage.__name__ = f"run_{stage}"
    return run_stage


def evaluate_stage(ctx: StageContext[VlmConfig], stage: str, out_dir: Path, from_fresh_adapter: bool) -> dict[str, float]:
    """The suite on the stage's export (and on its starting point when that was a fresh adapter). A failing
    evaluation does not throw the trained stage away: it is recorded (`eval_failed`, `eval/error.txt`)."""
    import traceback

    from components.vlm.evaluate import evaluate_checkpoint

    cfg, stage_cfg = ctx.config, ctx.config.stage(stage)
    runs = [("eval_untrained", out_dir / "initial", "untrained")] if from_fresh_adapter and (out_dir / "initial").exists() else []
    runs.append(("eval", out_dir / "model", stage))
    metrics: dict[str, float] = {}
    for prefix, checkpoint, name in runs:
        try:
            scores = evaluate_checkpoint(checkpoint, ctx.inputs["shards"], cfg, stage_cfg.frames_per_clip,
                                         stage_cfg.max_tokens, ctx.seed, out_dir / "eval" / f"{name}.jsonl")
        except Exception:  # noqa: BLE001 - recorded, and the trained export is kept
            log.exception("evaluating %s failed", checkpoint)
            (out_dir / "eval").mkdir(exist_ok=True)
            (out_dir / "eval" / "error.txt").write_text(traceback.format_exc())
            metrics["eval_failed"] = 1.0
            continue
        metrics |= {f"{prefix}/{k}": v for k, v in scores.items()}
    return metrics


def last_vit_export(vit_dir: Path) -> Path:
    """The ViT pretraining step's latest phase export (video, else siglip, else mim)."""
    for phase in ("video", "siglip", "mim", "initial"):
        if (vit_dir / phase / "vit.safetensors").exists():
            return vit_dir / phase
    raise FileNotFoundError(f"{vit_dir} holds no Seed-ViT export")


llm_pretrain: Component[VlmConfig] = component(
    name="llm_pretrain", version="1", config="train.vlm", inputs=("shards",), outputs=("llm",),
    key_exclude=LATER_THAN["llm_pretrain"])(run_llm_pretrain)


def stage_component(stage: str) -> Component[VlmConfig]:
    return component(name=f"vlm_{stage}", version="1", config="train.vlm",
                     inputs=("shards", "vit", "llm", "previous"), optional_inputs=("llm", "previous"),
                     outputs=("vlm",), external_fingerprint=llm_fingerprint,
                     key_exclude=LATER_THAN[stage])(make_stage_runner(stage))


vlm_stage0 = stage_component("stage0")
vlm_stage1 = stage_component("stage1")
vlm_stage2 = stage_component("stage2")
STEP_COMPONENTS = {c.name: c for c in (llm_pretrain, vlm_stage0, vlm_stage1, vlm_stage2)}


if __name__ == "__main__":
    import sys

    from components.common.cli import component_main

    if len(sys.argv) < 2 or sys.argv[1] not in STEP_COMPONENTS:
        print(f"usage: python -m components.vlm.stages {{{','.join(STEP_COMPONENTS)}}} --input NAME=PATH ... "
              "--output DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(component_main(STEP_COMPONENTS[sys.argv[1]], sys.argv[2:]))
