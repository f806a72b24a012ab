"""The ViT pretraining loop that each Ray Train worker runs: phases in order (MIM, SigLIP, video), one
DeepSpeed ZeRO engine per phase, checkpoints through Ray Train every N steps, resume from the latest
one after a failure, and a plain export (safetensors + config) at the start and after every phase.

State that a resume needs (phase, step, each worker's stream position and drop counts) is saved
beside DeepSpeed's files in the same checkpoint; data order is a pure function of the seed and the
position, so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from components.vit.config import PhaseConfig, VitPretrainConfig
from components.vit.model import forward_flops_per_patch
from components.vit.preprocess import image_to_patches, pack
from components.vit.shard_data import DropCounter, Sample, ShardStream, decoded, picture_split_key, task_shards

log = logging.getLogger(__name__)
CHECKPOINT_TAG = "ckpt"
IMAGE_TASKS = ("caption", "ocr", "grounding", "counting")
PHASE_TASKS = {"mim": IMAGE_TASKS, "siglip": ("caption",), "video": ("video",)}
PEAK_FLOPS = 989e12  # H100 dense bf16, for MFU
TRAINABLE = {  # module-name prefixes each phase trains
    "mim": ("vit.", "mim_head."),
    "siglip": ("vit.", "image_proj.", "text.", "text_proj.", "logit_scale", "logit_bias"),
    "video": ("vit.", "image_proj.", "text.", "text_proj.", "logit_scale", "logit_bias"),
}


@dataclasses.dataclass
class TrainState:
    phase_index: int = 0  # index into config.phases()
    step: int = 0  # steps done in that phase
    global_step: int = 0
    position: int = 0  # this worker's raw samples consumed in this phase
    drops: dict[str, int] = dataclasses.field(default_factory=dict)


def deepspeed_config(cfg: VitPretrainConfig, phase: PhaseConfig) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": phase.images_per_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.deepspeed.gradient_clipping,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": cfg.deepspeed.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def warmup_cosine(phase: PhaseConfig) -> Any:
    def factor(step: int) -> float:
        if step < phase.warmup_steps:
            return (step + 1) / (phase.warmup_steps + 1)
        progress = (step - phase.warmup_steps) / max(1, phase.steps - phase.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


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
                 seed: int, rank: int, world_size: int, state: TrainState) -> None:
        import deepspeed

        self.name, self.cfg, self.phase = name, cfg, getattr(cfg, name)
        self.teacher, self.rank, self.world_size = teacher, rank, world_size
        prefixes = tuple(p for p in TRAINABLE[name] if not (cfg.text.freeze and p == "text."))
        for param_name, param in model.named_parameters():
            param.requires_grad_(param_name.startswith(prefixes))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=self.phase.learning_rate, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(self.phase))
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=deepspeed_config(cfg, self.phase))
        self.counter = DropCounter(state.drops)
        shards = task_shards(shards_dir, PHASE_TASKS[name])
        if not shards:
            raise RuntimeError(f"phase {name!r} has no shards of tasks {PHASE_TASKS[name]} in {shards_dir}; "
                               f"disable train.vit_pretrain.{name} or enable the data step that writes them")
        phase_seed = seed * 1009 + ("mim", "siglip", "video").index(name)
        self.stream = ShardStream(shards, rank, world_size, phase_seed, held_out=False,
                                  holdout_fraction=cfg.holdout_fraction, counter=self.counter,
                                  split_key=picture_split_key)  # what the VLM holds out, the ViT never sees
        self.samples = decoded(self.stream.skip(state.position), self.counter)
        self.phase_seed = phase_seed

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
        # on the engine's device: NCCL reduces only CUDA tensors
        totals = torch.tensor([len(images), packed.num_patches, *(float(t.detach()) for t in terms.values())],
                              dtype=torch.float64, device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        images_total, patches_total, *term_sums = totals.tolist()
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
        return metrics


def save_checkpoint(runner: PhaseRunner, state: TrainState, metrics: dict[str, float]) -> None:
    """Every worker saves its DeepSpeed shard and its state; Ray Train merges them into one checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        runner.engine.save_checkpoint(folder, tag=CHECKPOINT_TAG)
        state_now = dataclasses.replace(state, position=runner.stream.position, drops=dict(runner.counter))
        (Path(folder) / f"state_rank{runner.rank}.json").write_text(json.dumps(dataclasses.asdict(state_now)))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"checkpoint_{state.global_step:07d}")


