"""The ViT pretraining step: one Ray Train job (TorchTrainer, DeepSpeed ZeRO on every worker) that runs
the enabled phases (MIM against a teacher's patch features, SigLIP on caption pairs, SigLIP on video
clips) and restarts from its latest checkpoint when a worker dies.

Inputs: `shards` (write_shards' output) and, optionally, `scorer` (the data stage's CLIP scorer, the
tiny profile's teacher and text tower). Output `vit/`: `initial/`, `mim/`, `siglip/`, `video/` (plain
exported checkpoints: `vit.safetensors`, `towers.safetensors`, `config.json`) and `train_log.jsonl`.
Per-step loss terms, learning rate, images/s, tokens/s (and MFU on GPU) go to the step's MLflow run
as `<phase>/<metric>`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from components.common.contract import StageContext, StageResult, component, file_stats
from components.vit.config import VitPretrainConfig

log = logging.getLogger(__name__)
SUMMED = ("images_per_s", "tokens_per_s", "step_seconds", "mfu")


def read_train_log(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The log's step records, the last one kept for each (phase, step) after a restart, plus the
    phase-end records; and the number of restarts (worker-group starts after the first). A line cut
    short by a killed worker is skipped."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the training workers must write into the step's output "
                                "folder, so run.root has to be storage every Ray node sees")
    records: dict[tuple[str, int], dict[str, Any]] = {}
    starts = 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            log.warning("skipping a cut-short line in %s", path)
            continue
        if record.get("event") == "start":
            starts += 1
        elif record.get("phase_end"):
            records[(record["phase"], -1)] = record
        else:
            records[(record["phase"], int(record["global_step"]))] = record
    ordered = sorted(records.values(), key=lambda r: (r["global_step"], bool(r.get("phase_end"))))
    return ordered, max(0, starts - 1)


def weight_files(cfg: VitPretrainConfig) -> list[Path]:
    """The local checkpoint files the teacher and the text tower load (`scorer` comes as an input)."""
    return [Path(w) for w in (cfg.teacher.weights, cfg.text.weights) if w and w != "scorer"]


def weights_fingerprint(cfg: VitPretrainConfig) -> dict[str, Any]:
    """Weight files enter the cache key by path, size and mtime; a missing one fails before any work."""
    missing = [str(f) for f in weight_files(cfg) if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"train.vit_pretrain: weights file(s) {missing} do not exist (weights are never "
                                "downloaded): put the open_clip checkpoints there or change teacher.weights / "
                                "text.weights")
    return {"weights": file_stats(weight_files(cfg))}


def phase_summary(records: list[dict[str, Any]], phase: str) -> dict[str, float]:
    """First and last loss (mean of the last few steps) and mean throughput of one phase."""
    rows = [r for r in records if r["phase"] == phase and not r.get("phase_end")]
    ends = [r for r in records if r["phase"] == phase and r.get("phase_end")]
    if not rows:
        return {}
    tail = rows[-max(1, len(rows) // 5):]
    summary = {f"{phase}_loss_first": float(rows[0]["loss"]),
               f"{phase}_loss_last": sum(float(r["loss"]) for r in tail) / len(tail),
               f"{phase}_steps": float(len(rows))}
    for key in SUMMED:
        values = [float(r[key]) for r in rows[1:] if key in r]  # the first step pays for warm-up
        if values:
            summary[f"{phase}_{key}"] = sum(values) / len(values)
    for key, value in (ends or rows)[-1].items():
        if key.startswith("samples_"):
            summary[f"{phase}_{key}"] = float(value)
    return summary


@component(name="vit_pretrain", version="1", config="train.vit_pretrain", inputs=("shards", "scorer"),
           optional_inputs=("scorer",), outputs=("vit",), external_fingerprint=weights_fingerprint)
def vit_pretrain(ctx: StageContext[VitPretrainConfig]) -> StageResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from components.vit.train_loop import train_loop_per_worker

    cfg = ctx.config
    weights_fingerprint(cfg)  # fails early, with the fix, when a weights file is missing
    if not cfg.phases():
        raise ValueError("train.vit_pretrain has no enabled phase: enable one of mim, siglip, video, "
                         "or disable the step with train.vit_pretrain.enabled=false")
    out_dir = ctx.outputs["vit"]
    out_dir.mkdir(parents=True, exist_ok=True)
    scorer = ctx.inputs.get("scorer")
    loop_config = {"config": cfg, "shards": str(ctx.inputs["shards"]), "out_dir": str(out_dir),
                   "scorer": str(scorer) if scorer else None, "seed": ctx.seed,
                   "threads": max(1, int(cfg.resources.num_cpus))}
    storage = ctx.workdir / "ray_train"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.resources.num_cpus},
                                     label_selector=cfg.resources.label_selector() or None),
        run_config=RunConfig(name="vit_pretrain", storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    trainer.fit()
    records, restarts = read_train_log(out_dir / "train_log.jsonl")
    for record in records:
        if record.get("phase_end"):
            continue
        ctx.log_metrics({f"{record['phase']}/{k}": float(v) for k, v in record.items()
                         if isinstance(v, (int, float)) and k not in ("global_step",)}, int(record["global_step"]))
    metrics: dict[str, float] = {"restarts": float(restarts),
                                 "steps": float(sum(1 for r in records if not r.get("phase_end")))}
    for phase in cfg.phases():
        metrics |= phase_summary(records, phase)
    shutil.rmtree(storage, ignore_errors=True)  # the exported checkpoints are what later stages read
    (out_dir / ".failed_once").unlink(missing_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(metrics, indent=1))
    return StageResult(metrics=metrics, artifacts=["vit/summary.json", "vit/train_log.jsonl"])


if __name__ == "__main__":
    import sys

    from components.common.cli import component_main

    sys.exit(component_main(vit_pretrain))
