"""Retrieval metrics of the ViT evaluation: recall@k both ways over distinct captions, and chance levels,
on hand-computed cases, perfect and random embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from components.vit.vit_eval import chance_levels, retrieval_metrics


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# Similarities of 7 images (rows) to 6 distinct captions (columns); images 5 and 6 share caption 5.
# The metrics only see the dot products, so text = identity and image rows = these values give exactly them.
CAPTION_INDEX = np.array([0, 1, 2, 3, 4, 5, 5])
SIMS = np.array([
    #  c0  c1  c2  c3  c4  c5      rank of the true caption in the row (i2t)
    [90, 75, 45, 55, 88, 65],  # img0 -> c0: 1st
    [72, 70, 35, 18, 15, 66],  # img1 -> c1: 2nd
    [12, 22, 5, 32, 42, 52],   # img2 -> c2: 6th (last)
    [11, 31, 41, 20, 51, 57],  # img3 -> c3: 5th
    [13, 23, 33, 43, 85, 53],  # img4 -> c4: 1st
    [62, 30, 40, 64, 50, 60],  # img5 -> c5: 3rd
    [14, 80, 34, 44, 54, 95],  # img6 -> c5: 1st
], dtype=np.float64) / 100
# Down the columns (t2i): c0 finds img0 1st; c1 finds img1 3rd (after img6, img0); c2 finds img2 7th (last);
# c3 finds img3 6th; c4 finds img4 2nd (after img0); c5 finds img6 1st (img5 only 4th).


def test_hand_computed_example() -> None:
    metrics = retrieval_metrics(SIMS, np.eye(6), CAPTION_INDEX, ks=(1, 5))
    assert metrics == pytest.approx({
        "i2t_r1": 3 / 7,  # img0, img4, img6
        "i2t_r5": 6 / 7,  # all but img2
        "t2i_r1": 2 / 6,  # c0, and c5 through img6
        "t2i_r5": 4 / 6,  # c0, c1, c4, c5 (c2 is 7th, c3 6th)
    })
    assert set(metrics) == {"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"}


def test_perfect_embeddings_recall_everything() -> None:
    rng = np.random.default_rng(0)
    text = unit_rows(rng.standard_normal((20, 32)))
    caption_index = np.concatenate([np.arange(20), rng.integers(0, 20, 30)])  # every caption, some repeated
    metrics = retrieval_metrics(text[caption_index], text, caption_index, ks=(1, 5))
    assert metrics == {"i2t_r1": 1.0, "i2t_r5": 1.0, "t2i_r1": 1.0, "t2i_r5": 1.0}


def test_images_with_the_same_caption_are_all_right() -> None:
    # img0 leans to caption 0 but is not its best image (img1 is); img2 and img3 are exact
    images = unit_rows(np.array([[1.0, 0.3, 0.0, 0.2], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]))
    shared = retrieval_metrics(images, np.eye(4)[:3], np.array([0, 0, 1, 2]), ks=(1,))
    assert shared == {"i2t_r1": 1.0, "t2i_r1": 1.0}  # img0 and img1 both retrieve caption 0, and are both right
    # the same images when img0 has a caption of its own (3), which it ranks below caption 0
    own = retrieval_metrics(images, np.eye(4), np.array([3, 0, 1, 2]), ks=(1,))
    assert own == {"i2t_r1": 3 / 4, "t2i_r1": 1.0}


def test_k_beyond_the_candidates_is_full_recall() -> None:
    metrics = retrieval_metrics(SIMS, np.eye(6), CAPTION_INDEX, ks=(6, 7, 50))
    assert metrics["i2t_r6"] == 1.0 and metrics["t2i_r7"] == 1.0 and metrics["t2i_r50"] == 1.0
    assert metrics["t2i_r6"] == pytest.approx(5 / 6)  # c2's only image is 7th


def test_chance_levels_by_hand() -> None:
    # 4 images, 3 distinct captions; caption 0 is carried by two images
    chance = chance_levels(np.array([0, 0, 1, 2]), ks=(1, 2, 3, 5))
    assert chance == pytest.approx({
        "i2t_r1": 1 / 3, "i2t_r2": 2 / 3, "i2t_r3": 1.0, "i2t_r5": 1.0,
        # t2i@1: P(the top image carries u) = count / 4, averaged: (2/4 + 1/4 + 1/4) / 3
        "t2i_r1": 1 / 3,
        # t2i@2: 1 - P(both top images miss u) = 1 - C(4-c, 2) / C(4, 2): 1 - 1/6 for c=2, 1 - 3/6 for c=1
        "t2i_r2": (5 / 6 + 1 / 2 + 1 / 2) / 3,
        # t2i@3: caption 0 (c=2) cannot be missed by 3 of 4 images; 1 - C(3, 3) / C(4, 3) = 3/4 for the others
        "t2i_r3": (1 + 3 / 4 + 3 / 4) / 3,
        "t2i_r5": 1.0,
    })


def test_chance_levels_match_a_monte_carlo_of_random_embeddings() -> None:
    rng = np.random.default_rng(1234)
    caption_index = np.array([0, 0, 1, 2, 2, 2, 3])
    ks = (1, 2, 3)
    trials = 3000
    totals = dict.fromkeys(chance_levels(caption_index, ks), 0.0)
    for _ in range(trials):
        images = unit_rows(rng.standard_normal((len(caption_index), 8)))
        text = unit_rows(rng.standard_normal((4, 8)))
        for name, value in retrieval_metrics(images, text, caption_index, ks).items():
            totals[name] += value / trials
    assert totals == pytest.approx(chance_levels(caption_index, ks), abs=0.03)


def test_random_embeddings_with_many_samples_are_near_chance() -> None:
    rng = np.random.default_rng(7)
    distinct, n = 200, 2000
    caption_index = np.concatenate([np.arange(distinct), rng.integers(0, distinct, n - distinct)])
    images = unit_rows(rng.standard_normal((n, 64)))
    text = unit_rows(rng.standard_normal((distinct, 64)))
    metrics = retrieval_metrics(images, text, caption_index)
    chance = chance_levels(caption_index)
    assert set(metrics) == set(chance) == {"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"}
    for name, expected in chance.items():
        count = n if name.startswith("i2t") else distinct
        sigma = np.sqrt(expected * (1 - expected) / count)
        assert abs(metrics[name] - expected) <= 4 * sigma, (name, metrics[name], expected)
    assert chance["i2t_r1"] == pytest.approx(1 / distinct) and chance["i2t_r5"] == pytest.approx(5 / distinct)