def restore(rank: int) -> tuple[TrainState, Any]:
    """The state of the latest checkpoint Ray Train hands back after a restart (and that checkpoint),
    or a fresh state."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainState(), None
    with checkpoint.as_directory() as folder:
        state = TrainState(**json.loads((Path(folder) / f"state_rank{rank}.json").read_text()))
    log.info("resuming from %s at phase %d step %d", checkpoint.path, state.phase_index, state.step)
    return state, checkpoint


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


def gathered_model(engine: Any) -> Any:
    """A context in which every rank holds full parameters (needed under ZeRO-3 only)."""
    import contextlib

    import deepspeed

    if engine.zero_optimization_stage() == 3:
        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "seedvl" / "torch_extensions"))
    import ray.train
    import ray.train.torch

    from components.vit.pretrain_model import PretrainModel, Teacher

    cfg: VitPretrainConfig = loop_config["config"]
    shards_dir, out_dir = Path(loop_config["shards"]), Path(loop_config["out_dir"])
    scorer_dir, seed = loop_config.get("scorer"), int(loop_config["seed"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(loop_config.get("threads", 1))))
    torch.manual_seed(seed)
    phases = cfg.phases()
    device = ray.train.torch.get_device()
    teacher_dtype = torch.bfloat16 if cfg.deepspeed.bf16 and device.type == "cuda" else torch.float32
    teacher = Teacher(cfg.teacher, scorer_dir, device, teacher_dtype) if "mim" in phases else None
    teacher_dim = teacher.dim if teacher is not None else 1
    model = PretrainModel(cfg, teacher_dim, scorer_dir)
    state, resume_from = restore(rank)
    if rank == 0 and resume_from is None:
        export(model, out_dir / "initial", cfg, teacher_dim, {"phase": "initial", "steps": 0})
    log_path = out_dir / "train_log.jsonl"
    if rank == 0:  # one start record per worker-group start: the driver counts restarts from them
        with log_path.open("a") as handle:
            handle.write(json.dumps({"event": "start", "phase_index": state.phase_index, "step": state.step}) + "\n")
    for phase_index, name in enumerate(phases):
        if phase_index < state.phase_index:
            continue
        if phase_index > state.phase_index:
            state = TrainState(phase_index=phase_index, global_step=state.global_step)
        runner = PhaseRunner(name, cfg, model, teacher, shards_dir, seed, rank, world_size, state)
        if resume_from is not None:
            with resume_from.as_directory() as folder:  # no copy when the storage is a local or shared path
                runner.engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
            resume_from = None
        started = time.perf_counter()
        while state.step < runner.phase.steps:
            maybe_fail(cfg.fail_at_step, state.global_step, rank, world_size, out_dir)
            metrics = runner.step(state.step)
            state.step += 1
            state.global_step += 1
            metrics |= {"phase_step": state.step, "global_step": state.global_step}
            metrics |= runner.counter.as_metrics("samples_")
            if rank == 0:
                with log_path.open("a") as handle:
                    handle.write(json.dumps({"phase": name, **metrics}) + "\n")
            if state.step % cfg.checkpoint_every == 0 or state.step == runner.phase.steps:
                save_checkpoint(runner, state, {"phase": name, **metrics})
        samples = all_workers_counts(runner.counter)
        with gathered_model(runner.engine):
            if rank == 0:
                with log_path.open("a") as handle:  # the phase's sample counts over all workers
                    handle.write(json.dumps({"phase": name, "phase_end": True, "global_step": state.global_step,
                                             **samples.as_metrics("samples_")}) + "\n")
                export(runner.engine.module, out_dir / name, cfg, teacher_dim,
                       {"phase": name, "steps": state.step, "seconds": time.perf_counter() - started,
                        "samples": dict(samples)})
        torch.distributed.barrier()
        runner.engine.destroy()  # drops the phase optimizer's gradient hooks and states before the next phase
        del runner
        gc.collect()
        state = TrainState(phase_index=phase_index + 1, global_step=state.global_step)


def all_workers_counts(counter: DropCounter) -> DropCounter:
    """The sum of every worker's counts (kept and dropped by reason)."""
    if not torch.distributed.is_initialized():
        return counter
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, dict(counter))
    total = DropCounter()
    for counts in gathered:
        total.update(counts)
    return total


def maybe_fail(fail_at_step: int, global_step: int, rank: int, world_size: int, out_dir: Path) -> None:
    """Testing aid: the last worker dies once, abruptly, at `fail_at_step` (a marker file makes it once)."""
    if fail_at_step != global_step or rank != world_size - 1:
        return
    marker = out_dir / ".failed_once"
    if marker.exists():
        return
    marker.write_text(str(global_step))
    log.warning("fail_at_step=%d: worker %d exits now", global_step, rank)
    os._exit(1)
