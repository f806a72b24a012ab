"""Dedup step: exact (content hash) and perceptual (64-bit pHash within a Hamming threshold)
duplicates, found with the LSH index of `dedup_core` (never all pairs), one representative kept.

Every image's signals (sha256, pHash, an 8x8 RGB thumbnail) come from ingest's decode (`lib/signals.py`);
rows without them (ingest's `signals` off, tables from elsewhere) are decoded once here, into a scratch table;
the driver finds the row pairs within the pHash threshold with the LSH index, keeps those that also
pass a second signal (identical bytes, or aspect ratios within `max_aspect_change` in log space and
thumbnails within `max_thumbnail_diff` at every cell: pHash alone confuses simple flat scenes), joins
them into groups and picks each group's representative (the largest image, ties to the smallest key);
a second Ray Data pass marks the others `duplicate_exact` (same bytes as their representative) or
`duplicate_near`. With `against` set, the images of earlier runs' caption shards are hashed the same way,
and every sample that forms a verified pair with one of them (the same two signals) is dropped as
`duplicate_earlier_shard`, whatever its group. `duplicates.parquet` lists every dropped key with the key it duplicates. Where
samples carry synthetic noise labels, recall on the labelled duplicates and the share of distinct
images removed are logged.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from components.common.contract import StageContext, StageResult, component, file_stats
from components.data.config import DedupConfig
from components.data.lib.dedup_core import LSHStats, choose_representatives, connected_roots, distinct, near_pairs
from components.data.lib.signals import THUMB_SIDE, add_signals
from components.data.lib.table import data_dir, drop_metrics, plot_counts, read_columns, read_kept, write_stats

DUPLICATE_LABELS = ("exact_duplicate", "near_duplicate")


def mark_duplicates(batch: pa.Table, reasons: dict[str, str]) -> pa.Table:
    """Ray Data UDF: `drop_reason` for the rows dedup drops; the signal columns stay (sample schema)."""
    drop = [reasons.get(key) for key in batch.column("key").to_pylist()]
    return batch.append_column("drop_reason", pa.array(drop, pa.string()))


def candidate_pairs(hashes: np.ndarray, threshold: int, max_bucket: int, stats: LSHStats) -> np.ndarray:
    """Row pairs whose pHashes are within the threshold: the LSH index's pairs of distinct hashes,
    expanded to their rows, plus the rows that share one hash (each with at most max_bucket others)."""
    unique, inverse = distinct(hashes)
    hash_pairs, found = near_pairs(unique, threshold, max_bucket=max_bucket)
    for field in dataclasses.fields(LSHStats):
        setattr(stats, field.name, getattr(found, field.name))
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(unique.size + 1))
    members = [order[starts[u]:starts[u + 1]] for u in range(unique.size)]
    pairs = [np.array([(a, b) for a in members[u] for b in members[v]], dtype=np.int64).reshape(-1, 2)
             for u, v in hash_pairs.tolist()]
    for rows in members:
        if rows.size > 1:
            pairs.append(np.array([(a, b) for i, a in enumerate(rows) for b in rows[i + 1:i + 1 + max_bucket]],
                                  dtype=np.int64))
    return np.concatenate(pairs) if pairs else np.empty((0, 2), dtype=np.int64)


def verified(pairs: np.ndarray, digests: list[str], sizes: np.ndarray, thumbs: np.ndarray, cfg: DedupConfig
             ) -> np.ndarray:
    """The candidate pairs that also agree on aspect ratio and thumbnail (or have identical bytes)."""
    if not pairs.size or not cfg.verify:
        return pairs
    a, b = pairs[:, 0], pairs[:, 1]
    same_bytes = np.array([digests[i] == digests[j] for i, j in pairs.tolist()])
    aspect = np.log(sizes[:, 0] / sizes[:, 1])
    close_aspect = np.abs(aspect[a] - aspect[b]) <= cfg.max_aspect_change
    close_thumb = np.abs(thumbs[a].astype(np.int16) - thumbs[b].astype(np.int16)).max(axis=1) <= cfg.max_thumbnail_diff
    return pairs[same_bytes | (close_aspect & close_thumb)]


def plan_drops(rows: pa.Table, cfg: DedupConfig) -> tuple[dict[str, str], list[dict[str, Any]], LSHStats]:
    """Group verified near pairs, keep one per group; returns key -> reason, the dropped list, index stats."""
    keys = rows.column("key").to_pylist()
    digests = rows.column("content_sha256").to_pylist()
    hashes = rows.column("phash").to_numpy(zero_copy_only=False).astype(np.uint64)
    sizes, thumbs = signal_sizes(rows), signal_thumbs(rows)
    stats = LSHStats()
    candidates = candidate_pairs(hashes, cfg.phash_threshold, cfg.max_bucket, stats)
    pairs = verified(candidates, digests, sizes, thumbs, cfg)
    stats.verified_pairs = int(len(pairs))
    groups = groups_of(len(keys), pairs, keys)
    keepers = choose_representatives(groups, keys, [(int(w * h),) for w, h in sizes])
    reasons: dict[str, str] = {}
    dropped: list[dict[str, Any]] = []
    for index, keep in sorted(keepers.items()):
        reason = "duplicate_exact" if digests[index] == digests[keep] else "duplicate_near"
        reasons[keys[index]] = reason
        distance = int(np.bitwise_count(hashes[index] ^ hashes[keep]))
        dropped.append({"key": keys[index], "duplicate_of": keys[keep], "reason": reason, "distance": distance})
    return reasons, dropped, stats


def earlier_shard_files(paths: list[str]) -> list[Path]:
    """The caption shards of earlier write_shards folders (`<folder>/caption/*.tar`; any other folder:
    every `.tar` under it; a file: itself), sorted; a missing path is an error."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted((path / "caption").glob("*.tar") if (path / "caption").is_dir() else path.rglob("*.tar"))
        else:
            raise FileNotFoundError(f"data.dedup.against: {path} does not exist (give earlier write_shards folders)")
    return sorted(set(files))


