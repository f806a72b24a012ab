"""The loop each Ray Train worker runs for one LLM/VLM step: text-only LLM pretraining or a VLM stage, on
packed sequences, with a DeepSpeed ZeRO engine over the parts the stage trains, checkpoints through Ray
Train every N steps, resume from the latest one after a failure, and a plain export at the end.

A resumed worker restarts its streams at the saved positions and replays the task draws, so it sees the
samples an uninterrupted run would, except those that sat in the packer's buffer at the checkpoint
(at most `pack_buffer` per worker, skipped for that epoch).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from components.training.shards import DropCounter
from components.training.worker import (Progress, StepLoop, TrainLog, WorkerInfo, all_reduce_sums, all_workers_counts,
                                        export_on_rank0, load_engine_state, make_engine, restore, run_steps,
                                        start_worker, warmup_cosine)
from components.vlm.config import LlmPretrainConfig, LlmPretrainJob, StageConfig, TokenBalanceConfig, VlmStageJob
from components.vlm.token_balance import balanced_image_features

log = logging.getLogger(__name__)
STAGE_SEEDS = {"llm_pretrain": 0, "stage0": 1, "stage1": 2, "stage2": 3, "sft": 4, "sft_rs": 5}  # each stage draws its own data order
ALL_TASKS = ("caption", "ocr", "grounding", "counting", "video")


class PackFeed:
    """Packed sequences for one worker: samples from the mixed stream, encoded, packed best-fit."""

    def __init__(self, stream: Any, encode: Any, max_tokens: int, max_images: int, pad_id: int, buffer: int,
                 counter: DropCounter) -> None:
        from components.vlm.packing import Packer

        self.stream, self.encode, self.counter = stream, encode, counter
        self.samples = iter(stream)
        self.packer = Packer(max_tokens, max_images, pad_id, buffer)
        self.ready: list[Any] = []

    def next_packs(self, count: int) -> list[Any]:
        while len(self.ready) < count:
            encoded = self.encode(next(self.samples))
            if encoded is not None:
                self.ready.extend(self.packer.add(encoded))
        packs, self.ready = self.ready[:count], self.ready[count:]
        return packs


def make_encoder(tokenizer: Any, job: LlmPretrainJob | VlmStageJob, vit_cfg: Any, counter: DropCounter) -> Any:
    """sample -> EncodedSample, or None with the drop counted: text-only (llm_pretrain) or with images."""
    from components.vlm.conversation import BadSample, encode_sample, system_prompt_of, turns_of
    from components.vlm.data import image_token_count, select_frames

    stage = job.stage
    if isinstance(job, LlmPretrainJob):
        def encode_text(sample: Any) -> Any:
            """The sample's conversation in the chat format with its media placeholders removed, every
            token trained: the LLM learns the corpus's language and the chat template, as an instruct
            LLM would know it, so stage 0 only has to align the images."""
            try:
                turns = [(strip_media(question), answer) for question, answer in turns_of(sample.info)]
                encoded = encode_sample(key=sample.key, task=sample.task, turns=turns, tokenizer=tokenizer,
                                        image_token_counts=[], max_tokens=stage.max_tokens)
            except BadSample as bad:
                counter[bad.reason] += 1
                return None
            counter["kept"] += 1
            return dataclasses.replace(encoded, labels=list(encoded.input_ids))
        return encode_text

    def encode_multimodal(sample: Any) -> Any:
        images, stamps = select_frames(sample, stage.frames_per_clip)
        try:
            turns = turns_of(sample.info)
            encoded = encode_sample(key=sample.key, task=sample.task, turns=turns, tokenizer=tokenizer,
                                    image_token_counts=[image_token_count(im, vit_cfg) for im in images],
                                    media=images, frame_timestamps=stamps, max_tokens=stage.max_tokens,
                                    system=system_prompt_of(sample.info) or job.system_prompt or None)  # its own wins
        except BadSample as bad:
            counter[bad.reason] += 1
            return None
        except ValueError:  # media that do not match the conversation (e.g. <video> in an image sample)
            counter["bad_media"] += 1
            return None
        if encoded.num_images > stage.max_images:
            counter["too_many_images"] += 1
            return None
        counter["kept"] += 1
        if encoded.truncated_turns:
            counter["truncated_turns"] += encoded.truncated_turns
        return encoded
    return encode_multimodal


def parameter_groups(model: Any, stage: StageConfig | LlmPretrainConfig) -> list[dict[str, Any]]:
    """The trainable parameters, the ViT's at `vit_lr_scale` times the stage's learning rate."""
    vit = getattr(model, "vit", None)
    vit_ids = {id(p) for p in vit.parameters()} if vit is not None else set()
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in vit_ids]
    groups = [{"params": rest, "lr": stage.learning_rate}] if rest else []
    vit_params = [p for p in vit.parameters() if p.requires_grad] if vit is not None else []
    if vit_params:
        groups.append({"params": vit_params, "lr": stage.learning_rate * getattr(stage, "vit_lr_scale", 1.0)})
    return groups


def strip_media(question: str) -> str:
    return question.replace("<image>\n", "").replace("<video>\n", "").replace("<image>", "").replace("<video>", "").strip()


def build_model(loop_config: dict[str, Any], device: torch.device) -> tuple[Any, Any, Any]:
    """(model, tokenizer, ViT config or None) for this step: a fresh LLM (llm_pretrain), the previous
    stage's export, or Seed-ViT + the LLM + a fresh adapter."""
    from components.vit.config import SeedViTConfig
    from components.vit.model import SeedViT
    from components.vlm.model import VisionLanguageModel, build_llm, load_llm, load_vlm
    from components.vlm.tokenizer import SpecialIds, add_special_tokens, load_tokenizer

    job: LlmPretrainJob | VlmStageJob = loop_config["config"]
    torch.manual_seed(int(loop_config["seed"]))  # every rank builds the same initial weights
    if isinstance(job, LlmPretrainJob):
        tokenizer = load_tokenizer(loop_config["tokenizer"])
        llm = build_llm(job.llm, len(tokenizer), SpecialIds.of(tokenizer).pad)
        return llm, tokenizer, None
    if loop_config.get("previous"):
        model, tokenizer, _ = load_vlm(loop_config["previous"])
        return model.train(), tokenizer, at_resolution(model.vit, job.stage.max_pixels)
    vit_dir = Path(loop_config["vit"])
    saved = json.loads((vit_dir / "config.json").read_text())
    vit = SeedViT(SeedViTConfig(**saved["vit"]))
    from safetensors.torch import load_file

    vit.load_state_dict(load_file(str(vit_dir / "vit.safetensors")))
    llm_dir = Path(loop_config["llm"])
    tokenizer = load_tokenizer(llm_dir) if loop_config.get("llm_is_ours") else None
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))
        added = add_special_tokens(tokenizer)
    else:
        added = 0
    dtype = torch.bfloat16 if job.job.deepspeed.bf16 and device.type == "cuda" else torch.float32
    llm = load_llm(llm_dir, dtype)
    if added and len(tokenizer) > llm.get_input_embeddings().num_embeddings:  # grow only: keep padded vocabularies
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model = VisionLanguageModel(vit, llm, SpecialIds.of(tokenizer).image_pad, job.adapter_hidden,
                                job.adapter_output_norm, job.adapter_position_buckets,
                                job.adapter_position_frequencies, job.adapter_position_scale)
    return model.train(), tokenizer, at_resolution(vit, job.stage.max_pixels)


