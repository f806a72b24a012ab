"""The WebDataset shard writer: kept samples into `<prefix>-NNNNNN.tar` shards with stats.

Shard membership is a stable hash of the key, the shard count is ceil(samples / samples_per_shard),
and members are sorted by key, so the same samples always give byte-identical shards with the same
names. Each shard gets `<name>.stats.json`; the job gets `stats.json` with the cumulative counts
since ingest (in = kept + dropped by reason, checked). Sample layout, schema version 1:

    <key>.jpg|png|webp   the image bytes as ingested
    <key>.txt            the caption (UTF-8)
    <key>.json           {"key", "caption", "width", "height", "source", "meta", "scores", "schema_version"}
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from components.common.cache import write_json_atomic
from components.common.contract import StageContext, StageResult, component
from components.data.config import ShardsConfig
from components.data.table import KEPT_SCHEMA, check_counts_add_up, read_kept, read_stats

SCHEMA_VERSION = 1
BASE_COLUMNS = frozenset(KEPT_SCHEMA.names) | {"shard"}  # anything else is a score column


def shard_of(key: str, num_shards: int) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % num_shards


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def write_tar(path: Path, rows: list[dict[str, Any]]) -> int:
    """Write one shard atomically (temp name, then rename); returns its size in bytes."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for row in sorted(rows, key=lambda r: r["key"]):
            sample_json = {
                "key": row["key"], "caption": row["caption"], "width": row["width"], "height": row["height"],
                "source": row["source"], "meta": json.loads(row["meta"]), "schema_version": SCHEMA_VERSION,
                "scores": {name: row[name] for name in sorted(row) if name not in BASE_COLUMNS},
            }
            _add(tar, f"{row['key']}.{row['image_ext']}", row["image"])
            _add(tar, f"{row['key']}.txt", (row["caption"] or "").encode())
            _add(tar, f"{row['key']}.json", json.dumps(sample_json, sort_keys=True).encode())
    tmp.replace(path)
    return path.stat().st_size


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    tar.addfile(info, io.BytesIO(payload))


def write_shard_group(group: pa.Table, folder: str, prefix: str) -> pa.Table:
    """Ray Data `map_groups` UDF: all rows of one shard in, the tar and its stats written, a stats row out."""
    rows = group.to_pylist()
    name = shard_name(prefix, rows[0]["shard"])
    size = write_tar(Path(folder) / name, rows)
    stats = {
        "shard": name, "samples": len(rows), "bytes": size,
        "sources": dict(sorted(Counter(r["source"] for r in rows).items())),
        "image_ext": dict(sorted(Counter(r["image_ext"] for r in rows).items())),
    }
    write_json_atomic(Path(folder) / f"{name[:-len('.tar')]}.stats.json", stats)
    return pa.table({"stats": [json.dumps(stats)]})


@component(name="write_shards", version="1", config="data.shards", inputs=("samples",), outputs=("shards",))
def write_shards(ctx: StageContext[ShardsConfig]) -> StageResult:
    cfg = ctx.config
    folder = ctx.outputs["shards"]
    folder.mkdir(parents=True, exist_ok=True)
    ds = read_kept(ctx.inputs["samples"])
    upstream = read_stats(ctx.inputs["samples"])["cumulative"]
    total = upstream["kept"]
    num_shards = max(1, math.ceil(total / cfg.samples_per_shard))
    shard_stats: list[dict[str, Any]] = []
    if total:
        with_shard = ds.map_batches(
            lambda batch: batch.append_column(
                "shard", pa.array([shard_of(k, num_shards) for k in batch.column("key").to_pylist()], pa.int32())),
            batch_format="pyarrow", batch_size=cfg.resources.batch_size, num_cpus=cfg.resources.num_cpus,
        )
        written = with_shard.groupby("shard").map_groups(
            write_shard_group, fn_kwargs={"folder": str(folder), "prefix": cfg.prefix}, batch_format="pyarrow",
            **cfg.resources.map_kwargs(),
        ).take_all()
        shard_stats = sorted((json.loads(r["stats"]) for r in written), key=lambda s: s["shard"])
    kept = sum(s["samples"] for s in shard_stats)
    if kept != total:
        raise RuntimeError(f"wrote {kept} samples but the upstream table kept {total}; rows were lost")
    job_stats = {
        "in": upstream["in"], "kept": kept, "dropped": upstream["dropped"], "shards": len(shard_stats),
        "bytes": sum(s["bytes"] for s in shard_stats), "schema_version": SCHEMA_VERSION,
        "per_shard": {s["shard"]: s["samples"] for s in shard_stats},
    }
    check_counts_add_up(job_stats)
    write_json_atomic(folder / "stats.json", job_stats)
    metrics = {"samples_in": float(job_stats["in"]), "samples_kept": float(kept), "shards": float(len(shard_stats)),
               "bytes": float(job_stats["bytes"])}
    metrics |= {f"dropped.{reason}": float(n) for reason, n in job_stats["dropped"].items()}
    return StageResult(metrics=metrics, artifacts=["shards/stats.json"])


def list_shards(folder: Path) -> list[Path]:
    """The shard files of a `write_shards` output, in name order."""
    return sorted(Path(folder).glob("*.tar"))


if __name__ == "__main__":
    import sys

    from components.common.cli import component_main

    sys.exit(component_main(write_shards))
