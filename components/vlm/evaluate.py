"""The VLM evaluation suite: held-out items (never trained on) answered by greedy decoding with a KV cache
in a Ray Data batch-inference job, scored per task (captioning text match, counting accuracy, grounding
IoU >= 0.5, OCR exact match, video temporal grounding, video QA), and the image-use gap: the answer loss
with each sample's own images against the same answers with another sample's images (a model that
ignores its images shows no gap).
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from components.vit.shard_data import DropCounter
from components.vlm.config import MIX_TASKS, VlmConfig, VlmEvalConfig

log = logging.getLogger(__name__)


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def held_out_rows(shards_dir: Path, cfg: VlmConfig, frames_per_clip: int) -> tuple[list[dict[str, Any]], DropCounter]:
    """Evaluation items as Ray Data rows (PNG bytes of the images or frames travel with them), at most
    `max_items_per_kind` per kind, and the drop counts of the held-out samples read."""
    from components.vlm.data import held_out_samples, select_frames
    from components.vlm.eval_tasks import items_from_sample

    counter = DropCounter()
    per_kind: Counter[str] = Counter()
    rows: list[dict[str, Any]] = []
    for sample in held_out_samples(shards_dir, MIX_TASKS, cfg.holdout_fraction, counter):
        images, stamps = select_frames(sample, frames_per_clip)
        encoded_images = None
        for item in items_from_sample({**sample.info, "task": sample.task, "key": sample.key}):
            if per_kind[item.kind] >= cfg.eval.max_items_per_kind:
                continue
            per_kind[item.kind] += 1
            encoded_images = encoded_images or [encode_png(image) for image in images]
            rows.append({**item.to_dict(), "images": encoded_images, "timestamps": stamps or []})
        counter["kept"] += 1
    return rows, counter


class GreedyAnswerer:
    """A Ray Data callable class: loads the exported VLM once, answers a batch of items greedily."""

    def __init__(self, checkpoint: str, max_new_tokens: int, threads: int = 1) -> None:
        from components.vlm.model import load_vlm

        torch.set_num_threads(max(1, threads))
        self.model, self.tokenizer, _ = load_vlm(checkpoint)
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from components.vlm.conversation import answer_text, prompt_ids
        from components.vlm.data import image_token_count, images_to_vit_input
        from components.vlm.tokenizer import SpecialIds

        special = SpecialIds.of(self.tokenizer)
        vit_cfg = self.model.vit.config
        prompts, all_images = [], []
        for question, images, stamps in zip(batch["question"], batch["images"], batch["timestamps"]):
            pictures = [decode_png(bytes(data)) for data in images]
            ids, used = prompt_ids(tokenizer=self.tokenizer, question=str(question),
                                   image_token_counts=[image_token_count(p, vit_cfg) for p in pictures],
                                   frame_timestamps=[float(t) for t in stamps] or None)
            prompts.append(ids)
            all_images += pictures[:len(used)]
        packed = images_to_vit_input(all_images, vit_cfg)
        generated = self.model.generate(prompts, packed.pixel_values if packed else None,
                                        packed.grid_hw if packed else None, self.max_new_tokens,
                                        eos_id=special.im_end, pad_id=special.pad)
        predictions = [answer_text(self.tokenizer, ids) for ids in generated]
        return {"key": batch["key"], "kind": batch["kind"], "question": batch["question"],
                "reference": batch["reference"], "turn": batch["turn"],
                "prediction": np.array(predictions, dtype=object)}


def answer_items(checkpoint: Path, rows: list[dict[str, Any]], eval_cfg: VlmEvalConfig) -> list[dict[str, Any]]:
    """Greedy answers to every row, as a Ray Data batch-inference job."""
    import ray.data

    if not rows:
        return []
    threads = max(1, int(eval_cfg.resources.num_cpus))
    dataset = ray.data.from_items(rows).map_batches(
        GreedyAnswerer, fn_constructor_kwargs={"checkpoint": str(checkpoint), "max_new_tokens": eval_cfg.max_new_tokens,
                                               "threads": threads},
        batch_size=eval_cfg.batch_size, **eval_cfg.resources.map_kwargs(actors=True))
    return dataset.take_all()


def score_answers(answers: list[dict[str, Any]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    from components.vlm.eval_tasks import EvalItem, aggregate, score

    scored, examples = [], []
    for row in answers:
        item = EvalItem(key=str(row["key"]), kind=str(row["kind"]), question=str(row["question"]),
                        reference=str(row["reference"]), turn=int(row["turn"]))
        result = score(item, str(row["prediction"]))
        scored.append((item, result))
        examples.append({"key": item.key, "kind": item.kind, "question": item.question, "reference": item.reference,
                         "prediction": str(row["prediction"]), **result})
    return aggregate(scored), examples


def image_use_gap(checkpoint: Path, shards_dir: Path, cfg: VlmConfig, frames_per_clip: int,
                  max_tokens: int, seed: int) -> dict[str, float]:
    """Mean answer loss over held-out samples with their own images and with another sample's images
    (the next sample of the same kind: image for image, clip for clip), and the difference."""
    from components.vlm.conversation import BadSample, encode_sample, turns_of
    from components.vlm.data import held_out_samples, image_token_count, images_to_vit_input, select_frames
    from components.vlm.model import load_vlm

    model, tokenizer, _ = load_vlm(checkpoint)
    vit_cfg = model.vit.config
    by_kind: dict[str, list[Any]] = {}
    limit = cfg.eval.gap_batches * cfg.eval.batch_size
    for sample in held_out_samples(shards_dir, MIX_TASKS, cfg.holdout_fraction, DropCounter()):
        group = by_kind.setdefault("video" if sample.task == "video" else "image", [])
        if len(group) < limit:
            group.append(sample)
    sums = {"true": 0.0, "shuffled": 0.0}
    tokens = 0
    for group in by_kind.values():
        if len(group) < 2:
            continue
        rng = np.random.default_rng(seed)
        order = np.roll(np.arange(len(group)), 1 + int(rng.integers(0, len(group) - 1)))  # nobody keeps its own
        for own, other in zip(group, (group[i] for i in order)):
            try:
                turns = turns_of(own.info)
                losses = []
                for images_of in (own, other):
                    images, stamps = select_frames(images_of, frames_per_clip)
                    if own.task == "video":  # the other clip's frames, under this clip's timestamps
                        stamps = (select_frames(own, frames_per_clip)[1] or [])[:len(images)]
                        if len(stamps) != len(images):
                            raise BadSample("image_count_mismatch")
                    encoded = encode_sample(key=own.key, task=own.task, turns=turns, tokenizer=tokenizer,
                                            image_token_counts=[image_token_count(i, vit_cfg) for i in images],
                                            media=images, frame_timestamps=stamps, max_tokens=max_tokens)
                    losses.append(sample_loss(model, encoded, vit_cfg, images_to_vit_input))
            except BadSample:
                continue
            (loss_true, count), (loss_shuffled, _) = losses
            sums["true"] += loss_true
            sums["shuffled"] += loss_shuffled
            tokens += count
    if tokens == 0:
        return {}
    true, shuffled = sums["true"] / tokens, sums["shuffled"] / tokens
    return {"gap_loss_true_images": true, "gap_loss_shuffled_images": shuffled, "image_use_gap": shuffled - true,
            "gap_answer_tokens": float(tokens)}


@torch.no_grad()
def sample_loss(model: Any, encoded: Any, vit_cfg: Any, to_vit_input: Any) -> tuple[float, int]:
    """(summed answer cross-entropy, answer tokens) of one encoded sample."""
    from components.vlm.model import answer_loss

    ids = torch.tensor([encoded.input_ids])
    labels = torch.tensor([encoded.labels])
    packed = to_vit_input(list(encoded.media), vit_cfg)
    embeds = model.embed(ids, packed.pixel_values if packed else None, packed.grid_hw if packed else None)
    logits = model.llm(inputs_embeds=embeds, use_cache=False).logits
    loss, count = answer_loss(logits, labels)
    return float(loss) * count, count


def evaluate_checkpoint(checkpoint: Path, shards_dir: Path, cfg: VlmConfig, frames_per_clip: int, max_tokens: int,
                        seed: int, examples_path: Path | None = None) -> dict[str, float]:
    """Every evaluation metric of one exported checkpoint."""
    import json

    import ray

    rows, counter = held_out_rows(shards_dir, cfg, frames_per_clip)
    answers = answer_items(checkpoint, rows, cfg.eval)
    metrics, examples = score_answers(answers)
    gap_task = ray.remote(image_use_gap).options(num_cpus=cfg.eval.resources.num_cpus)
    metrics |= ray.get(gap_task.remote(checkpoint, shards_dir, cfg, frames_per_clip, max_tokens, seed))
    metrics["held_out_samples"] = float(counter.get("kept", 0))
    if examples_path is not None:
        examples_path.parent.mkdir(parents=True, exist_ok=True)
        examples_path.write_text("\n".join(json.dumps(e) for e in examples) + "\n")
    return metrics
