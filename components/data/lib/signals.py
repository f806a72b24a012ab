"""Dedup's per-image signals, computed on the one decode ingest already does (issue 19).

Every image dedup compares needs three signals: `content_sha256` (exact duplicates), a 64-bit `phash`
(the LSH index's key) and an 8x8 RGB `thumbnail` (the second signal that confirms a pHash match).
Ingest decodes each image to validate it; `image_signals` is that decode, and hashes its pixels, so
the image is not decoded a second time in dedup.

Reduced decode. The pHash looks at 32x32 pixels and the thumbnail at 8x8, so the signals need only a
small image: `signal_pixels` decodes a JPEG DCT-scaled (libjpeg-turbo's 1/2, 1/4 or 1/8 scaling,
through simplejpeg) to the smallest such size at least SIGNAL_SIDE pixels on both sides, computed from the
low frequencies of each 8x8 block, so it is already low-pass filtered. libjpeg still reads the whole entropy-coded stream and
simplejpeg is strict (a warning such as a premature end of data is an error), so the scaled decode
rejects corrupt files as a full decode does (`benchmarks/cpu_path.py` checks it on the crawl's
corruptions); a JPEG simplejpeg refuses (corrupt, CMYK, ...) is decoded by Pillow, whose verdict then
stands. Other formats are decoded in full by Pillow and box-reduced by an integer factor to at least
SIGNAL_SIDE.

pHash. The classic DCT hash (Zauner; imagehash's `phash`): grey levels, area-resized to 32x32, 2-D DCT,
the 8x8 lowest frequencies compared with their median, first bit the most significant. OpenCV does
the grey conversion, the area resize and the DCT; imagehash does them with Pillow's Lanczos on the full
image and scipy's DCT, so the values differ (mean 0.7 bits on the crawl at SIGNAL_SIDE 128) while dedup's
verdicts do not get worse (`benchmarks/dedup_quality.py` measures both on the labelled crawl).
`dedup_core.phash64` remains imagehash's, as the reference.

The signals are nullable columns of the sample table: null for rows ingest dropped, and for tables
written by a producer that did not compute them (older runs, hand-made tables, earlier shards);
`add_signals` decodes and fills exactly those rows, the same way, so dedup gives the same verdicts on
any table. Every path that computes signals (ingest, `add_signals`, dedup's earlier shards) goes
through `image_signals`, so equal bytes give equal signals.
"""

from __future__ import annotations

import io
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import simplejpeg
from PIL import Image

from components.data.lib.dedup_core import content_hash
from components.data.lib.table import SIGNAL_FIELDS  # the columns, declared with the sample table

THUMB_SIDE = 8
PHASH_SIDE = 32  # the pHash's DCT input, hash_size 8 x highfreq_factor 4 as imagehash
SIGNAL_SIDE = 32  # the signals' decode: at least this many pixels a side (never upscaled past the file)
SIGNAL_NAMES = tuple(field.name for field in SIGNAL_FIELDS)


def signal_pixels(data: bytes, image: Image.Image, side: int = SIGNAL_SIDE) -> np.ndarray:
    """The image's pixels as (h, w, 3) uint8 RGB, reduced to at least side x side where the file is
    larger; decoding fully validates the file (raises what Pillow's `load` raises for a corrupt one).
    `image` is the lazily opened file (Pillow read only its header)."""
    if image.format == "JPEG":
        width, height = image.size
        factor = 8  # libjpeg-turbo's fast scalings are 1/1, 1/2, 1/4, 1/8; other M/8 use a slow IDCT
        while factor > 1 and min(width, height) // factor < side:
            factor //= 2
        scaled = {"min_width": -(-width // factor), "min_height": -(-height // factor)} if factor > 1 else {}
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", **scaled)
        except ValueError:
            pass  # corrupt or unsupported here (e.g. CMYK): Pillow decides below
    image.load()
    rgb = image.convert("RGB")  # alpha dropped, palettes expanded: as the thumbnail always did
    factor = max(1, min(rgb.size) // side)
    return np.asarray(rgb.reduce(factor) if factor > 1 else rgb)


def phash_pixels(rgb: np.ndarray) -> int:
    """The 64-bit DCT pHash of RGB pixels, as an unsigned int, first DCT bit most significant."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, (PHASH_SIDE, PHASH_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8]
    ordered = np.sort(low, axis=None)
    bits = low > (ordered[31] + ordered[32]) / 2  # np.median's value (float32), at a tenth of its cost
    return int.from_bytes(np.packbits(bits.reshape(-1)).tobytes(), "big")


def thumbnail_pixels(rgb: np.ndarray) -> bytes:
    """The second signal: an 8x8 RGB area-averaged thumbnail (192 bytes)."""
    return cv2.resize(rgb, (THUMB_SIDE, THUMB_SIDE), interpolation=cv2.INTER_AREA).tobytes()


def image_signals(data: bytes, image: Image.Image, side: int = SIGNAL_SIDE) -> dict[str, Any]:
    """Decode (reduced) and hash one image: its three signals. `image` is the opened, not yet loaded file;
    `side` other than SIGNAL_SIDE only for measuring (benchmarks/dedup_quality.py)."""
    rgb = signal_pixels(data, image, side)
    return {"content_sha256": content_hash(data), "phash": phash_pixels(rgb), "thumbnail": thumbnail_pixels(rgb)}


def decode_signals(data: bytes, side: int = SIGNAL_SIDE) -> dict[str, Any]:
    """The signals of encoded bytes, decoded the way ingest decodes them."""
    with Image.open(io.BytesIO(data)) as image:
        return image_signals(data, image, side)


def add_signals(batch: pa.Table, side: int = SIGNAL_SIDE) -> pa.Table:
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
        for name, value in decode_signals(images[i].as_py(), side).items():
            columns[name][i] = value
    batch = batch.drop_columns([name for name in SIGNAL_NAMES if name in batch.column_names])
    for field in SIGNAL_FIELDS:
        batch = batch.append_column(field, pa.array(columns[field.name], field.type))
    return batch
