"""Zero-shot image-text retrieval on the held-out caption pairs, for the untrained model and after
each pretraining phase: recall@1 and @5, image-to-text and text-to-image.

Held-out pairs are the caption samples whose key hash falls in `holdout_fraction` (never trained on
in any phase). Captions repeat in a synthetic crawl, so retrieval ranks the distinct captions: an
image is right at k when its caption is among its k best captions; a caption is right at k when one
of its k best images carries it. Chance levels are reported beside the scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from components.common.contract import StageContext, StageResult, component
from components.vit.config import VitEvalConfig

CHECKPOINTS = ("initial", "mim", "siglip", "video")


def retrieval_metrics(image_embeddings: np.ndarray, text_embeddings: np.ndarray, caption_index: np.ndarray,
                      ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """image_embeddings (N, D) and text_embeddings (U, D), L2-normalised; caption_index (N,) in [0, U)."""
    sims = image_embeddings @ text_embeddings.T  # (N, U)
    order_i2t = np.argsort(-sims, axis=1)
    order_t2i = np.argsort(-sims.T, axis=1)  # (U, N)
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"i2t_r{k}"] = float(np.mean([caption_index[i] in order_i2t[i, :k] for i in range(len(sims))]))
        metrics[f"t2i_r{k}"] = float(np.mean([np.any(caption_index[order_t2i[u, :k]] == u)
                                              for u in range(sims.shape[1])]))
    return metrics


def chance_levels(caption_index: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Expected recall of a random ranking."""
    distinct, counts = np.unique(caption_index, return_counts=True)
    n, u = len(caption_index), len(distinct)
    chance: dict[str, float] = {}
    for k in ks:
        chance[f"i2t_r{k}"] = min(1.0, k / u)
        # P(at least one of k random images carries caption u), averaged over captions
        misses = [np.prod([(n - c - j) / (n - j) for j in range(min(k, n))]) if n - c >= k else 0.0 for c in counts]
        chance[f"t2i_r{k}"] = float(1.0 - np.mean(misses))
    return chance


def evaluate_checkpoint(folder: Path, images: list[Any], captions: list[str], batch_size: int = 32) -> dict[str, float]:
    """Retrieval of one exported checkpoint on the given pairs."""
    import torch

    from components.vit.preprocess import image_to_patches, pack
    from components.vit.pretrain_model import load_exported

    model, _ = load_exported(folder)
    distinct = sorted(set(captions))
    caption_index = np.array([distinct.index(c) for c in captions])
    with torch.inference_mode():
        image_parts = []
        for start in range(0, len(images), batch_size):
            packed = pack([image_to_patches(image, model.vit.config) for image in images[start:start + batch_size]])
            image_parts.append(model.encode_images(packed.pixel_values, packed.grid_hw))
        text = model.encode_text(model.text.tokenize(distinct))
    return retrieval_metrics(torch.cat(image_parts).float().numpy(), text.float().numpy(), caption_index)


def run_eval(shards: str, vit_dir: str, max_pairs: int, threads: int, max_probe_images: int = 0) -> dict[str, Any]:
    """Runs inside a Ray task: every exported checkpoint of the pretraining step on the held-out pairs."""
    import torch

    from components.vit.shard_data import held_out_pairs

    torch.set_num_threads(threads)
    folders = [Path(vit_dir) / name for name in CHECKPOINTS if (Path(vit_dir) / name / "config.json").exists()]
    if not folders:
        raise FileNotFoundError(f"no exported checkpoints ({', '.join(CHECKPOINTS)}) in {vit_dir}")
    holdout = json.loads((folders[0] / "config.json").read_text())["holdout_fraction"]
    pairs = held_out_pairs(Path(shards), holdout, max_pairs)
    if len(pairs) < 5:
        raise ValueError(f"only {len(pairs)} held-out caption pairs in {shards}: raise holdout_fraction or the data size")
    images, captions = [p.images[0] for p in pairs], [p.caption for p in pairs]
    distinct = sorted(set(captions))
    results: dict[str, Any] = {"pairs": len(pairs), "distinct_captions": len(distinct),
                               "chance": chance_levels(np.array([distinct.index(c) for c in captions]))}
    for folder in folders:
        results[folder.name] = evaluate_checkpoint(folder, images, captions)
    if max_probe_images > 0:
        results["probes"] = probe_checkpoints(Path(shards), folders, max_probe_images)
    return results


def probe_checkpoints(shards: Path, folders: list[Path], max_images: int) -> dict[str, dict[str, float]]:
    """The linear probes (components.common.probes) on each phase's frozen ViT tokens, and on raw-pixel
    histograms of the same cells as the baseline."""
    from components.common.probes import pixel_tokens, probe_set, shard_probe_samples
    from components.vit.preprocess import visual_tokens
    from components.vit.pretrain_model import load_exported

    probes = probe_set(shard_probe_samples(shards), max_images)
    if len(probes.images) < 20:
        return {}
    results = {}
    for folder in folders:
        vit = load_exported(folder)[0].vit.eval()
        results[folder.name] = probes.score(lambda images, vit=vit: visual_tokens(vit, images))
        if "pixels" not in results:
            def pixels(images: list[Any], vit: Any = vit) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
                grids = visual_tokens(vit, images)[1]
                return [pixel_tokens(i, h, w) for i, (h, w) in zip(images, grids)], grids
            results = {"pixels": probes.score(pixels), **results}
    return results


@component(name="vit_eval", version="1", config="train.vit_eval", inputs=("shards", "vit"), outputs=("eval",))
def vit_eval(ctx: StageContext[VitEvalConfig]) -> StageResult:
    import ray

    cfg = ctx.config
    task = ray.remote(**cfg.resources.task_kwargs())(run_eval)
    results = ray.get(task.remote(str(ctx.inputs["shards"]), str(ctx.inputs["vit"]), cfg.max_pairs,
                                  max(1, int(cfg.resources.num_cpus)), cfg.probe_images))
    folder = ctx.outputs["eval"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "retrieval.json").write_text(json.dumps(results, indent=1))
    metrics: dict[str, float] = {"pairs": float(results["pairs"]), "distinct_captions": float(results["distinct_captions"])}
    for name in ("chance", *CHECKPOINTS):
        for key, value in results.get(name, {}).items():
            metrics[f"{name}_{key}"] = float(value)
    for name, scores in results.get("probes", {}).items():
        metrics |= {f"probe_{name}_{key}": float(value) for key, value in scores.items()}
    return StageResult(metrics=metrics, artifacts=["eval/retrieval.json"])


if __name__ == "__main__":
    import sys

    from components.common.cli import component_main

    sys.exit(component_main(vit_eval))
