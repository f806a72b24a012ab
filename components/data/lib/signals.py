"""Dedup's per-image signals, computed on the one decode ingest already does (issue 19).

Every image dedup compares needs three signals: `content_sha256` (exact duplicates), a 64-bit `phash`
(the LSH index's key) and an 8x8 RGB `thumbnail` (the second signal that confirms a pHash match).
Ingest decodes each image to validate it; `image_signals` hashes that decoded image, so the image is
not decoded a second time in dedup.

The decode is drafted: a JPEG is decoded DCT-scaled (libjpeg's 1/2, 1/4 or 1/8 scaling, `Image.draft`)
to the smallest size at least SIGNAL_DRAFT pixels on both sides. libjpeg still reads the whole
entropy-coded stream, so a drafted decode rejects the same corrupt files (`benchmarks/cpu_path.py`
checks it), and the pHash (32x32) and thumbnail (8x8) need far fewer pixels than a full decode gives.
The pHash is imagehash's pHash of that decode, so for a JPEG larger than 2 x SIGNAL_DRAFT it is not
bit-identical to imagehash's pHash of the full image (`benchmarks/dedup_quality.py` measures dedup
on both); PNG and WebP are decoded in full. Every path that computes signals (ingest, `add_signals`
for rows without them, dedup's earlier shards) drafts the same way, so equal bytes give equal signals.

The signals are nullable columns of the sample table:
null for rows ingest dropped, and for tables written by a producer that did not compute them (older
runs, hand-made tables, earlier shards); `add_signals` decodes and fills exactly those rows, so
dedup gives the same verdicts on any table.
"""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from components.data.lib.dedup_core import content_hash, phash64

THUMB_SIDE = 8
SIGNAL_DRAFT = 128  # JPEGs decoded DCT-scaled to >= this many pixels a side for the signals (0: full decode)
SIGNAL_FIELDS = (
    pa.field("content_sha256", pa.string()),  # sha256 hex of the encoded bytes
    pa.field("phash", pa.uint64()),  # imagehash's pHash (hash_size 8) as an unsigned int
    pa.field("thumbnail", pa.binary()),  # 8x8 RGB, box-filtered (192 bytes)
)
SIGNAL_NAMES = tuple(field.name for field in SIGNAL_FIELDS)


def thumbnail(image: Image.Image) -> bytes:
    """The second signal: an 8x8 RGB box-filtered thumbnail (192 bytes)."""
    return image.convert("RGB").resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX).tobytes()


def draft_for_signals(image: Image.Image, side: int = SIGNAL_DRAFT) -> None:
    """Before `load()`: ask a JPEG's decoder for a DCT-scaled decode of at least side x side (no-op for
    other formats and for side 0). The size the file declares must be read before this."""
    if side and image.format == "JPEG":
        image.draft(image.mode, (side, side))


def image_signals(data: bytes, image: Image.Image) -> dict[str, Any]:
    """The three signals of one image, from its encoded bytes and its loaded decode."""
    return {"content_sha256": content_hash(data), "phash": phash64(image), "thumbnail": thumbnail(image)}


def decode_signals(data: bytes, draft: int = SIGNAL_DRAFT) -> dict[str, Any]:
    """The signals of encoded bytes, decoded (drafted) the way ingest decodes them."""
    with Image.open(io.BytesIO(data)) as image:
        draft_for_signals(image, draft)
        image.load()
        return image_signals(data, image)


def add_signals(batch: pa.Table, draft: int = SIGNAL_DRAFT) -> pa.Table:
    """Ray Data UDF: the batch with all three signal columns filled. Rows that already carry them (from
    ingest's decode) are kept as they are; the others, or every row when the columns are absent, are
    decoded once here. Returns the signal columns at the end, in SIGNAL_FIELDS order."""
    n = batch.num_rows
    if all(name in batch.column_names for name in SIGNAL_NAMES):
        missing = pc.or_(pc.or_(pc.is_null(batch.column("content_sha256")), pc.is_null(batch.column("phash"))),
                         pc.is_null(batch.column("thumbnail")))
        todo = [i for i, m in enumerate(missing.to_pylist()) if m]
        if not todo:
            return batch
        columns = {name: batch.column(name).to_pylist() for name in SIGNAL_NAMES}
    else:
        todo = list(range(n))
        columns = {name: [None] * n for name in SIGNAL_NAMES}
    images = batch.column("image")
    for i in todo:
        for name, value in decode_signals(images[i].as_py(), draft).items():
            columns[name][i] = value
    batch = batch.drop_columns([name for name in SIGNAL_NAMES if name in batch.column_names])
    for field in SIGNAL_FIELDS:
        batch = batch.append_column(field, pa.array(columns[field.name], field.type))
    return batch