def against_fingerprint(cfg: DedupConfig) -> dict[str, Any]:
    """Earlier shards enter the cache key by name, size and mtime (shards are written once, atomically)."""
    return {"against": file_stats(earlier_shard_files(cfg.against))}


def shard_images(path: Path) -> Iterator[bytes]:
    """The image of every sample in one shard (video frames and other members skipped)."""
    with tarfile.open(path) as tar:
        for member in tar:
            suffix = Path(member.name).name.partition(".")[2]
            if member.isfile() and suffix in ("jpg", "jpeg", "png", "webp"):
                yield tar.extractfile(member).read()  # type: ignore[union-attr]


def read_shard_signals(batch: pa.Table) -> pa.Table:
    """Ray Data UDF: shard paths in, the same signals ingest computes for each of their images out."""
    images = [data for path in batch.column("path").to_pylist() for data in shard_images(Path(path))]
    sizes = []
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            sizes.append(image.size)
    table = pa.table({"image": pa.array(images, pa.binary()), "width": [w for w, _ in sizes],
                      "height": [h for _, h in sizes]})
    return add_signals(table).drop_columns(["image"])


def earlier_signals(cfg: DedupConfig) -> pa.Table:
    import ray.data

    files = earlier_shard_files(cfg.against)
    if not files:
        return pa.table({})
    import ray

    blocks = ray.data.from_items([{"path": str(f)} for f in files], override_num_blocks=len(files)).map_batches(
        read_shard_signals, batch_size=1, batch_format="pyarrow", **cfg.resources.map_kwargs()).to_arrow_refs()
    tables = [t for t in ray.get(blocks) if t.num_rows]
    return pa.concat_tables(tables) if tables else pa.table({})


def drop_seen_before(rows: pa.Table, earlier: pa.Table, cfg: DedupConfig, reasons: dict[str, str],
                     dropped: list[dict[str, Any]]) -> int:
    """Mark rows that are verified duplicates of an earlier shard's image (the same two signals as within
    the run); returns how many were marked."""
    if not earlier.num_rows or not rows.num_rows:
        return 0
    columns = ["content_sha256", "phash", "thumbnail", "width", "height"]
    both = pa.concat_tables([rows.select(columns).cast(earlier.select(columns).schema), earlier.select(columns)])
    hashes = both.column("phash").to_numpy(zero_copy_only=False).astype(np.uint64)
    candidates = candidate_pairs(hashes, cfg.phash_threshold, cfg.max_bucket, LSHStats())
    pairs = verified(candidates, both.column("content_sha256").to_pylist(), signal_sizes(both), signal_thumbs(both), cfg)
    current = rows.num_rows
    seen = {int(min(a, b)) for a, b in pairs.tolist() if min(a, b) < current <= max(a, b)}
    keys = rows.column("key").to_pylist()
    marked = {keys[i] for i in seen}
    dropped[:] = [d for d in dropped if d["key"] not in marked]
    for key in sorted(marked):
        reasons[key] = "duplicate_earlier_shard"
        dropped.append({"key": key, "duplicate_of": "earlier shards", "reason": "duplicate_earlier_shard",
                        "distance": -1})
    return len(marked)


def signal_sizes(rows: pa.Table) -> np.ndarray:
    return np.stack([rows.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in ("width", "height")],
                    axis=1).reshape(-1, 2)


