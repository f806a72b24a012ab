"""The VLM pipeline steps: `llm_pretrain` (a byte-level BPE trained on the corpus, then text-only training
of the built MoE LLM, standing in for a pretrained LLM) and `vlm_stage0`, `vlm_stage1`, `vlm_stage2`
(one Ray Train + DeepSpeed job each, on the training runtime; what trains, on which mix and at what length
is `train.vlm.stageN`). Each step's config is the typed view of `train.vlm` it uses (`VlmStageJob`), so
its cache key holds its own stage's settings and never another stage's or the evaluation's; the
evaluation of each stage is its own step (`components/vlm/evaluate.py`).

Each step runs alone too: `python -m components.vlm.stages <step> ...`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from components.common.contract import Component, StageContext, StageResult, component, file_stats
from components.training.runtime import launch, log_step_metrics, read_log, summarise
from components.vlm.config import (MIX_TASKS, SFT_STAGES, STAGES, LlmConfig, LlmPretrainJob, VlmStageJob,
                                   llm_pretrain_view, stage_view)

log = logging.getLogger(__name__)
RUN_ONLY = ("fail_at_step", "checkpoint_every", "max_failures")  # how a job runs, not what it computes
TIMED = ("tokens_per_s", "images_per_s", "padding", "aux_loss", "step_seconds")


def llm_fingerprint(job: VlmStageJob) -> dict[str, Any]:
    """The pretrained LLM folder's files enter the cache key; a missing one fails with the fix."""
    check_pretrained_llm(job.llm)
    if not job.llm.pretrained_path:
        return {}
    folder = Path(job.llm.pretrained_path).expanduser()
    return {"pretrained_llm": file_stats(sorted(p for p in folder.iterdir() if p.is_file()))}


def check_pretrained_llm(llm: LlmConfig) -> None:
    """A named pretrained LLM folder must hold a Hugging Face config (checked before anything runs)."""
    if llm.pretrained_path and not (Path(llm.pretrained_path).expanduser() / "config.json").is_file():
        raise FileNotFoundError(f"'train.vlm.llm.pretrained_path' = {llm.pretrained_path!r} has no config.json (weights "
                                "are never downloaded): give a local Hugging Face model folder, or set it to '' to "
                                "build the LLM from train.vlm.llm")


def missing_llm(job: VlmStageJob) -> str:
    """Before the pipeline runs: a named pretrained LLM folder must exist."""
    try:
        check_pretrained_llm(job.llm)
    except FileNotFoundError as error:
        return str(error)
    return ""


def train_tokenizer_from_shards(shards_dir: Path, job: LlmPretrainJob, folder: Path) -> int:
    """Train the byte-level BPE on the training split's text and save it; returns the texts used."""
    from components.training.shards import DropCounter, ShardStream, task_shards
    from components.vlm.data import corpus_texts, decode_sample, vlm_split_key
    from components.vlm.tokenizer import save_tokenizer, train_tokenizer

    texts: list[str] = []
    counter = DropCounter()
    for task in MIX_TASKS:
        shards = task_shards(shards_dir, (task,))
        if not shards:
            continue
        stream = ShardStream(shards, 0, 1, 0, held_out=False, holdout_fraction=job.holdout_fraction,
                             counter=counter, split_key=vlm_split_key)
        for raw in stream.epoch(0):
            sample = decode_sample(raw, task, counter)
            if sample is not None:
                texts += corpus_texts(sample)
    tokenizer = train_tokenizer(texts, job.llm.vocab_size, job.llm.tokenizer_min_frequency)
    save_tokenizer(tokenizer, folder)
    return len(texts)


def train(ctx: StageContext[Any], name: str, loop_extra: dict[str, Any], out_dir: Path) -> dict[str, float]:
    """One Ray Train job for the stage, its per-step metrics to MLflow as `train/<metric>`, its summary back."""
    from components.vlm.train_loop import train_loop_per_worker

    loop_config = {"config": ctx.config, "shards": str(ctx.inputs.get("shards", "")), "out_dir": str(out_dir),
                   "seed": ctx.seed, **loop_extra}
    launch(name, train_loop_per_worker, loop_config, ctx.config.job, ctx.workdir / "ray_train", out_dir)
    log = read_log(out_dir / "train_log.jsonl")
    log_step_metrics(log.steps, ctx.log_metrics)
    return {"restarts": float(log.restarts)} | summarise(log.steps, log.ends.get(name), TIMED)


def run_llm_pretrain(ctx: StageContext[LlmPretrainJob]) -> StageResult:
    out_dir = ctx.outputs["llm"]
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = train_tokenizer_from_shards(ctx.inputs["shards"], ctx.config, out_dir / "tokenizer")
    metrics = train(ctx, "llm_pretrain", {"tokenizer": str(out_dir / "tokenizer")}, out_dir)
    metrics["tokenizer_texts"] = float(texts)
    (out_dir / "summary.json").write_text(json.dumps(metrics, indent=1))
    return StageResult(metrics=metrics, artifacts=["llm/summary.json", "llm/train_log.jsonl"])


