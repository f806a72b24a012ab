"""The sample table passed between data stages: a parquet folder of image-text rows, each annotated
with the reason this stage dropped it (null when kept), plus a `stats.json` whose counts add up.

Dropped rows stay in the table (nothing is lost, and filters can be scored against labels later);
the next stage reads only the kept rows. `stats.json` carries this stage's counts and the cumulative
counts since ingest, so the last stage can report in = kept + dropped for the whole job.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from components.common.cache import write_json_atomic

DATA_DIR = "data"
STATS_FILE = "stats.json"

# Dedup's per-image signals, computed on ingest's one decode (lib/signals.py); null where not computed.
SIGNAL_FIELDS = (
    pa.field("content_sha256", pa.string()),  # sha256 hex of the encoded bytes
    pa.field("phash", pa.uint64()),  # 64-bit DCT pHash
    pa.field("thumbnail", pa.binary()),  # 8x8 RGB, area-averaged (192 bytes)
)

SAMPLE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # unique across sources: <source>-<shard>-<original key>
        ("image", pa.binary()),  # the encoded bytes as found (never re-encoded)
        ("image_ext", pa.string()),  # jpg | png | webp, from the decoded format
        ("caption", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("source", pa.string()),
        ("meta", pa.string()),  # JSON: the source's own metadata (img2dataset json, cls, labels)
        *SIGNAL_FIELDS,  # dedup's signals (sha256, pHash, thumbnail) from ingest's decode; null where not computed
        ("drop_reason", pa.string()),  # null: kept by this stage
    ]
)
KEPT_SCHEMA = pa.schema([f for f in SAMPLE_SCHEMA if f.name != "drop_reason"])


class StageCounts:
    """Counts in / kept / dropped-by-reason of one stage, checked to add up."""

    def __init__(self, stage: str, dropped: Counter[str], kept: int) -> None:
        self.stage = stage
        self.dropped = Counter({k: v for k, v in dropped.items() if v})
        self.kept = kept

    @property
    def total_in(self) -> int:
        return self.kept + sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "in": self.total_in, "kept": self.kept, "dropped": dict(sorted(self.dropped.items()))}


def data_dir(table: Path) -> Path:
    return Path(table) / DATA_DIR


def read_columns(folder: Path, columns: list[str]) -> pa.Table:
    """Only `columns` of every parquet file in `folder`, read here (small columns: keys, hashes,
    scores); an empty folder gives empty columns."""
    files = sorted(str(f) for f in Path(folder).glob("*.parquet"))
    if not files:
        return pa.table({name: pa.array([], pa.null()) for name in columns})
    return pads.dataset(files, format="parquet").to_table(columns=columns)


def count_drop_reasons(table: Path) -> StageCounts:
    """Read only the `drop_reason` column of a written table and count it."""
    reasons = Counter[str]()
    kept = 0
    column = read_columns(data_dir(table), ["drop_reason"]).column(0)
    for value, count in Counter(column.to_pylist()).items():
        if value is None:
            kept += count
        else:
            reasons[value] += count
    return StageCounts(Path(table).name, reasons, kept)


def write_stats(table: Path, stage: str, upstream: Path | None) -> dict[str, Any]:
    """Write `stats.json` for a finished table: this stage's counts plus cumulative counts."""
    counts = count_drop_reasons(table)
    counts.stage = stage
    own = counts.to_dict()
    if upstream is None:
        cumulative = {"in": own["in"], "kept": own["kept"], "dropped": own["dropped"]}
    else:
        before = read_stats(upstream)["cumulative"]
        if before["kept"] != own["in"]:
            raise RuntimeError(
                f"{stage}: read {own['in']} rows but the upstream table kept {before['kept']}; rows were lost"
            )
        dropped = Counter(before["dropped"]) + Counter(own["dropped"])
        cumulative = {"in": before["in"], "kept": own["kept"], "dropped": dict(sorted(dropped.items()))}
    stats = {**own, "cumulative": cumulative}
    check_counts_add_up(stats)
    write_json_atomic(Path(table) / STATS_FILE, stats)
    return stats


def read_stats(table: Path) -> dict[str, Any]:
    return json.loads((Path(table) / STATS_FILE).read_text())


def check_counts_add_up(stats: dict[str, Any]) -> None:
    for scope in (stats, stats.get("cumulative", stats)):
        if scope["in"] != scope["kept"] + sum(scope["dropped"].values()):
            raise RuntimeError(f"counts do not add up: {scope}")


def read_kept(table: Path) -> Any:
    """The kept rows of a table as a Ray Dataset (without the `drop_reason` column)."""
    import ray.data

    files = sorted(str(f) for f in data_dir(table).glob("*.parquet"))
    if not files:
        return ray.data.from_arrow(KEPT_SCHEMA.empty_table())
    return ray.data.read_parquet(files).map_batches(_kept_rows, batch_format="pyarrow", batch_size=None)


def _kept_rows(batch: pa.Table) -> pa.Table:
    """Kept rows without `drop_reason`; columns later stages added (e.g. `clip_score`) stay."""
    kept = batch.filter(pc.is_null(batch.column("drop_reason")))
    return kept.drop_columns(["drop_reason"])


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)


def plot_counts(table: Path, stats: dict[str, Any]) -> str:
    """`drop_reasons.png` beside the table's stats: kept vs each drop reason of this stage."""
    from components.common.plots import bar_chart

    counts = {"kept": stats["kept"], **stats["dropped"]}
    bar_chart(counts, f"{stats['stage']}: {stats['in']} rows in", Path(table) / "drop_reasons.png")
    return f"{Path(table).name}/drop_reasons.png"


def drop_metrics(stats: dict[str, Any]) -> dict[str, float]:
    """Flatten stats into MLflow metrics: rows_in, rows_kept, dropped.<reason>, and cumulative ones."""
    metrics: dict[str, float] = {"rows_in": stats["in"], "rows_kept": stats["kept"]}
    metrics.update({f"dropped.{reason}": n for reason, n in stats["dropped"].items()})
    cumulative = stats.get("cumulative")
    if cumulative:
        metrics["cumulative.rows_in"] = cumulative["in"]
        metrics["cumulative.rows_kept"] = cumulative["kept"]
    return metrics
