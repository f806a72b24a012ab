"""The VLM evaluation suite, one pipeline step per trained stage (`vlm_eval_stage0` .. `vlm_eval_stage2`):
held-out items (never trained on) answered greedily by the generation engine in a Ray Data
batch-inference job, scored per task (captioning text match, counting accuracy, grounding
IoU >= 0.5, OCR exact match, video temporal grounding, video QA), each beside its shuffled-image control
(every item asked again, with the same decoding, with another held-out sample's image or clip: a score that
does not drop there was learned from the questions' and answers' language, not from the pixels), and the
image-use gap per task: the answer loss with each sample's own images against the same answers with
another sample's images.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.common.contract import Component, StageContext, StageResult, component
from components.training.shards import DropCounter
from components.vlm.config import MIX_TASKS, STAGES, VlmEvalConfig, VlmEvalJob, eval_view
from components.vlm.data import encode_png
from components.vlm.inference import generation_request, load_for_inference

log = logging.getLogger(__name__)


def held_out_rows(shards_dir: Path, job: VlmEvalJob) -> tuple[list[dict[str, Any]], DropCounter]:
    """Evaluation items as Ray Data rows (PNG bytes of the images or frames travel with them), at most
    `max_items_per_kind` per kind, and the drop counts of the held-out samples read. Items are taken one
    per sample in rounds (sample i gives its item i, i+1, ... modulo its count), so a kind's items come from as
    many pictures as the held-out split has, and from every turn (boxes and points alike), rather than from the
    first few samples' every turn."""
    from components.vlm.data import held_out_samples, select_frames
    from components.vlm.eval_tasks import items_from_sample

    counter = DropCounter()
    per_sample: list[tuple[list[Any], Any]] = []
    for sample in held_out_samples(shards_dir, MIX_TASKS, job.holdout_fraction, counter):
        items = items_from_sample({**sample.info, "task": sample.task, "key": sample.key})
        if items:
            per_sample.append((items, sample))
        counter["kept"] += 1
    per_kind: Counter[str] = Counter()
    media: dict[int, tuple[list[bytes], list[float]]] = {}  # encoded once per sample, only where used
    rows: list[dict[str, Any]] = []
    for round_ in range(max((len(items) for items, _ in per_sample), default=0)):
        for index, (items, sample) in enumerate(per_sample):
            if round_ >= len(items):
                continue
            item = items[(index + round_) % len(items)]
            if per_kind[item.kind] >= job.eval.max_items_per_kind:
                continue
            per_kind[item.kind] += 1
            if index not in media:
                images, stamps = select_frames(sample, job.frames_per_clip)
                media[index] = ([encode_png(image) for image in images], stamps or [])
            encoded_images, stamps = media[index]
            rows.append({**item.to_dict(), "images": encoded_images, "timestamps": stamps, "control": "true"})
    return rows, counter