def signal_thumbs(rows: pa.Table) -> np.ndarray:
    return np.frombuffer(b"".join(rows.column("thumbnail").to_pylist()), dtype=np.uint8).reshape(
        -1, THUMB_SIDE * THUMB_SIDE * 3)


def groups_of(n: int, pairs: np.ndarray, keys: list[str]) -> list[list[int]]:
    """Connected components (size >= 2) of the pair graph, members and groups ordered by key."""
    labels = connected_roots(n, pairs)
    by_root: dict[int, list[int]] = {}
    for index, root in enumerate(labels.tolist()):
        by_root.setdefault(root, []).append(index)
    groups = [sorted(g, key=lambda i: keys[i]) for g in by_root.values() if len(g) > 1]
    return sorted(groups, key=lambda g: keys[g[0]])


def label_metrics(meta: list[str], keys: list[str], kept_for: dict[str, str]) -> dict[str, float]:
    """Scored against the crawl's labels, where each duplicate names the original it copies (same source
    shard): `duplicate_recall` is the share of labelled duplicates that ended up grouped with their
    original (either one may be the one kept: an enlarged copy is rightly kept over a smaller original);
    `distinct_removed_rate` is the share of distinct labelled images dropped for an image that is not
    a copy of them. `kept_for` maps each dropped key to the key kept in its place."""
    root: dict[str, str] = {}
    for key, text in zip(keys, meta):
        synthetic = json.loads(text).get("synthetic")
        if synthetic is not None:
            original = synthetic.get("duplicate_of") if synthetic.get("noise") in DUPLICATE_LABELS else None
            root[key] = f"{key.rsplit('-', 1)[0]}-{original}" if original and "-" in key else original or key
    if not root:
        return {}
    final = {key: kept_for.get(key, key) for key in root}
    duplicates = [k for k in root if root[k] != k]
    caught = sum(1 for k in duplicates if root[k] in final and final[k] == final[root[k]])
    distinct = [k for k in root if root[k] == k]
    wrongly = sum(1 for k in distinct if k in kept_for and root.get(kept_for[k], kept_for[k]) != k)
    return {"labelled_rows": float(len(root)), "labelled_duplicates": float(len(duplicates)),
            "duplicate_recall": caught / max(1, len(duplicates)),
            "distinct_removed_rate": wrongly / max(1, len(distinct))}


@component(name="dedup", version="5", config="data.dedup", inputs=("samples",), outputs=("samples",),
           external_fingerprint=against_fingerprint, key_exclude=("against",))
def dedup(ctx: StageContext[DedupConfig]) -> StageResult:
    import ray.data

    cfg = ctx.config
    hashed_dir = ctx.workdir / "_hashed"
    read_kept(ctx.inputs["samples"]).map_batches(
        add_signals, batch_size=cfg.resources.batch_size, batch_format="pyarrow", **cfg.resources.map_kwargs(),
    ).write_parquet(str(hashed_dir))
    table = ctx.outputs["samples"]
    hashed_files = sorted(hashed_dir.glob("*.parquet"))
    reasons: dict[str, str] = {}
    dropped: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    if hashed_files:
        rows = read_columns(hashed_dir, ["key", "content_sha256", "phash", "thumbnail", "width", "height", "meta"])
        reasons, dropped, index_stats = plan_drops(rows, cfg)
        if cfg.against:
            earlier = earlier_signals(cfg)
            seen = drop_seen_before(rows, earlier, cfg, reasons, dropped)
            metrics |= {"earlier_images": float(earlier.num_rows), "dropped_seen_before": float(seen)}
        metrics |= {f"lsh.{k}": float(v) for k, v in vars(index_stats).items()}
        metrics |= label_metrics(rows.column("meta").to_pylist(), rows.column("key").to_pylist(),
                                 {d["key"]: d["duplicate_of"] for d in dropped})
        ray.data.read_parquet([str(f) for f in hashed_files]).map_batches(
            mark_duplicates, fn_kwargs={"reasons": reasons}, batch_format="pyarrow", batch_size=None,
        ).write_parquet(str(data_dir(table)))
    else:
        data_dir(table).mkdir(parents=True)
    shutil.rmtree(hashed_dir)
    pq.write_table(pa.Table.from_pylist(dropped, schema=pa.schema(
        [("key", pa.string()), ("duplicate_of", pa.string()), ("reason", pa.string()), ("distance", pa.int32())])),
        table / "duplicates.parquet")
    stats = write_stats(table, "dedup", upstream=ctx.inputs["samples"])
    metrics |= drop_metrics(stats)
    return StageResult(metrics=metrics, artifacts=["samples/stats.json", plot_counts(table, stats)])


if __name__ == "__main__":
    import sys

    from components.common.cli import component_main

    sys.exit(component_main(dedup))