def make_stage_runner(stage: str) -> Callable[[StageContext[VlmStageJob]], StageResult]:
    def run_stage(ctx: StageContext[VlmStageJob]) -> StageResult:
        job = ctx.config
        out_dir = ctx.outputs["vlm"]
        out_dir.mkdir(parents=True, exist_ok=True)
        previous = ctx.inputs.get("previous")
        if previous is None and "llm" not in ctx.inputs and not job.llm.pretrained_path:
            raise ValueError(f"{stage} has no LLM: enable train.vlm.llm_pretrain or set train.vlm.llm.pretrained_path")
        llm = str(ctx.inputs["llm"] / "model") if "llm" in ctx.inputs else str(Path(job.llm.pretrained_path).expanduser())
        extra = {"previous": str(previous / "model") if previous else None, "vit": str(last_vit_export(ctx.inputs["vit"])),
                 "llm": llm, "llm_is_ours": "llm" in ctx.inputs}
        metrics = train(ctx, stage, extra, out_dir)
        (out_dir / "summary.json").write_text(json.dumps(metrics, indent=1))
        return StageResult(metrics=metrics, artifacts=["vlm/summary.json", "vlm/train_log.jsonl"])
    run_stage.__name__ = f"run_{stage}"
    return run_stage


def make_sft_runner(stage: str) -> Callable[[StageContext[VlmStageJob]], StageResult]:
    def run_sft(ctx: StageContext[VlmStageJob]) -> StageResult:
        """SFT on the training runtime from the previous export (stage 2's for `sft`, the first round's for
        `sft_rs`), on the SFT conversations and, when given, the rejection-sampled answers; loss on the
        answers (reasoning included) only; the export records the two answer modes for serving."""
        from components.vlm.modes import MODES

        out_dir = ctx.outputs["vlm"]
        out_dir.mkdir(parents=True, exist_ok=True)
        sources = [ctx.inputs["sft"], *([ctx.inputs["rs"]] if "rs" in ctx.inputs else [])]
        mix_dir = merged_shard_tree(sources, ctx.workdir / "sft_mix")
        extra = {"previous": str(ctx.inputs["previous"] / "model"), "shards": str(mix_dir),
                 "summary": {"answer_modes": dict(MODES)}}
        metrics = train(ctx, stage, extra, out_dir)
        (out_dir / "summary.json").write_text(json.dumps(metrics, indent=1))
        return StageResult(metrics=metrics, artifacts=["vlm/summary.json", "vlm/train_log.jsonl"])
    run_sft.__name__ = f"run_{stage}"
    return run_sft


def merged_shard_tree(sources: list[Path], folder: Path) -> Path:
    """One `<task>/*.tar` tree over several steps' shard trees, by symbolic links (the sources are read-only
    cache entries), so the mixed stream draws each task from all of them."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    for index, source in enumerate(sources):
        for shard in sorted(Path(source).glob("*/*.tar")):
            target = folder / shard.parent.name / f"{index:02d}-{shard.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(shard.resolve())
    return folder


def last_vit_export(vit_dir: Path) -> Path:
    """The ViT pretraining step's latest phase export (video, else siglip, else mim)."""
    for phase in ("video", "siglip", "mim", "initial"):
        if (vit_dir / phase / "vit.safetensors").exists():
            return vit_dir / phase
    raise FileNotFoundError(f"{vit_dir} holds no Seed-ViT export")


llm_pretrain: Component[LlmPretrainJob] = component(
    name="llm_pretrain", version="2", config="train.vlm", inputs=("shards",), outputs=("llm",),
    key_exclude=(*RUN_ONLY, "token_balance"), view=llm_pretrain_view)(run_llm_pretrain)  # text only: no images


def stage_component(stage: str) -> Component[VlmStageJob]:
    return component(name=f"vlm_{stage}", version="2", config="train.vlm",
                     inputs=("shards", "vit", "llm", "previous"), optional_inputs=("llm", "previous"),
                     outputs=("vlm",), external_fingerprint=llm_fingerprint,
                     key_exclude=RUN_ONLY, view=stage_view(stage), preflight=missing_llm)(make_stage_runner(stage))


vlm_stage0, vlm_stage1, vlm_stage2 = (stage_component(stage) for stage in STAGES)


def sft_component(stage: str) -> Component[VlmStageJob]:
    return component(name=f"vlm_{stage}", version="1", config="train.vlm", inputs=("sft", "rs", "previous"),
                     optional_inputs=("rs",), outputs=("vlm",), key_exclude=RUN_ONLY,
                     view=stage_view(stage))(make_sft_runner(stage))


vlm_sft, vlm_sft_rs = (sft_component(stage) for stage in SFT_STAGES)
STEP_COMPONENTS = {c.name: c for c in (llm_pretrain, vlm_stage0, vlm_stage1, vlm_stage2, vlm_sft, vlm_sft_rs)}


if __name__ == "__main__":
    import sys

    from components.common.cli import named_component_main

    sys.exit(named_component_main(STEP_COMPONENTS, "components.vlm.stages", "--input NAME=PATH ... --output DIR"))