def shuffled_control(rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """The shuffled-image control: every item again with the images (and frame times) of another held-out
    sample of the same kind, the samples of each kind rotated by a seeded shift so that no item keeps its
    own sample's media. A kind with a single sample has nothing to swap with and is left out."""
    by_kind: dict[str, list[str]] = {}
    media: dict[tuple[str, str], tuple[Any, Any]] = {}
    for row in rows:
        keys = by_kind.setdefault(row["kind"], [])
        if row["key"] not in keys:
            keys.append(row["key"])
            media[row["kind"], row["key"]] = (row["images"], row["timestamps"])
    rng = np.random.default_rng(seed)
    donor: dict[tuple[str, str], str] = {}
    for kind, keys in by_kind.items():
        if len(keys) < 2:
            continue
        shift = 1 + int(rng.integers(0, len(keys) - 1))
        donor |= {(kind, key): other for key, other in zip(keys, keys[shift:] + keys[:shift])}
    shuffled = []
    for row in rows:
        other = donor.get((row["kind"], row["key"]))
        if other is not None:
            images, stamps = media[row["kind"], other]
            shuffled.append({**row, "images": images, "timestamps": stamps, "control": "shuffled"})
    return shuffled


class GreedyAnswerer:
    """A Ray Data callable class: loads the exported VLM once into the generation engine and answers a
    batch of items greedily, as far as the longest reference answer of the batch needs (at least
    `max_new_tokens`)."""

    def __init__(self, checkpoint: str, max_new_tokens: int, threads: int = 1, system: str = "") -> None:
        from components.generation.engine import GenerationEngine

        torch.set_num_threads(max(1, threads))
        model, tokenizer = load_for_inference(checkpoint)
        self.engine, self.tokenizer = GenerationEngine(model, tokenizer), tokenizer
        self.max_new_tokens, self.system = max_new_tokens, system or None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from components.generation.engine import SamplingParams
        from components.vlm.conversation import answer_text

        longest = max(len(self.tokenizer(str(ref), add_special_tokens=False)["input_ids"]) for ref in batch["reference"])
        sampling = SamplingParams(max_tokens=max(self.max_new_tokens, longest + 4), temperature=0.0)
        requests = [generation_request(self.engine, self.tokenizer, str(question), images, stamps, self.system, sampling)
                    for question, images, stamps in zip(batch["question"], batch["images"], batch["timestamps"])]
        completions = self.engine.generate(requests)
        predictions = [answer_text(self.tokenizer, samples[0].token_ids) for samples in completions]
        passed = {name: values for name, values in batch.items() if name not in ("images", "timestamps")}
        return passed | {"prediction": np.array(predictions, dtype=object)}


def answer_items(checkpoint: Path, rows: list[dict[str, Any]], eval_cfg: VlmEvalConfig,
                 system: str = "") -> list[dict[str, Any]]:
    """Greedy answers to every row, as a Ray Data batch-inference job."""
    import ray.data

    if not rows:
        return []
    threads = max(1, int(eval_cfg.resources.num_cpus))
    dataset = ray.data.from_items(rows).map_batches(
        GreedyAnswerer, fn_constructor_kwargs={"checkpoint": str(checkpoint), "max_new_tokens": eval_cfg.max_new_tokens,
                                               "threads": threads, "system": system},
        batch_size=eval_cfg.batch_size, num_gpus=eval_cfg.num_gpus, **eval_cfg.resources.map_kwargs(actors=True))
    return dataset.take_all()


def score_answers(answers: list[dict[str, Any]], thinking: bool = False) -> tuple[dict[str, dict[str, float]],
                                                                                 list[dict[str, Any]]]:
    """Aggregated metrics per control ("true", "shuffled"), and one example per item: its prediction and
    scores with its own image, and with the shuffled image when it was asked so (`*_shuffled` keys). With
    `thinking`, each prediction is scored on what follows its `</think>` (the verifiers' rule), with
    `format_ok`; every prediction also gives `answer_words` (and `thinking_words`), the mean lengths."""
    from components.vlm.eval_tasks import EvalItem, aggregate, score
    from components.vlm.verifiers import split_thinking

    scored: dict[str, list[Any]] = {"true": [], "shuffled": []}
    examples: dict[tuple[str, str, int], dict[str, Any]] = {}
    for row in answers:
        item = EvalItem.from_dict(row)
        control = str(row.get("control", "true"))
        result = score(item, str(row["prediction"]), thinking=thinking)
        reasoning, answer = split_thinking(str(row["prediction"])) if thinking else (None, str(row["prediction"]))
        result = {**result, "answer_words": float(len(answer.split()))}
        if thinking:
            result["thinking_words"] = float(len((reasoning or "").split()))
        scored[control].append((item, result))
        example = examples.setdefault((item.key, item.kind, item.turn),
                                      {"key": item.key, "kind": item.kind, "turn": item.turn,
                                       "question": item.question, "reference": item.reference,
                                       "scene_objects": item.scene_objects})
        suffix = "" if control == "true" else f"_{control}"
        example |= {f"prediction{suffix}": str(row["prediction"]), **{f"{k}{suffix}": v for k, v in result.items()}}
    metrics = {control: aggregate(items) for control, items in scored.items() if items}
    # Ray Data's actor pool returns rows in no fixed order: the examples are sorted so the file is the same
    # on every run
    return metrics, [examples[k] for k in sorted(examples)]


def image_use_gap(checkpoint: Path, shards_dir: Path, job: VlmEvalJob, seed: int) -> dict[str, float]:
    """Mean answer loss over held-out samples with their own images and with another sample's images
    (the next sample of the same task, image for image, clip for clip), over the same answer tokens:
    a pair whose encodings differ in their labels (a truncation that depends on the image sizes) is
    skipped. Up to `gap_batches * batch_size` samples of every task."""
    from components.vlm.conversation import BadSample, encode_sample, turns_of
    from components.vlm.data import held_out_samples, image_token_count, select_frames

    torch.set_num_threads(max(1, int(job.eval.resources.num_cpus)))
    frames_per_clip, max_tokens = job.frames_per_clip, job.max_tokens
    model, tokenizer = load_for_inference(checkpoint)
    vit_cfg = model.vit.config
    by_task: dict[str, list[Any]] = {}
    limit = job.eval.gap_batches * job.eval.batch_size
    for sample in held_out_samples(shards_dir, MIX_TASKS, job.holdout_fraction, DropCounter()):
        group = by_task.setdefault(sample.task, [])
        if len(group) < limit:
            group.append(sample)
    sums, tokens, skipped = {"true": 0.0, "shuffled": 0.0}, 0, 0
    per_task: dict[str, list[float]] = {}  # task -> [true sum, shuffled sum, tokens]
    for task, group in by_task.items():
        if len(group) < 2:
            continue
        shift = 1 + int(np.random.default_rng(seed).integers(0, len(group) - 1))
        for own, other in zip(group, group[shift:] + group[:shift]):  # nobody keeps its own images
            try:
                turns = turns_of(own.info)
                own_images, stamps = select_frames(own, frames_per_clip)
                other_images = select_frames(other, frames_per_clip)[0][:len(own_images)]
                encoded = [encode_sample(key=own.key, task=own.task, turns=turns, tokenizer=tokenizer,
                                         image_token_counts=[image_token_count(i, vit_cfg) for i in images],
                                         media=images, frame_timestamps=stamps[:len(images)] if stamps else None,
                                         max_tokens=max_tokens, system=job.system_prompt or None)
                           for images in (own_images, other_images)]
            except (BadSample, ValueError):
                skipped += 1
                continue
            answers = [[label for label in e.labels if label != -100] for e in encoded]
            if answers[0] != answers[1] or not answers[0]:
                skipped += 1
                continue
            (loss_true, count), (loss_shuffled, _) = (sample_loss(model, e, vit_cfg) for e in encoded)
            sums["true"] += loss_true
            sums["shuffled"] += loss_shuffled
            tokens += count
            task_sums = per_task.setdefault(task, [0.0, 0.0, 0])
            task_sums[0] += loss_true
            task_sums[1] += loss_shuffled
            task_sums[2] += count
    if tokens == 0:
        return {"gap_pairs_skipped": float(skipped)}
    true, shuffled = sums["true"] / tokens, sums["shuffled"] / tokens
    by_task_gap = {f"image_use_gap_{task}": (s_shuffled - s_true) / n
                   for task, (s_true, s_shuffled, n) in sorted(per_task.items()) if n}
    return {"heldout_answer_loss": true, "shuffled_images_answer_loss": shuffled, "image_use_gap": shuffled - true,
            **by_task_gap, "gap_answer_tokens": float(tokens), "gap_pairs_skipped": float(skipped)}


def probe_export(checkpoint: Path, shards_dir: Path, max_images: int, threads: int) -> dict[str, float]:
    """The linear probes (components.common.probes) on the export's frozen ViT tokens (`probe_vit_*`) and on
    its adapter's output, the tokens the LLM reads (`probe_adapter_*`)."""
    from components.common.probes import probe_set, shard_probe_samples
    from components.vit.preprocess import visual_tokens

    torch.set_num_threads(threads)
    probes = probe_set(shard_probe_samples(shards_dir), max_images)
    if len(probes.images) < 20:
        return {}
    model, _ = load_for_inference(checkpoint)
    model = model.float().cpu()
    metrics = {}
    merge = model.vit.config.merge_size

    def adapter_tokens(images: list[Any]) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
        """The adapter's output per image, as the LLM reads it (with the token positions when it adds them)."""
        tokens, grids = visual_tokens(model.vit, images)
        with torch.inference_mode():
            grid_hw = torch.tensor([(h * merge, w * merge) for h, w in grids], dtype=torch.long)
            out = model.adapter(torch.from_numpy(np.concatenate(tokens)), grid_hw, merge).float().numpy()
        offsets = np.cumsum([0] + [len(t) for t in tokens])
        return [out[a:b] for a, b in zip(offsets[:-1], offsets[1:])], grids

    for name, encode in (("vit", lambda images: visual_tokens(model.vit, images)), ("adapter", adapter_tokens)):
        scores = probes.score(encode)
        metrics |= {f"probe_{name}_{key}": value for key, value in scores.items()}
    return metrics


@torch.no_grad()
def sample_loss(model: Any, encoded: Any, vit_cfg: Any) -> tuple[float, int]:
    """(summed answer cross-entropy, answer tokens) of one encoded sample."""
    from components.vlm.data import images_to_vit_input
    from components.vlm.model import causal_lm_loss

    device = model.adapter.fc1.weight.device
    ids = torch.tensor([encoded.input_ids], device=device)
    labels = torch.tensor([encoded.labels], device=device)
    packed = images_to_vit_input(list(encoded.media), vit_cfg)
    embeds = model.embed(ids, packed.pixel_values.to(device) if packed else None,
                         packed.grid_hw.to(device) if packed else None)
    result = causal_lm_loss(model.llm, embeds, torch.arange(ids.shape[1], device=device)[None], labels, 0.0)
    return float(result.lm_loss) * result.answer_tokens, result.answer_tokens


def evaluate_checkpoint(checkpoint: Path, shards_dir: Path, job: VlmEvalJob, seed: int,
                        examples_path: Path | None = None, controls: bool = True,
                        mode: str | None = None) -> dict[str, float]:
    """Every evaluation metric of one exported checkpoint; with `controls`, each score's shuffled-image
    control too (`shuffled/<metric>`) and its gap (`gap/<metric>`: true minus shuffled). `mode` ("thinking"
    or "direct", for an SFT export) asks under that mode's system prompt, and thinking answers are scored
    after their reasoning; the image-use gap and the probes, which do not depend on the mode, are measured in
    direct mode only."""
    import dataclasses

    import ray

    from components.vlm.modes import system_prompt

    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not an exported VLM (no config.json)")
    rows, counter = held_out_rows(shards_dir, job)
    asked = rows + (shuffled_control(rows, seed) if controls else [])
    system, eval_cfg = job.system_prompt, job.eval
    if mode is not None:
        system = system_prompt(mode)
        job = dataclasses.replace(job, system_prompt=system)
    if mode == "thinking":
        eval_cfg = dataclasses.replace(eval_cfg, max_new_tokens=eval_cfg.thinking_max_new_tokens)
    # The image-use gap and the probes (direct mode only) run as Ray tasks beside the answering actors, so
    # every CPU the evaluation's resources allow is busy while the answers are decoded.
    pending = []
    if mode != "thinking":
        cpus, placement = job.eval.resources.num_cpus, job.eval.resources.placement_kwargs()
        gap_task = ray.remote(image_use_gap).options(num_cpus=cpus, num_gpus=job.eval.num_gpus, **placement)
        pending.append(gap_task.remote(checkpoint, shards_dir, job, seed))
        if controls and job.probes and job.eval.probe_images > 0:
            probe_task = ray.remote(probe_export).options(num_cpus=cpus, **placement)
            pending.append(probe_task.remote(checkpoint, shards_dir, job.eval.probe_images, max(1, int(cpus))))
    by_control, examples = score_answers(answer_items(checkpoint, asked, eval_cfg, system),
                                         thinking=mode == "thinking")
    metrics = dict(by_control.get("true", {}))
    shuffled = by_control.get("shuffled", {})
    metrics |= {f"shuffled/{key}": value for key, value in shuffled.items()}
    metrics |= {f"gap/{key}": metrics[key] - value for key, value in shuffled.items()
                if key in metrics and not key.startswith("n_") and not key.endswith("_majority")}
    for result in ray.get(pending):
        metrics |= result
    return finish_metrics(metrics, counter, examples, examples_path)


def finish_metrics(metrics: dict[str, float], counter: DropCounter, examples: list[dict[str, Any]],
                   examples_path: Path | None) -> dict[str, float]:
    """The held-out sample count added, and the scored examples written (one JSON line each)."""
    metrics["held_out_samples"] = float(counter.get("kept", 0))
    if examples_path is not None:
        examples_path.parent.mkdir(parents=True, exist_ok=True)
        examples_path.write_text("\n".join(json.dumps(e) for e in examples) + "\n")
    return metrics


def prefixed(prefix: str, scores: dict[str, float]) -> dict[str, float]:
    """MLflow keys: `eval/<metric>`, its control `eval_shuffled/<metric>` and `eval_gap/<metric>`."""
    out = {}
    for key, value in scores.items():
        group, _, metric = key.rpartition("/")
        out[f"{prefix}_{group}/{metric}" if group else f"{prefix}/{metric}"] = value
    return out


def make_eval_runner(stage: str) -> Any:
    def run_eval(ctx: StageContext[VlmEvalJob]) -> StageResult:
        """The suite with its shuffled-image controls on the stage's export, and (without controls) on its
        starting point when the stage began from a fresh adapter (the export's `initial/`, scored as
        `eval_untrained/`). A failure fails the step, so it is never cached and the next run retries it."""
        trained, out_dir = ctx.inputs["vlm"], ctx.outputs["eval"]
        out_dir.mkdir(parents=True, exist_ok=True)
        runs = [("eval_untrained", trained / "initial", "untrained")] if (trained / "initial").is_dir() else []
        runs.append(("eval", trained / "model", stage))
        metrics: dict[str, float] = {}
        for prefix, checkpoint, name in runs:
            scores = evaluate_checkpoint(checkpoint, ctx.inputs["shards"], ctx.config, ctx.seed,
                                         out_dir / f"{name}.jsonl", controls=prefix == "eval")
            metrics |= prefixed(prefix, scores)
        (out_dir / "scores.json").write_text(json.dumps(metrics, indent=1))
        from components.vlm.eval_gallery import draw_galleries  # a few items drawn, to look at in MLflow

        gallery = draw_galleries(out_dir, [n for _, _, n in runs], held_out_rows(ctx.inputs["shards"], ctx.config)[0])
        return StageResult(metrics=metrics, artifacts=["eval/scores.json", *(f"eval/{n}.jsonl" for _, _, n in runs),
                                                       *gallery])
    run_eval.__name__ = f"run_eval_{stage}"
    return run_eval


def eval_component(stage: str) -> Component[VlmEvalJob]:
    return component(name=f"vlm_eval_{stage}", version="1", config="train.vlm", inputs=("shards", "vlm"),
                     outputs=("eval",), view=eval_view(stage))(make_eval_runner(stage))


vlm_eval_stage0, vlm_eval_stage1, vlm_eval_stage2 = (eval_component(stage) for stage in STAGES)


def run_eval_sft(ctx: StageContext[VlmEvalJob]) -> StageResult:
    """The SFT export (the last round that ran) evaluated in the job's answer modes (both for SFT; RL's view
    names the modes it trained), each with its shuffled-image
    controls: `eval_direct/*` and `eval_thinking/*` (with `_shuffled` and `_gap` beside them), thinking answers
    scored after their reasoning, and the mean answer and reasoning lengths per mode."""
    trained, out_dir = ctx.inputs["vlm"], ctx.outputs["eval"]
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {}
    modes = list(ctx.config.modes)  # eval_view and rl_eval_view name them
    for mode in modes:
        scores = evaluate_checkpoint(trained / "model", ctx.inputs["shards"], ctx.config, ctx.seed,
                                     out_dir / f"{mode}.jsonl", controls=True, mode=mode)
        metrics |= prefixed(f"eval_{mode}", scores)
    (out_dir / "scores.json").write_text(json.dumps(metrics, indent=1))
    from components.vlm.eval_gallery import draw_galleries

    gallery = draw_galleries(out_dir, modes, held_out_rows(ctx.inputs["shards"], ctx.config)[0])
    return StageResult(metrics=metrics, artifacts=["eval/scores.json", *(f"eval/{mode}.jsonl" for mode in modes),
                                                   *gallery])


vlm_eval_sft = component(name="vlm_eval_sft", version="1", config="train.vlm", inputs=("shards", "vlm"),
                         outputs=("eval",), view=eval_view("sft"))(run_eval_sft)
EVAL_COMPONENTS = {c.name: c for c in (vlm_eval_stage0, vlm_eval_stage1, vlm_eval_stage2, vlm_eval_sft)}


if __name__ == "__main__":
    import sys

    from components.common.cli import named_component_main

    sys.exit(named_component_main(EVAL_COMPONENTS, "components.vlm.evaluate", "--input shards=PATH --input vlm=PATH --output DIR"))
