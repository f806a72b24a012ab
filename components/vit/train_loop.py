"""The ViT pretraining loop that each Ray Train worker runs, on the training runtime
(`components.training.worker`): phases in order (MIM, SigLIP, video), one DeepSpeed ZeRO engine per
phase, checkpoints every N steps, resume from the latest one after a failure, and a plain export
(safetensors + config) at the start and after every phase.

The runtime saves each worker's progress (phase, step, stream position and drop counts) beside
DeepSpeed's files; data order is a pure function of the seed and the position, so a resumed run sees
the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from components.training.shards import DropCounter, ShardStream, picture_split_key, task_shards
from components.training.worker import (Progress, StepLoop, TrainLog, WorkerInfo, all_reduce_sums, all_workers_counts,
                                        export_on_rank0, load_engine_state, make_engine, restore, run_steps,
                                        start_worker, warmup_cosine)
from components.vit.config import VitPretrainConfig
from components.vit.model import forward_flops_per_patch
from components.vit.preprocess import image_to_patches, pack
from components.vit.shard_data import Sample, decoded

log = logging.getLogger(__name__)
IMAGE_TASKS = ("caption", "ocr", "grounding", "counting")
PHASE_TASKS = {"mim": IMAGE_TASKS, "siglip": ("caption",), "video": ("video",)}
PEAK_FLOPS = 989e12  # H100 dense bf16, for MFU
TRAINABLE = {  # module-name prefixes each phase trains
    "mim": ("vit.", "mim_head."),
    "siglip": ("vit.", "image_proj.", "text.", "text_proj.", "logit_scale", "logit_bias"),
    "video": ("vit.", "image_proj.", "text.", "text_proj.", "logit_scale", "logit_bias"),
}


def evenly_spaced(frames: list[Any], count: int) -> list[Any]:
    if len(frames) <= count:
        return frames
    return [frames[round(i * (len(frames) - 1) / (count - 1))] if count > 1 else frames[len(frames) // 2]
            for i in range(count)]


def next_batch(samples: Iterator[Sample], size: int) -> list[Sample]:
    return [next(samples) for _ in range(size)]


class PhaseRunner:
    """One phase on one worker: the engine, the data stream, the step."""

    def __init__(self, name: str, cfg: VitPretrainConfig, model: torch.nn.Module, teacher: Any, shards_dir: Path,
                 seed: int, worker: WorkerInfo, progress: Progress) -> None:
        self.name, self.cfg, self.phase = name, cfg, getattr(cfg, name)
        self.teacher, self.rank, self.world_size = teacher, worker.rank, worker.world_size
        prefixes = tuple(p for p in TRAINABLE[name] if not (cfg.text.freeze and p == "text."))
        for param_name, param in model.named_parameters():
            param.requires_grad_(param_name.startswith(prefixes))
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.engine = make_engine(model, [{"params": trainable}], self.phase.learning_rate, cfg.weight_decay,
                                  warmup_cosine(self.phase.steps, self.phase.warmup_steps), cfg.deepspeed,
                                  self.phase.images_per_batch)
        self.counter = DropCounter(progress.data.get("drops", {}))
        shards = task_shards(shards_dir, PHASE_TASKS[name])
        if not shards:
            raise RuntimeError(f"phase {name!r} has no shards of tasks {PHASE_TASKS[name]} in {shards_dir}; "
                               f"disable train.vit_pretrain.{name} or enable the data step that writes them")
        phase_seed = seed * 1009 + ("mim", "siglip", "video").index(name)
        self.stream = ShardStream(shards, self.rank, self.world_size, phase_seed, held_out=False,
                                  holdout_fraction=cfg.holdout_fraction, counter=self.counter,
                                  split_key=picture_split_key)  # what the VLM holds out, the ViT never sees
        self.samples = decoded(self.stream.skip(int(progress.data.get("position", 0))), self.counter)
        self.phase_seed = phase_seed

    def data_state(self) -> dict[str, Any]:
        return {"position": self.stream.position, "drops": dict(self.counter)}

    def step(self, step: int) -> dict[str, float]:
        """Train on one batch; `step` (this phase's, from 0) seeds the masks, so a resumed run draws the same."""
        from components.vit.pretrain_model import random_patch_mask, same_caption

        started = time.perf_counter()
        batch = next_batch(self.samples, self.phase.images_per_batch)
        vit_cfg = self.cfg.vit
        if self.name == "video":
            clips = [evenly_spaced(sample.images, self.phase.frames_per_clip) for sample in batch]
            images = [frame for clip in clips for frame in clip]
            frames_per_item = torch.tensor([len(clip) for clip in clips])
        else:
            images, frames_per_item = [sample.images[0] for sample in batch], None
        packed = pack([image_to_patches(image, vit_cfg) for image in images])
        device = self.engine.device
        if self.name == "mim":
            generator = torch.Generator().manual_seed(self.phase_seed * 7919 + self.rank * 104729 + step)
            mask = random_patch_mask(packed.grid_hw, self.phase.mask_ratio, generator)
            targets = self.teacher.patch_targets(images, packed.grid_hw, vit_cfg.merge_size)
            terms = self.engine("mim", pixel_values=packed.pixel_values.to(device), grid_hw=packed.grid_hw,
                                mask=mask.to(device), targets=targets.to(device))
        else:
            captions = [sample.caption for sample in batch]
            tokens = self.engine.module.text.tokenize(captions)
            terms = self.engine("siglip", pixel_values=packed.pixel_values.to(device), grid_hw=packed.grid_hw,
                                tokens=tokens.to(device), positives=same_caption(captions),
                                frames_per_item=frames_per_item)
        loss = sum(terms.values())
        self.engine.backward(loss)
        self.engine.step()
        elapsed = time.perf_counter() - started
        images_total, patches_total, *term_sums = all_reduce_sums(
            [len(images), packed.num_patches, *(float(t.detach()) for t in terms.values())], device)
        metrics = {key: value / self.world_size for key, value in zip(terms, term_sums)}  # means over workers
        metrics |= {"loss": sum(term_sums) / self.world_size, "lr": self.engine.get_lr()[0], "step_seconds": elapsed,
                    "images_per_s": images_total / elapsed, "tokens_per_s": patches_total / elapsed}
        if self.name != "mim":
            module = self.engine.module
            metrics |= {"logit_scale": float(module.logit_scale.detach().exp()),
                        "logit_bias": float(module.logit_bias.detach())}
        if device.type == "cuda":
            mean_length = packed.num_patches / len(images)
            flops = 3 * forward_flops_per_patch(vit_cfg, int(mean_length)) * patches_total
            metrics["mfu"] = flops / elapsed / (PEAK_FLOPS * self.world_size)
        return metrics | self.counter.as_metrics("samples_")


def export(model: torch.nn.Module, folder: Path, cfg: VitPretrainConfig, teacher_dim: int,
           summary: dict[str, Any]) -> None:
    """A plain checkpoint: `vit.safetensors` + `config.json` for Seed-ViT, `towers.safetensors` for the rest."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    save_file({k[len("vit."):]: v for k, v in state.items() if k.startswith("vit.")}, str(tmp / "vit.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("vit.")}, str(tmp / "towers.safetensors"))
    config = {"architecture": "seed_vit", "vit": dataclasses.asdict(cfg.vit), "embed_dim": cfg.embed_dim,
              "text": dataclasses.asdict(cfg.text), "teacher_dim": teacher_dim,
              "holdout_fraction": cfg.holdout_fraction, **summary}
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.replace(folder)



def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker: the enabled phases in order, each on a fresh engine."""
    from components.vit.pretrain_model import PretrainModel, Teacher

    worker = start_worker(int(loop_config.get("threads", 1)))
    cfg: VitPretrainConfig = loop_config["config"]
    shards_dir, out_dir = Path(loop_config["shards"]), Path(loop_config["out_dir"])
    scorer_dir, seed = loop_config.get("scorer"), int(loop_config["seed"])
    torch.manual_seed(seed)
    phases = cfg.phases()
    teacher_dtype = torch.bfloat16 if cfg.deepspeed.bf16 and worker.device.type == "cuda" else torch.float32
    teacher = Teacher(cfg.teacher, scorer_dir, worker.device, teacher_dtype) if "mim" in phases else None
    teacher_dim = teacher.dim if teacher is not None else 1
    model = PretrainModel(cfg, teacher_dim, scorer_dir)
    progress, resume_from = restore(worker.rank)
    if worker.rank == 0 and resume_from is None:
        export(model, out_dir / "initial", cfg, teacher_dim, {"phase": "initial", "steps": 0})
    train_log = TrainLog(out_dir, worker.rank)
    train_log.start(progress)
    for phase_index, name in enumerate(phases):
        if phase_index < progress.part:
            continue
        if phase_index > progress.part:
            progress = Progress(part=phase_index, global_step=progress.global_step)
        runner = PhaseRunner(name, cfg, model, teacher, shards_dir, seed, worker, progress)
        if resume_from is not None:
            load_engine_state(runner.engine, resume_from)
            resume_from = None
        started = time.perf_counter()
        loop = StepLoop(name, runner.phase.steps, cfg.checkpoint_every, cfg.fail_at_step)
        run_steps(loop, runner.engine, progress, runner.step, runner.data_state, worker, train_log, out_dir)
        samples = all_workers_counts(runner.counter)
        train_log.end(name, samples, progress.global_step)
        summary = {"phase": name, "steps": progress.step, "seconds": time.perf_counter() - started,
                   "samples": dict(samples)}
        export_on_rank0(runner.engine, worker.rank,
                        lambda module: export(module, out_dir / name, cfg, teacher_dim, summary))
        runner.engine.destroy()  # drops the phase optimizer's gradient hooks and states before the next phase
        del runner
        gc.collect()
        progress = Progress(part=phase_index + 1, global_step=progress.global_step)
