"""Dedup step: exact (content hash) and perceptual (64-bit pHash within a Hamming threshold)
duplicates, found with the LSH index of `dedup_core` (never all pairs), one representative kept.

Ray Data hashes every image (one decode each) into a scratch table; the driver groups the hashes
(8 bytes a row) and picks each group's representative (the largest image, ties to the smallest key);
a second Ray Data pass marks the others `duplicate_exact` (same bytes as their representative) or
`duplicate_near`. With `against` set, the pHashes of earlier runs' shards (their json `scores.phash`,
or the image hashed again when a shard lacks it) form a `HammingIndex`, and every sample within the
threshold of one is dropped as `duplicate_earlier_shard`, whatever its group. `duplicates.parquet` lists every dropped key with the key it duplicates. Where
samples carry synthetic noise labels, recall on the labelled duplicates and the share of distinct
images removed are logged.
"""

from __future__ import annotations

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

from components.common.contract import StageContext, StageResult, component
from components.data.config import DedupConfig
from components.data.dedup_core import (HammingIndex, LSHStats, choose_representatives, content_hash,
                                        find_duplicate_groups, phash64)
from components.data.table import data_dir, drop_metrics, plot_counts, read_columns, read_kept, write_stats

DUPLICATE_LABELS = ("exact_duplicate", "near_duplicate")


def add_hashes(batch: pa.Table) -> pa.Table:
    """Ray Data UDF: `content_sha256` and `phash` (uint64) columns, one decode per image."""
    digests, phashes = [], []
    for data in batch.column("image").to_pylist():
        digests.append(content_hash(data))
        with Image.open(io.BytesIO(data)) as image:
            phashes.append(phash64(image))
    return batch.append_column("content_sha256", pa.array(digests, pa.string())).append_column(
        "phash", pa.array(phashes, pa.uint64()))


def mark_duplicates(batch: pa.Table, reasons: dict[str, str]) -> pa.Table:
    drop = [reasons.get(key) for key in batch.column("key").to_pylist()]
    return batch.drop_columns(["content_sha256"]).append_column("drop_reason", pa.array(drop, pa.string()))


def plan_drops(rows: pa.Table, threshold: int, max_bucket: int) -> tuple[dict[str, str], list[dict[str, Any]],
                                                                          LSHStats]:
    """Group the hashes, keep one per group; returns key -> reason, the dropped list, index stats."""
    keys = rows.column("key").to_pylist()
    digests = rows.column("content_sha256").to_pylist()
    hashes = rows.column("phash").to_numpy(zero_copy_only=False).astype(np.uint64)
    areas = (rows.column("width").to_numpy(zero_copy_only=False).astype(np.int64)
             * rows.column("height").to_numpy(zero_copy_only=False).astype(np.int64))
    stats = LSHStats()
    groups = find_duplicate_groups(keys, hashes, threshold, max_bucket=max_bucket, stats=stats)
    keepers = choose_representatives(groups, keys, [(int(a),) for a in areas])
    reasons: dict[str, str] = {}
    dropped: list[dict[str, Any]] = []
    for index, keep in sorted(keepers.items()):
        reason = "duplicate_exact" if digests[index] == digests[keep] else "duplicate_near"
        reasons[keys[index]] = reason
        distance = int(np.bitwise_count(hashes[index] ^ hashes[keep]))
        dropped.append({"key": keys[index], "duplicate_of": keys[keep], "reason": reason, "distance": distance})
    return reasons, dropped, stats


def earlier_shard_files(paths: list[str]) -> list[Path]:
    """Every `.tar` under the given shard folders (or the files themselves), sorted; a missing path is an error."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted(path.rglob("*.tar"))
        else:
            raise FileNotFoundError(f"data.dedup.against: {path} does not exist (give earlier write_shards folders)")
    return sorted(set(files))


def against_fingerprint(cfg: DedupConfig) -> dict[str, Any]:
    """Earlier shards enter the cache key by name, size and mtime (shards are written once, atomically)."""
    return {"against": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in earlier_shard_files(cfg.against)]}


def shard_hashes(path: Path) -> Iterator[int]:
    """The pHash of every sample in one shard: the stored score, else the image hashed again."""
    images: dict[str, bytes] = {}
    stored: dict[str, int | None] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = Path(member.name).name.partition(".")
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if ext == "json":
                stored[key] = json.loads(data).get("scores", {}).get("phash")
            elif ext in ("jpg", "jpeg", "png", "webp", "frame0000.jpg"):
                images[key] = data
    for key in sorted(set(images) | set(stored)):
        if stored.get(key) is not None:
            yield int(stored[key])  # type: ignore[arg-type]
        elif key in images:
            with Image.open(io.BytesIO(images[key])) as image:
                yield phash64(image)


def read_shard_hashes(batch: dict[str, Any]) -> dict[str, Any]:
    """Ray Data UDF: shard paths in, their samples' pHashes out."""
    hashes = [h for path in batch["path"] for h in shard_hashes(Path(path))]
    return {"phash": np.array(hashes, dtype=np.uint64)}


