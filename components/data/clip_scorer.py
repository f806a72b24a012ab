"""Training a small open_clip scorer on clean synthetic image-caption pairs (the tiny profile's
stand-in for a pretrained CLIP, since no weights can be downloaded), with its held-out quality.

The step renders fresh scenes with the crawl's own drawing code (never the crawl's samples), trains
with the CLIP contrastive loss for a time/step budget inside a Ray task, and measures on held-out
scenes how well the score separates true captions from captions of other scenes. It also picks the
score threshold that best separates them (precision and recall of removing the mismatched pairs
balanced, at the expected mismatch rate); the CLIP filter
can use it (`mode: calibrated`). Output: `scorer/model.safetensors`, `scorer/scorer.json`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from components.common.contract import StageContext, StageResult, component
from components.data.config import ClipScorerConfig, NoiseRates, SyntheticCrawlConfig
from components.data.synthetic_crawl import clean_size, generate_shard, random_scene, render


def render_pairs(count: int, seed: int, max_side: int) -> tuple[list[Any], list[str]]:
    """`count` clean scenes (PIL images at crawl-like sizes and aspects) and their captions."""
    rng = random.Random(seed)
    shape_cfg = SyntheticCrawlConfig(max_side=max_side)
    images, captions = [], []
    for _ in range(count):
        width, height = clean_size(rng, shape_cfg)
        scene = random_scene(rng, width, height)
        images.append(render(scene))
        captions.append(scene.caption())
    return images, captions


def calibration_pairs(crawl: SyntheticCrawlConfig, count: int, seed: int) -> tuple[list[Any], list[str], list[str]]:
    """`count` held-out crawl-like images with their true captions and mismatched ones.

    The images are the rows of a fresh crawl (its generator and settings, another seed) that reach
    the CLIP filter with a true caption: clean samples and near/exact duplicates, in the crawl's
    proportion among such rows. Each mismatched caption is another random scene's, of the same size,
    as the crawl makes its `mismatched_caption` noise.
    """
    from PIL import Image

    rates = dataclasses.asdict(crawl.noise)
    kept = ("exact_duplicate", "near_duplicate")
    share = 1.0 - sum(v for k, v in rates.items() if k not in kept)  # rows with a true caption
    look = dataclasses.replace(crawl, noise=NoiseRates(**{k: (v / share if k in kept else 0.0) for k, v in rates.items()}))
    rng = random.Random(f"calibration-{seed}")
    images, true_captions, false_captions = [], [], []
    for sample in generate_shard(look, shard=0, count=count, seed=seed):
        image = Image.open(io.BytesIO(sample.image)).convert("RGB")
        caption = sample.caption.decode()
        other = random_scene(rng, image.width, image.height)
        while other.caption() == caption:
            other = random_scene(rng, image.width, image.height)
        images.append(image)
        true_captions.append(caption)
        false_captions.append(other.caption())
    return images, true_captions, false_captions


def best_threshold(true_scores: np.ndarray, false_scores: np.ndarray, false_rate: float = 0.5) -> dict[str, float]:
    """The threshold (drop below it) that balances precision and recall of removing the false pairs,
    the largest min(precision, recall) (ties to the better F1), when a fraction `false_rate` of all
    pairs is false (precision is reweighted to that prior); and its precision, recall and F1.

    Balanced rather than max F1 because the goal is both high: F1's flat optimum, estimated from a
    few hundred held-out pairs, moved between precision-heavy and recall-heavy cuts from one
    calibration draw to the next (0.40 to 0.52 on the same scorer), the balanced point much less.
    """
    true_sorted, false_sorted = np.sort(true_scores), np.sort(false_scores)
    candidates = np.unique(np.concatenate([true_sorted, false_sorted]))
    removed_false = np.searchsorted(false_sorted, candidates, side="left").astype(float)  # scores < threshold
    removed_true = np.searchsorted(true_sorted, candidates, side="left").astype(float)
    usable = removed_false > 0
    if not usable.any():
        return {"threshold": float(candidates[0]) if candidates.size else 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    candidates, removed_false, removed_true = candidates[usable], removed_false[usable], removed_true[usable]
    false_weight, true_weight = false_rate / len(false_scores), (1 - false_rate) / len(true_scores)
    precision = removed_false * false_weight / (removed_false * false_weight + removed_true * true_weight)
    recall = removed_false / len(false_scores)
    f1 = 2 * precision * recall / (precision + recall)
    best = int(np.lexsort((-np.arange(candidates.size), f1, np.minimum(precision, recall)))[-1])  # first of ties
    return {"threshold": float(candidates[best]), "precision": float(precision[best]), "recall": float(recall[best]),
            "f1": float(f1[best])}


def train_scorer(cfg: ClipScorerConfig, out_dir: str, seed: int) -> dict[str, float]:
    """Runs inside a Ray task: train, evaluate on held-out scenes, save weights and calibration."""
    import torch
    from safetensors.torch import save_file

    from components.common.clip_model import load_clip, scores_against

    torch.manual_seed(seed)
    torch.set_num_threads(max(1, int(cfg.resources.num_cpus)))
    bundle = load_clip(cfg.architecture)
    model = bundle.model
    images, captions = render_pairs(cfg.train_samples, seed=seed * 1000 + 1, max_side=cfg.render_max_side)
    pixels = torch.stack([bundle.preprocess(image) for image in images])
    tokens = bundle.tokenizer(captions)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    model.train()
    started, step, losses = time.perf_counter(), 0, []
    generator = torch.Generator().manual_seed(seed)
    while step < cfg.max_steps and time.perf_counter() - started < cfg.max_seconds:
        batch = torch.randint(0, len(images), (cfg.batch_size,), generator=generator)
        image_features, text_features, logit_scale = model(pixels[batch], tokens[batch])
        logits = logit_scale * image_features @ text_features.T
        same_caption = (tokens[batch][:, None, :] == tokens[batch][None, :, :]).all(-1).float()
        targets = same_caption / same_caption.sum(-1, keepdim=True)  # duplicate captions are all right
        loss = (torch.nn.functional.cross_entropy(logits, targets)
                + torch.nn.functional.cross_entropy(logits.T, targets)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        step += 1
    train_seconds = time.perf_counter() - started
    model.eval()
    eval_images, true_captions, false_captions = calibration_pairs(cfg.calibration_crawl, cfg.eval_samples,
                                                                   seed=seed * 1000 + 2)
    true_scores, false_scores = scores_against(bundle, eval_images, [true_captions, false_captions])
    calibration = best_threshold(true_scores, false_scores, cfg.expected_mismatch_rate)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    summary = {
        "architecture": cfg.architecture, "steps": step, "train_seconds": train_seconds,
        "loss_first": losses[0] if losses else float("nan"), "loss_last": float(np.mean(losses[-10:])) if losses else float("nan"),
        "pair_accuracy": float((true_scores > false_scores).mean()),
        "calibrated_threshold": calibration["threshold"], "heldout_precision": calibration["precision"],
        "heldout_recall": calibration["recall"], "parameters": sum(p.numel() for p in model.parameters()),
        "steps_per_second": step / max(train_seconds, 1e-9),
    }
    (folder / "scorer.json").write_text(json.dumps(summary, indent=1))
    return summary


@component(name="clip_scorer", version="1", config="data.clip_scorer", outputs=("scorer",))
def clip_scorer(ctx: StageContext[ClipScorerConfig]) -> StageResult:
    import ray

    cfg = ctx.config
    task = ray.remote(**cfg.resources.task_kwargs())(train_scorer)
    summary = ray.get(task.remote(cfg, str(ctx.outputs["scorer"]), ctx.seed))
    metrics = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float))}
    return StageResult(metrics=metrics, artifacts=["scorer/scorer.json"])


def scorer_summary(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "scorer.json").read_text())


if __name__ == "__main__":
    import sys

    from components.common.cli import component_main

    sys.exit(component_main(clip_scorer))
