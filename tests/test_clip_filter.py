"""CLIP-score filter pieces: thresholds (fixed, quantile, calibrated), label scoring, the open_clip loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from components.data.clip_filter import label_metrics, mark_low_scores, resolve_threshold
from components.data.clip_scorer import best_threshold
from components.data.config import ClipFilterConfig


def test_fraction_mode_keeps_the_top_fraction() -> None:
    scores = np.linspace(0.0, 1.0, 1001)
    threshold = resolve_threshold(ClipFilterConfig(mode="fraction", keep_fraction=0.3), scores, None)
    assert (scores >= threshold).mean() == pytest.approx(0.3, abs=0.002)


def test_threshold_and_calibrated_modes(tmp_path: Path) -> None:
    assert resolve_threshold(ClipFilterConfig(mode="threshold", threshold=0.25), np.zeros(3), None) == 0.25
    (tmp_path / "scorer.json").write_text(json.dumps({"calibrated_threshold": 0.31}))
    assert resolve_threshold(ClipFilterConfig(mode="calibrated"), np.zeros(3), tmp_path) == 0.31
    with pytest.raises(ValueError, match="clip_scorer"):
        resolve_threshold(ClipFilterConfig(mode="calibrated"), np.zeros(3), None)


def test_best_threshold_separates_two_populations() -> None:
    rng = np.random.default_rng(0)
    true_scores, false_scores = rng.normal(0.6, 0.05, 500), rng.normal(0.2, 0.05, 500)
    best = best_threshold(true_scores, false_scores)
    assert 0.3 < best["threshold"] < 0.5
    assert best["precision"] > 0.99 and best["recall"] > 0.99
    overlapping = best_threshold(rng.normal(0.6, 0.1, 500), rng.normal(0.4, 0.1, 500), false_rate=0.1)
    balanced = best_threshold(rng.normal(0.6, 0.1, 500), rng.normal(0.4, 0.1, 500), false_rate=0.5)
    assert overlapping["threshold"] < balanced["threshold"]  # rarer false pairs: a stricter cut


def test_mark_low_scores_and_label_metrics() -> None:
    batch = pa.table({"clip_score": pa.array([0.1, 0.5, 0.05, 0.9], pa.float32())})
    marked = mark_low_scores(batch, 0.2)
    assert marked.column("drop_reason").to_pylist() == ["clip_score_low", None, "clip_score_low", None]
    meta = [json.dumps({"synthetic": {"noise": n}}) for n in ("mismatched_caption", None, None)] + ["{}"]
    metrics = label_metrics(meta, np.array([True, False, True, False]))
    assert metrics == {"labelled_rows": 3.0, "mismatch_precision": 0.5, "mismatch_recall": 1.0}
    hindsight = label_metrics(meta, np.array([True, False, True, False]), np.array([0.1, 0.5, 0.05, 0.9]))
    assert hindsight["hindsight_precision"] == pytest.approx(0.5) and hindsight["hindsight_recall"] == 1.0  # no cut separates
    separable = label_metrics(meta, np.array([True, False, True, False]), np.array([0.1, 0.5, 0.3, 0.9]))
    assert separable["hindsight_threshold"] > 0.1 and separable["hindsight_precision"] == 1.0


def test_open_clip_loads_our_config_and_refuses_missing_weights(tmp_path: Path) -> None:
    from components.common.clip_model import load_clip, pair_scores
    from components.data.synthetic_crawl import random_scene, render

    bundle = load_clip("seedvl-tiny-clip")
    import random

    scene = random_scene(random.Random(0), 300, 200)
    scores = pair_scores(bundle, [render(scene)], [scene.caption()])
    assert scores.shape == (1,) and -1.0 <= scores[0] <= 1.0
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_clip("seedvl-tiny-clip", str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        load_clip("no-such-arch")


def test_calibration_pairs_look_like_the_crawl() -> None:
    from components.data.clip_scorer import calibration_pairs
    from components.data.config import SyntheticCrawlConfig
    from components.data.synthetic_crawl import COLOURS

    crawl = SyntheticCrawlConfig(max_side=256, min_side=100, colour_skew=3.0)
    images, true_captions, false_captions = calibration_pairs(crawl, 120, seed=5)

    assert len(images) == len(true_captions) == len(false_captions) == 120
    assert all(t != f for t, f in zip(true_captions, false_captions))
    assert all(100 <= min(i.size) and max(i.size) <= 256 for i in images)  # the crawl's sizes, not the scorer's
    duplicates = sum(a is not b and a.tobytes() == b.tobytes() for a in images for b in images) // 2
    assert duplicates > 0  # exact duplicates, as in the crawl
    head, tail = list(COLOURS)[0], list(COLOURS)[-1]
    assert sum(c.count(head) for c in true_captions) > 3 * sum(c.count(tail) for c in true_captions)  # skewed
    assert calibration_pairs(crawl, 120, seed=5)[1] == true_captions  # reproducible
