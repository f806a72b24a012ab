"""CLIP-score filter: score every image-caption pair with an open_clip model (a Ray Data actor pool,
model loaded once per actor), keep the score as a `clip_score` column, and drop pairs under a
threshold: fixed (`threshold`), the quantile that keeps `keep_fraction` (DataComp's rule), or the
scorer step's calibrated threshold. Where samples carry synthetic noise labels, the precision and
recall of removing the mismatched-caption pairs are logged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components.common.contract import StageContext, StageResult, component
from components.data.config import ClipFilterConfig
from components.data.lib.table import data_dir, drop_metrics, plot_counts, read_columns, read_kept, write_stats

DROP_REASON = "clip_score_low"
MISMATCH_LABEL = "mismatched_caption"


class ClipScoreBatch:
    """Ray Data actor: loads the model once, appends `clip_score` to each batch."""

    def __init__(self, architecture: str, weights: str, threads: int) -> None:
        import torch

        from components.common.clip_model import load_clip

        torch.set_num_threads(max(1, threads))
        self.bundle = load_clip(architecture, weights)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from components.common.clip_model import decode_rgb, pair_scores

        images = [decode_rgb(data) for data in batch.column("image").to_pylist()]
        captions = batch.column("caption").to_pylist()
        scores = pair_scores(self.bundle, images, captions)
        return batch.append_column("clip_score", pa.array(scores, pa.float32()))


def mark_low_scores(batch: pa.Table, threshold: float) -> pa.Table:
    low = pc.less(batch.column("clip_score"), pa.scalar(threshold, pa.float32()))
    reasons = pc.if_else(low, pa.scalar(DROP_REASON), pa.scalar(None, pa.string()))
    return batch.append_column("drop_reason", reasons)


def resolve_threshold(cfg: ClipFilterConfig, scores: np.ndarray, scorer: Path | None) -> float:
    if cfg.mode == "fraction":
        return float(np.quantile(scores, 1.0 - cfg.keep_fraction)) if len(scores) else 0.0
    if cfg.mode == "calibrated":
        if scorer is None:
            raise ValueError("data.clip_filter.mode=calibrated needs the clip_scorer step (data.clip_scorer.enabled)")
        return float(json.loads((scorer / "scorer.json").read_text())["calibrated_threshold"])
    return cfg.threshold


def label_metrics(meta: list[str], dropped: np.ndarray, scores: np.ndarray | None = None) -> dict[str, float]:
    """Precision/recall of removing mismatched captions, over rows with synthetic noise labels. With
    `scores`, also the best balanced precision/recall any threshold reaches on these rows, and that
    threshold: a hindsight measure of the scorer (from the labels), never used to filter."""
    labelled, mismatched = [], []
    for index, text in enumerate(meta):
        synthetic = json.loads(text).get("synthetic")
        if synthetic is not None:
            labelled.append(index)
            mismatched.append(synthetic.get("noise") == MISMATCH_LABEL)
    if not labelled:
        return {}
    is_mismatch = np.array(mismatched)
    was_dropped = dropped[np.array(labelled)]
    true_positive = float((is_mismatch & was_dropped).sum())
    metrics = {
        "labelled_rows": float(len(labelled)),
        "mismatch_precision": true_positive / max(1.0, float(was_dropped.sum())),
        "mismatch_recall": true_positive / max(1.0, float(is_mismatch.sum())),
    }
    if scores is not None and is_mismatch.any() and not is_mismatch.all():
        from components.data.clip_scorer import best_threshold

        labelled_scores = scores[np.array(labelled)]
        best = best_threshold(labelled_scores[~is_mismatch], labelled_scores[is_mismatch], float(is_mismatch.mean()))
        metrics |= {"hindsight_threshold": best["threshold"], "hindsight_precision": best["precision"],
                    "hindsight_recall": best["recall"]}
    return metrics


def score_histogram(scores: np.ndarray, threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.hist(scores, bins=50, color="#4c72b0")
    axes.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold {threshold:.3f}")
    axes.set_xlabel("CLIP score (cosine)")
    axes.set_ylabel("pairs")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def missing_weights(cfg: ClipFilterConfig) -> str:
    """Before the pipeline runs: a named local weights file must exist (weights are never downloaded)."""
    if cfg.weights and cfg.weights != "scorer" and not Path(cfg.weights).is_file():
        return (f"'data.clip_filter.weights' = {cfg.weights}: no such file (weights are never downloaded): put the "
                "checkpoint there, or point the key at a local file")
    return ""


@component(name="clip_filter", version="1", config="data.clip_filter", inputs=("samples", "scorer"),
           optional_inputs=("scorer",), outputs=("samples",), preflight=missing_weights)
def clip_filter(ctx: StageContext[ClipFilterConfig]) -> StageResult:
    import ray.data

    cfg = ctx.config
    scorer = ctx.inputs.get("scorer")
    architecture, weights = cfg.architecture, cfg.weights
    if scorer is not None:
        architecture = json.loads((scorer / "scorer.json").read_text())["architecture"]
        weights = str(scorer / "model.safetensors")
    elif not weights:
        raise ValueError("data.clip_filter.weights is empty: give a local open_clip checkpoint, or enable "
                         "data.clip_scorer to train a small scorer")
    scored_dir = ctx.workdir / "_scored"
    resources = cfg.resources
    read_kept(ctx.inputs["samples"]).map_batches(
        ClipScoreBatch, fn_constructor_args=(architecture, weights, int(resources.num_cpus)),
        batch_size=resources.batch_size, batch_format="pyarrow",
        **resources.map_kwargs(actors=True),
    ).write_parquet(str(scored_dir))
    scored = read_columns(scored_dir, ["clip_score", "meta"])
    scores = scored.column("clip_score").to_numpy(zero_copy_only=False)
    threshold = float(np.float32(resolve_threshold(cfg, scores, scorer)))  # compared in float32 below
    table = ctx.outputs["samples"]
    ray.data.read_parquet(str(scored_dir)).map_batches(
        mark_low_scores, fn_kwargs={"threshold": threshold}, batch_format="pyarrow", batch_size=None,
    ).write_parquet(str(data_dir(table)))
    shutil.rmtree(scored_dir)
    stats = write_stats(table, "clip_filter", upstream=ctx.inputs["samples"])
    score_histogram(scores, threshold, table / "clip_scores.png")
    metrics: dict[str, Any] = drop_metrics(stats) | {"threshold": threshold}
    if len(scores):
        metrics |= {"score_mean": float(scores.mean()), "score_p10": float(np.quantile(scores, 0.1)),
                    "score_p90": float(np.quantile(scores, 0.9))}
    metrics |= label_metrics(scored.column("meta").to_pylist(), scores < threshold, scores)
    return StageResult(metrics=metrics, artifacts=["samples/stats.json", "samples/clip_scores.png",
                                                   plot_counts(table, stats)])


if __name__ == "__main__":
    import sys

    from components.common.cli import component_main

    sys.exit(component_main(clip_filter))
