"""Rebalancing step: count concepts in captions (or a metadata field), cap the head and repeat the tail,
so rare visual concepts are over-sampled as the paper does; the distribution is logged before and after.

Concepts: the configured vocabulary matched in each caption as whole words (a plural `s`/`es` on the
last word counts), or the most frequent caption words when no vocabulary is given, or the value(s) of
one metadata field. Head cap (MetaCLIP's balancing): a concept seen in `n > max_per_concept` samples
selects each of its samples with probability `max_per_concept / n`; a sample stays when any of its
concepts selects it (samples without a concept always stay). The draw is a hash of (seed, key, concept),
so reruns choose the same samples. Tail: a kept sample whose rarest concept has `n < min_per_concept`
samples after the cap gets `repeat = min(max_repeat, ceil(min_per_concept / n) - 1)` extra copies,
which the shard writer writes as `<key>_r1`, ... Dropped rows get `rebalance_head_cap`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from components.common.cache import write_json_atomic
from components.common.contract import StageContext, StageResult, component
from components.data.config import RebalanceConfig
from components.data.lib.table import data_dir, drop_metrics, read_columns, read_kept, write_stats

NO_CONCEPT = "(none)"
STOPWORDS = frozenset(
    "a an the and or of on in at to with for from by is are was were be this that these those it its "
    "one two three four five six seven eight nine ten some many background image photo picture".split())
WORD = re.compile(r"[a-z]+")


def concept_patterns(vocabulary: Sequence[str]) -> list[tuple[str, re.Pattern[str]]]:
    """One whole-word pattern per entry; a plural on the last word matches too."""
    patterns = []
    for entry in vocabulary:
        words = entry.lower().split()
        if not words:
            continue
        body = r"\s+".join(re.escape(w) for w in words)
        patterns.append((" ".join(words), re.compile(rf"\b{body}(?:s|es)?\b")))
    return patterns


def frequent_words(captions: Sequence[str | None], top_k: int) -> list[str]:
    """The `top_k` most frequent caption words (3+ letters, no stopwords): a vocabulary when none is given."""
    counts = Counter(w for c in captions if c for w in set(WORD.findall(c.lower()))
                     if len(w) >= 3 and w not in STOPWORDS)
    return [word for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]]


def meta_concepts(meta: str, field: str) -> list[str]:
    value: Any = json.loads(meta)
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None or value == "":
        return []
    values = value if isinstance(value, list) else [value]
    return sorted({str(v) for v in values})


def caption_concepts(caption: str | None, patterns: list[tuple[str, re.Pattern[str]]]) -> list[str]:
    text = (caption or "").lower()
    return [name for name, pattern in patterns if pattern.search(text)]


def unit_draw(seed: int, key: str, concept: str) -> float:
    digest = hashlib.blake2b(f"{seed}\0{key}\0{concept}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def plan_rebalance(keys: Sequence[str], concepts: Sequence[list[str]], cfg: RebalanceConfig, seed: int
                   ) -> tuple[set[str], dict[str, int], Counter[str], Counter[str]]:
    """(keys dropped by the head cap, key -> extra copies, concept counts before, after)."""
    before = Counter(c for found in concepts for c in (found or [NO_CONCEPT]))
    dropped: set[str] = set()
    for key, found in zip(keys, concepts):
        if cfg.max_per_concept and found and not any(
                unit_draw(seed, key, c) < min(1.0, cfg.max_per_concept / before[c]) for c in found):
            dropped.add(key)
    capped = Counter(c for key, found in zip(keys, concepts) if key not in dropped for c in (found or [NO_CONCEPT]))
    repeats: dict[str, int] = {}
    for key, found in zip(keys, concepts):
        if key in dropped or not found or not cfg.min_per_concept:
            continue
        rarest = min(capped[c] for c in found)
        if rarest < cfg.min_per_concept:
            repeats[key] = min(cfg.max_repeat, math.ceil(cfg.min_per_concept / rarest) - 1)
    after = Counter()
    for key, found in zip(keys, concepts):
        if key not in dropped:
            for c in found or [NO_CONCEPT]:
                after[c] += 1 + repeats.get(key, 0)
    return dropped, repeats, before, after


def balance_metrics(counts: Counter[str], prefix: str) -> dict[str, float]:
    """Imbalance (largest / smallest concept), normalised entropy, and the top tenth's share."""
    values = sorted((n for c, n in counts.items() if c != NO_CONCEPT and n > 0), reverse=True)
    if not values:
        return {}
    total = sum(values)
    entropy = -sum(n / total * math.log(n / total) for n in values)
    top = values[:max(1, len(values) // 10)]
    return {f"{prefix}.imbalance": values[0] / values[-1],
            f"{prefix}.normalised_entropy": entropy / math.log(len(values)) if len(values) > 1 else 1.0,
            f"{prefix}.top_decile_share": sum(top) / total}


def mark_rebalanced(batch: pa.Table, dropped: set[str], repeats: dict[str, int]) -> pa.Table:
    """Ray Data UDF: `drop_reason` (head cap) and `repeat` (extra copies) columns from the plan."""
    keys = batch.column("key").to_pylist()
    reasons = ["rebalance_head_cap" if k in dropped else None for k in keys]
    return batch.append_column("drop_reason", pa.array(reasons, pa.string())).append_column(
        "repeat", pa.array([repeats.get(k, 0) for k in keys], pa.int32()))


def sample_concepts(rows: pa.Table, cfg: RebalanceConfig) -> tuple[list[list[str]], list[str]]:
    """Each row's concepts and the vocabulary used."""
    if cfg.concept_source == "meta":
        return [meta_concepts(m, cfg.meta_field) for m in rows.column("meta").to_pylist()], []
    captions = rows.column("caption").to_pylist()
    vocabulary = list(cfg.vocabulary) or frequent_words(captions, cfg.top_k)
    patterns = concept_patterns(vocabulary)
    return [caption_concepts(c, patterns) for c in captions], vocabulary


def plot_distribution(before: Counter[str], after: Counter[str], folder: Path, top: int = 30) -> list[str]:
    from components.common.plots import bar_chart

    shown = [c for c, _ in before.most_common(top)]
    bar_chart({c: before[c] for c in shown}, "concepts before rebalancing", folder / "concepts_before.png")
    bar_chart({c: after[c] for c in shown}, "concepts after rebalancing (copies counted)", folder / "concepts_after.png")
    return [f"{folder.name}/concepts_before.png", f"{folder.name}/concepts_after.png"]


@component(name="rebalance", version="1", config="data.rebalance", inputs=("samples",), outputs=("samples",))
def rebalance(ctx: StageContext[RebalanceConfig]) -> StageResult:
    cfg = ctx.config
    table = ctx.outputs["samples"]
    rows = read_columns(data_dir(ctx.inputs["samples"]), ["key", "caption", "meta", "drop_reason"])
    kept = rows.filter(pc.is_null(rows.column("drop_reason"))) if rows.num_rows else rows
    keys = kept.column("key").to_pylist() if kept.num_rows else []
    concepts, vocabulary = sample_concepts(kept, cfg) if keys else ([], [])
    dropped, repeats, before, after = plan_rebalance(keys, concepts, cfg, ctx.seed)
    read_kept(ctx.inputs["samples"]).map_batches(
        mark_rebalanced, fn_kwargs={"dropped": dropped, "repeats": repeats}, batch_format="pyarrow",
        batch_size=cfg.resources.batch_size, **cfg.resources.map_kwargs(),
    ).write_parquet(str(data_dir(table)))
    data_dir(table).mkdir(parents=True, exist_ok=True)
    stats = write_stats(table, "rebalance", upstream=ctx.inputs["samples"])
    write_json_atomic(table / "concepts.json", {
        "vocabulary": vocabulary, "before": dict(before.most_common()), "after": dict(after.most_common()),
        "repeats": sum(repeats.values()), "repeated_samples": len(repeats)})
    metrics = drop_metrics(stats) | balance_metrics(before, "before") | balance_metrics(after, "after")
    metrics |= {"concepts": float(len([c for c in before if c != NO_CONCEPT])), "repeats": float(sum(repeats.values())),
                "samples_without_concept": float(before.get(NO_CONCEPT, 0))}
    plots = plot_distribution(before, after, table) if before else []
    return StageResult(metrics=metrics, artifacts=["samples/stats.json", "samples/concepts.json", *plots])


if __name__ == "__main__":
    import sys

    from components.common.cli import component_main

    sys.exit(component_main(rebalance))