def at_resolution(vit: Any, max_pixels: int) -> Any:
    """The ViT's config with the stage's image size cap (a native-resolution ViT reads any size; the export
    keeps the cap, so evaluation and serving resize as training did); unchanged when `max_pixels` is 0."""
    import dataclasses

    if max_pixels:
        vit.config = dataclasses.replace(vit.config, max_pixels=max_pixels,
                                         min_pixels=min(vit.config.min_pixels, max_pixels))
    return vit.config


class StageStep:
    """One training step of an LLM/VLM stage: the next packs, the forward and backward pass, and the
    step's metrics summed or averaged over all workers."""

    def __init__(self, engine: Any, feed: PackFeed, stage: StageConfig | LlmPretrainConfig, vit_cfg: Any,
                 worker: WorkerInfo, balance: TokenBalanceConfig | None = None) -> None:
        self.engine, self.feed, self.stage, self.vit_cfg, self.worker = engine, feed, stage, vit_cfg, worker
        self.balance = balance if balance is not None and balance.enabled else None

    def __call__(self, step: int) -> dict[str, float]:
        from components.vlm.data import images_to_vit_input, to_device
        from components.vlm.model import causal_lm_loss
        from components.vlm.packing import collate, padding_fraction

        started = time.perf_counter()
        device, engine = self.worker.device, self.engine
        packs = self.feed.next_packs(self.stage.packs_per_step)
        batch = {k: v.to(device) for k, v in collate(packs).items()}
        reduction = getattr(self.stage, "loss_reduction", "token")
        num_images, num_patches, loads = 0, 0, {}
        if self.vit_cfg is None:  # text only
            embeds = engine.module.get_input_embeddings()(batch["input_ids"])
            terms = causal_lm_loss(engine, embeds, batch["position_ids"], batch["labels"],
                                   float(getattr(engine.module.config, "router_aux_loss_coef", 0.0)), reduction)
            loss = terms.loss
        else:
            images = [image for pack in packs for image in pack.media]
            packed = images_to_vit_input(images, self.vit_cfg)
            pixel_values, grid_hw = to_device(packed, device)
            num_images, num_patches = len(images), packed.num_patches if packed is not None else 0
            if self.balance is not None:
                balanced = balanced_image_features(engine.module, pixel_values, grid_hw, self.balance.group_size,
                                                   self.vit_cfg.merge_size)
                terms = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                               labels=batch["labels"], image_features=balanced.features, loss_reduction=reduction)
                loss = terms.loss + 0.0 * balanced.features.sum()  # see balanced_image_features
                loads = vit_load_metrics(balanced.patches_before, balanced.patches_after)
            else:
                terms = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                               labels=batch["labels"], pixel_values=pixel_values, grid_hw=grid_hw,
                               loss_reduction=reduction)
                loss = terms.loss
                patches = all_gather_floats(float(num_patches))
                loads = vit_load_metrics(patches, patches)
        engine.backward(loss)
        engine.step()
        elapsed = time.perf_counter() - started
        real_tokens = sum(pack.num_tokens - pack.num_padding for pack in packs)
        lm_sum, aux_sum, answers, tokens, padding_sum, images_total, patches_total = all_reduce_sums(
            [float(terms.lm_loss.detach()), float(terms.aux_loss.detach()), terms.answer_tokens, real_tokens,
             padding_fraction(packs), num_images, num_patches], device)
        world = self.worker.world_size
        return {"loss": lm_sum / world, "aux_loss": aux_sum / world, "lr": engine.get_lr()[0],
                "answer_tokens": answers, "tokens_per_s": tokens / elapsed, "padding": padding_sum / world,
                "images_per_s": images_total / elapsed, "vit_patches_per_s": patches_total / elapsed,
                "step_seconds": elapsed, **loads, **self.feed.counter.as_metrics("samples_")}


