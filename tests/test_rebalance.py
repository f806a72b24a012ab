"""Rebalancing: concept matching, the head cap and tail repeats, and the step into task-typed shards."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from sample_tables import caption_table

from components.common.executor import run_into
from components.data.config import RebalanceConfig, ShardsConfig
from components.data.rebalance import (NO_CONCEPT, caption_concepts, concept_patterns, frequent_words,
                                       meta_concepts, plan_rebalance, rebalance)
from components.data.write_shards import list_shards, write_shards


def test_vocabulary_matches_whole_words_and_plurals() -> None:
    patterns = concept_patterns(["red circle", "box"])
    assert caption_concepts("two red circles on a mat", patterns) == ["red circle"]
    assert caption_concepts("a red  circle and three boxes", patterns) == ["red circle", "box"]
    assert caption_concepts("a bored circle in a boxer", patterns) == []
    assert caption_concepts(None, patterns) == []


def test_frequent_words_and_meta_concepts() -> None:
    assert frequent_words(["a red cat", "the red dog", "red cat", None], top_k=2) == ["red", "cat"]
    assert meta_concepts(json.dumps({"cls": 3}), "cls") == ["3"]
    assert meta_concepts(json.dumps({"labels": {"domain": ["news", "art"]}}), "labels.domain") == ["art", "news"]
    assert meta_concepts(json.dumps({}), "labels.domain") == []


def _skewed(n_head: int, n_tail: int) -> tuple[list[str], list[list[str]]]:
    keys = [f"h{i:04d}" for i in range(n_head)] + [f"t{i:04d}" for i in range(n_tail)] + ["none"]
    return keys, [["head"]] * n_head + [["tail"]] * n_tail + [[]]


def test_head_is_capped_tail_repeated_deterministically() -> None:
    keys, concepts = _skewed(1000, 5)
    cfg = RebalanceConfig(max_per_concept=100, min_per_concept=20, max_repeat=3)
    dropped, repeats, before, after = plan_rebalance(keys, concepts, cfg, seed=0)
    assert before == Counter({"head": 1000, "tail": 5, NO_CONCEPT: 1})
    assert 70 <= 1000 - len(dropped) <= 130  # each head sample kept with probability 100/1000
    assert all(k.startswith("h") for k in dropped) and "none" not in dropped
    assert repeats == {f"t{i:04d}": 3 for i in range(5)}  # ceil(20 / 5) - 1 = 3, within max_repeat
    assert after["tail"] == 20 and after["head"] == 1000 - len(dropped) and after[NO_CONCEPT] == 1
    assert plan_rebalance(keys, concepts, cfg, seed=0)[0] == dropped
    assert plan_rebalance(keys, concepts, cfg, seed=1)[0] != dropped


def test_a_sample_stays_when_any_of_its_concepts_selects_it() -> None:
    keys = [f"k{i}" for i in range(400)]
    concepts = [["common", "rare"] if i < 10 else ["common"] for i in range(400)]
    dropped, _, _, _ = plan_rebalance(keys, concepts, RebalanceConfig(max_per_concept=40), seed=0)
    assert not {f"k{i}" for i in range(10)} & dropped  # `rare` (10 <= 40) selects all of its samples


def test_off_by_default() -> None:
    keys, concepts = _skewed(50, 2)
    dropped, repeats, before, after = plan_rebalance(keys, concepts, RebalanceConfig(), seed=0)
    assert not dropped and not repeats and before == after


def test_step_marks_rows_and_shards_write_the_copies(tmp_path: Path, local_ray: None) -> None:
    captions = ["a red circle on white"] * 60 + ["a blue square on white"] * 4 + ["nothing known here"] * 2
    source = caption_table(tmp_path / "in", captions)
    cfg = RebalanceConfig(vocabulary=["red circle", "blue square"], max_per_concept=20, min_per_concept=8)
    staged = tmp_path / "rebalanced"
    result, _ = run_into(rebalance, cfg, {"samples": source}, staged, seed=0)
    stats = json.loads((staged / "samples" / "stats.json").read_text())
    kept_red = stats["kept"] - 4 - 2
    assert stats["in"] == 66 and stats["dropped"] == {"rebalance_head_cap": 60 - kept_red}
    assert stats["cumulative"]["dropped"] == {"image_corrupt": 1, "rebalance_head_cap": 60 - kept_red}
    assert result.metrics["repeats"] == 4 and result.metrics["after.imbalance"] < result.metrics["before.imbalance"]
    concepts = json.loads((staged / "samples" / "concepts.json").read_text())
    assert concepts["before"] == {"red circle": 60, "blue square": 4, NO_CONCEPT: 2}
    assert concepts["after"]["blue square"] == 8

    out = tmp_path / "shards"
    run_into(write_shards, ShardsConfig(samples_per_shard=16), {"samples": staged / "samples"}, out, seed=0)
    job = json.loads((out / "shards" / "stats.json").read_text())
    assert job["written"] == job["kept"] + 4 and job["in"] == 67
    keys = []
    for shard in list_shards(out / "shards", "caption"):
        with tarfile.open(shard) as tar:
            keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".json")]
            copies = [json.load(tar.extractfile(m)) for m in tar.getmembers() if "_r" in m.name
                      and m.name.endswith(".json")]
            assert all(c["repeat_of"] and c["key"].startswith(c["repeat_of"] + "_r") for c in copies)
    assert len(keys) == len(set(keys)) == job["written"]
    assert sum(1 for k in keys if "_r" in k) == 4


def test_meta_source_needs_a_field() -> None:
    with pytest.raises(ValueError, match="meta_field"):
        RebalanceConfig(concept_source="meta")
