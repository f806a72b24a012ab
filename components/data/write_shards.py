"""The WebDataset shard writer: every kept sample into `<task>/<prefix>-NNNNNN.tar` shards, one folder
per task type, with stats per shard, per task and per job.

Shard membership is a stable hash of the key, a task's shard count is ceil(samples / samples_per_shard),
rows reach their shard through parquet fragments on disk (pass 1) that pass 2 assembles into tars,
and members are sorted by key, so the same samples always give byte-identical shards with the same
names. A caption sample that the rebalancing step marked for `repeat` extra copies is written that many
more times as `<key>_r1`, `<key>_r2`, ... (the tail duplicated on disk, as the paper does). Counts are
checked every time: in = kept + dropped by reason (since ingest for captions, since synthesis for the
other tasks), and written = kept + repeats. Sample layout, schema version 2 (README, "Shards"):

    <key>.jpg|png|webp          the image (caption, ocr, grounding, counting)
    <key>.frame0000.jpg ...     the sampled frames of a video, in order (video)
    <key>.txt                   the caption (UTF-8)
    <key>.json                  {"key", "task", "caption", "conversations", "annotations", "width", "height",
                                 "source", "meta", "scores", "repeat_of", "schema_version",
                                 "caption_source" (video_captions' tables: human, synthetic or model:<model>)}
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from components.common.cache import write_json_atomic
from components.common.contract import StageContext, StageResult, component
from components.data.config import ShardsConfig
from components.data.lib.table import KEPT_SCHEMA, check_counts_add_up, data_dir, read_columns, read_kept, read_stats
from components.data.lib.tasks import TASK_SCHEMA, TASK_TYPES

SCHEMA_VERSION = 2
TASK_INPUTS = ("ocr", "grounding", "video")  # optional inputs: task tables (tasks.py) of the synthesis steps
# Columns of the two input schemas that are not scores; anything else (clip_score, ...) is a score. Dedup's
# signals (sha256, pHash, thumbnail) are sample-table columns since ingest computes them, so not scores.
BASE_COLUMNS = frozenset(KEPT_SCHEMA.names) | frozenset(TASK_SCHEMA.names) | {"repeat", "caption_source"}
SHARD_ROW_SCHEMA = pa.schema([
    ("key", pa.string()), ("task", pa.string()), ("shard", pa.int32()), ("media", pa.list_(pa.binary())),
    ("image_ext", pa.string()), ("txt", pa.string()), ("sample_json", pa.string()),
])


def shard_of(key: str, num_shards: int) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % num_shards


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def sample_json(row: dict[str, Any], task: str, key: str, repeat_of: str | None) -> str:
    """The `<key>.json` member: labels, provenance and every score column the stages added."""
    return json.dumps({
        "key": key, "task": task, "caption": row["caption"], "width": row["width"], "height": row["height"],
        "source": row["source"], "meta": json.loads(row["meta"]),
        "conversations": json.loads(row.get("conversations") or "[]"),
        "annotations": json.loads(row.get("annotations") or "{}"),
        "scores": {name: row[name] for name in sorted(row) if name not in BASE_COLUMNS},
        "repeat_of": repeat_of, "schema_version": SCHEMA_VERSION,
        **({"caption_source": row["caption_source"]} if row.get("caption_source") else {}),
    }, sort_keys=True)


def to_shard_rows(batch: pa.Table, num_shards: dict[str, int]) -> pa.Table:
    """Ray Data UDF: caption rows (with optional `repeat`) or task rows into shard rows, copies expanded."""
    out: list[dict[str, Any]] = []
    for row in batch.to_pylist():
        task = row.get("task") or "caption"
        media = row["images"] if "images" in row else [row["image"]]
        for copy in range(1 + int(row.get("repeat") or 0)):
            key = row["key"] if copy == 0 else f"{row['key']}_r{copy}"
            out.append({
                "key": key, "task": task, "shard": shard_of(key, num_shards[task]), "media": media,
                "image_ext": row["image_ext"], "txt": row["caption"] or "",
                "sample_json": sample_json(row, task, key, row["key"] if copy else None),
            })
    return pa.Table.from_pylist(out, schema=SHARD_ROW_SCHEMA)


def write_tar(path: Path, rows: list[dict[str, Any]]) -> int:
    """Write one shard atomically (temp name, then rename); returns its size in bytes."""
    import uuid

    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # unique: two attempts never interleave
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for row in sorted(rows, key=lambda r: r["key"]):
            key, ext, media = row["key"], row["image_ext"], row["media"]
            if row["task"] == "video":
                for index, frame in enumerate(media):
                    _add(tar, f"{key}.frame{index:04d}.{ext}", frame)
            else:
                _add(tar, f"{key}.{ext}", media[0])
            _add(tar, f"{key}.txt", row["txt"].encode())
            _add(tar, f"{key}.json", row["sample_json"].encode())
    tmp.replace(path)
    return path.stat().st_size


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    tar.addfile(info, io.BytesIO(payload))


def write_fragments(batch: pa.Table, folder: str) -> pa.Table:
    """Ray Data UDF, pass 1: a batch's rows split by (task, shard) into parquet fragments under `folder`.

    A file-based exchange instead of Ray's hash shuffle: no aggregator actors competing for a small
    machine's CPUs, and memory bounded by one shard in pass 2. A retried task may leave a second copy
    of a fragment; pass 2 keeps one row per key, so retries never duplicate samples."""
    import uuid

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    written = []
    for task, shard in sorted(set(zip(batch.column("task").to_pylist(), batch.column("shard").to_pylist()))):
        part = batch.filter(pc.and_(pc.equal(batch.column("task"), task), pc.equal(batch.column("shard"), shard)))
        target = Path(folder) / task / f"{shard:06d}"
        target.mkdir(parents=True, exist_ok=True)
        tmp = target / f".{uuid.uuid4().hex}.tmp"
        pq.write_table(part, tmp)
        tmp.rename(tmp.with_name(tmp.name[1:-len(".tmp")] + ".parquet"))
        written.append({"task": task, "shard": shard})
    return pa.Table.from_pylist(written, schema=pa.schema([("task", pa.string()), ("shard", pa.int32())]))


def write_shard(batch: pa.Table, fragments: str, folder: str, prefix: str) -> pa.Table:
    """Ray Data UDF, pass 2: one (task, shard) per row in; its fragments read, the tar and stats written."""
    import pyarrow.parquet as pq

    out = []
    for task, index in zip(batch.column("task").to_pylist(), batch.column("shard").to_pylist()):
        rows: dict[str, dict[str, Any]] = {}
        for fragment in sorted((Path(fragments) / task / f"{index:06d}").glob("*.parquet")):
            for row in pq.read_table(fragment).to_pylist():
                kept = rows.setdefault(row["key"], row)
                if kept != row:  # a retried task's copy is identical; anything else is a key collision
                    raise ValueError(f"two different samples share the key {row['key']!r} in {task}; "
                                     "keys must be unique across all inputs")
        out.append(json.dumps(write_group(list(rows.values()), task, index, Path(folder), prefix)))
    return pa.table({"stats": out})


def write_group(rows: list[dict[str, Any]], task: str, index: int, folder: Path, prefix: str) -> dict[str, Any]:
    name = f"{task}/{shard_name(prefix, index)}"
    (folder / task).mkdir(parents=True, exist_ok=True)
    size = write_tar(folder / name, rows)
    samples = [json.loads(r["sample_json"]) for r in rows]
    stats = {"shard": name, "task": task, "samples": len(rows), "bytes": size,
             "repeats": sum(1 for sample in samples if sample["repeat_of"]),
             "sources": dict(sorted(Counter(sample["source"] for sample in samples).items()))}
    write_json_atomic(folder / f"{name[:-len('.tar')]}.stats.json", stats)
    return stats


def caption_counts(table: Path) -> dict[str, Any]:
    """Counts of the caption path since ingest, and the copies the rebalancing step asked for."""
    cumulative = read_stats(table)["cumulative"]
    columns = read_columns(data_dir(table), ["drop_reason"] + (["repeat"] if has_column(table, "repeat") else []))
    repeats = 0
    if "repeat" in columns.column_names:
        kept = [r for d, r in zip(columns.column("drop_reason").to_pylist(), columns.column("repeat").to_pylist())
                if d is None]
        repeats = sum(int(r or 0) for r in kept)
    return {"caption": {"in": cumulative["in"], "kept": cumulative["kept"], "dropped": cumulative["dropped"],
                        "repeats": repeats}}


def task_counts(table: Path) -> dict[str, dict[str, Any]]:
    """Per task in one task table: in, kept, dropped by reason (the synthesis or video step's own)."""
    columns = read_columns(data_dir(table), ["task", "drop_reason"])
    counts: dict[str, dict[str, Any]] = {}
    for task, reason in zip(columns.column("task").to_pylist(), columns.column("drop_reason").to_pylist()):
        entry = counts.setdefault(task, {"in": 0, "kept": 0, "dropped": Counter(), "repeats": 0})
        entry["in"] += 1
        if reason is None:
            entry["kept"] += 1
        else:
            entry["dropped"][reason] += 1
    return {task: {**c, "dropped": dict(sorted(c["dropped"].items()))} for task, c in counts.items()}


def has_column(table: Path, name: str) -> bool:
    import pyarrow.parquet as pq

    files = sorted(data_dir(table).glob("*.parquet"))
    return bool(files) and name in pq.read_schema(files[0]).names


def job_stats(expected: dict[str, dict[str, Any]], shard_stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task and overall stats; raises if a shard lost or gained a sample."""
    tasks: dict[str, Any] = {}
    for task in sorted(expected):
        counts = expected[task]
        own = [s for s in shard_stats if s["task"] == task]
        written = sum(s["samples"] for s in own)
        if written != counts["kept"] + counts["repeats"]:
            raise RuntimeError(f"{task}: wrote {written} samples but expected {counts['kept']} kept + "
                               f"{counts['repeats']} repeats; rows were lost")
        tasks[task] = {**counts, "written": written, "shards": len(own), "bytes": sum(s["bytes"] for s in own),
                       "per_shard": {s["shard"]: s["samples"] for s in own}}
        check_counts_add_up(tasks[task])
    dropped = sum((Counter(t["dropped"]) for t in tasks.values()), Counter())
    stats = {
        "in": sum(t["in"] for t in tasks.values()), "kept": sum(t["kept"] for t in tasks.values()),
        "dropped": dict(sorted(dropped.items())), "written": sum(t["written"] for t in tasks.values()),
        "shards": len(shard_stats), "bytes": sum(s["bytes"] for s in shard_stats), "schema_version": SCHEMA_VERSION,
        "tasks": tasks, "per_shard": {s["shard"]: s["samples"] for s in shard_stats},
    }
    check_counts_add_up(stats)
    return stats


@component(name="write_shards", version="3", config="data.shards", inputs=("samples", *TASK_INPUTS),
           optional_inputs=TASK_INPUTS, outputs=("shards",))
def write_shards(ctx: StageContext[ShardsConfig]) -> StageResult:
    import ray.data

    cfg = ctx.config
    folder = ctx.outputs["shards"]
    folder.mkdir(parents=True, exist_ok=True)
    expected = caption_counts(ctx.inputs["samples"])
    tables = [ctx.inputs["samples"]]
    for name in TASK_INPUTS:
        if name in ctx.inputs:
            expected |= task_counts(ctx.inputs[name])
            tables.append(ctx.inputs[name])
    num_shards = {task: max(1, math.ceil((c["kept"] + c["repeats"]) / cfg.samples_per_shard))
                  for task, c in expected.items()}
    shard_stats: list[dict[str, Any]] = []
    if sum(c["kept"] for c in expected.values()):
        fragments = ctx.workdir / "_fragments"
        for table in tables:
            read_kept(table).map_batches(
                to_shard_rows, fn_kwargs={"num_shards": num_shards}, batch_format="pyarrow",
                batch_size=cfg.resources.batch_size, num_cpus=cfg.resources.num_cpus,
                **cfg.resources.placement_kwargs(),
            ).map_batches(write_fragments, fn_kwargs={"folder": str(fragments)}, batch_format="pyarrow",
                          batch_size=None, num_cpus=cfg.resources.num_cpus,
                          **cfg.resources.placement_kwargs()).materialize()
        groups = [{"task": task.name, "shard": int(shard.name)} for task in sorted(fragments.iterdir())
                  for shard in sorted(task.iterdir())]
        written = ray.data.from_items(groups, override_num_blocks=len(groups)).map_batches(
            write_shard, fn_kwargs={"fragments": str(fragments), "folder": str(folder), "prefix": cfg.prefix},
            batch_size=1, batch_format="pyarrow", **cfg.resources.map_kwargs(),
        ).take_all()
        shutil.rmtree(fragments)
        shard_stats = sorted((json.loads(r["stats"]) for r in written), key=lambda s: s["shard"])
    stats = job_stats(expected, shard_stats)
    write_json_atomic(folder / "stats.json", stats)
    metrics = {"samples_in": float(stats["in"]), "samples_kept": float(stats["kept"]),
               "samples_written": float(stats["written"]), "shards": float(stats["shards"]),
               "bytes": float(stats["bytes"])}
    metrics |= {f"dropped.{reason}": float(n) for reason, n in stats["dropped"].items()}
    metrics |= {f"{task}.written": float(t["written"]) for task, t in stats["tasks"].items()}
    return StageResult(metrics=metrics, artifacts=["shards/stats.json"])


def list_shards(folder: Path, task: str | None = None) -> list[Path]:
    """The shard files of a `write_shards` output (of one task, or all), in path order."""
    tasks = [task] if task else TASK_TYPES
    return sorted(p for t in tasks for p in (Path(folder) / t).glob("*.tar"))


if __name__ == "__main__":
    import sys

    from components.common.cli import component_main

    sys.exit(component_main(write_shards))