def all_gather_floats(value: float) -> list[float]:
    """Every worker's value, in rank order."""
    gathered: list[Any] = [value]
    if torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, value)
    return [float(v) for v in gathered]


def vit_load_metrics(before: list[float], after: list[float]) -> dict[str, float]:
    """The step's ViT load over workers: the largest and the mean number of patches a worker loaded, and
    the largest it ran the ViT on (the same without redistribution); a step waits on its largest."""
    mean = sum(before) / max(1, len(before))
    return {"vit_patches_max_loaded": max(before, default=0.0), "vit_patches_mean": mean,
            "vit_patches_max_computed": max(after, default=0.0),
            "vit_load_imbalance": max(after, default=0.0) / mean if mean > 0 else 1.0}


def make_feed(loop_config: dict[str, Any], job: LlmPretrainJob | VlmStageJob, tokenizer: Any, vit_cfg: Any,
              worker: WorkerInfo, progress: Progress) -> tuple[PackFeed, Any]:
    """The worker's packed-sequence feed, resumed at the saved stream position, and the stream itself."""
    from components.vlm.data import MixedStream
    from components.vlm.tokenizer import SpecialIds

    stage, data = job.stage, progress.data
    counter = DropCounter(data.get("drops", {}))
    mix = {task: 1.0 for task in ALL_TASKS} if isinstance(job, LlmPretrainJob) else stage.mix
    stream = MixedStream(Path(loop_config["shards"]), mix, worker.rank, worker.world_size,
                         int(loop_config["seed"]) * 1009 + STAGE_SEEDS[job.name], job.holdout_fraction, counter,
                         data.get("positions", {}), int(data.get("draws", 0)))
    encode = make_encoder(tokenizer, job, vit_cfg, counter)
    feed = PackFeed(stream, encode, stage.max_tokens, getattr(stage, "max_images", 1),
                    SpecialIds.of(tokenizer).pad, getattr(stage, "pack_buffer", 16), counter)
    return feed, stream


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker: build or load the model, train the stage, export it."""
    from components.vlm.model import export_vlm, set_trainable

    worker = start_worker(int(loop_config.get("threads", 1)))
    job: LlmPretrainJob | VlmStageJob = loop_config["config"]
    out_dir = Path(loop_config["out_dir"])
    model, tokenizer, vit_cfg = build_model(loop_config, worker.device)
    text_only = isinstance(job, LlmPretrainJob)
    trainable = ({"llm": sum(p.numel() for p in model.parameters())} if text_only
                 else set_trainable(model, job.stage.trainable))
    progress, resume_from = restore(worker.rank)
    engine = make_engine(model, parameter_groups(model, job.stage), job.stage.learning_rate, job.job.weight_decay,
                         warmup_cosine(job.stage.steps, job.stage.warmup_steps), job.job.deepspeed,
                         job.stage.packs_per_step)
    if resume_from is not None:
        load_engine_state(engine, resume_from)
    elif not text_only and not loop_config.get("previous"):  # the starting point, for the untrained evaluation
        export_on_rank0(engine, worker.rank, lambda module: export_vlm(
            module, tokenizer, out_dir / "initial", {"stage": "initial", "steps": 0}))
    feed, stream = make_feed(loop_config, job, tokenizer, vit_cfg, worker, progress)
    train_log = TrainLog(out_dir, worker.rank)
    train_log.start(progress, trainable=trainable)
    started = time.perf_counter()
    loop = StepLoop(job.name, job.stage.steps, job.job.checkpoint_every, job.job.fail_at_step)
    step = StageStep(engine, feed, job.stage, None if text_only else vit_cfg, worker, job.job.token_balance)
    run_steps(loop, engine, progress, step,
              lambda: {"positions": stream.positions, "draws": stream.draws, "drops": dict(feed.counter)},
              worker, train_log, out_dir)
    samples = all_workers_counts(feed.counter)
    train_log.end(job.name, samples, progress.global_step)
    summary = {"stage": job.name, "steps": progress.step, "seconds": time.perf_counter() - started,
               "samples": dict(samples), "trainable": trainable,
               "system_prompt": getattr(job, "system_prompt", ""),  # serving's default system prompt
               **loop_config.get("summary", {})}  # e.g. the SFT steps' answer modes
    export = export_llm if text_only else export_vlm
    export_on_rank0(engine, worker.rank, lambda module: export(module, tokenizer, out_dir / "model", summary))
    engine.destroy()


def export_llm(llm: Any, tokenizer: Any, folder: Path, summary: dict[str, Any]) -> None:
    """The text-pretrained LLM as a Hugging Face folder with its tokenizer, written atomically."""
    import shutil

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    llm.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "training_summary.json").write_text(json.dumps(summary, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)
