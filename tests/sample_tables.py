"""Small sample tables written the way the data stages write them, for step tests."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from components.data.lib.table import SAMPLE_SCHEMA, data_dir, write_stats


def caption_table(folder: Path, captions: list[str]) -> Path:
    """A finished ingest-like table: one kept row per caption (placeholder image bytes) and one dropped row."""
    rows = [{"key": f"s{i:03d}", "image": b"\xff\xd8fake", "image_ext": "jpg", "caption": c, "width": 64,
             "height": 64, "source": "t", "meta": "{}", "drop_reason": None} for i, c in enumerate(captions)]
    rows.append({**rows[0], "key": "gone", "drop_reason": "image_corrupt"})
    data_dir(folder).mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), data_dir(folder) / "part.parquet")
    write_stats(folder, "ingest", upstream=None)
    return folder
