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
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from components.vit.shard_data import DropCounter
from components.vit.train_loop import all_workers_counts, gathered_model, maybe_fail, warmup_cosine
from components.vlm.config import LlmPretrainConfig, StageConfig, VlmConfig

log = logging.getLogger(__name__)
CHECKPOINT_TAG = "ckpt"
STAGE_SEEDS = {"llm_pretrain": 0, "stage0": 1, "stage1": 2, "stage2": 3}  # each stage draws its own data order


@dataclasses.dataclass
class LoopState:
    step: int = 0
    positions: dict[str, int] = dataclasses.field(default_factory=dict)  # this worker's raw samples per task
    draws: int = 0  # this worker's task draws
    drops: dict[str, int] = dataclasses.field(default_factory=dict)


def deepspeed_config(cfg: VlmConfig, micro_batch: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.deepspeed.gradient_clipping,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": cfg.deepspeed.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


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


def make_encoder(tokenizer: Any, cfg: VlmConfig, stage: StageConfig | LlmPretrainConfig, vit_cfg: Any,
                 counter: DropCounter) -> Any:
    """sample -> EncodedSample, or None with the drop counted: text-only (llm_pretrain) or with images."""
    from components.vlm.conversation import BadSample, encode_sample, turns_of
    from components.vlm.data import image_token_count, select_frames

    if isinstance(stage, LlmPretrainConfig):
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
                                    system=cfg.system_prompt or None)
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


def save_checkpoint(engine: Any, state: LoopState, rank: int, metrics: dict[str, float]) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag=CHECKPOINT_TAG)
        (Path(folder) / f"state_rank{rank}.json").write_text(json.dumps(dataclasses.asdict(state)))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"checkpoint_{state.step:07d}")


def restore(rank: int) -> tuple[LoopState, Any]:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return LoopState(), None
    with checkpoint.as_directory() as folder:
        state = LoopState(**json.loads((Path(folder) / f"state_rank{rank}.json").read_text()))
    log.info("resuming from %s at step %d", checkpoint.path, state.step)
    return state, checkpoint