def earlier_hashes(cfg: DedupConfig) -> np.ndarray:
    import ray.data

    files = earlier_shard_files(cfg.against)
    if not files:
        return np.empty(0, dtype=np.uint64)
    rows = ray.data.from_items([{"path": str(f)} for f in files], override_num_blocks=len(files)).map_batches(
        read_shard_hashes, batch_size=1, **cfg.resources.map_kwargs()).take_all()
    return np.array([r["phash"] for r in rows], dtype=np.uint64)


def drop_seen_before(rows: pa.Table, earlier: np.ndarray, cfg: DedupConfig, reasons: dict[str, str],
                     dropped: list[dict[str, Any]]) -> int:
    """Mark rows within the threshold of an earlier shard's hash; returns how many were marked."""
    if not earlier.size:
        return 0
    hashes = rows.column("phash").to_numpy(zero_copy_only=False).astype(np.uint64)
    matched = HammingIndex(earlier, cfg.phash_threshold, max_bucket=cfg.max_bucket).query(hashes)
    keys = rows.column("key").to_pylist()
    for index in np.flatnonzero(matched).tolist():
        if keys[index] in reasons:
            dropped[:] = [d for d in dropped if d["key"] != keys[index]]
        reasons[keys[index]] = "duplicate_earlier_shard"
        dropped.append({"key": keys[index], "duplicate_of": "earlier shards", "reason": "duplicate_earlier_shard",
                        "distance": -1})
    return int(matched.sum())


def label_metrics(meta: list[str], keys: list[str], reasons: dict[str, str]) -> dict[str, float]:
    """Recall on labelled duplicates and the share of the other (distinct) labelled images removed."""
    labelled = dup_total = dup_dropped = distinct_total = distinct_dropped = 0
    for key, text in zip(keys, meta):
        synthetic = json.loads(text).get("synthetic")
        if synthetic is None:
            continue
        labelled += 1
        if synthetic.get("noise") in DUPLICATE_LABELS:
            dup_total += 1
            dup_dropped += key in reasons
        else:
            distinct_total += 1
            distinct_dropped += key in reasons
    if not labelled:
        return {}
    return {"labelled_rows": float(labelled), "duplicate_recall": dup_dropped / max(1, dup_total),
            "distinct_removed_rate": distinct_dropped / max(1, distinct_total),
            "labelled_duplicates": float(dup_total)}


@component(name="dedup", version="2", config="data.dedup", inputs=("samples",), outputs=("samples",),
           external_fingerprint=against_fingerprint, key_exclude=("against",))
def dedup(ctx: StageContext[DedupConfig]) -> StageResult:
    import ray.data

    cfg = ctx.config
    hashed_dir = ctx.workdir / "_hashed"
    read_kept(ctx.inputs["samples"]).map_batches(
        add_hashes, batch_size=cfg.resources.batch_size, batch_format="pyarrow", **cfg.resources.map_kwargs(),
    ).write_parquet(str(hashed_dir))
    table = ctx.outputs["samples"]
    hashed_files = sorted(hashed_dir.glob("*.parquet"))
    reasons: dict[str, str] = {}
    dropped: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    if hashed_files:
        rows = read_columns(hashed_dir, ["key", "content_sha256", "phash", "width", "height", "meta"])
        reasons, dropped, index_stats = plan_drops(rows, cfg.phash_threshold, cfg.max_bucket)
        if cfg.against:
            earlier = earlier_hashes(cfg)
            seen = drop_seen_before(rows, earlier, cfg, reasons, dropped)
            metrics |= {"earlier_hashes": float(earlier.size), "dropped_seen_before": float(seen)}
        metrics |= {f"lsh.{k}": float(v) for k, v in vars(index_stats).items()}
        metrics |= label_metrics(rows.column("meta").to_pylist(), rows.column("key").to_pylist(), reasons)
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
