"""The ViT pretraining step: one Ray Train job (TorchTrainer, DeepSpeed ZeRO on every worker) that runs
the enabled phases (MIM against a teacher's patch features, SigLIP on caption pairs, SigLIP on video
clips) and restarts from its latest checkpoint when a worker dies.

Inputs: `shards` (write_shards' output) and, optionally, `scorer` (the data stage's CLIP scorer, the
tiny profile's teacher and text tower). Output `vit/`: `initial/`, `mim/`, `siglip/`, `video/` (plain
exported checkpoints: `vit.safetensors`, `towers.safetensors`, `config.json`) and `train_log.jsonl`.
Per-step loss terms, learning rate, images/s, tokens/s (and MFU on GPU) go to the step's MLflow run
as `train/<metric>` (`runtime.step_metric_series`; the phases follow each other in global steps).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from components.common.contract import StageContext, StageResult, component, file_stats
from components.training.runtime import TrainLogRecords, launch, log_step_metrics, read_log, summarise
from components.vit.config import VitPretrainConfig

SUMMED = ("images_per_s", "tokens_per_s", "step_seconds", "mfu")


def weight_files(cfg: VitPretrainConfig) -> list[Path]:
    """The local checkpoint files the teacher and the text tower load (`scorer` comes as an input)."""
    used = ((cfg.teacher.weights,) if cfg.mim.enabled else ()) + (cfg.text.weights,)
    return [Path(w) for w in used if w and w != "scorer"]


def missing_weights(cfg: VitPretrainConfig) -> str:
    """Before the pipeline runs: the teacher's and text tower's local weight files must exist."""
    wanted = [("teacher.weights", cfg.teacher.weights)] if cfg.mim.enabled else []
    wanted.append(("text.weights", cfg.text.weights))
    absent = [f"'train.vit_pretrain.{key}' = {path}" for key, path in wanted
              if path and path != "scorer" and not Path(path).is_file()]
    return (f"{', '.join(absent)}: no such file (weights are never downloaded): put the checkpoint there, or point "
            "the key at a local file") if absent else ""


def weights_fingerprint(cfg: VitPretrainConfig) -> dict[str, Any]:
    """Weight files enter the cache key by path, size and mtime; a missing one fails with `missing_weights`."""
    problem = missing_weights(cfg)
    if problem:
        raise FileNotFoundError(problem)
    return {"weights": file_stats(weight_files(cfg))}


def phase_summary(log: TrainLogRecords, phase: str) -> dict[str, float]:
    """One phase's summary (`runtime.summarise`), each key prefixed with the phase's name."""
    records = log.part(phase)
    if not records:
        return {}
    return {f"{phase}_{key}": value for key, value in summarise(records, log.ends.get(phase), SUMMED).items()}


@component(name="vit_pretrain", version="1", config="train.vit_pretrain", inputs=("shards", "scorer"),
           optional_inputs=("scorer",), outputs=("vit",), external_fingerprint=weights_fingerprint,
           preflight=missing_weights)
def vit_pretrain(ctx: StageContext[VitPretrainConfig]) -> StageResult:
    from components.vit.train_loop import train_loop_per_worker

    cfg = ctx.config
    if not cfg.phases():
        raise ValueError("train.vit_pretrain has no enabled phase: enable one of mim, siglip, video, "
                         "or disable the step with train.vit_pretrain.enabled=false")
    out_dir = ctx.outputs["vit"]
    out_dir.mkdir(parents=True, exist_ok=True)
    scorer = ctx.inputs.get("scorer")
    loop_config = {"config": cfg, "shards": str(ctx.inputs["shards"]), "out_dir": str(out_dir),
                   "scorer": str(scorer) if scorer else None, "seed": ctx.seed}
    launch("vit_pretrain", train_loop_per_worker, loop_config, cfg, ctx.workdir / "ray_train", out_dir)
    log = read_log(out_dir / "train_log.jsonl")
    log_step_metrics(log.steps, ctx.log_metrics)
    metrics: dict[str, float] = {"restarts": float(log.restarts), "steps": float(len(log.steps))}
    for phase in cfg.phases():
        metrics |= phase_summary(log, phase)
    (out_dir / "summary.json").write_text(json.dumps(metrics, indent=1))
    return StageResult(metrics=metrics, artifacts=["vit/summary.json", "vit/train_log.jsonl"])


if __name__ == "__main__":
    import sys

    from components.common.cli import component_main

    sys.exit(component_main(vit_pretrain))