def build_model(loop_config: dict[str, Any], device: torch.device) -> tuple[Any, Any, Any]:
    """(model, tokenizer, ViT config or None) for this step: a fresh LLM (llm_pretrain), the previous
    stage's export, or Seed-ViT + the LLM + a fresh adapter."""
    from components.vit.config import SeedViTConfig
    from components.vit.model import SeedViT
    from components.vlm.model import VisionLanguageModel, build_llm, load_llm, load_vlm
    from components.vlm.tokenizer import SpecialIds, add_special_tokens, load_tokenizer

    cfg: VlmConfig = loop_config["config"]
    torch.manual_seed(int(loop_config["seed"]))  # every rank builds the same initial weights
    if loop_config["stage"] == "llm_pretrain":
        tokenizer = load_tokenizer(loop_config["tokenizer"])
        llm = build_llm(cfg.llm, len(tokenizer), SpecialIds.of(tokenizer).pad)
        return llm, tokenizer, None
    if loop_config.get("previous"):
        model, tokenizer, _ = load_vlm(loop_config["previous"])
        return model.train(), tokenizer, model.vit.config
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
    dtype = torch.bfloat16 if cfg.deepspeed.bf16 and device.type == "cuda" else torch.float32
    llm = load_llm(llm_dir, dtype)
    if added and len(tokenizer) > llm.get_input_embeddings().num_embeddings:  # grow only: keep padded vocabularies
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model = VisionLanguageModel(vit, llm, SpecialIds.of(tokenizer).image_pad, cfg.adapter_hidden)
    return model.train(), tokenizer, vit.config


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "seedvl" / "torch_extensions"))
    import deepspeed
    import ray.train
    import ray.train.torch

    from components.vlm.data import MixedStream, images_to_vit_input, to_device
    from components.vlm.model import causal_lm_loss, export_vlm, set_trainable
    from components.vlm.packing import collate, padding_fraction
    from components.vlm.tokenizer import SpecialIds

    cfg: VlmConfig = loop_config["config"]
    stage_name: str = loop_config["stage"]
    stage = cfg.stage(stage_name)
    shards_dir, out_dir, seed = Path(loop_config["shards"]), Path(loop_config["out_dir"]), int(loop_config["seed"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(loop_config.get("threads", 1))))
    device = ray.train.torch.get_device()
    model, tokenizer, vit_cfg = build_model(loop_config, device)
    text_only = stage_name == "llm_pretrain"
    if text_only:
        trainable_counts = {"llm": sum(p.numel() for p in model.parameters())}
    else:
        trainable_counts = set_trainable(model, stage.trainable)
    state, resume_from = restore(rank)
    special = SpecialIds.of(tokenizer)
    optimizer = torch.optim.AdamW(parameter_groups(model, stage), lr=stage.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(stage))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, stage.packs_per_step))
    if resume_from is not None:
        with resume_from.as_directory() as folder:
            engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
    elif not text_only and not loop_config.get("previous"):  # the starting point, for the untrained evaluation
        with gathered_model(engine):
            if rank == 0:
                export_vlm(engine.module, tokenizer, out_dir / "initial", {"stage": "initial", "steps": 0})
        torch.distributed.barrier()
    counter = DropCounter(state.drops)
    mix = {task: 1.0 for task in ("caption", "ocr", "grounding", "counting", "video")} if text_only else stage.mix
    stream = MixedStream(shards_dir, mix, rank, world_size, seed * 1009 + STAGE_SEEDS[stage_name], cfg.holdout_fraction,
                         counter, state.positions, state.draws)
    encode = make_encoder(tokenizer, cfg, stage, vit_cfg, counter)
    feed = PackFeed(stream, encode, stage.max_tokens, getattr(stage, "max_images", 1), special.pad,
                    getattr(stage, "pack_buffer", 16), counter)
    log_path = out_dir / "train_log.jsonl"
    if rank == 0:
        with log_path.open("a") as handle:
            handle.write(json.dumps({"event": "start", "step": state.step, "trainable": trainable_counts}) + "\n")
    started_stage = time.perf_counter()
    while state.step < stage.steps:
        maybe_fail(cfg.fail_at_step, state.step, rank, world_size, out_dir)
        started = time.perf_counter()
        packs = feed.next_packs(stage.packs_per_step)
        batch = {k: v.to(device) for k, v in collate(packs).items()}
        if text_only:
            embeds = engine.module.get_input_embeddings()(batch["input_ids"])
            terms = causal_lm_loss(engine, embeds, batch["position_ids"], batch["labels"],
                                   float(getattr(engine.module.config, "router_aux_loss_coef", 0.0)))
            loss, lm_loss, aux, answer_tokens = terms.loss, terms.lm_loss, terms.aux_loss, terms.answer_tokens
            num_images, num_patches = 0, 0
        else:
            images = [image for pack in packs for image in pack.media]
            packed = images_to_vit_input(images, vit_cfg)
            pixel_values, grid_hw = to_device(packed, device)
            terms = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                           pixel_values=pixel_values, grid_hw=grid_hw)
            loss, lm_loss, aux, answer_tokens = terms.loss, terms.lm_loss, terms.aux_loss, terms.answer_tokens
            num_images, num_patches = len(images), packed.num_patches if packed is not None else 0
        engine.backward(loss)
        engine.step()
        state.step += 1
        elapsed = time.perf_counter() - started
        real_tokens = sum(pack.num_tokens - pack.num_padding for pack in packs)
        totals = torch.tensor([float(lm_loss.detach()), float(aux.detach()), answer_tokens, real_tokens,
                               padding_fraction(packs), num_images, num_patches], dtype=torch.float64, device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        lm_sum, aux_sum, answers, tokens, padding_sum, images_total, patches_total = totals.tolist()
        metrics = {"loss": lm_sum / world_size, "aux_loss": aux_sum / world_size, "lr": engine.get_lr()[0],
                   "answer_tokens": answers, "tokens_per_s": tokens / elapsed, "padding": padding_sum / world_size,
                   "images_per_s": images_total / elapsed, "vit_patches_per_s": patches_total / elapsed,
                   "step_seconds": elapsed, "step": state.step}
        if rank == 0:
            with log_path.open("a") as handle:
                handle.write(json.dumps({"stage": stage_name, **metrics, **counter.as_metrics("samples_")}) + "\n")
        if state.step % cfg.checkpoint_every == 0 or state.step == stage.steps:
            state.positions, state.draws, state.drops = stream.positions, stream.draws, dict(counter)
            save_checkpoint(engine, state, rank, {"stage": stage_name, **metrics})
    samples = all_workers_counts(counter)
    with gathered_model(engine):
        if rank == 0:
            summary = {"stage": stage_name, "steps": state.step, "seconds": time.perf_counter() - started_stage,
                       "samples": dict(samples), "trainable": trainable_counts,
                       "system_prompt": cfg.system_prompt}  # serving's default system prompt
            with log_path.open("a") as handle:
                handle.write(json.dumps({"stage": stage_name, "stage_end": True, **samples.as_metrics("samples_")}) + "\n")
            if text_only:
                export_llm(engine.module, tokenizer, out_dir / "model", summary)
            else:
                export_vlm(engine.module, tokenizer, out_dir / "model", summary)
    torch.distributed.barrier()
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
