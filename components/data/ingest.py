"""Ingest: every configured source (and the synthetic crawl) into one sample table, on Ray Data.

Step 1 reads files into raw records (`sources.py`); step 2 decodes each image once with Pillow to
learn its real format and size and to catch corrupt bytes, and decodes captions as UTF-8. On that
same decode it computes dedup's signals (sha256, pHash, 8x8 thumbnail; `lib/signals.py`, which also
says why a JPEG's decode is DCT-scaled and how that still validates it), so no later step decodes the
image again to hash it (`data.ingest.signals: false` decodes in full with Pillow and leaves them
null). Records
that fail get a `drop_reason` (`image_corrupt`, `image_missing`, `caption_not_utf8`, `tar_truncated`,
`caption_without_image`, ...) and stay in the table; stats count them by reason.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image

from components.common.contract import StageContext, StageResult, component
from components.data.config import IngestConfig, SourceConfig
from components.data.lib.signals import image_signals
from components.data.lib.sources import RawRecord, ReadTask, fingerprint, plan_reads, read_task
from components.data.lib.table import data_dir, drop_metrics, plot_counts, rows_to_table, write_stats

PIL_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
RECORDS_PER_BLOCK = 256


def validate(record: RawRecord, max_pixels: int, signals: bool = True) -> dict[str, Any]:
    """A raw record as a sample row: image decoded to check it (and hashed on that decode when
    `signals`), caption decoded, drop reason set."""
    row: dict[str, Any] = {
        "key": record.key, "image": record.image, "image_ext": record.image_ext, "caption": None,
        "width": None, "height": None, "source": record.source,
        "meta": json.dumps(record.meta, sort_keys=True, default=str), "drop_reason": record.read_error,
    }
    if row["drop_reason"] is None and record.caption is not None:
        try:
            row["caption"] = record.caption.decode("utf-8").strip()
        except UnicodeDecodeError:
            row["drop_reason"] = "caption_not_utf8"
    if row["drop_reason"] is None:
        row.update(inspect_image(record.image, max_pixels, signals=signals))
    return row


def inspect_image(data: bytes | None, max_pixels: int, *, signals: bool = False) -> dict[str, Any]:
    """Decode fully (truncated files only fail on load) and report format, size or a drop reason;
    with `signals`, a valid image's dedup signals too, computed on this decode."""
    if not data:
        return {"drop_reason": "image_missing"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    return {"drop_reason": "image_too_large", "width": width, "height": height}
                fmt = PIL_FORMATS.get(image.format or "")
                if fmt is None:
                    return {"drop_reason": "image_format_unsupported", "width": width, "height": height}
                if signals:  # the one decode, reduced for a JPEG, that also hashes (lib/signals.py)
                    found = image_signals(data, image)
                else:
                    image.load()
                    found = {}
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return {"drop_reason": "image_too_large"}
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError, EOFError):
        return {"drop_reason": "image_corrupt"}
    return {"image_ext": fmt, "width": width, "height": height, **found}


def read_files(batch: pa.Table, max_pixels: int, signals: bool = True) -> Iterator[pa.Table]:
    """Ray Data UDF: read tasks in, validated sample rows out, a block every few hundred records."""
    rows: list[dict[str, Any]] = []
    for encoded in batch.column("task").to_pylist():
        for record in read_task(ReadTask.from_row(encoded)):
            rows.append(validate(record, max_pixels, signals))
            if len(rows) >= RECORDS_PER_BLOCK:
                yield rows_to_table(rows)
                rows = []
    if rows:
        yield rows_to_table(rows)


def crawl_as_source(folder: Path) -> SourceConfig:
    return SourceConfig(kind="webdataset", path=str(folder), name="crawl")


def ingest_fingerprint(cfg: IngestConfig) -> dict[str, Any]:
    return {"sources": [fingerprint(source) for source in cfg.sources]}


@component(
    name="ingest", version="2", config="data.ingest", inputs=("crawl",), optional_inputs=("crawl",),
    outputs=("samples",), external_fingerprint=ingest_fingerprint, key_exclude=("path",),
)
def ingest(ctx: StageContext[IngestConfig]) -> StageResult:
    import ray.data

    cfg = ctx.config
    sources = list(cfg.sources)
    if "crawl" in ctx.inputs:
        sources.insert(0, crawl_as_source(ctx.inputs["crawl"]))
    if not sources:
        raise ValueError("ingest has nothing to read: enable data.synthetic_crawl or add data.ingest.sources")
    tasks = [task for source in sources for task in plan_reads(source)]
    table = ctx.outputs["samples"]
    if tasks:
        items = [task.to_row() for task in tasks]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(read_files, fn_kwargs={"max_pixels": cfg.max_image_pixels, "signals": cfg.signals},
                            batch_size=1, batch_format="pyarrow", **cfg.resources.map_kwargs())
        ds.write_parquet(str(data_dir(table)))
    stats = write_stats(table, "ingest", upstream=None)
    metrics = drop_metrics(stats) | {"read_tasks": float(len(tasks)), "sources": float(len(sources))}
    return StageResult(metrics=metrics, artifacts=["samples/stats.json", plot_counts(table, stats)])


if __name__ == "__main__":
    import sys

    from components.common.cli import component_main

    sys.exit(component_main(ingest))
